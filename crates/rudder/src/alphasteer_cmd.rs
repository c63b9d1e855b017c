//! `rudder steer alphasteer fit`, `rudder steer eval-refusal`, `rudder steer judge`: AlphaSteer
//! and its safety/utility evaluation (flags → rudder-steer calls → files and run folders).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use rudder_lm::engine::{Engine, EngineConfig};
use rudder_lm::hooks::{Positions, Site};
use rudder_steer::activations::{ActivationSet, CaptureConfig, capture};
use rudder_steer::alphasteer::{self, FitConfig, NullSpace, SteerFile};
use rudder_steer::prompts::{PromptSet, Rendering};
use rudder_steer::refusal::{self, Condition, Decision, EvalConfig, EvalSet, SetKind};
use rudder_steer::rollouts::Journal;
use serde::Serialize;
use serde_json::{Value, json};

#[derive(Subcommand)]
pub enum AlphaSteerCmd {
    /// Fit AlphaSteer from benign and harmful prompts: refusal direction (difference of means)
    /// and null-space-constrained gate per layer, written as a steering file for `rudder lm
    /// generate|chat --steer`, `rudder serve --steer` and `rudder steer eval-refusal`.
    Fit(FitArgs),
}

#[derive(Args)]
pub struct FitArgs {
    #[arg(long, short, default_value = "smollm2-135m-instruct")]
    pub model: String,
    /// Benign training prompts (JSON/JSONL; repeatable), e.g. benign_train.json.
    #[arg(long, required_unless_present = "benign_acts")]
    pub benign: Vec<PathBuf>,
    /// Harmful training prompts (repeatable), e.g. harmful_train_1000.json.
    #[arg(long, required_unless_present = "harmful_acts")]
    pub harmful: Vec<PathBuf>,
    /// Fit from an activation set instead (`rudder steer capture --sites resid_pre`, or any
    /// file in that format): no model is run.
    #[arg(long, requires = "harmful_acts")]
    pub benign_acts: Option<PathBuf>,
    #[arg(long, requires = "benign_acts")]
    pub harmful_acts: Option<PathBuf>,
    /// Only the first N prompts of each benign file (0: all).
    #[arg(long, default_value_t = 0)]
    pub limit_benign: usize,
    /// Only the first N prompts of each harmful file (0: all).
    #[arg(long, default_value_t = 0)]
    pub limit_harmful: usize,
    /// Steered layers (ResidPre), e.g. "8-14,16,18" (default: 25–60 % of depth, as the
    /// reference's bands).
    #[arg(long)]
    pub layers: Option<String>,
    /// Null-space ratio p: k = ⌊d·p⌋ lowest-variance benign directions.
    #[arg(long, default_value_t = 0.6)]
    pub p: f64,
    /// Per-layer ratio overrides, LAYER=P (repeatable), as the reference's configs.
    #[arg(long = "p-layer")]
    pub p_layer: Vec<String>,
    /// Choose k by the reference's (unused) tolerance rule instead of p.
    #[arg(long)]
    pub tolerance: bool,
    /// Ridge regularisation α of the fit.
    #[arg(long, default_value_t = 10.0)]
    pub alpha: f64,
    /// The refusal direction: `harmful-benign` = mean(harmful) − mean(benign) training prompts;
    /// `refused-complied` = mean(refused) − mean(complied), by the keyword judge on the
    /// model's own greedy responses to every training prompt (generated, ≤ --judge-tokens
    /// tokens, journalled in <out>.acts/responses.jsonl and reused).
    #[arg(long, value_enum, default_value_t = DirectionArg::HarmfulBenign)]
    pub direction: DirectionArg,
    /// Held-out benign prompts (e.g. benign_val.json): after the fit, the gate's mean and the
    /// share of prompts with a gate above 0.5 per layer on them (should stay near 0).
    #[arg(long)]
    pub benign_val: Vec<PathBuf>,
    /// Held-out harmful prompts (e.g. harmful_val.json): the same (should be near 1).
    #[arg(long)]
    pub harmful_val: Vec<PathBuf>,
    /// Only the first N prompts of each validation file (0: all).
    #[arg(long, default_value_t = 0)]
    pub limit_val: usize,
    /// Response length judged for `--direction refused-complied`.
    #[arg(long, default_value_t = 64)]
    pub judge_tokens: usize,
    /// Prompts per capture batch (and rows decoded together for the judged responses).
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Output steering file (safetensors; a JSON index is written next to it). Activations are
    /// cached in <out>.acts/ and reused.
    #[arg(long, short)]
    pub out: PathBuf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DirectionArg {
    HarmfulBenign,
    RefusedComplied,
}

#[derive(Args)]
pub struct EvalArgs {
    #[arg(long, short, default_value = "smollm2-135m-instruct")]
    pub model: String,
    /// AlphaSteer file from `rudder steer alphasteer fit`.
    #[arg(long)]
    pub steer: Option<PathBuf>,
    /// AlphaSteer strengths λ (0 = the unsteered model).
    #[arg(
        long,
        default_value = "0,0.5,1",
        value_delimiter = ',',
        allow_hyphen_values = true
    )]
    pub strengths: Vec<f64>,
    /// Strengths of the plain refusal-vector baseline (the same vectors added at every prompt
    /// position of the same layers, no gate).
    #[arg(long, value_delimiter = ',', allow_hyphen_values = true)]
    pub vector_strengths: Vec<f64>,
    /// Data folder laid out as ../shared/data/steering/refusal (test/, test/jailbreak/).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Extra sets NAME:KIND=FILE with KIND harmful, safe, math or open (repeatable).
    #[arg(long = "set")]
    pub sets: Vec<String>,
    /// Only these sets (comma-separated names; default all found).
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Prompts per set (0: all).
    #[arg(long, default_value_t = 0)]
    pub limit: usize,
    /// Cap on every set's generation length (0: the reference's 128/512/2048/4096).
    #[arg(long, default_value_t = 0)]
    pub max_tokens: usize,
    /// Rows decoded together.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    #[arg(long, default_value_t = refusal::KEYWORD_WINDOW)]
    pub keyword_window: usize,
    #[command(flatten)]
    pub judge: JudgeLlmArgs,
    #[arg(long, short)]
    pub out: PathBuf,
}

#[derive(Args, Clone)]
pub struct JudgeLlmArgs {
    /// Also judge refusals with an LLM (XSTest three classes): inproc:MODEL or the base URL of
    /// an OpenAI-compatible server.
    #[arg(long)]
    pub judge_llm: Option<String>,
    /// Model name sent to the judge server.
    #[arg(long)]
    pub judge_model: Option<String>,
    /// text (parse the reply, bounded retries) or logprob (most likely class label).
    #[arg(long, default_value = "text")]
    pub judge_decisions: String,
    /// Record/replay cache of the judge's exchanges (JSON Lines).
    #[arg(long)]
    pub judge_cache: Option<PathBuf>,
}

#[derive(Args)]
pub struct JudgeArgs {
    /// JSON array or JSON Lines of records.
    #[arg(long)]
    pub responses: PathBuf,
    /// Response fields to judge (repeatable; e.g. one per steering strength).
    #[arg(long = "field", required = true)]
    pub fields: Vec<String>,
    /// The request field (for the LLM judge).
    #[arg(long, default_value = "query")]
    pub question_field: String,
    #[arg(long, default_value_t = refusal::KEYWORD_WINDOW)]
    pub keyword_window: usize,
    #[command(flatten)]
    pub judge: JudgeLlmArgs,
    /// Write the per-record verdicts here (JSON).
    #[arg(long, short)]
    pub out: Option<PathBuf>,
}

pub fn run_alphasteer(cmd: AlphaSteerCmd) -> Result<()> {
    match cmd {
        AlphaSteerCmd::Fit(a) => run_fit(a),
    }
}

fn load_prompts(files: &[PathBuf], limit: usize) -> Result<Vec<String>> {
    let mut v = Vec::new();
    for f in files {
        let ps = PromptSet::load(f, None, None)?.truncate(limit);
        if ps.items.is_empty() {
            bail!("{}: no prompts", f.display());
        }
        v.extend(ps.items.into_iter().map(|p| p.text));
    }
    Ok(v)
}

fn fit_config(a: &FitArgs, layers: Vec<usize>) -> Result<FitConfig> {
    let mut per_layer_p = BTreeMap::new();
    for s in &a.p_layer {
        let (l, p) = s
            .split_once('=')
            .with_context(|| format!("--p-layer {s:?}: expected LAYER=P"))?;
        per_layer_p.insert(
            l.trim()
                .parse::<usize>()
                .with_context(|| format!("--p-layer {s:?}"))?,
            p.trim()
                .parse::<f64>()
                .with_context(|| format!("--p-layer {s:?}"))?,
        );
    }
    let cfg = FitConfig {
        layers,
        null_space: if a.tolerance {
            NullSpace::Tolerance
        } else {
            NullSpace::Ratio(a.p)
        },
        per_layer_p,
        alpha: a.alpha,
        direction: match a.direction {
            DirectionArg::HarmfulBenign => alphasteer::Direction::HarmfulBenign,
            DirectionArg::RefusedComplied => alphasteer::Direction::RefusedComplied,
        },
    };
    cfg.null_space.check()?;
    for &p in cfg.per_layer_p.values() {
        NullSpace::Ratio(p).check()?;
    }
    Ok(cfg)
}

fn print_report(report: &[alphasteer::LayerReport]) {
    eprintln!("layer    k  ‖r‖      gate(harmful)  gate(benign)  seconds");
    for r in report {
        eprintln!(
            "{:>5} {:>4}  {:>7.3}  {:>13.3}  {:>12.3}  {:>7.2}",
            r.layer, r.k, r.refusal_norm, r.gate_harmful_mean, r.gate_benign_mean, r.seconds
        );
    }
}

/// Fit from activation files, no model.
fn run_fit_acts(a: &FitArgs, b: &Path, h: &Path) -> Result<()> {
    let (sb, sh) = (ActivationSet::load(b)?, ActivationSet::load(h)?);
    let present: Vec<usize> = sb
        .sites
        .iter()
        .filter_map(|s| match s {
            Site::ResidPre(l) if sh.sites.contains(s) => Some(*l),
            _ => None,
        })
        .collect();
    if present.is_empty() {
        bail!(
            "{} and {} share no resid_pre site",
            b.display(),
            h.display()
        );
    }
    let max = present.iter().max().copied().unwrap_or(0) + 1;
    let layers = match &a.layers {
        Some(s) => crate::steer_cmd::parse_layers(s, max)?,
        None => present.clone(),
    };
    if let Some(l) = layers.iter().find(|l| !present.contains(l)) {
        bail!(
            "layer {l}: {} has no blocks.{l}.hook_resid_pre for both sets",
            b.display()
        );
    }
    let cfg = fit_config(a, layers)?;
    if !a.benign_val.is_empty() || !a.harmful_val.is_empty() {
        bail!(
            "--benign-val/--harmful-val are prompts the model reads: give --benign/--harmful \
             prompt files (and the model), not activation files"
        );
    }
    if a.direction == DirectionArg::RefusedComplied {
        bail!(
            "--direction refused-complied judges the model's responses to the training prompts: \
             give --benign/--harmful prompt files (and the model), not activation files"
        );
    }
    let pb = crate::steer_cmd::bar("fit", cfg.layers.len() as u64);
    let (steer, report) =
        alphasteer::fit(&sb, &sh, &cfg, None, &mut |k, _| pb.set_position(k as u64))?;
    pb.finish_and_clear();
    let file = SteerFile {
        layers: steer,
        meta: json!({"benign_acts": b, "harmful_acts": h, "fit": cfg, "benign_rows": sb.len(), "harmful_rows": sh.len(),
            "hidden_size": sb.hidden, "capture_meta": sb.meta, "report": report}),
    };
    file.save(&a.out)?;
    eprintln!(
        "AlphaSteer fitted on {} benign and {} harmful rows → {}",
        sb.len(),
        sh.len(),
        a.out.display()
    );
    print_report(&report);
    Ok(())
}

fn run_fit(a: FitArgs) -> Result<()> {
    if let (Some(b), Some(h)) = (&a.benign_acts, &a.harmful_acts) {
        return run_fit_acts(&a, b, h);
    }
    let lm = Arc::new(crate::steer_cmd::open_model(&a.model)?);
    let (nl, d) = (lm.decoder.cfg.num_layers, lm.decoder.cfg.hidden_size);
    let layers = match &a.layers {
        Some(s) => crate::steer_cmd::parse_layers(s, nl)?,
        None => ((nl as f64 * 0.25).floor() as usize
            ..=((nl as f64 * 0.6).floor() as usize).min(nl - 1))
            .collect(),
    };
    let cfg = fit_config(&a, layers.clone())?;
    let rendering = Rendering::plain(true);
    let acts_dir = {
        let mut p = a.out.as_os_str().to_owned();
        p.push(".acts");
        PathBuf::from(p)
    };
    std::fs::create_dir_all(&acts_dir)?;
    let sites: Vec<Site> = layers.iter().map(|&l| Site::ResidPre(l)).collect();
    let mut sets = Vec::new();
    for (name, files, limit) in [
        ("benign", &a.benign, a.limit_benign),
        ("harmful", &a.harmful, a.limit_harmful),
        ("benign_val", &a.benign_val, a.limit_val),
        ("harmful_val", &a.harmful_val, a.limit_val),
    ] {
        if files.is_empty() {
            continue; // a validation set not asked for
        }
        let texts = load_prompts(files, limit)?;
        let ids: Vec<Vec<u32>> = texts
            .iter()
            .map(|t| rendering.ids(&lm, t))
            .collect::<rudder_steer::Result<_>>()?;
        let path = acts_dir.join(format!("{name}.safetensors"));
        let meta = json!({"template_hash": rendering.template_hash(&lm), "rendering": rendering,
            "files": files, "limit": limit, "sites": sites.iter().map(|s| s.to_string()).collect::<Vec<_>>()});
        // a cached set is reused only if it was made from the same prompts and sites
        let cached = ActivationSet::load(&path).ok().filter(|s| {
            s.len() == ids.len()
                && s.meta["meta"]["files"] == meta["files"]
                && s.meta["meta"]["limit"] == meta["limit"]
                && sites.iter().all(|x| s.sites.contains(x))
        });
        let set = match cached {
            Some(s) => s,
            None => {
                let _ = std::fs::remove_file(&path);
                let pb = crate::steer_cmd::bar(&format!("capture {name}"), ids.len() as u64);
                let s = capture(
                    &lm,
                    &ids,
                    None,
                    &CaptureConfig {
                        sites: sites.clone(),
                        positions: Positions::LastPrompt,
                        batch: a.batch.max(1),
                        shard_batches: 8,
                    },
                    None,
                    &path,
                    meta,
                    &mut |k, _| pb.set_position(k as u64),
                )?;
                pb.finish_and_clear();
                s
            }
        };
        sets.push((name, files.clone(), set, ids));
    }
    let refusals = match a.direction {
        DirectionArg::HarmfulBenign => None,
        DirectionArg::RefusedComplied => Some(judge_training_prompts(
            lm.clone(),
            [&sets[0].3, &sets[1].3],
            &a,
            &acts_dir,
        )?),
    };
    let pb = crate::steer_cmd::bar("fit", layers.len() as u64);
    let (steer, report) = alphasteer::fit(
        &sets[0].2,
        &sets[1].2,
        &cfg,
        refusals.as_ref(),
        &mut |k, _| pb.set_position(k as u64),
    )?;
    pb.finish_and_clear();
    // the gate on held-out prompts, per layer: (layer, mean gate, share above 0.5)
    let mut validation = serde_json::Map::new();
    for (name, _, set, _) in &sets[2..] {
        let g = alphasteer::gate_on(&steer, set)?;
        eprintln!(
            "gate on {name} ({} prompts), per layer: mean / share > 0.5",
            set.len()
        );
        for (l, mean, share) in &g {
            eprintln!("{l:>5}  {mean:>7.3}  {share:>5.2}");
        }
        validation.insert(
            name.to_string(),
            json!(
                g.iter()
                    .map(|(l, m, s)| json!({"layer": l, "gate_mean": m, "gate_above_half": s}))
                    .collect::<Vec<_>>()
            ),
        );
    }
    let refused = refusals.as_ref().map(|r| {
        json!({"benign": r.benign.iter().filter(|&&x| x).count(),
               "harmful": r.harmful.iter().filter(|&&x| x).count(),
               "judge": "keyword", "max_tokens": a.judge_tokens})
    });
    let mut hashes = BTreeMap::new();
    for (_, files, _, _) in &sets {
        for f in files {
            hashes.insert(
                f.display().to_string(),
                rudder_data::assets::sha256_file(f)?,
            );
        }
    }
    let file = SteerFile {
        layers: steer,
        meta: json!({
            "model": lm.info, "hidden_size": d, "num_layers": nl,
            "template_hash": rendering.template_hash(&lm),
            "fit": cfg, "benign_rows": sets[0].2.len(), "harmful_rows": sets[1].2.len(),
            "refused_training_prompts": refused,
            "validation": validation,
            "data_sha256": hashes,
            "strength_grid": [0.0, 0.25, 0.5, 1.0, 2.0],
            "report": report,
        }),
    };
    file.save(&a.out)?;
    eprintln!(
        "AlphaSteer fitted on {} benign and {} harmful prompts → {}",
        sets[0].2.len(),
        sets[1].2.len(),
        a.out.display()
    );
    print_report(&report);
    Ok(())
}

/// Greedy responses of the model to the benign and harmful training prompts (journalled in
/// `dir/responses.jsonl`, so a rerun generates only what is missing), judged by keywords: the
/// groups of the refused-vs-complied direction.
fn judge_training_prompts(
    lm: Arc<rudder_lm::loader::LanguageModel>,
    ids: [&Vec<Vec<u32>>; 2],
    a: &FitArgs,
    dir: &Path,
) -> Result<alphasteer::Refusals> {
    let engine = Engine::start(lm, EngineConfig::offline(a.batch.max(1)));
    let mut journal = Journal::open(&dir.join("responses.jsonl"))?;
    let rc = rudder_steer::rollouts::RolloutConfig {
        per_prompt: 1,
        sampling: rudder_lm::generate::GenConfig {
            max_new_tokens: a.judge_tokens.max(1),
            temperature: 0.0,
            ..Default::default()
        },
        marker: None,
    };
    let mut flags: Vec<Vec<bool>> = Vec::new();
    for (tag, ids) in ["benign", "harmful"].into_iter().zip(ids) {
        let pb = crate::steer_cmd::bar(&format!("respond {tag}"), ids.len() as u64);
        let gold = vec![None; ids.len()];
        rudder_steer::rollouts::run(
            &engine,
            tag,
            ids,
            &gold,
            &rc,
            0.0,
            None,
            &mut journal,
            &mut |d, _| pb.set_position(d as u64),
        )?;
        pb.finish_and_clear();
        let mut f = vec![false; ids.len()];
        for r in journal.tagged(tag).filter(|r| r.question < ids.len()) {
            f[r.question] = refusal::keyword_refuses(&r.text, refusal::KEYWORD_WINDOW);
        }
        eprintln!(
            "{tag}: the model refused {} of {} training prompts (keyword judge, ≤ {} tokens)",
            f.iter().filter(|&&x| x).count(),
            f.len(),
            a.judge_tokens
        );
        flags.push(f);
    }
    let harmful = flags.pop().unwrap_or_default();
    let benign = flags.pop().unwrap_or_default();
    Ok(alphasteer::Refusals { benign, harmful })
}

/// The LLM judge of `--judge-llm`: one client (an in-process judge loads its model once) and
/// one runtime for every call of a command.
struct LlmJudge {
    client: rudder_client::Client,
    decision: Decision,
    model: String,
    rt: tokio::runtime::Runtime,
}

impl LlmJudge {
    fn open(j: &JudgeLlmArgs) -> Result<Option<Self>> {
        let Some(b) = &j.judge_llm else {
            return Ok(None);
        };
        let mut spec = rudder_client::LlmSpec::new(b);
        spec.model = j.judge_model.clone();
        spec.cache = j.judge_cache.clone();
        if j.judge_cache.is_some() {
            spec.cache_mode = rudder_client::replay::CacheMode::RecordMissing;
        }
        let decision = match j.judge_decisions.as_str() {
            "text" => Decision::Text,
            "logprob" => Decision::Logprob,
            o => bail!("--judge-decisions {o:?}: expected text or logprob"),
        };
        Ok(Some(LlmJudge {
            client: rudder_client::Client::from_spec(&spec)?,
            decision,
            model: j.judge_model.clone().unwrap_or_default(),
            rt: tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?,
        }))
    }

    /// XSTest classes of (question, response) pairs.
    fn classify(&self, pairs: &[(String, String)]) -> Vec<refusal::Judgement> {
        let pb = crate::steer_cmd::bar("LLM judge", pairs.len() as u64);
        // in chunks, so the bar moves and an interruption keeps the cache of what was judged
        let mut out = Vec::new();
        for chunk in pairs.chunks(16) {
            out.extend(self.rt.block_on(refusal::llm_judge(
                &self.client,
                &self.model,
                chunk,
                self.decision,
                2,
            )));
            pb.inc(chunk.len() as u64);
        }
        pb.finish_and_clear();
        out
    }

    fn win_rate(&self, items: &[(String, String, String)]) -> (f64, usize) {
        self.rt.block_on(refusal::win_rate(
            &self.client,
            &self.model,
            items,
            self.decision,
            0,
        ))
    }
}

#[derive(Serialize)]
struct EvalRecord<'a> {
    model: &'a str,
    steer: Option<&'a Path>,
    strengths: &'a [f64],
    vector_strengths: &'a [f64],
    sets: &'a [EvalSet],
    limit: usize,
    max_tokens_cap: usize,
    keyword_window: usize,
    judge_llm: Option<&'a str>,
}

pub fn run_eval(a: EvalArgs) -> Result<()> {
    let lm = Arc::new(crate::steer_cmd::open_model(&a.model)?);
    let (nl, d) = (lm.decoder.cfg.num_layers, lm.decoder.cfg.hidden_size);
    let mut sets = match &a.data {
        Some(root) => EvalSet::standard(root),
        None => Vec::new(),
    };
    for s in &a.sets {
        let (nk, file) = s
            .split_once('=')
            .with_context(|| format!("--set {s:?}: expected NAME:KIND=FILE"))?;
        let (name, kind) = nk
            .split_once(':')
            .with_context(|| format!("--set {s:?}: expected NAME:KIND=FILE"))?;
        let kind = match kind {
            "harmful" => SetKind::Harmful,
            "safe" => SetKind::Safe,
            "math" => SetKind::Math,
            "open" => SetKind::Open,
            o => bail!("--set {s:?}: kind {o:?} is not harmful, safe, math or open"),
        };
        sets.push(EvalSet {
            name: name.into(),
            path: file.into(),
            kind,
            max_tokens: match kind {
                SetKind::Math => 2048,
                SetKind::Open => 512,
                _ => 128,
            },
        });
    }
    if !a.only.is_empty() {
        let unknown: Vec<&String> = a
            .only
            .iter()
            .filter(|n| !sets.iter().any(|s| &s.name == *n))
            .collect();
        if !unknown.is_empty() {
            bail!(
                "--only: no set named {unknown:?} (found: {})",
                sets.iter()
                    .map(|s| s.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        sets.retain(|s| a.only.contains(&s.name));
    }
    if sets.is_empty() {
        bail!(
            "no test sets: give --data DIR (../shared/data/steering/refusal) or --set NAME:KIND=FILE"
        );
    }
    let file = match &a.steer {
        Some(p) => {
            let f = SteerFile::load(p)?;
            f.check(nl, d, p)?;
            Some(f)
        }
        None => None,
    };
    let mut conditions = Vec::new();
    for &s in &a.strengths {
        conditions.push(match (&file, s == 0.0) {
            (_, true) => Condition {
                method: "none".into(),
                strength: 0.0,
                interventions: None,
            },
            (Some(f), false) => Condition {
                method: "alphasteer".into(),
                strength: s,
                interventions: Some(f.interventions(s as f32)),
            },
            (None, false) => bail!("--strengths {s} needs --steer FILE"),
        });
    }
    for &s in &a.vector_strengths {
        let f = file
            .as_ref()
            .context("--vector-strengths needs --steer FILE (its refusal vectors)")?;
        conditions.push(Condition {
            method: "vector".into(),
            strength: s,
            interventions: Some(f.vector_baseline(s as f32)),
        });
    }
    // one unsteered condition is enough
    let mut seen = std::collections::HashSet::new();
    conditions.retain(|c| seen.insert((c.method.clone(), c.strength.to_bits())));
    let run = crate::runs::RunDir::create(&a.out)?;
    run.write_config(&EvalRecord {
        model: &a.model,
        steer: a.steer.as_deref(),
        strengths: &a.strengths,
        vector_strengths: &a.vector_strengths,
        sets: &sets,
        limit: a.limit,
        max_tokens_cap: a.max_tokens,
        keyword_window: a.keyword_window,
        judge_llm: a.judge.judge_llm.as_deref(),
    })?;
    let engine = Engine::start(lm.clone(), EngineConfig::offline(a.batch));
    let mut journal = Journal::open(&a.out.join("responses.jsonl"))?;
    let cfg = EvalConfig {
        limit: a.limit,
        max_tokens_cap: a.max_tokens,
        keyword_window: a.keyword_window,
    };
    let t0 = std::time::Instant::now();
    let mut bars = crate::steer_cmd::StepBars::default();
    let rows = refusal::evaluate(
        &engine,
        &sets,
        &conditions,
        &cfg,
        &mut journal,
        &mut |label, done, total| bars.update(label, done, total),
    )?;
    bars.finish();
    drop(engine);
    let seconds = t0.elapsed().as_secs_f64();
    // the LLM judge over refusal-scored sets
    let mut judge_rows: Vec<Value> = Vec::new();
    if let Some(judge) = LlmJudge::open(&a.judge)? {
        let mut pairs = Vec::new();
        let mut keys = Vec::new();
        for set in sets
            .iter()
            .filter(|s| matches!(s.kind, SetKind::Harmful | SetKind::Safe))
        {
            let (_, texts, _) = refusal::load_set(&lm, set, a.limit)?;
            for c in &conditions {
                let tag = format!("{}/{}", c.method, set.name);
                for r in journal
                    .tagged(&tag)
                    .filter(|r| r.alpha == c.strength && r.question < texts.len())
                {
                    pairs.push((texts[r.question].clone(), r.text.clone()));
                    keys.push((
                        c.method.clone(),
                        c.strength,
                        set.name.clone(),
                        refusal::keyword_refuses(&r.text, a.keyword_window),
                    ));
                }
            }
        }
        let js = judge.classify(&pairs);
        let mut by: BTreeMap<(String, u64, String), (Vec<bool>, Vec<Option<refusal::Class>>)> =
            BTreeMap::new();
        for (k, j) in keys.iter().zip(&js) {
            let e = by
                .entry((k.0.clone(), k.1.to_bits(), k.2.clone()))
                .or_default();
            e.0.push(k.3);
            e.1.push(j.class);
        }
        for ((m, s, set), (kw, llm)) in by {
            let mut row = serde_json::to_value(refusal::compare(&kw, &llm))?;
            row["method"] = json!(m);
            row["strength"] = json!(f64::from_bits(s));
            row["set"] = json!(set);
            judge_rows.push(row);
        }
        // AlpacaEval-style win rate of each steered condition against the unsteered answers
        {
            for set in sets.iter().filter(|s| s.kind == SetKind::Open) {
                let (_, texts, _) = refusal::load_set(&lm, set, a.limit)?;
                let base: BTreeMap<usize, String> = journal
                    .tagged(&format!("none/{}", set.name))
                    .map(|r| (r.question, r.text.clone()))
                    .collect();
                if base.is_empty() {
                    eprintln!(
                        "win rate on {}: no unsteered answers (add 0 to --strengths)",
                        set.name
                    );
                    continue;
                }
                for c in conditions.iter().filter(|c| c.method != "none") {
                    let tag = format!("{}/{}", c.method, set.name);
                    let items: Vec<(String, String, String)> = journal
                        .tagged(&tag)
                        .filter(|r| r.alpha == c.strength && r.question < texts.len())
                        .filter_map(|r| {
                            base.get(&r.question)
                                .map(|b| (texts[r.question].clone(), b.clone(), r.text.clone()))
                        })
                        .collect();
                    let (wr, undecided) = judge.win_rate(&items);
                    judge_rows.push(json!({"method": c.method, "strength": c.strength, "set": set.name, "n": items.len(),
                        "win_rate_vs_unsteered": wr, "undecided": undecided}));
                }
            }
        }
        crate::steer_cmd::write_json(
            &a.out.join("judge.json"),
            &json!({"judge": a.judge.judge_llm, "rows": judge_rows,
            "verdicts": keys.iter().zip(&js).map(|(k, j)| json!({"method": k.0, "strength": k.1, "set": k.2, "keyword": k.3, "llm": j.class, "raw": j.raw})).collect::<Vec<_>>()}),
        )?;
    }
    let trade = refusal::tradeoff(&rows);
    let mut lines: Vec<Value> = rows
        .iter()
        .map(|r| serde_json::to_value(r).unwrap_or_default())
        .collect();
    lines.extend(trade.iter().map(|t| json!({"tradeoff": t})));
    lines.extend(judge_rows.iter().map(|j| json!({"judge": j})));
    run.write_metrics(&lines)?;
    // plots: safety vs over-refusal per method; refusal rate vs strength per set
    let mut series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for t in &trade {
        let (x, y) = (
            t["xstest_compliance"].as_f64().unwrap_or(f64::NAN),
            t["dsr_mean"].as_f64().unwrap_or(f64::NAN),
        );
        if x.is_finite() && y.is_finite() {
            series
                .entry(t["method"].as_str().unwrap_or("?").to_string())
                .or_default()
                .push((x, y));
        }
    }
    let sv: Vec<(&str, Vec<(f64, f64)>)> = series
        .iter()
        .map(|(k, v)| (k.as_str(), v.clone()))
        .collect();
    if let Err(e) = crate::plots::scatter(
        &a.out.join("tradeoff.png"),
        "safety vs over-refusal",
        "XSTest-safe compliance",
        "mean refusal rate on harmful sets",
        &sv,
    ) {
        tracing::warn!("plot skipped: {e}");
    }
    let mut by_set: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for r in rows.iter().filter(|r| r.method != "vector") {
        if let Some(v) = r.refusal_rate {
            by_set
                .entry(r.set.clone())
                .or_default()
                .push((r.strength, v));
        }
    }
    let sv: Vec<(&str, Vec<(f64, f64)>)> = by_set
        .iter()
        .map(|(k, v)| (k.as_str(), v.clone()))
        .collect();
    if let Err(e) = crate::plots::lines(
        &a.out.join("refusal_vs_strength.png"),
        "refusal rate vs AlphaSteer strength",
        "λ",
        &sv,
    ) {
        tracing::warn!("plot skipped: {e}");
    }
    // summary
    let mut s = String::new();
    s.push_str("# Refusal steering evaluation\n\n");
    s.push_str(&format!(
        "Model {}, steering file {}, {} sets ({} prompts each at most), greedy, generation capped at {}. Refusals judged by keywords in the first {} characters{}. Wall time {:.0} s.\n\n",
        a.model,
        a.steer.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "none".into()),
        sets.len(),
        if a.limit == 0 { "all".to_string() } else { a.limit.to_string() },
        if a.max_tokens == 0 {
            "the reference's per-set token limits".to_string()
        } else {
            format!("{} tokens", a.max_tokens)
        },
        a.keyword_window,
        if a.judge.judge_llm.is_some() { " and by the LLM judge (judge.json)" } else { "" },
        seconds
    ));
    s.push_str("## Trade-off\n\nCompliance by the keyword judge counts any non-refusal, gibberish included; the \"answered\" column also excludes degenerate responses (loops, repeated words or characters, symbol soup: `refusal::degenerate`).\n\n| method | λ | mean refusal on harmful sets (DSR) | XSTest-safe compliance | XSTest-safe answered | degenerate, harmful / safe | math accuracy |\n|---|---|---|---|---|---|---|\n");
    let f = |v: &Value| {
        v.as_f64()
            .filter(|x| x.is_finite())
            .map(|x| format!("{:.3}", x))
            .unwrap_or_else(|| "–".into())
    };
    for t in &trade {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} / {} | {} |\n",
            t["method"].as_str().unwrap_or(""),
            t["strength"],
            f(&t["dsr_mean"]),
            f(&t["xstest_compliance"]),
            f(&t["xstest_clean_compliance"]),
            f(&t["degenerate_harmful"]),
            f(&t["degenerate_safe"]),
            f(&t["math_accuracy"])
        ));
    }
    s.push_str("\n## Per set\n\n| method | λ | set | n | refusal rate | accuracy | degenerate | mean tokens |\n|---|---|---|---|---|---|---|---|\n");
    for r in &rows {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {:.3} | {:.0} |\n",
            r.method,
            r.strength,
            r.set,
            r.n,
            r.refusal_rate
                .map(|v| format!("{v:.3}"))
                .unwrap_or_else(|| "–".into()),
            r.accuracy
                .map(|v| format!("{v:.3}"))
                .unwrap_or_else(|| "–".into()),
            r.degenerate_rate,
            r.mean_tokens
        ));
    }
    if !judge_rows.is_empty() {
        s.push_str("\n## LLM judge vs keywords\n\n| method | λ | set | LLM refusal rate | keyword refusal rate | agreement | κ | unparsed |\n|---|---|---|---|---|---|---|---|\n");
        for j in judge_rows.iter().filter(|j| j.get("agreement").is_some()) {
            s.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
                j["method"].as_str().unwrap_or(""),
                j["strength"],
                j["set"].as_str().unwrap_or(""),
                f(&j["llm_refusal_rate"]),
                f(&j["keyword_refusal_rate"]),
                f(&j["agreement"]),
                f(&j["kappa"]),
                j["unparsed"]
            ));
        }
    }
    let wins: Vec<&Value> = judge_rows
        .iter()
        .filter(|j| j.get("win_rate_vs_unsteered").is_some())
        .collect();
    if !wins.is_empty() {
        s.push_str("\n## Win rate against the unsteered model's own answers (LLM judge, order randomised)\n\n| method | λ | set | n | win rate | undecided |\n|---|---|---|---|---|---|\n");
        for j in wins {
            s.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} |\n",
                j["method"].as_str().unwrap_or(""),
                j["strength"],
                j["set"].as_str().unwrap_or(""),
                j["n"],
                f(&j["win_rate_vs_unsteered"]),
                j["undecided"]
            ));
        }
    }
    s.push_str("\nFiles: responses.jsonl (every response, resumable), metrics.jsonl, tradeoff.png, refusal_vs_strength.png, config.toml.\n");
    run.write_summary(&s)?;
    print!("{s}");
    Ok(())
}

pub fn run_judge(a: JudgeArgs) -> Result<()> {
    let records: Vec<Value> = rudder_steer::prompts::read_records(&a.responses)?
        .into_iter()
        .map(|(v, _)| v)
        .collect();
    if records.is_empty() {
        bail!("{}: no records", a.responses.display());
    }
    let judge = LlmJudge::open(&a.judge)?;
    let mut out = Vec::new();
    let mut verdicts = Vec::new();
    println!(
        "| field | n | keyword refusal rate |{}",
        if a.judge.judge_llm.is_some() {
            " LLM refusal rate | agreement | κ |"
        } else {
            ""
        }
    );
    println!(
        "|---|---|---|{}",
        if a.judge.judge_llm.is_some() {
            "---|---|---|"
        } else {
            ""
        }
    );
    for field in &a.fields {
        let mut pairs = Vec::new();
        for (i, r) in records.iter().enumerate() {
            let resp = r.get(field).and_then(|v| v.as_str()).with_context(|| {
                format!(
                    "{}: record {i} has no text field {field:?}",
                    a.responses.display()
                )
            })?;
            let q = r
                .get(&a.question_field)
                .and_then(|v| v.as_str())
                .unwrap_or("");
            pairs.push((q.to_string(), resp.to_string()));
        }
        let kw: Vec<bool> = pairs
            .iter()
            .map(|(_, r)| refusal::keyword_refuses(r, a.keyword_window))
            .collect();
        let rate = kw.iter().filter(|&&x| x).count() as f64 / kw.len() as f64;
        let llm = judge.as_ref().map(|j| j.classify(&pairs));
        match &llm {
            None => println!("| {field} | {} | {rate:.3} |", kw.len()),
            Some(js) => {
                let c = refusal::compare(&kw, &js.iter().map(|j| j.class).collect::<Vec<_>>());
                println!(
                    "| {field} | {} | {rate:.3} | {:.3} | {:.3} | {:.3} |",
                    kw.len(),
                    c.llm_refusal_rate,
                    c.agreement,
                    c.kappa
                );
            }
        }
        out.push(json!({"field": field, "n": kw.len(), "keyword_refusal_rate": rate}));
        verdicts.push(json!({"field": field, "keyword": kw, "llm": llm.map(|v| v.into_iter().map(|j| j.class).collect::<Vec<_>>())}));
    }
    if let Some(p) = &a.out {
        crate::steer_cmd::write_json(p, &json!({"summary": out, "verdicts": verdicts}))?;
    }
    Ok(())
}
