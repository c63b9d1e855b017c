//! `rudder llmrec …`: language-model recommenders on LLaRA/S-DPO data: the sequential
//! baselines (sasrec, gru4rec, caser), LoRA training of a rudder-lm model (sft, dpo, sdpo) and
//! evaluation (eval). See docs/llmrec.md.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use rand::seq::SliceRandom;
use rudder_data::sequences::SeqSample;
use rudder_llmrec::data::{Catalog, RecExample, Unknown, from_prompts, from_sequences};
use rudder_llmrec::hybrid::attach_hybrid;
use rudder_llmrec::ilora::{Curriculum, SeqConditioner};
use rudder_llmrec::lmdata::{LmExample, Tokenize, tokenize};
use rudder_llmrec::lmeval::{
    GenSummary, candidate_logps, generate_answers, likelihood_report, summarize,
};
use rudder_llmrec::lmtrain::{
    Conditioner, EvalRecord, LmObserver, LmTrainConfig, Objective, RunFiles, StepRecord,
};
use rudder_llmrec::prompts::Templates;
use rudder_llmrec::seqrec::{SeqConfig, SeqKind};
use rudder_llmrec::seqtrain::{self, SeqEpoch, SeqObserver};
use rudder_lm::loader::LanguageModel;
use rudder_lm::lora::{LoraConfig, Target};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::runs::RunDir;
use crate::steer_cmd::StepBars;

#[derive(Subcommand)]
pub enum LlmrecCmd {
    /// Train SASRec (the LLaRA variant) on the sequences; evaluate by full ranking and on the
    /// 20-candidate protocol.
    Sasrec(SeqArgs),
    /// Train GRU4Rec (same data, loss and evaluation as sasrec).
    Gru4rec(SeqArgs),
    /// Train Caser (same data, loss and evaluation as sasrec).
    Caser(SeqArgs),
    /// Supervised fine-tuning of a LoRA adapter: cross-entropy on the answer title.
    Sft(LmTrainArgs),
    /// DPO from an SFT adapter: one rejected candidate per example.
    Dpo(LmTrainArgs),
    /// S-DPO from an SFT adapter: softmax preference loss over k rejected candidates.
    Sdpo(LmTrainArgs),
    /// LLaRA: hybrid prompts (the frozen SASRec's item embeddings, projected into the model at a
    /// marker after every title) and one LoRA, trained by SFT with the text→hybrid curriculum.
    Llara(HybridArgs),
    /// iLoRA: LLaRA with a mixture of LoRA experts (K splitting the rank) mixed per sequence by a
    /// router over the frozen SASRec user vector.
    Ilora(HybridArgs),
    /// Evaluate a model (optionally with a LoRA adapter): greedy generation read by S-DPO's and
    /// LLaRA's rules (HR@1, ValidRatio), and likelihood ranking of the 20 candidates. A LLaRA or
    /// iLoRA adapter folder (with hybrid.json) is evaluated on hybrid prompts with its gate.
    Eval(EvalArgs),
    /// Build LLaRA-format training sequences from ratings (LLaRA ships MovieLens-100K val/test
    /// rows but no training rows): ratings ≥ --min-rating in time order, the held-out rows'
    /// users found in the ratings and left out, one sliding-window row per interaction of every
    /// other user. Writes OUT/train.jsonl, copies the held-out files and u.item / id2name.txt
    /// beside it (so `--seqs OUT` works) and OUT/build.json with what was matched.
    Sequences(SequencesArgs),
}

#[derive(Args, Clone)]
pub struct SequencesArgs {
    /// Rated, timestamped interactions: a fetched asset (ml-100k), a RecBole atomic folder or a
    /// raw ML-100K folder.
    #[arg(long, default_value = "ml-100k")]
    pub ratings: String,
    /// The LLaRA folder whose held-out rows (val.jsonl, test.jsonl) and item names the training
    /// rows must fit, e.g. ../shared/data/llara/movielens. With u.item a rating's item id N is
    /// row N − 1 (ML-100K ids start at 1); with id2name.txt it is id N.
    #[arg(long)]
    pub llara: PathBuf,
    /// Keep interactions rated at least this (3: no lower rating occurs in LLaRA's rows).
    #[arg(long, default_value_t = 3.0)]
    pub min_rating: f32,
    /// History window of a row.
    #[arg(long, default_value_t = 10)]
    pub window: usize,
    /// How many interactions beyond a held-out row's own length the matched user's tail may
    /// hold (order within one timestamp is not recoverable, so rows are matched as sets).
    #[arg(long, default_value_t = 10)]
    pub max_slack: usize,
    /// Output folder.
    #[arg(long, short)]
    pub out: PathBuf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RouterArg {
    /// The reference's ResNet-1D router (batch norm, ~90K parameters).
    Resnet,
    /// Ablation: softmax of a linear map of the user vector, one gate for every layer.
    Linear,
    /// The reference's per-layer Dense gates: each layer its own softmax(W_l u).
    Layer,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum CurriculumArg {
    /// Hybrid probability ramps from 0 to 1 over the run (what LLaRA describes).
    Linear,
    /// The reference as coded: ramps 0 → 1/epochs within each epoch and resets.
    Faithful,
    /// Always hybrid.
    Hybrid,
    /// Text-only training batches (evaluation is still hybrid).
    Text,
}

#[derive(Args, Clone)]
pub struct HybridArgs {
    #[command(flatten)]
    pub train: LmTrainArgs,
    /// The SASRec run folder (`rudder llmrec sasrec --out RUN`) on the same item set; its item
    /// embeddings and user vectors are used frozen. Required except with --resume.
    #[arg(long)]
    pub sasrec: Option<PathBuf>,
    /// iLoRA experts splitting the LoRA rank (must divide --rank).
    #[arg(long, default_value_t = 4)]
    pub experts: usize,
    /// iLoRA gate network.
    #[arg(long, value_enum, default_value = "resnet")]
    pub router: RouterArg,
    /// Mix of text-only and hybrid training batches.
    #[arg(long, value_enum, default_value = "linear")]
    pub curriculum: CurriculumArg,
    /// The reference's curriculum as coded (same as --curriculum faithful).
    #[arg(long)]
    pub faithful: bool,
}

/// What a LLaRA / iLoRA run adds to an SFT run (config.toml `[hybrid]`, and
/// `adapter/hybrid.json` for evaluation).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
struct HybridConfig {
    method: String,
    sasrec: PathBuf,
    experts: usize,
    router: rudder_llmrec::router::RouterKind,
    curriculum: rudder_llmrec::ilora::Curriculum,
}

#[derive(Deserialize)]
struct SavedSeqRun {
    model: SeqConfig,
}

/// The trained sequential model of a run folder, checked against the data's item count.
fn load_seq_run(
    dir: &Path,
    n_items: usize,
) -> Result<(
    Box<dyn rudder_llmrec::seqrec::SeqModel + Send + Sync>,
    SeqConfig,
)> {
    let p = dir.join("config.toml");
    let text = std::fs::read_to_string(&p)
        .with_context(|| format!("--sasrec {}: no run config", p.display()))?;
    let rc: SavedSeqRun = toml::from_str(&text)
        .with_context(|| format!("{}: not a sequential-model run config", p.display()))?;
    let model = seqtrain::build(n_items, &rc.model)?;
    let w = dir.join("model.safetensors");
    let map = rudder_nn::checkpoint::load(&w, &candle_core::Device::Cpu)
        .with_context(|| format!("{}", w.display()))?;
    seqtrain::load_params(model.as_ref(), &map, &w)?;
    Ok((model, rc.model))
}

fn build_conditioner(
    h: &HybridConfig,
    n_items: usize,
    lm: &LanguageModel,
    seed: u64,
) -> Result<SeqConditioner> {
    let (seq, sc) = load_seq_run(&h.sasrec, n_items)?;
    let router = (h.method == "ilora").then_some((h.router, h.experts));
    Ok(SeqConditioner::new(
        seq,
        sc.window,
        n_items,
        lm.decoder.cfg.hidden_size,
        lm.decoder.cfg.num_layers,
        router,
        h.curriculum,
        seed,
    )?)
}

#[derive(Args, Clone, Serialize, Deserialize, Debug, PartialEq)]
pub struct DataArgs {
    /// LLaRA folder: train/val/test.jsonl (10 ids right-padded with the pad id) and id2name.txt
    /// (e.g. ../shared/data/llara/lastfm). Required (except with --resume).
    #[arg(long)]
    pub seqs: Option<PathBuf>,
    /// S-DPO prompt folder (val.json / test.json: historyList, itemList, trueSelection) for the
    /// validation and test questions; without it they are built from val/test.jsonl with
    /// S-DPO's candidate rule. Records naming titles absent from id2name are skipped (counted
    /// in the summary).
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// Candidates per question (target included).
    #[arg(long, default_value_t = 20)]
    pub candidates: usize,
    /// Evaluate on at most this many test questions (a fixed seeded subset, the same for every
    /// command, so runs compare on the same questions).
    #[arg(long)]
    pub max_test: Option<usize>,
    /// Seed of the candidate sets built from sequences.
    #[arg(long, default_value_t = 1958)]
    pub data_seed: u64,
}

struct Data {
    catalog: Catalog,
    train: Vec<SeqSample>,
    val_rows: Vec<SeqSample>,
    test_rows: Vec<SeqSample>,
    val_ex: Vec<RecExample>,
    test_ex: Vec<RecExample>,
    notes: Vec<String>,
}

fn subset<T: Clone>(v: Vec<T>, max: Option<usize>, key: u64) -> Vec<T> {
    match max {
        Some(m) if m < v.len() => {
            let mut idx: Vec<usize> = (0..v.len()).collect();
            idx.shuffle(&mut rudder_data::rng::stream(0, &[key]));
            let mut keep: Vec<usize> = idx.into_iter().take(m).collect();
            keep.sort_unstable();
            keep.into_iter().map(|i| v[i].clone()).collect()
        }
        _ => v,
    }
}

impl DataArgs {
    fn seqs(&self) -> Result<&Path> {
        self.seqs.as_deref().context(
            "--seqs is required (the LLaRA sequence folder, e.g. ../shared/data/llara/lastfm)",
        )
    }
}

fn load_data(a: &DataArgs) -> Result<Data> {
    let seqs = a.seqs()?;
    let ds = rudder_data::formats::llara::read_dir(seqs)?;
    let names = ds.item_names.clone().with_context(|| {
        format!(
            "{}: no id2name.txt or u.item with the item names",
            seqs.display()
        )
    })?;
    let catalog = Catalog::new(names);
    let n = catalog.n_items();
    let split = |s: &str| {
        ds.splits
            .iter()
            .find(|(k, _)| k == s)
            .map(|(_, v)| v.clone())
    };
    let train = split("train").unwrap_or_default();
    let val_rows = split("val").unwrap_or_default();
    let test_rows = split("test").unwrap_or_default();
    let mut notes = Vec::new();
    let (val_ex, test_ex) = match &a.prompts {
        Some(p) => {
            let pd = rudder_data::formats::llara::read_prompt_dir(p)?;
            let mut get = |s: &str| -> Result<Vec<RecExample>> {
                let Some((_, recs)) = pd.splits.iter().find(|(k, _)| k == s) else {
                    return Ok(Vec::new());
                };
                let src = p.join(format!("{s}.json"));
                let (ex, skipped, first) = from_prompts(recs, &catalog, Unknown::Skip, &src)?;
                if skipped > 0 {
                    notes.push(format!(
                        "{}: {skipped} of {} records skipped, their titles are not in the item names (first: {:?})",
                        src.display(),
                        recs.len(),
                        first.unwrap_or_default()
                    ));
                }
                Ok(ex)
            };
            let v = get("val")?;
            let t = get("test")?;
            (v, t)
        }
        None => {
            let build = |rows: &[SeqSample], name: &str| {
                from_sequences(rows, n, 1, a.candidates, a.data_seed, &seqs.join(name))
            };
            (
                build(&val_rows, "val.jsonl")?,
                build(&test_rows, "test.jsonl")?,
            )
        }
    };
    let n_test = test_ex.len();
    let test_ex = subset(test_ex, a.max_test, 0x7E57);
    if test_ex.len() < n_test {
        notes.push(format!(
            "test: a fixed subset of {} of the {n_test} questions",
            test_ex.len()
        ));
    }
    Ok(Data {
        catalog,
        train,
        val_rows,
        test_rows,
        val_ex,
        test_ex,
        notes,
    })
}

#[derive(Args, Clone)]
pub struct SeqArgs {
    #[command(flatten)]
    pub data: DataArgs,
    #[arg(long, default_value_t = 100)]
    pub epochs: usize,
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    /// L2 coefficient (PyTorch Adam weight_decay); the shipped SASRec checkpoints used 1e-4.
    #[arg(long, default_value_t = 1e-4)]
    pub l2: f64,
    #[arg(long, default_value_t = 256)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 64)]
    pub hidden: usize,
    #[arg(long, default_value_t = 0.1)]
    pub dropout: f64,
    /// Stop after this many epochs without a better validation NDCG@10 (0 = never).
    #[arg(long, default_value_t = 10)]
    pub patience: usize,
    /// What picks the kept epoch: `full` = NDCG@10 of the full-catalogue ranking of val.jsonl's
    /// rows (the reference's rule); `candidates` = NDCG@10 of the target among each validation
    /// question's candidates (S-DPO's val.json with --prompts, else built from val.jsonl): a
    /// denser signal when val.jsonl is small (122 rows on LastFM against 2,767 prompts).
    #[arg(long, value_enum, default_value_t = SelectBy::Full)]
    pub select_by: SelectBy,
    #[arg(long, default_value_t = 1234)]
    pub seed: u64,
    /// Run folder.
    #[arg(long, short)]
    pub out: PathBuf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SelectBy {
    Full,
    Candidates,
}

#[derive(Serialize)]
struct SeqRunConfig<'a> {
    data: &'a DataArgs,
    model: &'a SeqConfig,
    select_by: SelectBy,
}

struct SeqBars {
    bars: StepBars,
    epoch: usize,
    steps: usize,
    done: usize,
}

impl SeqObserver for SeqBars {
    fn epoch_start(&mut self, epoch: usize, steps: usize) {
        self.epoch = epoch;
        self.steps = steps;
        self.done = 0;
    }
    fn step_done(&mut self) {
        self.done += 1;
        if self.done.is_multiple_of(20) || self.done == self.steps {
            self.bars
                .update(&format!("epoch {}", self.epoch + 1), self.done, self.steps);
        }
    }
    fn epoch_done(&mut self, r: &SeqEpoch) {
        self.bars.finish();
        let hit = match (r.valid_hit20, r.valid_hit1) {
            (Some(h), _) => format!("HR@20 {h:.4}"),
            (None, Some(h)) => format!("candidates: HR@1 {h:.4}"),
            (None, None) => String::new(),
        };
        eprintln!(
            "epoch {:>3}  loss {:.4}  valid NDCG@10 {:.4}  {hit}  ({:.1} s)",
            r.epoch + 1,
            r.loss,
            r.valid_ndcg10,
            r.seconds
        );
    }
}

fn run_seq(kind: SeqKind, a: SeqArgs) -> Result<()> {
    let d = load_data(&a.data)?;
    anyhow::ensure!(
        !d.train.is_empty(),
        "{}: no train.jsonl",
        a.data.seqs()?.display()
    );
    anyhow::ensure!(
        !d.val_rows.is_empty(),
        "{}: no val.jsonl",
        a.data.seqs()?.display()
    );
    let cfg = SeqConfig {
        hidden: a.hidden,
        dropout: a.dropout,
        lr: a.lr,
        l2: a.l2,
        batch_size: a.batch_size,
        epochs: a.epochs,
        patience: a.patience,
        seed: a.seed,
        ..SeqConfig::new(kind)
    };
    let run = RunDir::create(&a.out)?;
    run.write_config(&SeqRunConfig {
        data: &a.data,
        model: &cfg,
        select_by: a.select_by,
    })?;
    let n = d.catalog.n_items();
    let model = seqtrain::build(n, &cfg)?;
    let mut obs = SeqBars {
        bars: StepBars::default(),
        epoch: 0,
        steps: 0,
        done: 0,
    };
    let t0 = std::time::Instant::now();
    let valid = match a.select_by {
        SelectBy::Full => seqtrain::Validation::Full(&d.val_rows),
        SelectBy::Candidates => seqtrain::Validation::Candidates(&d.val_ex),
    };
    let rep = seqtrain::train(model.as_ref(), &cfg, n, &d.train, valid, &mut obs)?;
    let train_s = t0.elapsed().as_secs_f64();
    let params: Vec<(String, candle_core::Tensor)> = model
        .params()
        .into_iter()
        .map(|(k, v)| (k, v.as_tensor().clone()))
        .collect();
    rudder_nn::checkpoint::save(&params, &run.path.join("model.safetensors"))?;
    let ks = [1, 5, 10, 20];
    let full = (!d.test_rows.is_empty())
        .then(|| seqtrain::eval_full(model.as_ref(), &d.test_rows, n, cfg.window, &ks))
        .transpose()?;
    let cand = seqtrain::eval_candidates(model.as_ref(), &d.test_ex, n, cfg.window, &[1, 5, 10])?;
    let mut lines: Vec<serde_json::Value> = rep
        .epochs
        .iter()
        .map(|e| serde_json::to_value(e).unwrap_or_default())
        .collect();
    let result = json!({
        "kind": "test",
        "model": kind.name(),
        "best_epoch": rep.best_epoch + 1,
        "selected_by": a.select_by,
        "train_seconds": train_s,
        "full_ranking": full.as_ref().map(|r| &r.means),
        "full_ranking_rows": full.as_ref().map(|r| r.n_users),
        "candidates": &cand.means,
        "candidate_questions": cand.n_users,
    });
    lines.push(result.clone());
    run.write_metrics(&lines)?;
    crate::steer_cmd::write_json(&run.path.join("results.json"), &result)?;
    let on = match a.select_by {
        SelectBy::Full => format!("full ranking of {} rows", d.val_rows.len()),
        SelectBy::Candidates => format!("candidates of {} questions", d.val_ex.len()),
    };
    let mut md = format!(
        "# {} on {}\n\nTrained {} epochs ({:.0} s), best validation NDCG@10 ({on}) at epoch {}.\n\n",
        kind.name(),
        a.data.seqs()?.display(),
        rep.epochs.len(),
        train_s,
        rep.best_epoch + 1
    );
    md += "## LLM protocol: rank the 20 candidates (every answer valid)\n\n| questions | HR@1 | HR@5 | NDCG@5 | NDCG@10 |\n|---:|---:|---:|---:|---:|\n";
    md += &format!(
        "| {} | {:.4} | {:.4} | {:.4} | {:.4} |\n\n",
        cand.n_users,
        cand.get("hit", 1),
        cand.get("hit", 5),
        cand.get("ndcg", 5),
        cand.get("ndcg", 10)
    );
    if let Some(f) = &full {
        md += "## Full ranking of the next item (whole catalogue)\n\n| rows | HR@1 | HR@5 | HR@10 | HR@20 | NDCG@10 | NDCG@20 |\n|---:|---:|---:|---:|---:|---:|---:|\n";
        md += &format!(
            "| {} | {:.4} | {:.4} | {:.4} | {:.4} | {:.4} | {:.4} |\n\n",
            f.n_users,
            f.get("hit", 1),
            f.get("hit", 5),
            f.get("hit", 10),
            f.get("hit", 20),
            f.get("ndcg", 10),
            f.get("ndcg", 20)
        );
    }
    for n in &d.notes {
        md += &format!("- {n}\n");
    }
    run.write_summary(&md)?;
    let loss: Vec<(f64, f64)> = rep
        .epochs
        .iter()
        .map(|e| ((e.epoch + 1) as f64, e.loss))
        .collect();
    let nd: Vec<(f64, f64)> = rep
        .epochs
        .iter()
        .map(|e| ((e.epoch + 1) as f64, e.valid_ndcg10))
        .collect();
    if let Err(e) = crate::plots::lines(
        &run.path.join("loss.png"),
        "training loss (BCE)",
        "epoch",
        &[("loss", loss)],
    )
    .and_then(|_| {
        crate::plots::lines(
            &run.path.join("valid.png"),
            &format!("validation NDCG@10 ({on})"),
            "epoch",
            &[("NDCG@10", nd)],
        )
    }) {
        tracing::warn!("plots skipped: {e}");
    }
    print!("{md}");
    Ok(())
}

#[derive(Args, Clone)]
pub struct LmModelArgs {
    /// A model folder, .gguf file or fetched asset name; trained and evaluated in f32 (GGUF
    /// weights are dequantized).
    #[arg(long, short, default_value = "smollm2-135m-instruct")]
    pub model: String,
    /// Prompt templates: music (S-DPO's 10 LastFM templates), movie (its 15 MovieLens
    /// templates) or a file with one template per line ([HistoryHere], [CansHere]).
    #[arg(long, default_value = "music")]
    pub templates: String,
    /// Prompts longer than this keep their last tokens (after BOS).
    #[arg(long, default_value_t = 512)]
    pub max_prompt_tokens: usize,
}

#[derive(Args, Clone)]
pub struct LmTrainArgs {
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub lm: LmModelArgs,
    /// Start from this adapter (PEFT folder; DPO/S-DPO: the SFT adapter, which is also the
    /// frozen reference). Without it a fresh LoRA is created.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Continue an interrupted run from its folder (all settings come from its config.toml).
    #[arg(long, conflicts_with = "out")]
    pub resume: Option<PathBuf>,
    /// Run folder.
    #[arg(long, short)]
    pub out: Option<PathBuf>,
    /// Train on a fixed seeded subset of this many examples (the full LastFM set is 47,872).
    #[arg(long)]
    pub max_train: Option<usize>,
    /// Validate on a fixed subset of this many questions.
    #[arg(long, default_value_t = 200)]
    pub max_val: usize,
    /// Learning rate (reference: 1e-5 at 5 (SFT) / 3 (DPO) epochs of 47,872 examples).
    #[arg(long)]
    pub lr: Option<f64>,
    #[arg(long)]
    pub epochs: Option<f64>,
    /// Examples per forward/backward pass.
    #[arg(long, default_value_t = 4)]
    pub micro_batch: usize,
    /// Examples per optimizer step (reference 128), reached by gradient accumulation.
    #[arg(long, default_value_t = 128)]
    pub batch: usize,
    /// Validate and checkpoint every this many epochs (reference: 0.2 SFT, 0.1 DPO).
    #[arg(long)]
    pub eval_every: Option<f64>,
    #[arg(long, default_value_t = 1.0)]
    pub beta: f64,
    /// S-DPO negatives per example (DPO always uses 1).
    #[arg(long, default_value_t = 3)]
    pub negatives: usize,
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    #[arg(long, default_value_t = 32.0)]
    pub alpha: f64,
    #[arg(long, default_value_t = 0.1)]
    pub lora_dropout: f64,
    /// Projections to adapt, comma-separated (q,k,v,o,gate,up,down).
    #[arg(long, default_value = "q,k,v,o,gate,up,down")]
    pub targets: String,
    #[arg(long, default_value_t = 0.05)]
    pub warmup_ratio: f64,
    #[arg(long, default_value_t = 0.3)]
    pub max_grad_norm: f64,
    /// Run each answer as a full sequence instead of branching from the shared prompt.
    #[arg(long)]
    pub no_prefix_sharing: bool,
    /// Recompute the reference log-probabilities every step instead of caching them once.
    #[arg(long)]
    pub no_reference_cache: bool,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
struct LmRunConfig {
    data: DataArgs,
    model: String,
    templates: String,
    init_adapter: Option<PathBuf>,
    max_train: Option<usize>,
    max_val: usize,
    tokenize: Tokenize,
    train: LmTrainConfig,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    hybrid: Option<HybridConfig>,
}

struct LmBars {
    bars: StepBars,
    total: u64,
}

impl LmObserver for LmBars {
    fn progress(&mut self, phase: &str, done: usize, total: usize) {
        if !phase.starts_with("train") {
            self.bars.update(phase, done, total);
        }
    }
    fn step(&mut self, r: &StepRecord) {
        self.bars
            .update("train (steps)", r.step as usize, self.total as usize);
        let rw = r
            .rewards
            .as_ref()
            .map(|w| format!("  reward margin {:+.3}  acc {:.2}", w.margin, w.accuracy))
            .unwrap_or_default();
        tracing::info!(
            "step {}/{}  loss {:.4}  lr {:.2e}  |g| {:.3}  {:.0} tok/s{rw}",
            r.step,
            self.total,
            r.loss,
            r.lr,
            r.grad_norm,
            r.tokens_per_s
        );
    }
    fn eval(&mut self, r: &EvalRecord) {
        self.bars.finish();
        let rw = r
            .val_rewards
            .as_ref()
            .map(|w| format!("  reward accuracy {:.3}", w.accuracy))
            .unwrap_or_default();
        eprintln!(
            "step {:>5} (epoch {:.2})  validation loss {:.4}{rw}{}",
            r.step,
            r.epoch,
            r.val_loss,
            if r.best { "  (best)" } else { "" }
        );
    }
}

fn templates(spec: &str) -> Result<Templates> {
    match Templates::builtin(spec) {
        Some(t) => Ok(t),
        None => Ok(Templates::from_file(Path::new(spec))?),
    }
}

/// Training and evaluation run in f32 (GGUF weights dequantized).
fn open_lm(model: &str) -> Result<LanguageModel> {
    crate::lm_cmd::open(&crate::lm_cmd::ModelArgs {
        model: model.to_string(),
        dequantize: true,
        adapter: None,
    })
}

fn parse_targets(s: &str) -> Result<Vec<Target>> {
    s.split(',')
        .filter(|x| !x.trim().is_empty())
        .map(|x| {
            Target::parse(x)
                .with_context(|| format!("--targets: {x:?} is not one of q,k,v,o,gate,up,down"))
        })
        .collect()
}

fn run_lm_train(
    objective: Objective,
    a: LmTrainArgs,
    hy: Option<(&str, HybridArgs)>,
) -> Result<()> {
    let method = hy
        .as_ref()
        .map_or(objective.name(), |(m, _)| *m)
        .to_string();
    let (rc, dir, resume) = match &a.resume {
        Some(dir) => {
            let p = dir.join("config.toml");
            let text = std::fs::read_to_string(&p).with_context(|| format!("{}", p.display()))?;
            let rc: LmRunConfig = toml::from_str(&text)
                .with_context(|| format!("{}: not a llmrec training config", p.display()))?;
            let was = rc
                .hybrid
                .as_ref()
                .map_or(rc.train.objective.name().to_string(), |h| h.method.clone());
            anyhow::ensure!(
                was == method,
                "{} is a {was} run, not {method}",
                dir.display(),
            );
            anyhow::ensure!(
                dir.join("checkpoint.safetensors").exists(),
                "{}: no checkpoint.safetensors (the run finished, or never reached its first validation)",
                dir.display()
            );
            (rc, dir.clone(), true)
        }
        None => {
            a.data.seqs()?;
            let data = a.data.clone();
            let out = a
                .out
                .clone()
                .context("--out is required (the run folder)")?;
            if out.join("checkpoint.safetensors").exists() {
                bail!(
                    "{} holds an interrupted run; continue it with `--resume {}` or choose another --out",
                    out.display(),
                    out.display()
                );
            }
            let mut t = LmTrainConfig::reference(objective);
            t.lora = LoraConfig {
                r: a.rank,
                alpha: a.alpha,
                dropout: a.lora_dropout,
                targets: parse_targets(&a.targets)?,
                experts: match &hy {
                    Some(("ilora", h)) => h.experts,
                    _ => 1,
                },
            };
            let hybrid = match &hy {
                None => None,
                Some((m, h)) => {
                    // the reference's LastFM settings (train_lastfm.sh): lr 7e-4 to a floor of
                    // 1%, validated every epoch
                    t.lr = 7e-4;
                    t.eval_every = 1.0;
                    t.lr_floor = 0.01;
                    let sasrec = h
                        .sasrec
                        .clone()
                        .context("--sasrec is required (a `rudder llmrec sasrec` run folder)")?;
                    let sasrec = std::fs::canonicalize(&sasrec)
                        .with_context(|| format!("--sasrec {}", sasrec.display()))?;
                    Some(HybridConfig {
                        method: m.to_string(),
                        sasrec,
                        experts: t.lora.experts,
                        router: match h.router {
                            RouterArg::Resnet => rudder_llmrec::router::RouterKind::Resnet,
                            RouterArg::Linear => rudder_llmrec::router::RouterKind::Linear,
                            RouterArg::Layer => rudder_llmrec::router::RouterKind::Layer,
                        },
                        curriculum: match (h.faithful, h.curriculum) {
                            (true, _) | (_, CurriculumArg::Faithful) => Curriculum::Faithful,
                            (_, CurriculumArg::Linear) => Curriculum::Linear,
                            (_, CurriculumArg::Hybrid) => Curriculum::Hybrid,
                            (_, CurriculumArg::Text) => Curriculum::Text,
                        },
                    })
                }
            };
            t.beta = a.beta;
            t.negatives = if objective == Objective::Sdpo {
                a.negatives
            } else {
                1
            };
            t.lr = a.lr.unwrap_or(t.lr);
            t.epochs = a.epochs.unwrap_or(t.epochs);
            t.eval_every = a.eval_every.unwrap_or(t.eval_every);
            t.micro_batch = a.micro_batch;
            t.effective_batch = a.batch;
            t.warmup_ratio = a.warmup_ratio;
            t.max_grad_norm = a.max_grad_norm;
            t.prefix_sharing = !a.no_prefix_sharing;
            t.cache_reference = !a.no_reference_cache;
            t.seed = a.seed;
            t.validate()?;
            if objective != Objective::Sft && a.adapter.is_none() {
                tracing::warn!(
                    "no --adapter: preference training starts from a fresh LoRA (the reference is the base model)"
                );
            }
            let rc = LmRunConfig {
                data,
                model: a.lm.model.clone(),
                templates: a.lm.templates.clone(),
                init_adapter: a.adapter.clone(),
                max_train: a.max_train,
                max_val: a.max_val,
                tokenize: Tokenize {
                    seed: 1958,
                    negatives: t.negatives,
                    max_prompt_tokens: a.lm.max_prompt_tokens,
                },
                train: t,
                hybrid,
            };
            (rc, out, false)
        }
    };
    let run = RunDir::create(&dir)?;
    if !resume {
        run.write_config(&rc)?;
    }
    let d = load_data(&rc.data)?;
    anyhow::ensure!(
        !d.train.is_empty(),
        "{}: no train.jsonl",
        rc.data.seqs()?.display()
    );
    let n = d.catalog.n_items();
    let train_ex = from_sequences(
        &d.train,
        n,
        3,
        rc.data.candidates,
        rc.data.data_seed,
        &rc.data.seqs()?.join("train.jsonl"),
    )?;
    let n_all = train_ex.len();
    let train_ex = subset(train_ex, rc.max_train, 0x7A1);
    let val_ex = subset(d.val_ex.clone(), Some(rc.max_val), 0x7A2);
    anyhow::ensure!(
        !val_ex.is_empty(),
        "no validation questions (val.json / val.jsonl)"
    );
    let mut lm = open_lm(&rc.model)?;
    let tpl = templates(&rc.templates)?;
    let ctx = lm.decoder.cfg.max_position_embeddings;
    let tk_train = rc.tokenize.clone();
    let mut tr = tokenize(&train_ex, &d.catalog, &tpl, &lm.tok, ctx, &tk_train)?;
    let tk_val = Tokenize {
        seed: tk_train.seed ^ 0x5A1,
        ..tk_train.clone()
    };
    let mut va = tokenize(&val_ex, &d.catalog, &tpl, &lm.tok, ctx, &tk_val)?;
    let cond = match &rc.hybrid {
        None => None,
        Some(h) => {
            let c = build_conditioner(h, n, &lm, rc.train.seed)?;
            c.check_histories(
                train_ex.iter().map(|e| e.history.as_slice()),
                "training example",
            )?;
            c.check_histories(
                val_ex.iter().map(|e| e.history.as_slice()),
                "validation question",
            )?;
            attach_hybrid(
                &mut tr, &train_ex, &d.catalog, &tpl, &lm.tok, ctx, &tk_train,
            )?;
            attach_hybrid(&mut va, &val_ex, &d.catalog, &tpl, &lm.tok, ctx, &tk_val)?;
            Some(c)
        }
    };
    let adapter = match &rc.init_adapter {
        Some(p) => lm
            .decoder
            .load_peft(p, rc.train.seed)
            .with_context(|| format!("--adapter {}", p.display()))?,
        None => lm.decoder.attach_lora(&rc.train.lora, rc.train.seed)?,
    };
    if rc.init_adapter.is_some() && adapter.cfg.r != rc.train.lora.r {
        tracing::warn!(
            "the adapter's own rank {} and alpha {} are kept",
            adapter.cfg.r,
            adapter.cfg.alpha
        );
    }
    let files = RunFiles { dir: dir.clone() };
    if let Some(h) = &rc.hybrid {
        std::fs::create_dir_all(files.best_adapter())?;
        crate::steer_cmd::write_json(&files.best_adapter().join("hybrid.json"), &json!(h))?;
    }
    let eff = rc.train.effective_batch.min(tr.len());
    let total = ((rc.train.epochs * tr.len() as f64) / eff as f64).ceil() as u64;
    eprintln!(
        "{} on {} of {n_all} training examples ({} steps of {eff}, micro-batch {}), {} validation questions, {} adapter parameters",
        method,
        tr.len(),
        total,
        rc.train.micro_batch,
        va.len(),
        adapter.num_params()
    );
    let mut obs = LmBars {
        bars: StepBars::default(),
        total,
    };
    let t0 = std::time::Instant::now();
    let base = rc.model.clone();
    let rep = rudder_llmrec::lmtrain::train(
        &mut lm.decoder,
        &adapter,
        &rc.train,
        &tr,
        &va,
        lm.tok.pad,
        &base,
        &files,
        resume,
        cond.as_ref().map(|c| c as &dyn Conditioner),
        &mut obs,
    )?;
    obs.bars.finish();
    let secs = t0.elapsed().as_secs_f64();
    let steps = &rep.history.steps;
    let mean = |f: &dyn Fn(&StepRecord) -> f64| {
        steps.iter().map(f).sum::<f64>() / steps.len().max(1) as f64
    };
    let summary_json = json!({
        "objective": objective.name(),
        "train_examples": tr.len(),
        "val_questions": va.len(),
        "steps": rep.total_steps,
        "best_step": rep.best_step,
        "best_val_loss": rep.best_val,
        "seconds": secs,
        "seconds_per_step": mean(&|s| s.seconds),
        "tokens_per_s": mean(&|s| s.tokens_per_s),
        "truncated_prompts": tr.iter().filter(|e| e.truncated).count(),
    });
    crate::steer_cmd::write_json(&dir.join("results.json"), &summary_json)?;
    let mut md = format!(
        "# {} of {} on {}\n\n{} steps of {eff} examples ({} of {n_all} training examples, {:.2} epochs), micro-batch {}, lr {:.1e}, LoRA r {} α {} dropout {}.\n\n",
        objective.name().to_uppercase(),
        rc.model,
        rc.data.seqs()?.display(),
        rep.total_steps,
        tr.len(),
        rc.train.epochs,
        rc.train.micro_batch,
        rc.train.lr,
        adapter.cfg.r,
        adapter.cfg.alpha,
        adapter.cfg.dropout
    );
    md += &format!(
        "Best validation loss {:.4} at step {} (adapter in `adapter/`, PEFT layout). {:.1} s per step, {:.0} tokens/s.\n\n",
        rep.best_val,
        rep.best_step,
        mean(&|s| s.seconds),
        mean(&|s| s.tokens_per_s)
    );
    md += "| step | validation loss | reward accuracy |\n|---:|---:|---:|\n";
    for e in &rep.history.evals {
        md += &format!(
            "| {} | {:.4} | {} |\n",
            e.step,
            e.val_loss,
            e.val_rewards
                .as_ref()
                .map(|w| format!("{:.3}", w.accuracy))
                .unwrap_or_else(|| "–".into())
        );
    }
    if let Some(c) = &cond {
        // the best weights' gates on the validation questions
        let w = files
            .best_adapter()
            .join(rudder_llmrec::lmtrain::CONDITIONER_FILE);
        let map = rudder_nn::checkpoint::load(&w, &candle_core::Device::Cpu)
            .with_context(|| format!("{}", w.display()))?;
        c.load(&map, "", &w)?;
        let hist: Vec<&[u32]> = val_ex.iter().map(|e| e.history.as_slice()).collect();
        if let Some((_, g)) = gate_diagnostics(c, &hist, &d.train, n, &dir)? {
            md += &format!(
                "\n{}",
                g.replace(
                    "## iLoRA gates",
                    "## iLoRA gates on the validation questions"
                )
            );
        }
    }
    md += &format!(
        "\nEvaluate: `rudder llmrec eval --model {} --adapter {} --seqs {}{} --out …`\n",
        rc.model,
        dir.join("adapter").display(),
        rc.data.seqs()?.display(),
        rc.data
            .prompts
            .as_ref()
            .map(|p| format!(" --prompts {}", p.display()))
            .unwrap_or_default()
    );
    run.write_summary(&md)?;
    let loss: Vec<(f64, f64)> = steps.iter().map(|s| (s.step as f64, s.loss)).collect();
    let val: Vec<(f64, f64)> = rep
        .history
        .evals
        .iter()
        .map(|e| (e.step as f64, e.val_loss))
        .collect();
    if let Err(e) = crate::plots::lines(
        &dir.join("loss.png"),
        &format!("{} loss", objective.name()),
        "optimizer step",
        &[("train", loss), ("validation", val)],
    ) {
        tracing::warn!("plots skipped: {e}");
    }
    print!("{md}");
    Ok(())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EvalMode {
    Both,
    Likelihood,
    Generate,
}

#[derive(Args, Clone)]
pub struct EvalArgs {
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub lm: LmModelArgs,
    /// A LoRA adapter folder (PEFT layout); without it the base model is evaluated (zero-shot).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "both")]
    pub mode: EvalMode,
    /// Greedy tokens per answer (S-DPO: 20).
    #[arg(long, default_value_t = 20)]
    pub max_new_tokens: usize,
    /// Questions per batch.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Run folder.
    #[arg(long, short)]
    pub out: PathBuf,
}

struct EvalBars(StepBars);
impl LmObserver for EvalBars {
    fn progress(&mut self, phase: &str, done: usize, total: usize) {
        self.0.update(phase, done, total);
    }
}

fn run_eval(a: EvalArgs) -> Result<()> {
    let d = load_data(&a.data)?;
    anyhow::ensure!(!d.test_ex.is_empty(), "no test questions");
    let run = RunDir::create(&a.out)?;
    run.write_config(&json!({
        "data": &a.data,
        "model": a.lm.model,
        "adapter": a.adapter,
        "templates": a.lm.templates,
        "mode": a.mode,
        "max_new_tokens": a.max_new_tokens,
        "max_prompt_tokens": a.lm.max_prompt_tokens,
    }))?;
    let mut lm = open_lm(&a.lm.model)?;
    let adapter = match &a.adapter {
        Some(p) => Some(
            lm.decoder
                .load_peft(p, 0)
                .with_context(|| format!("--adapter {}", p.display()))?,
        ),
        None => None,
    };
    let tpl = templates(&a.lm.templates)?;
    let ctx = lm.decoder.cfg.max_position_embeddings;
    let tk = Tokenize {
        seed: 1958,
        negatives: 0,
        max_prompt_tokens: a.lm.max_prompt_tokens,
    };
    let mut exs: Vec<LmExample> = tokenize(&d.test_ex, &d.catalog, &tpl, &lm.tok, ctx, &tk)?;
    // a LLaRA / iLoRA adapter: hybrid prompts, the trained projector and router
    let hybrid_file = a.adapter.as_ref().map(|p| p.join("hybrid.json"));
    let cond = match hybrid_file.filter(|f| f.exists()) {
        None => None,
        Some(f) => {
            let h: HybridConfig = serde_json::from_str(&std::fs::read_to_string(&f)?)
                .with_context(|| format!("{}: not a hybrid adapter description", f.display()))?;
            let n = d.catalog.n_items();
            let c = build_conditioner(&h, n, &lm, 0)?;
            let w = f.with_file_name(rudder_llmrec::lmtrain::CONDITIONER_FILE);
            let map = rudder_nn::checkpoint::load(&w, &candle_core::Device::Cpu)
                .with_context(|| format!("{}", w.display()))?;
            c.load(&map, "", &w)?;
            c.check_histories(
                d.test_ex.iter().map(|e| e.history.as_slice()),
                "test question",
            )?;
            attach_hybrid(&mut exs, &d.test_ex, &d.catalog, &tpl, &lm.tok, ctx, &tk)?;
            Some((c, h))
        }
    };
    let conditioned = match (&cond, &adapter) {
        (Some((c, _)), Some(ad)) => Some((c as &dyn Conditioner, ad)),
        _ => None,
    };
    let mut obs = EvalBars(StepBars::default());
    let mut result =
        json!({"kind": "test", "model": a.lm.model, "adapter": a.adapter, "questions": exs.len()});
    let label = a
        .adapter
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "zero-shot".into());
    let mut md = format!(
        "# {} ({label}) on {}\n\n{} test questions.\n\n",
        a.lm.model,
        a.data.seqs()?.display(),
        exs.len()
    );
    if a.mode != EvalMode::Generate {
        let t0 = std::time::Instant::now();
        let s = candidate_logps(&lm, &exs, a.batch, conditioned, &mut obs)?;
        obs.0.finish();
        let rep = likelihood_report(&s, &d.test_ex, d.catalog.n_items(), &[1, 5, 10])?;
        result["likelihood"] = json!(&rep.means);
        result["likelihood_seconds"] = json!(t0.elapsed().as_secs_f64());
        md += &format!(
            "## Likelihood ranking of the candidates (every answer valid)\n\n| HR@1 | HR@5 | NDCG@5 | NDCG@10 |\n|---:|---:|---:|---:|\n| {:.4} | {:.4} | {:.4} | {:.4} |\n\n",
            rep.get("hit", 1),
            rep.get("hit", 5),
            rep.get("ndcg", 5),
            rep.get("ndcg", 10)
        );
    }
    if a.mode != EvalMode::Likelihood {
        let t0 = std::time::Instant::now();
        let rows = generate_answers(&lm, &exs, a.max_new_tokens, a.batch, conditioned, &mut obs)?;
        obs.0.finish();
        let s: GenSummary = summarize(&rows);
        let mut g = String::new();
        for r in &rows {
            g.push_str(&serde_json::to_string(r)?);
            g.push('\n');
        }
        rudder_data::io::write_bytes_atomic(&a.out.join("generations.jsonl"), g.as_bytes())?;
        result["generation"] = json!(&s);
        result["generation_seconds"] = json!(t0.elapsed().as_secs_f64());
        md += &format!(
            "## Greedy generation ({} new tokens)\n\n| rule | HR@1 (hits / all) | ValidRatio | hits / valid |\n|---|---:|---:|---:|\n| S-DPO (substring, case-sensitive) | {:.4} | {:.4} | {:.4} |\n| LLaRA/iLoRA (first line, lower case) | {:.4} | {:.4} | {:.4} |\n\nOutputs: `generations.jsonl`.\n\n",
            a.max_new_tokens,
            s.hr1,
            s.valid_ratio,
            if s.valid_ratio > 0.0 {
                s.hr1 / s.valid_ratio
            } else {
                0.0
            },
            s.llara_hr1,
            s.llara_valid_ratio,
            s.llara_hr1_given_valid
        );
    }
    if let Some((c, h)) = &cond {
        md += &format!(
            "Hybrid prompts ({}; SASRec {}).\n\n",
            h.method,
            h.sasrec.display()
        );
        let hist: Vec<&[u32]> = d.test_ex.iter().map(|e| e.history.as_slice()).collect();
        if let Some(g) = gate_diagnostics(c, &hist, &d.train, d.catalog.n_items(), &a.out)? {
            result["gates"] = g.0;
            md += &g.1;
        }
    }
    for n in &d.notes {
        md += &format!("- {n}\n");
    }
    run.write_metrics(std::slice::from_ref(&result))?;
    crate::steer_cmd::write_json(&a.out.join("results.json"), &result)?;
    run.write_summary(&md)?;
    print!("{md}");
    Ok(())
}

/// iLoRA's gates over the questions' histories: expert usage, entropy, and the mean gate of
/// niche, middle and mainstream users (terciles of the mean training popularity of their history
/// items); `gates.json` and `gates.png` in `out`.
fn gate_diagnostics(
    c: &SeqConditioner,
    hist: &[&[u32]],
    train: &[SeqSample],
    n_items: usize,
    out: &Path,
) -> Result<Option<(serde_json::Value, String)>> {
    let Some(g) = c.gates(hist)? else {
        return Ok(None);
    };
    let g = g.to_vec2::<f32>()?;
    let k = g.first().map_or(0, Vec::len);
    let mut pop = vec![0f64; n_items];
    for s in train {
        if (s.next as usize) < n_items {
            pop[s.next as usize] += 1.0;
        }
    }
    let user_pop: Vec<f64> = hist
        .iter()
        .map(|h| {
            let v: Vec<f64> = h
                .iter()
                .filter(|&&i| (i as usize) < n_items)
                .map(|&i| pop[i as usize])
                .collect();
            v.iter().sum::<f64>() / v.len().max(1) as f64
        })
        .collect();
    let mut order: Vec<usize> = (0..hist.len()).collect();
    order.sort_by(|&a, &b| user_pop[a].total_cmp(&user_pop[b]));
    let mut group = vec![0usize; hist.len()];
    for (rank, &u) in order.iter().enumerate() {
        group[u] = rank * 3 / hist.len().max(1);
    }
    let names = ["niche", "middle", "mainstream"];
    let mean = |rows: &[usize]| -> Vec<f64> {
        let mut m = vec![0f64; k];
        for &r in rows {
            for (j, v) in g[r].iter().enumerate() {
                m[j] += *v as f64;
            }
        }
        m.iter().map(|x| x / rows.len().max(1) as f64).collect()
    };
    let all: Vec<usize> = (0..g.len()).collect();
    let usage = mean(&all);
    let entropy = g
        .iter()
        .map(|row| {
            -row.iter()
                .filter(|&&p| p > 0.0)
                .map(|&p| (p as f64) * (p as f64).ln())
                .sum::<f64>()
        })
        .sum::<f64>()
        / g.len().max(1) as f64;
    let mut top = vec![0usize; k];
    for row in &g {
        let j = (0..k)
            .max_by(|&a, &b| row[a].total_cmp(&row[b]))
            .unwrap_or(0);
        top[j] += 1;
    }
    let by_group: Vec<(String, Vec<f64>)> = (0..3)
        .map(|gi| {
            let rows: Vec<usize> = (0..g.len()).filter(|&r| group[r] == gi).collect();
            (names[gi].to_string(), mean(&rows))
        })
        .collect();
    let v = json!({
        "experts": k,
        "usage": usage,
        "mean_entropy": entropy,
        "max_entropy": (k as f64).ln(),
        "argmax_counts": top,
        "by_user_type": by_group.iter().map(|(n, m)| json!({"users": n, "mean_gate": m})).collect::<Vec<_>>(),
    });
    crate::steer_cmd::write_json(&out.join("gates.json"), &v)?;
    let series: Vec<(&str, Vec<(f64, f64)>)> = by_group
        .iter()
        .map(|(n, m)| {
            (
                n.as_str(),
                m.iter()
                    .enumerate()
                    .map(|(j, x)| ((j + 1) as f64, *x))
                    .collect(),
            )
        })
        .collect();
    if let Err(e) = crate::plots::lines(
        &out.join("gates.png"),
        "mean gate per expert by user type (history popularity terciles)",
        "expert",
        &series,
    ) {
        tracing::warn!("gate plot skipped: {e}");
    }
    let mut md = format!(
        "## iLoRA gates ({k} experts)\n\nMean entropy {entropy:.3} (uniform: {:.3}); expert usage {}; most-weighted expert counts {:?}.\n\n| users | {} |\n|---|{}\n",
        (k as f64).ln(),
        usage
            .iter()
            .map(|x| format!("{x:.3}"))
            .collect::<Vec<_>>()
            .join(" / "),
        top,
        (1..=k)
            .map(|j| format!("expert {j}"))
            .collect::<Vec<_>>()
            .join(" | "),
        "---:|".repeat(k)
    );
    for (n, m) in &by_group {
        md += &format!(
            "| {n} | {} |\n",
            m.iter()
                .map(|x| format!("{x:.3}"))
                .collect::<Vec<_>>()
                .join(" | ")
        );
    }
    md += "\nPlot: `gates.png`; values: `gates.json`.\n\n";
    Ok(Some((v, md)))
}

pub fn run(cmd: LlmrecCmd) -> Result<()> {
    match cmd {
        LlmrecCmd::Sasrec(a) => run_seq(SeqKind::Sasrec, a),
        LlmrecCmd::Gru4rec(a) => run_seq(SeqKind::Gru4rec, a),
        LlmrecCmd::Caser(a) => run_seq(SeqKind::Caser, a),
        LlmrecCmd::Sft(a) => run_lm_train(Objective::Sft, a, None),
        LlmrecCmd::Dpo(a) => run_lm_train(Objective::Dpo, a, None),
        LlmrecCmd::Sdpo(a) => run_lm_train(Objective::Sdpo, a, None),
        LlmrecCmd::Llara(h) => run_lm_train(Objective::Sft, h.train.clone(), Some(("llara", h))),
        LlmrecCmd::Ilora(h) => run_lm_train(Objective::Sft, h.train.clone(), Some(("ilora", h))),
        LlmrecCmd::Eval(a) => run_eval(a),
        LlmrecCmd::Sequences(a) => run_sequences(a),
    }
}

/// `rudder llmrec sequences`: LLaRA training rows from ratings, beside the shipped held-out rows.
fn run_sequences(a: SequencesArgs) -> Result<()> {
    use rudder_data::formats::llara_build::{histories, match_held_out, sliding_rows};
    let store = rudder_data::assets::Store::from_env();
    let rudder_data::formats::Loaded::Interactions(ds) =
        rudder_data::resolve::load(&a.ratings, None, &store)
            .with_context(|| format!("--ratings {}", a.ratings))?
    else {
        bail!("--ratings {}: not an interaction dataset", a.ratings);
    };
    let inter = &ds.interactions;
    if !inter.has_timestamps() {
        bail!(
            "--ratings {}: every interaction needs a timestamp (rows are in time order)",
            a.ratings
        );
    }
    let llara = rudder_data::formats::llara::read_dir(&a.llara)
        .with_context(|| format!("--llara {}", a.llara.display()))?;
    let Some(names) = llara.item_names.as_ref() else {
        bail!(
            "--llara {}: no u.item or id2name.txt (the item ids must be known)",
            a.llara.display()
        );
    };
    let pad = names.len() as u32;
    if a.window == 0 {
        bail!("--window must be at least 1");
    }
    // LLaRA's item id of a dataset item: with u.item (ML-100K, ids from 1) its row, the raw id
    // − 1; with id2name.txt (ids from 0) the raw id — checked against the names either way
    let first = if a.llara.join("id2name.txt").exists() {
        0
    } else {
        1
    };
    let last = pad - 1 + first;
    let mut item_id = vec![0u32; ds.n_items()];
    for (dense, ext) in ds.items.iter() {
        let raw: u32 = ext
            .parse()
            .ok()
            .filter(|r| (first..=last).contains(r))
            .with_context(|| {
                format!(
                    "--ratings {}: item {ext:?} is not an id {first}..={last} of the {pad} item names in {}",
                    a.ratings,
                    a.llara.display()
                )
            })?;
        item_id[dense as usize] = raw - first;
    }
    let Some(histories) = histories(inter, &item_id, a.min_rating) else {
        bail!(
            "--ratings {}: every interaction needs a rating (--min-rating filters them)",
            a.ratings
        );
    };
    let mut held = vec![false; histories.len()];
    let mut report = Vec::new();
    for (split, rows) in &llara.splits {
        if split == "train" {
            continue;
        }
        let m = match_held_out(rows, &histories, pad, a.max_slack);
        let unmatched: Vec<usize> = (0..m.len()).filter(|&i| m[i].is_none()).collect();
        let mut slack = std::collections::BTreeMap::<usize, usize>::new();
        let mut ties = 0;
        for x in m.iter().flatten() {
            held[x.user] = true;
            *slack.entry(x.slack).or_default() += 1;
            ties += (x.ties > 0) as usize;
        }
        eprintln!(
            "{split}.jsonl: {} of {} rows matched to a user ({} unmatched, {ties} ambiguous); slack {:?}",
            m.len() - unmatched.len(),
            m.len(),
            unmatched.len(),
            slack
        );
        report.push(json!({
            "split": split, "rows": m.len(), "matched": m.len() - unmatched.len(),
            "unmatched_lines": unmatched.iter().map(|i| i + 1).collect::<Vec<_>>(),
            "ambiguous": ties, "slack_histogram": slack,
        }));
    }
    let with_ratings = llara
        .splits
        .iter()
        .any(|(_, r)| r.iter().any(|s| s.seq_ratings.is_some()));
    let mut train = Vec::new();
    let mut train_users = 0;
    for (u, h) in histories.iter().enumerate() {
        if held[u] || h.is_empty() {
            continue;
        }
        train_users += 1;
        train.extend(sliding_rows(h, a.window, pad, with_ratings));
    }
    std::fs::create_dir_all(&a.out).with_context(|| format!("{}", a.out.display()))?;
    rudder_data::formats::llara::write_jsonl(&a.out.join("train.jsonl"), &train)?;
    for f in ["val.jsonl", "test.jsonl", "u.item", "id2name.txt"] {
        let src = a.llara.join(f);
        if src.exists() {
            let bytes = std::fs::read(&src).with_context(|| format!("{}", src.display()))?;
            rudder_data::io::write_bytes_atomic(&a.out.join(f), &bytes)?;
        }
    }
    let kept: usize = histories.iter().map(|h| h.len()).sum();
    let summary = json!({
        "ratings": a.ratings, "llara": a.llara, "min_rating": a.min_rating, "window": a.window,
        "max_slack": a.max_slack, "users": histories.len(), "kept_interactions": kept,
        "interactions": inter.len(), "held_out_users": held.iter().filter(|&&h| h).count(),
        "train_users": train_users, "train_rows": train.len(), "held_out": report,
    });
    rudder_data::io::write_bytes_atomic(
        &a.out.join("build.json"),
        serde_json::to_string_pretty(&summary)?.as_bytes(),
    )?;
    eprintln!(
        "{} of {} interactions rated ≥ {}; {} held-out users left out; {} train rows from {} users → {}",
        kept,
        inter.len(),
        a.min_rating,
        summary["held_out_users"],
        train.len(),
        train_users,
        a.out.join("train.jsonl").display()
    );
    Ok(())
}
