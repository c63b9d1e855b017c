//! The one CF training loop (cf-seeds.md [S6]): per epoch, an optional adversarial phase, one
//! pass of the [S2] sampler through the loss and Adam; every `eval_every` epochs, validation
//! Recall@K selects the best weights and drives early stopping; at the end the best weights are
//! restored and every test set is evaluated.

use crate::config::{CfConfig, LossConfig};
use crate::loss::{self, BatchEmb, BatchIdx, Hardness};
use crate::model::{self, Backbone, ModelInputs};
use crate::scorer::EmbeddingScorer;
use crate::{CfError, Result};
use candle_core::{Device, Tensor};
use rudder_data::eval::{EvalConfig, EvalReport, Evaluator};
use rudder_data::sampler::{Sampler, SamplerConfig};
use rudder_data::{Interactions, Split};
use rudder_nn::optim::{Adam, AdamConfig};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The checkpoint file a run folder holds while training (removed once the run is written).
pub const CHECKPOINT: &str = "checkpoint.safetensors";

/// Where a training run checkpoints and whether it continues from an existing checkpoint.
/// With a folder, the trainer writes `checkpoint.safetensors` (model, optimizer moments, the
/// adversary and its optimizer, best-so-far weights, loop counters, history) and
/// `metrics.jsonl` (the epochs so far) atomically at every evaluation; with `resume`, it
/// restores them and continues, giving the numbers of an uninterrupted run.
#[derive(Debug, Clone, Default)]
pub struct Checkpointing {
    pub dir: Option<PathBuf>,
    pub resume: bool,
}

/// Everything of the loop's state that is not a tensor.
#[derive(serde::Serialize, serde::Deserialize)]
struct LoopState {
    config: CfConfig,
    /// (users, items, train, valid interactions): the checkpoint belongs to this split
    data: [usize; 4],
    opt_steps: u64,
    adv_opt_steps: Option<u64>,
    inner_opt_steps: Option<u64>,
    adv_done: usize,
    since_best: usize,
    best: Option<(f64, usize, EvalReport)>,
    history: Vec<EpochRecord>,
}

/// Rewrite the run folder's `metrics.jsonl` (beside the checkpoint `ck`) with the epochs so far.
fn write_progress(ck: &Path, history: &[EpochRecord]) -> Result<()> {
    Ok(rudder_data::io::write_bytes_atomic(
        &ck.with_file_name("metrics.jsonl"),
        history_lines(history).as_bytes(),
    )?)
}

/// The epoch lines of `metrics.jsonl`.
fn history_lines(history: &[EpochRecord]) -> String {
    let mut lines = String::new();
    for r in history {
        lines.push_str(&serde_json::to_string(r).expect("records serialise"));
        lines.push('\n');
    }
    lines
}

/// Callbacks for progress display.
pub trait TrainObserver {
    fn epoch_start(&mut self, _epoch: usize, _n_batches: usize) {}
    fn batch_done(&mut self, _loss: f64) {}
    fn epoch_done(&mut self, _rec: &EpochRecord) {}
    /// Training continues from a checkpoint after `_epochs_done` epochs.
    fn resumed(&mut self, _epochs_done: usize) {}
}

pub struct Silent;
impl TrainObserver for Silent {}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EpochRecord {
    pub epoch: usize,
    pub loss: f64,
    /// Wall time of the epoch, adversarial phase included.
    pub seconds: f64,
    /// Wall time of this epoch's adversarial phase (AdvInfoNCE's hardness ascent or AdvDrop's
    /// ARM updates of the mask network), when it had one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adv_seconds: Option<f64>,
    /// Named diagnostics of this epoch's adversarial phase, written as top-level fields:
    /// AdvInfoNCE's `adv_kl` (KL(p‖uniform) of the hardness distribution after its passes),
    /// AdvDrop's `adv_dual_keep` / `adv_main_keep` (mean keep probability of each view's edges).
    #[serde(flatten)]
    pub adv_stats: BTreeMap<String, f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub valid: Option<BTreeMap<String, f64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_seconds: Option<f64>,
}

pub struct TrainReport {
    pub config: CfConfig,
    pub history: Vec<EpochRecord>,
    pub best_epoch: Option<usize>,
    pub best_valid: Option<EvalReport>,
    pub tests: Vec<(String, EvalReport)>,
    pub params: Vec<(String, Tensor)>,
    pub user_emb: Tensor,
    pub item_emb: Tensor,
}

impl TrainReport {
    pub fn mean_epoch_seconds(&self) -> f64 {
        let v: Vec<f64> = self.history.iter().map(|r| r.seconds).collect();
        v.iter().sum::<f64>() / v.len().max(1) as f64
    }
    /// Mean wall time of an adversarial phase and how many epochs had one.
    pub fn mean_adv_seconds(&self) -> Option<(f64, usize)> {
        let v: Vec<f64> = self.history.iter().filter_map(|r| r.adv_seconds).collect();
        (!v.is_empty()).then(|| (v.iter().sum::<f64>() / v.len() as f64, v.len()))
    }
    pub fn mean_eval_seconds(&self) -> Option<f64> {
        let v: Vec<f64> = self.history.iter().filter_map(|r| r.eval_seconds).collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    }
    pub fn scorer(&self) -> Result<EmbeddingScorer> {
        EmbeddingScorer::new(&self.user_emb, &self.item_emb, self.config.loss.cosine())
    }
}

fn evaluate(
    sc: &EmbeddingScorer,
    truth: &Interactions,
    masks: &[&Interactions],
    ks: &[usize],
) -> Result<EvalReport> {
    let mut ev = Evaluator::new(truth);
    for m in masks {
        ev = ev.mask(m);
    }
    let cfg = EvalConfig {
        ks: ks.to_vec(),
        batch_size: 256,
        per_user: false,
    };
    Ok(ev.run(sc, &cfg)?)
}

/// The validation split ranked with train items masked (what model selection reads).
pub fn evaluate_valid(sc: &EmbeddingScorer, split: &Split, ks: &[usize]) -> Result<EvalReport> {
    evaluate(sc, &split.valid, &[&split.train], ks)
}

/// Every non-empty test set of a split, ranked with train, validation and the other test sets
/// masked (a test set identical to this one, like `test_id` ≡ `test_ood`, is not masked).
pub fn evaluate_tests(
    sc: &EmbeddingScorer,
    split: &Split,
    ks: &[usize],
) -> Result<Vec<(String, EvalReport)>> {
    let parts: Vec<(String, &Interactions)> = std::iter::once(("test".to_string(), &split.test))
        .chain(split.extra_tests.iter().map(|(n, x)| (n.clone(), x)))
        .filter(|(_, x)| !x.is_empty())
        .collect();
    let mut out = Vec::with_capacity(parts.len());
    for (name, truth) in &parts {
        let mut masks: Vec<&Interactions> = vec![&split.train, &split.valid];
        for (other, x) in &parts {
            if other != name && *x != *truth {
                masks.push(x);
            }
        }
        out.push((name.clone(), evaluate(sc, truth, &masks, ks)?));
    }
    Ok(out)
}

/// Whether AdvInfoNCE runs its adversarial phase at `epoch` (reference schedule).
pub fn adversarial_epoch(
    epoch: usize,
    interval: usize,
    done: usize,
    eta_epochs: usize,
    warm_up: usize,
) -> bool {
    (epoch + 3).is_multiple_of(interval) && done < eta_epochs && epoch > warm_up
}

pub fn train(cfg: &CfConfig, split: &Split, obs: &mut dyn TrainObserver) -> Result<TrainReport> {
    train_with(cfg, split, &ModelInputs::default(), obs)
}

/// [`train`] for models that need more than interactions (AlphaRec's item features).
pub fn train_with(
    cfg: &CfConfig,
    split: &Split,
    inputs: &ModelInputs,
    obs: &mut dyn TrainObserver,
) -> Result<TrainReport> {
    train_checkpointed(cfg, split, inputs, obs, &Checkpointing::default())
}

/// [`train_with`], checkpointing into (and optionally resuming from) a run folder.
pub fn train_checkpointed(
    cfg: &CfConfig,
    split: &Split,
    inputs: &ModelInputs,
    obs: &mut dyn TrainObserver,
    ck: &Checkpointing,
) -> Result<TrainReport> {
    cfg.validate()?;
    let dev = Device::Cpu;
    let train = &split.train;
    if train.is_empty() {
        return Err(CfError::Config("the train split is empty".into()));
    }
    let model: Box<dyn Backbone> = model::build(cfg, train, inputs, &dev)?;
    let params = model.params();
    // everything a checkpoint holds: optimised parameters plus model-internal trained state
    let state: Vec<(String, candle_core::Var)> =
        params.iter().cloned().chain(model.extra_state()).collect();
    let mut opt = Adam::new(
        params.iter().map(|(_, v)| v.clone()).collect(),
        AdamConfig::adam(cfg.lr),
    )?;
    let sampler = Sampler::new(
        train,
        SamplerConfig {
            batch_size: cfg.batch_size.min(train.len()),
            n_neg: cfg.loss.n_neg(),
            drop_last: true,
            seed: cfg.seed,
            mode: cfg.sampler,
            repeat_negatives: matches!(&cfg.loss, LossConfig::Advinfonce(a) if a.faithful_negatives),
        },
    )?;
    let cosine = cfg.loss.cosine();
    let (adv, mut adv_opt) = match &cfg.loss {
        LossConfig::Advinfonce(a) => {
            let h = Hardness::new(train.n_users(), train.n_items(), a, cfg.seed, &dev)?;
            let o = Adam::new(
                h.params().into_iter().map(|(_, v)| v).collect(),
                AdamConfig::adam(a.adv_lr),
            )?;
            (Some(h), Some(o))
        }
        _ => (None, None),
    };
    let mut adv_done = 0usize;
    let k_sel = cfg.selection_k();
    // Selection reads validation, or the first test set in faithful AlphaRec mode.
    let has_valid = if cfg.select_on_test {
        !split.test.is_empty()
    } else {
        !split.valid.is_empty()
    };
    let mut best: Option<(f64, usize, Vec<Tensor>, EvalReport)> = None;
    let mut since_best = 0usize;
    let mut history = Vec::new();
    let data_key = [
        train.n_users(),
        train.n_items(),
        train.len(),
        split.valid.len(),
    ];
    let ck_path = ck.dir.as_ref().map(|d| d.join(CHECKPOINT));
    let ck_err = |p: &Path, why: String| CfError::Config(format!("{}: {why}", p.display()));

    if let (true, Some(p)) = (ck.resume, &ck_path)
        && p.exists()
    {
        let (t, meta) = rudder_nn::checkpoint::load_state(p, &dev)?;
        let st: LoopState = serde_json::from_str(&meta)
            .map_err(|e| ck_err(p, format!("unreadable checkpoint metadata: {e}")))?;
        if st.config != *cfg {
            return Err(ck_err(
                p,
                "the checkpoint was written with a different configuration; resume with the \
                     run's own config.toml"
                    .into(),
            ));
        }
        if st.data != data_key {
            return Err(ck_err(
                p,
                format!(
                    "the checkpoint belongs to other data ({} users, {} items, {} train, {} \
                         valid interactions; now {:?})",
                    st.data[0], st.data[1], st.data[2], st.data[3], data_key
                ),
            ));
        }
        let get = |name: &str| {
            t.get(name)
                .ok_or_else(|| ck_err(p, format!("checkpoint lacks tensor `{name}`")))
        };
        for (n, v) in &state {
            v.set(get(&format!("state.{n}"))?)?;
        }
        opt.load_state("opt", st.opt_steps, &t)?;
        if let (Some(h), Some(ao), Some(steps)) = (&adv, adv_opt.as_mut(), st.adv_opt_steps) {
            for (n, v) in h.params() {
                v.set(get(&format!("adv.{n}"))?)?;
            }
            ao.load_state("advopt", steps, &t)?;
        }
        if let (Some(o), Some(steps)) = (model.inner_optimizer(), st.inner_opt_steps) {
            o.borrow_mut().load_state("inner", steps, &t)?;
        }
        best = match st.best {
            Some((score, e, r)) => {
                let snap = state
                    .iter()
                    .map(|(n, _)| get(&format!("best.{n}")).cloned())
                    .collect::<Result<Vec<_>>>()?;
                Some((score, e, snap, r))
            }
            None => None,
        };
        adv_done = st.adv_done;
        since_best = st.since_best;
        history = st.history;
        // metrics.jsonl holds exactly the checkpointed epochs (a kill may have come
        // between the checkpoint and this file)
        write_progress(p, &history)?;
        obs.resumed(history.len());
    }
    let start = history.len();
    let save_checkpoint = |history: &[EpochRecord],
                           opt: &Adam,
                           adv_opt: Option<&Adam>,
                           adv_done: usize,
                           since_best: usize,
                           best: &Option<(f64, usize, Vec<Tensor>, EvalReport)>|
     -> Result<()> {
        let Some(p) = &ck_path else { return Ok(()) };
        let mut t: Vec<(String, Tensor)> = state
            .iter()
            .map(|(n, v)| (format!("state.{n}"), v.as_tensor().clone()))
            .collect();
        let (opt_steps, ot) = opt.state("opt")?;
        t.extend(ot);
        let mut adv_opt_steps = None;
        if let (Some(h), Some(ao)) = (&adv, adv_opt) {
            t.extend(
                h.params()
                    .into_iter()
                    .map(|(n, v)| (format!("adv.{n}"), v.as_tensor().clone())),
            );
            let (s, at) = ao.state("advopt")?;
            t.extend(at);
            adv_opt_steps = Some(s);
        }
        let mut inner_opt_steps = None;
        if let Some(o) = model.inner_optimizer() {
            let (s, it) = o.borrow().state("inner")?;
            t.extend(it);
            inner_opt_steps = Some(s);
        }
        if let Some((_, _, snap, _)) = best {
            t.extend(
                state
                    .iter()
                    .zip(snap)
                    .map(|((n, _), s)| (format!("best.{n}"), s.clone())),
            );
        }
        let st = LoopState {
            config: cfg.clone(),
            data: data_key,
            opt_steps,
            adv_opt_steps,
            inner_opt_steps,
            adv_done,
            since_best,
            best: best.as_ref().map(|(s, e, _, r)| (*s, *e, r.clone())),
            history: history.to_vec(),
        };
        let meta = serde_json::to_string(&st).map_err(|e| CfError::Config(e.to_string()))?;
        rudder_nn::checkpoint::save_state(&t, &meta, p)?;
        write_progress(p, history)
    };

    let batch_loss =
        |m: &dyn Backbone, idx: &BatchIdx, hard: Option<&Hardness>, step: u64| -> Result<Tensor> {
            if let Some(l) = m.custom_loss(idx, step) {
                return l;
            }
            let (users, items) = m.forward()?;
            // MF + BPR: one fused op (same value and gradients as the generic path)
            if let (LossConfig::Bpr { reg }, true) = (
                &cfg.loss,
                m.ego_is_final() && idx.n == 1 && users.device().is_cpu(),
            ) {
                return Ok(crate::fused::fused_bpr(
                    &users,
                    &items,
                    idx.user_ids.clone(),
                    idx.pos_ids.clone(),
                    idx.neg_ids.clone(),
                    *reg,
                )?);
            }
            let emb = BatchEmb::gather(&users, &items, idx, cosine)?;
            let (pos, neg) = emb.scores()?;
            let (main, reg, typo) = match &cfg.loss {
                LossConfig::Bpr { reg } => (loss::bpr(&pos, &neg)?, *reg, false),
                LossConfig::Infonce { tau, reg, .. } => {
                    (loss::infonce(&pos, &neg, *tau)?, *reg, false)
                }
                LossConfig::Advinfonce(a) => {
                    let h = hard.expect("hardness present for AdvInfoNCE").logits(idx)?;
                    (
                        loss::advinfonce(&pos, &neg, &h, a.tau, a.k_neg)?,
                        a.reg,
                        a.faithful_reg_typo,
                    )
                }
            };
            // layer-0 rows only when regularised (AlphaRec's are a full projection)
            let reg = if reg == 0.0 {
                None
            } else {
                let (ego_u, ego_i) = m.ego()?;
                loss::l2_reg(&ego_u, &ego_i, idx, reg, typo)?
            };
            Ok(match reg {
                Some(r) => (main + r)?,
                None => main,
            })
        };

    for epoch in start..cfg.epochs {
        if since_best >= cfg.patience && cfg.patience > 0 {
            break;
        }
        let t0 = Instant::now();
        let mut adv_seconds = None;
        let mut adv_stats = BTreeMap::new();
        // adversarial phase: gradient ascent on the loss w.r.t. the hardness embeddings only
        if let (LossConfig::Advinfonce(a), Some(h), Some(ao)) = (&cfg.loss, &adv, adv_opt.as_mut())
            && adversarial_epoch(
                epoch,
                a.adv_interval,
                adv_done,
                a.eta_epochs,
                a.warm_up_epochs,
            )
        {
            for rep in 0..a.adv_epochs {
                // fresh negatives: a distinct stream from the main pass
                let mut first = None;
                let stream = (1u64 << 40) + (epoch * a.adv_epochs.max(1) + rep) as u64;
                for b in sampler.iter_epoch(stream) {
                    let idx = BatchIdx::new(&b, &dev)?;
                    let l = batch_loss(model.as_ref(), &idx, Some(h), 0)?;
                    // ascend the loss; the fixed behaviour also keeps the adversary's rows small
                    let objective = if a.faithful_adv_reg || a.adv_reg == 0.0 {
                        l.neg()?
                    } else {
                        (l.neg()? + h.l2(&idx, a.adv_reg)?)?
                    };
                    let grads = objective.backward()?;
                    ao.step(&grads)?;
                    first.get_or_insert(idx);
                }
                adv_done += 1;
                if let Some(idx) = &first {
                    adv_stats.insert("adv_kl".to_string(), h.kl_to_uniform(idx)?);
                }
            }
            adv_seconds = Some(t0.elapsed().as_secs_f64());
        }
        let n_batches = sampler.n_batches();
        // model-specific adversary (AdvDrop's mask network)
        let ta = Instant::now();
        if let Some(r) = model.adversarial(epoch, n_batches) {
            adv_stats.extend(r?.into_iter().map(|(k, v)| (k.to_string(), v)));
            adv_seconds = Some(adv_seconds.unwrap_or(0.0) + ta.elapsed().as_secs_f64());
        }
        obs.epoch_start(epoch, n_batches);
        let mut total = 0.0;
        for (bi, b) in sampler.iter_epoch(epoch as u64).enumerate() {
            let idx = BatchIdx::new(&b, &dev)?;
            let step = (epoch * n_batches + bi) as u64;
            let l = batch_loss(model.as_ref(), &idx, adv.as_ref(), step)?;
            let v = l.to_scalar::<f32>()? as f64;
            if !v.is_finite() {
                return Err(CfError::Config(format!(
                    "loss became {v} at epoch {epoch}; lower the learning rate"
                )));
            }
            total += v;
            let grads = l.backward()?;
            opt.step(&grads)?;
            obs.batch_done(v);
        }
        let seconds = t0.elapsed().as_secs_f64();
        let mut rec = EpochRecord {
            epoch,
            loss: total / n_batches.max(1) as f64,
            seconds,
            adv_seconds,
            adv_stats,
            valid: None,
            eval_seconds: None,
        };
        let last = epoch + 1 == cfg.epochs;
        if has_valid && ((epoch + 1) % cfg.eval_every == 0 || last) {
            let te = Instant::now();
            let (u, i) = model.forward()?;
            let sc = EmbeddingScorer::new(&u, &i, cosine)?;
            let r = if cfg.select_on_test {
                evaluate_tests(&sc, split, &cfg.ks)?.swap_remove(0).1
            } else {
                evaluate_valid(&sc, split, &cfg.ks)?
            };
            rec.eval_seconds = Some(te.elapsed().as_secs_f64());
            let score = r.get("recall", k_sel);
            rec.valid = Some(r.means.clone());
            if best.as_ref().is_none_or(|b| score > b.0) {
                let snap = state
                    .iter()
                    .map(|(_, v)| v.as_tensor().copy())
                    .collect::<candle_core::Result<Vec<_>>>()?;
                best = Some((score, epoch, snap, r));
                since_best = 0;
            } else {
                since_best += 1;
            }
        }
        let evaluated = rec.valid.is_some();
        obs.epoch_done(&rec);
        history.push(rec);
        if evaluated || (epoch + 1) % cfg.eval_every == 0 || last {
            save_checkpoint(
                &history,
                &opt,
                adv_opt.as_ref(),
                adv_done,
                since_best,
                &best,
            )?;
        }
    }
    let (best_epoch, best_valid) = match best {
        Some((_, e, snap, r)) => {
            for ((_, v), t) in state.iter().zip(snap) {
                v.set(&t)?;
            }
            (Some(e), Some(r))
        }
        None => (None, None),
    };
    let (users, items) = model.forward()?;
    let (users, items) = (users.detach(), items.detach());
    let tests = evaluate_tests(
        &EmbeddingScorer::new(&users, &items, cosine)?,
        split,
        &cfg.ks,
    )?;
    Ok(TrainReport {
        config: cfg.clone(),
        history,
        best_epoch,
        best_valid,
        tests,
        params: state
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().detach()))
            .collect(),
        user_emb: users,
        item_emb: items,
    })
}

/// Markdown table row of a report's headline metrics at K.
pub fn metrics_row(name: &str, r: &EvalReport, k: usize) -> String {
    format!(
        "| {name} | {:.4} | {:.4} | {:.4} | {:.4} | {:.4} |",
        r.get("recall", k),
        r.get("ndcg", k),
        r.get("hit", k),
        r.get("precision", k),
        r.get("mrr", k)
    )
}

/// A report's means as a JSON object (`"recall@20": …`) with the number of users.
pub fn metrics_json(r: &EvalReport) -> serde_json::Value {
    let mut m = serde_json::json!({ "users": r.n_users });
    for (k, v) in &r.means {
        m[k] = (*v).into();
    }
    m
}

/// Write the run folder: `config.toml` (the caller's resolved configuration, or the model
/// config when `None`), `metrics.jsonl`, `summary.md`, `best.safetensors`.
pub fn write_run(
    dir: &Path,
    data: &str,
    config_toml: Option<&str>,
    report: &TrainReport,
) -> Result<()> {
    use rudder_data::io::write_bytes_atomic;
    std::fs::create_dir_all(dir).map_err(|e| rudder_data::DataError::io(dir, e))?;
    let cfg_text = match config_toml {
        Some(t) => t.to_string(),
        None => {
            toml::to_string_pretty(&report.config).map_err(|e| CfError::Config(e.to_string()))?
        }
    };
    write_bytes_atomic(&dir.join("config.toml"), cfg_text.as_bytes())?;
    let mut lines = history_lines(&report.history);
    for (n, r) in &report.tests {
        let mut m = metrics_json(r);
        m["split"] = n.clone().into();
        m["best_epoch"] = report.best_epoch.into();
        lines.push_str(&m.to_string());
        lines.push('\n');
    }
    write_bytes_atomic(&dir.join("metrics.jsonl"), lines.as_bytes())?;
    rudder_nn::checkpoint::save(&report.params, &dir.join("best.safetensors"))?;
    let k = report.config.selection_k();
    let mut md = format!(
        "# {} + {} on `{data}`\n\n{} epochs run (best at epoch {}), {:.2} s per epoch{}{}.\n\n| split | Recall@{k} | NDCG@{k} | HR@{k} | Precision@{k} | MRR@{k} |\n|---|---|---|---|---|---|\n",
        match report.config.model {
            crate::ModelKind::Mf => "MF",
            crate::ModelKind::Lightgcn => "LightGCN",
            crate::ModelKind::Alpharec => "AlphaRec",
            crate::ModelKind::Advdrop => "AdvDrop",
        },
        report.config.loss.name(),
        report.history.len(),
        report
            .best_epoch
            .map_or("—".to_string(), |e| (e + 1).to_string()),
        report.mean_epoch_seconds(),
        report
            .mean_adv_seconds()
            .map_or(String::new(), |(s, n)| format!(
                " (adversarial phase in {n} of them: {s:.2} s each, included)"
            )),
        report
            .mean_eval_seconds()
            .map_or(String::new(), |s| format!(", {s:.2} s per validation pass")),
    );
    if let Some(v) = &report.best_valid {
        md.push_str(&metrics_row("valid (best)", v, k));
        md.push('\n');
    }
    for (n, r) in &report.tests {
        md.push_str(&metrics_row(n, r, k));
        md.push('\n');
    }
    write_bytes_atomic(&dir.join("summary.md"), md.as_bytes())?;
    Ok(())
}
