//! The one training loop of the language-model recommenders: SFT, DPO and S-DPO on LoRA
//! adapters over a frozen rudder-lm decoder (llmrec-seeds.md §1.4–1.5).
//!
//! - SFT: cross-entropy on the answer tokens (`" " + title` and EOS), masked by prompt length
//!   (not by the reference's last-colon quirk); the mean over the micro-batch's answer tokens.
//! - DPO / S-DPO: [`crate::sdpo::sdpo_loss`] over the chosen answer and k rejected ones (DPO
//!   is k = 1, as the reference's `dpo.sh` runs it), against a frozen reference: the adapter
//!   the run starts from, in evaluation mode. Its log-probabilities are computed once for
//!   every (prompt, answer) and cached in the run folder (`reference_logps.safetensors`), which
//!   is exact because the negatives are fixed per example; `cache_reference = false` recomputes
//!   them every step (the cost the cache saves).
//! - With `prefix_sharing` the prompt of an example runs once and its 1 + k answers branch
//!   from its cache ([`rudder_lm::score::branch_logprobs`]); the values and gradients equal
//!   running 1 + k full sequences.
//!
//! Optimisation as the reference: AdamW (weight decay 0 by default), linear warmup over
//! `warmup_ratio` of the steps then cosine decay to 0, gradient accumulation to the effective
//! batch, global-norm clipping, validation every `eval_every` epochs with the best adapter
//! (lowest validation loss) kept. Examples are visited in a seeded per-epoch permutation, step
//! `t` taking samples `[t·B, (t+1)·B)` of the concatenated epochs, so a run resumed from its
//! checkpoint (adapter, AdamW moments, dropout stream position, history) repeats the
//! uninterrupted run exactly.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use rand::Rng;
use rand::seq::SliceRandom;
use rudder_lm::decoder::Decoder;
use rudder_lm::hooks::{Hook, NoHook};
use rudder_lm::lora::{Adapter, LoraConfig};
use rudder_lm::score::{branch_logprobs, continuation_logprobs};
use rudder_nn::optim::{Adam, AdamConfig, clip_grad_norm, warmup_cosine};
use serde::{Deserialize, Serialize};

use crate::lmdata::LmExample;
use crate::sdpo::{RewardStats, sdpo_loss};
use crate::{LlmrecError, Result};

/// Parameters of a [`Conditioner`] optimised together (Adam with coupled weight decay, the
/// learning rate `lr_mult ×` the schedule).
pub struct ParamGroup {
    pub name: String,
    pub params: Vec<(String, Var)>,
    pub lr_mult: f64,
    pub weight_decay: f64,
}

/// What a forward pass over a batch runs: the prompts and the hook.
pub struct Prepared {
    pub prompts: Vec<Vec<u32>>,
    pub hook: Box<dyn Hook>,
}

/// A method that conditions the language model on more than the prompt text (LLaRA's spliced
/// item embeddings, iLoRA's gate): its own trainable parameters and, per batch, the prompts, a
/// hook and the adapter's gate. It plugs into [`train`] (SFT only) and the evaluation.
pub trait Conditioner {
    fn groups(&self) -> Vec<ParamGroup>;
    /// Probability that a training batch uses the hybrid form at `step` of `total` optimizer
    /// steps (the curriculum); evaluation always does.
    fn hybrid_probability(&self, step: u64, total: u64, steps_per_epoch: f64) -> f64;
    /// Prepare a pass over `exs`: the prompts (hybrid or text), the hook, and the adapter's
    /// gate (set here, cleared by the caller with `adapter.set_gate(None)`).
    fn prepare(
        &self,
        exs: &[&LmExample],
        hybrid: bool,
        training: bool,
        adapter: &Adapter,
    ) -> Result<Prepared>;
    /// Parameters and buffers (checkpoints, the saved model).
    fn tensors(&self) -> Vec<(String, Tensor)>;
    fn load(
        &self,
        map: &std::collections::HashMap<String, Tensor>,
        prefix: &str,
        source: &Path,
    ) -> Result<()>;
}

/// A conditioned model (LLaRA, iLoRA): the conditioner and the adapter whose gate it sets.
pub type Conditioned<'a> = Option<(&'a dyn Conditioner, &'a Adapter)>;

/// Run `f` on a pass over `exs`: with the conditioner's prompts, hook and gate (cleared after,
/// whatever `f` returns), or the examples' own text prompts.
pub fn with_prepared<T>(
    cond: Conditioned,
    exs: &[&LmExample],
    hybrid: bool,
    training: bool,
    f: impl FnOnce(&mut Prepared) -> Result<T>,
) -> Result<T> {
    match cond {
        Some((c, ad)) => {
            let mut prep = c.prepare(exs, hybrid, training, ad)?;
            let out = f(&mut prep);
            ad.set_gate(None)?;
            out
        }
        None => f(&mut Prepared {
            prompts: exs.iter().map(|e| e.prompt.clone()).collect(),
            hook: Box::new(NoHook),
        }),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Objective {
    Sft,
    Dpo,
    Sdpo,
}

impl Objective {
    pub fn name(self) -> &'static str {
        match self {
            Objective::Sft => "sft",
            Objective::Dpo => "dpo",
            Objective::Sdpo => "sdpo",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LmTrainConfig {
    pub objective: Objective,
    pub lora: LoraConfig,
    /// Preference temperature β (S-DPO's script: 1).
    pub beta: f64,
    /// Rejected answers per example (S-DPO: 3; DPO: 1).
    pub negatives: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub epochs: f64,
    pub micro_batch: usize,
    /// Examples per optimizer step (reference: 4 GPUs × 4 × 8 accumulation = 128).
    pub effective_batch: usize,
    pub warmup_ratio: f64,
    pub max_grad_norm: f64,
    /// Validate (and checkpoint) every this many epochs.
    pub eval_every: f64,
    pub prefix_sharing: bool,
    pub cache_reference: bool,
    pub seed: u64,
    /// The schedule starts warmup at, and decays to, this fraction of `lr` (iLoRA: 0.01;
    /// S-DPO: 0).
    #[serde(default)]
    pub lr_floor: f64,
}

impl LmTrainConfig {
    /// The reference's settings for each stage (sft.sh, softmax_dpo.sh, dpo.sh at HEAD).
    pub fn reference(objective: Objective) -> Self {
        let pref = objective != Objective::Sft;
        LmTrainConfig {
            objective,
            lora: LoraConfig::default(),
            beta: 1.0,
            negatives: match objective {
                Objective::Sdpo => 3,
                _ => 1,
            },
            lr: 1e-5,
            weight_decay: 0.0,
            epochs: if pref { 3.0 } else { 5.0 },
            micro_batch: 4,
            effective_batch: 128,
            warmup_ratio: 0.05,
            max_grad_norm: 0.3,
            eval_every: if pref { 0.1 } else { 0.2 },
            prefix_sharing: true,
            cache_reference: true,
            seed: 42,
            lr_floor: 0.0,
        }
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(LlmrecError::Config(m));
        if self.micro_batch == 0 || self.effective_batch == 0 {
            return bad("micro batch and effective batch must be positive".into());
        }
        if !(self.epochs > 0.0 && self.eval_every > 0.0 && self.lr > 0.0) {
            return bad(format!(
                "epochs {}, eval_every {} and lr {} must be positive",
                self.epochs, self.eval_every, self.lr
            ));
        }
        if self.objective != Objective::Sft && self.negatives == 0 {
            return bad("preference training needs at least one negative".into());
        }
        if self.objective == Objective::Dpo && self.negatives != 1 {
            return bad("DPO uses exactly one negative (S-DPO takes several)".into());
        }
        self.lora
            .validate()
            .map_err(|e| LlmrecError::Config(e.to_string()))
    }

    fn accum(&self) -> usize {
        self.effective_batch.div_ceil(self.micro_batch)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    pub step: u64,
    pub epoch: f64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub seconds: f64,
    /// Token positions the forward passes processed (prompt once per example with prefix
    /// sharing) and their rate.
    pub tokens: usize,
    pub tokens_per_s: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rewards: Option<RewardStats>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EvalRecord {
    pub step: u64,
    pub epoch: f64,
    pub val_loss: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_rewards: Option<RewardStats>,
    pub best: bool,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct History {
    pub steps: Vec<StepRecord>,
    pub evals: Vec<EvalRecord>,
}

impl History {
    /// One JSON line per record, steps and evaluations interleaved in step order.
    pub fn jsonl(&self) -> String {
        let mut lines: Vec<(u64, u8, String)> = Vec::new();
        for s in &self.steps {
            let mut v = serde_json::to_value(s).unwrap_or_default();
            v["kind"] = "step".into();
            lines.push((s.step, 0, v.to_string()));
        }
        for e in &self.evals {
            let mut v = serde_json::to_value(e).unwrap_or_default();
            v["kind"] = "eval".into();
            lines.push((e.step, 1, v.to_string()));
        }
        lines.sort_by_key(|(s, k, _)| (*s, *k));
        lines.into_iter().map(|(_, _, l)| l + "\n").collect()
    }
}

pub trait LmObserver {
    /// Progress of a named phase (`reference`, `train`, `validate`).
    fn progress(&mut self, _phase: &str, _done: usize, _total: usize) {}
    fn step(&mut self, _rec: &StepRecord) {}
    fn eval(&mut self, _rec: &EvalRecord) {}
    /// Return false to stop after this step (tests simulate a kill with it).
    fn keep_going(&mut self, _step: u64) -> bool {
        true
    }
}

pub struct Silent;
impl LmObserver for Silent {}

pub struct LmTrainReport {
    pub history: History,
    pub best_val: f64,
    pub best_step: u64,
    pub total_steps: u64,
    pub completed: bool,
    pub resumed_from: Option<u64>,
}

#[derive(Serialize, Deserialize)]
struct LoopState {
    step: u64,
    best_val: f64,
    best_step: u64,
    dropout_calls: u64,
    adam_steps: u64,
    history: History,
}

/// Files of a run folder the loop owns.
pub struct RunFiles {
    pub dir: PathBuf,
}

impl RunFiles {
    pub fn checkpoint(&self) -> PathBuf {
        self.dir.join("checkpoint.safetensors")
    }
    pub fn reference(&self) -> PathBuf {
        self.dir.join("reference_logps.safetensors")
    }
    pub fn best_adapter(&self) -> PathBuf {
        self.dir.join("adapter")
    }
    pub fn metrics(&self) -> PathBuf {
        self.dir.join("metrics.jsonl")
    }
}

/// The conditioner's tensors beside the best adapter (`adapter/conditioner.safetensors`).
pub const CONDITIONER_FILE: &str = "conditioner.safetensors";

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    rudder_data::io::write_bytes_atomic(path, bytes).map_err(LlmrecError::from)
}

/// The branches (answers) an objective scores per example: the target, then the negatives.
fn branches(ex: &LmExample, objective: Objective) -> Vec<Vec<u32>> {
    let mut b = vec![ex.responses[ex.target].clone()];
    if objective != Objective::Sft {
        b.extend(ex.negatives.iter().map(|&j| ex.responses[j].clone()));
    }
    b
}

/// Per-token log-probabilities of each example's branches (flat) and the number of token
/// positions the decoder processed.
fn logprobs(
    dec: &Decoder,
    exs: &[&LmExample],
    objective: Objective,
    share: bool,
    pad: u32,
    prep: &mut Prepared,
) -> Result<(Tensor, Vec<usize>, usize)> {
    let br: Vec<Vec<Vec<u32>>> = exs.iter().map(|e| branches(e, objective)).collect();
    let lens: Vec<usize> = br.iter().flatten().map(Vec::len).collect();
    let prompts = &prep.prompts;
    if share {
        let tokens = shared_tokens(prompts, &lens);
        let lp = branch_logprobs(dec, prompts, &br, pad, prep.hook.as_mut())?;
        Ok((lp, lens, tokens))
    } else {
        if prompts.len() != exs.len() {
            return Err(LlmrecError::Config(
                "a conditioned pass runs one sequence per example".into(),
            ));
        }
        let mut pairs = Vec::new();
        for (p, bs) in prompts.iter().zip(&br) {
            for b in bs {
                pairs.push((p.clone(), b.clone()));
            }
        }
        let tmax = pairs
            .iter()
            .map(|(p, c)| p.len() + c.len())
            .max()
            .unwrap_or(0);
        let tokens = pairs.len() * tmax;
        let lp = continuation_logprobs(dec, &pairs, pad, prep.hook.as_mut())?;
        Ok((lp, lens, tokens))
    }
}

/// Sum the flat per-token values into one value per branch: `[n_branches]`.
fn segment_sums(flat: &Tensor, lens: &[usize]) -> Result<Tensor> {
    let total: usize = lens.iter().sum();
    let mut m = vec![0f32; lens.len() * total];
    let mut o = 0;
    for (r, &l) in lens.iter().enumerate() {
        for k in 0..l {
            m[r * total + o + k] = 1.0;
        }
        o += l;
    }
    let s = Tensor::from_vec(m, (lens.len(), total), &Device::Cpu)?;
    Ok(s.matmul(&flat.unsqueeze(1)?)?.squeeze(1)?)
}

/// Sequence log-probabilities (sums over each answer's tokens) of several answers per prompt,
/// the prompt computed once and shared (evaluation: no graph is kept), and the token positions
/// the decoder processed.
pub fn answer_logps(
    dec: &Decoder,
    prompts: &[Vec<u32>],
    answers: &[Vec<Vec<u32>>],
    pad: u32,
    hook: &mut dyn Hook,
) -> Result<(Vec<Vec<f32>>, usize)> {
    let lens: Vec<usize> = answers.iter().flatten().map(Vec::len).collect();
    let lp = branch_logprobs(dec, prompts, answers, pad, hook)?.to_vec1::<f32>()?;
    let mut o = 0;
    let rows = answers
        .iter()
        .map(|bs| {
            bs.iter()
                .map(|b| {
                    let v: f32 = lp[o..o + b.len()].iter().sum();
                    o += b.len();
                    v
                })
                .collect()
        })
        .collect();
    Ok((rows, shared_tokens(prompts, &lens)))
}

/// Token positions of a shared-prefix pass: the padded prompt batch and the padded branches.
fn shared_tokens(prompts: &[Vec<u32>], lens: &[usize]) -> usize {
    let pmax = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let bmax = lens.iter().max().copied().unwrap_or(1);
    prompts.len() * pmax + lens.len() * (bmax.max(1) - 1).max(1)
}

/// Sequence log-probabilities `[B, 1+k]` of the examples' branches (the objective's answers),
/// evaluation mode, and the token positions processed.
pub fn sequence_logps(
    dec: &Decoder,
    exs: &[&LmExample],
    objective: Objective,
    pad: u32,
) -> Result<(Vec<Vec<f32>>, usize)> {
    let prompts: Vec<Vec<u32>> = exs.iter().map(|e| e.prompt.clone()).collect();
    let br: Vec<Vec<Vec<u32>>> = exs.iter().map(|e| branches(e, objective)).collect();
    answer_logps(dec, &prompts, &br, pad, &mut NoHook)
}

struct Mode<'a> {
    dec: &'a mut Decoder,
    adapter: &'a Adapter,
}

impl Mode<'_> {
    fn train(&mut self) {
        self.dec.differentiable = true;
        self.adapter.set_training(true);
    }
    fn eval(&mut self) {
        self.dec.differentiable = false;
        self.adapter.set_training(false);
    }
}

/// Reference log-probabilities of every example (evaluation mode, current adapter).
fn reference_table(
    dec: &Decoder,
    exs: &[LmExample],
    objective: Objective,
    pad: u32,
    batch: usize,
    phase: &str,
    obs: &mut dyn LmObserver,
) -> Result<Vec<Vec<f32>>> {
    let mut out = Vec::with_capacity(exs.len());
    for chunk in exs.chunks(batch.max(1)) {
        let refs: Vec<&LmExample> = chunk.iter().collect();
        out.extend(sequence_logps(dec, &refs, objective, pad)?.0);
        obs.progress(phase, out.len(), exs.len());
    }
    Ok(out)
}

fn table_tensor(t: &[Vec<f32>]) -> Result<Tensor> {
    let w = t.first().map_or(0, Vec::len);
    Ok(Tensor::from_vec(t.concat(), (t.len(), w), &Device::Cpu)?)
}

fn tensor_table(t: &Tensor) -> Result<Vec<Vec<f32>>> {
    Ok(t.to_vec2::<f32>()?)
}

/// The objective's loss over `exs` (mean over the examples' answer tokens for SFT, mean over
/// examples for the preference losses), differentiable when the decoder is.
fn batch_loss(
    dec: &Decoder,
    exs: &[&LmExample],
    refs: Option<&[Vec<f32>]>,
    cfg: &LmTrainConfig,
    pad: u32,
    prep: &mut Prepared,
) -> Result<(Tensor, Option<RewardStats>, usize)> {
    // prefix sharing gains nothing with one answer (SFT), and a conditioned pass wants one
    // row per example
    let share = cfg.prefix_sharing && cfg.objective != Objective::Sft;
    let (lp, lens, tokens) = logprobs(dec, exs, cfg.objective, share, pad, prep)?;
    if cfg.objective == Objective::Sft {
        let n = lp.elem_count();
        return Ok(((lp.sum_all()?.neg()? / n as f64)?, None, tokens));
    }
    let per = 1 + cfg.negatives;
    let pol = segment_sums(&lp, &lens)?.reshape((exs.len(), per))?;
    let refs = refs.ok_or_else(|| {
        LlmrecError::Config("preference loss without reference log-probabilities".into())
    })?;
    let r = table_tensor(refs)?;
    let (loss, st) = sdpo_loss(&pol, &r, cfg.beta)?;
    Ok((loss, Some(st), tokens))
}

fn sample_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    v.shuffle(&mut rudder_data::rng::stream(seed, &[0x0D3E, epoch]));
    v
}

/// Validation loss (and reward statistics) in evaluation mode.
#[allow(clippy::too_many_arguments)]
fn validate(
    dec: &Decoder,
    val: &[LmExample],
    refs: Option<&[Vec<f32>]>,
    cfg: &LmTrainConfig,
    pad: u32,
    cond: Option<&dyn Conditioner>,
    adapter: &Adapter,
    obs: &mut dyn LmObserver,
) -> Result<(f64, Option<RewardStats>)> {
    let bs = (cfg.micro_batch * 2).max(1);
    let mut total = 0f64;
    let mut weight = 0f64;
    let mut rw = RewardStats::default();
    for (c, chunk) in val.chunks(bs).enumerate() {
        let exs: Vec<&LmExample> = chunk.iter().collect();
        let r = refs.map(|r| &r[c * bs..c * bs + chunk.len()]);
        let (loss, st, _) = with_prepared(cond.map(|c| (c, adapter)), &exs, true, false, |p| {
            batch_loss(dec, &exs, r, cfg, pad, p)
        })?;
        let w = if cfg.objective == Objective::Sft {
            exs.iter()
                .map(|e| e.responses[e.target].len())
                .sum::<usize>() as f64
        } else {
            exs.len() as f64
        };
        total += loss.to_scalar::<f32>()? as f64 * w;
        weight += w;
        if let Some(st) = st {
            let k = exs.len() as f64;
            rw.chosen += st.chosen * k;
            rw.rejected += st.rejected * k;
            rw.margin += st.margin * k;
            rw.accuracy += st.accuracy * k;
        }
        obs.progress("validate", (c * bs + chunk.len()).min(val.len()), val.len());
    }
    let st = (cfg.objective != Objective::Sft).then(|| {
        let n = val.len() as f64;
        RewardStats {
            chosen: rw.chosen / n,
            rejected: rw.rejected / n,
            margin: rw.margin / n,
            accuracy: rw.accuracy / n,
        }
    });
    Ok((total / weight.max(1.0), st))
}

/// Train the adapter attached to `dec` (as `adapter`) on `train`, validating on `val`; the
/// run folder `files.dir` receives the checkpoint, the reference cache, the best adapter (PEFT
/// layout) and metrics.jsonl. With `resume`, continue from the folder's checkpoint.
#[allow(clippy::too_many_arguments)]
pub fn train(
    dec: &mut Decoder,
    adapter: &Adapter,
    cfg: &LmTrainConfig,
    train: &[LmExample],
    val: &[LmExample],
    pad: u32,
    base_model: &str,
    files: &RunFiles,
    resume: bool,
    cond: Option<&dyn Conditioner>,
    obs: &mut dyn LmObserver,
) -> Result<LmTrainReport> {
    cfg.validate()?;
    if cond.is_some() && cfg.objective != Objective::Sft {
        return Err(LlmrecError::Config(
            "hybrid prompts and gates train with the SFT objective only".into(),
        ));
    }
    if train.is_empty() || val.is_empty() {
        return Err(LlmrecError::Input(
            "training and validation examples must be non-empty".into(),
        ));
    }
    if cfg.objective != Objective::Sft
        && let Some((i, e)) = train
            .iter()
            .chain(val)
            .enumerate()
            .find(|(_, e)| e.negatives.len() != cfg.negatives)
    {
        return Err(LlmrecError::Input(format!(
            "example {i} has {} negatives, the objective needs {}",
            e.negatives.len(),
            cfg.negatives
        )));
    }
    let n = train.len();
    let eff = cfg.effective_batch.min(n);
    let total_steps = ((cfg.epochs * n as f64) / eff as f64).ceil().max(1.0) as u64;
    let warmup = (cfg.warmup_ratio * total_steps as f64).ceil() as u64;
    let eval_steps = ((cfg.eval_every * n as f64) / eff as f64).round().max(1.0) as u64;
    let accum = cfg.accum();
    let params = adapter.params.clone();
    let mut opt = Adam::new(adapter.vars(), AdamConfig::adamw(cfg.lr, cfg.weight_decay))?;
    // everything the optimizer updates: the adapter, then the conditioner's groups
    let mut all = params.clone();
    for g in cond.map(|c| c.groups()).unwrap_or_default() {
        let vars = g.params.iter().map(|(_, v)| v.clone()).collect();
        opt.add_scaled_group(
            vars,
            AdamConfig {
                weight_decay: g.weight_decay,
                ..AdamConfig::adam(cfg.lr)
            },
            g.lr_mult,
        )?;
        all.extend(
            g.params
                .into_iter()
                .map(|(n, v)| (format!("{}.{n}", g.name), v)),
        );
    }
    let mut mode = Mode { dec, adapter };

    // The reference: the adapter the run starts from.
    let mut init: Vec<Tensor> = params
        .iter()
        .map(|(_, v)| v.as_tensor().copy())
        .collect::<candle_core::Result<_>>()?;
    let mut state = LoopState {
        step: 0,
        best_val: f64::INFINITY,
        best_step: 0,
        dropout_calls: 0,
        adam_steps: 0,
        history: History::default(),
    };
    let mut resumed_from = None;
    if resume {
        let ck = files.checkpoint();
        let (map, meta) = rudder_nn::checkpoint::load_state(&ck, &Device::Cpu)
            .map_err(|e| LlmrecError::file(&ck, e))?;
        state = serde_json::from_str(&meta)
            .map_err(|e| LlmrecError::file(&ck, format!("loop state: {e}")))?;
        let mut ad = std::collections::HashMap::new();
        let mut init_map = std::collections::HashMap::new();
        for (k, t) in &map {
            if let Some(name) = k.strip_prefix("adapter.") {
                ad.insert(name.to_string(), t.clone());
            }
            if let Some(name) = k.strip_prefix("initial.") {
                init_map.insert(name.to_string(), t.clone());
            }
        }
        adapter.load_tensors(&ad, &ck)?;
        if let Some(c) = cond {
            c.load(&map, "cond.", &ck)?;
        }
        // the reference is the adapter the run started from, not the one it resumes from
        for ((name, v), slot) in params.iter().zip(init.iter_mut()) {
            let t = init_map.get(name).ok_or_else(|| {
                LlmrecError::file(&ck, format!("lacks the initial adapter tensor {name}"))
            })?;
            if t.dims() != v.dims() {
                return Err(LlmrecError::file(
                    &ck,
                    format!(
                        "initial tensor {name} has shape {:?}, the adapter {:?}",
                        t.dims(),
                        v.dims()
                    ),
                ));
            }
            *slot = t.clone();
        }
        opt.load_state("adam", state.adam_steps, &map)
            .map_err(|e| LlmrecError::file(&ck, e))?;
        adapter.set_dropout_calls(state.dropout_calls);
        resumed_from = Some(state.step);
    }

    let needs_ref = cfg.objective != Objective::Sft;
    let (ref_train, ref_val) = if !needs_ref {
        (None, None)
    } else {
        let rp = files.reference();
        if resume && rp.exists() {
            let m = candle_core::safetensors::load(&rp, &Device::Cpu)
                .map_err(|e| LlmrecError::file(&rp, e))?;
            let get = |k: &str| {
                m.get(k)
                    .ok_or_else(|| LlmrecError::file(&rp, format!("tensor {k} is missing")))
            };
            (
                Some(tensor_table(get("train")?)?),
                Some(tensor_table(get("val")?)?),
            )
        } else {
            mode.eval();
            let cur: Vec<Tensor> = params
                .iter()
                .map(|(_, v)| v.as_tensor().copy())
                .collect::<candle_core::Result<_>>()?;
            set_all(&params, &init)?;
            let bs = cfg.micro_batch * 2;
            let rv = reference_table(
                mode.dec,
                val,
                cfg.objective,
                pad,
                bs,
                "reference (validation)",
                obs,
            )?;
            let rt = if cfg.cache_reference {
                Some(reference_table(
                    mode.dec,
                    train,
                    cfg.objective,
                    pad,
                    bs,
                    "reference (training)",
                    obs,
                )?)
            } else {
                None
            };
            set_all(&params, &cur)?;
            let mut map = std::collections::HashMap::new();
            map.insert("val".to_string(), table_tensor(&rv)?);
            if let Some(rt) = &rt {
                map.insert("train".to_string(), table_tensor(rt)?);
            }
            if rt.is_some() {
                let tmp = files.dir.join(".reference_logps.safetensors.tmp");
                candle_core::safetensors::save(&map, &tmp)?;
                std::fs::rename(&tmp, &rp).map_err(|e| LlmrecError::file(&rp, e))?;
            }
            (rt, Some(rv))
        }
    };

    let mut order_cache: Option<(u64, Vec<usize>)> = None;
    let mut sample = |s: u64| -> usize {
        let epoch = s / n as u64;
        if order_cache.as_ref().is_none_or(|(e, _)| *e != epoch) {
            order_cache = Some((epoch, sample_order(n, cfg.seed, epoch)));
        }
        order_cache.as_ref().unwrap().1[(s % n as u64) as usize]
    };

    // validate, keep the best adapter (and conditioner), record
    let evaluate = |dec: &Decoder, state: &mut LoopState, obs: &mut dyn LmObserver| -> Result<()> {
        let (vl, vr) = validate(dec, val, ref_val.as_deref(), cfg, pad, cond, adapter, obs)?;
        let best = vl < state.best_val;
        if best {
            state.best_val = vl;
            state.best_step = state.step;
            dec.save_peft(adapter, &files.best_adapter(), base_model)?;
            if let Some(c) = cond {
                rudder_nn::checkpoint::save(
                    &c.tensors(),
                    &files.best_adapter().join(CONDITIONER_FILE),
                )?;
            }
        }
        let er = EvalRecord {
            step: state.step,
            epoch: (state.step * eff as u64) as f64 / n as f64,
            val_loss: vl,
            val_rewards: vr,
            best,
        };
        obs.eval(&er);
        state.history.evals.push(er);
        Ok(())
    };
    // the starting point is validated too, so "best" can be the adapter the run started from
    // (a preference stage that only hurts keeps its SFT adapter)
    if !resume {
        mode.eval();
        evaluate(mode.dec, &mut state, obs)?;
    }
    let mut completed = true;
    while state.step < total_steps {
        let t0 = Instant::now();
        let step = state.step;
        let idx: Vec<usize> = (step * eff as u64..(step + 1) * eff as u64)
            .map(&mut sample)
            .collect();
        let mut acc: Vec<Option<Tensor>> = vec![None; all.len()];
        let p_hybrid = cond.map_or(0.0, |c| {
            c.hybrid_probability(step, total_steps, n as f64 / eff as f64)
        });
        let mut loss_sum = 0f64;
        let mut tokens = 0usize;
        let mut rw = RewardStats::default();
        for (m, mb) in idx.chunks(cfg.micro_batch).enumerate() {
            let exs: Vec<&LmExample> = mb.iter().map(|&i| &train[i]).collect();
            let refs: Option<Vec<Vec<f32>>> = if !needs_ref {
                None
            } else if let Some(rt) = &ref_train {
                Some(mb.iter().map(|&i| rt[i].clone()).collect())
            } else {
                // no cache: the reference runs now (initial adapter, evaluation mode)
                mode.eval();
                let cur: Vec<Tensor> = params
                    .iter()
                    .map(|(_, v)| v.as_tensor().copy())
                    .collect::<candle_core::Result<_>>()?;
                set_all(&params, &init)?;
                let (r, tk) = sequence_logps(mode.dec, &exs, cfg.objective, pad)?;
                set_all(&params, &cur)?;
                tokens += tk;
                Some(r)
            };
            mode.train();
            let hybrid = p_hybrid > 0.0
                && rudder_data::rng::stream(cfg.seed, &[0xC0C, step, m as u64]).random::<f64>()
                    < p_hybrid;
            let (loss, st, tk) =
                with_prepared(cond.map(|c| (c, adapter)), &exs, hybrid, true, |p| {
                    batch_loss(mode.dec, &exs, refs.as_deref(), cfg, pad, p)
                })?;
            tokens += tk;
            let w = exs.len() as f64 / idx.len() as f64;
            loss_sum += loss.to_scalar::<f32>()? as f64 * w;
            if let Some(st) = st {
                rw.chosen += st.chosen * w;
                rw.rejected += st.rejected * w;
                rw.margin += st.margin * w;
                rw.accuracy += st.accuracy * w;
            }
            let grads = (loss * w)?.backward()?;
            for (a, (_, v)) in acc.iter_mut().zip(&all) {
                if let Some(g) = grads.get(v.as_tensor()) {
                    *a = Some(match a.take() {
                        Some(x) => (x + g)?,
                        None => g.clone(),
                    });
                }
            }
            obs.progress(
                "train (micro-batches of this step)",
                m + 1,
                accum.min(idx.len().div_ceil(cfg.micro_batch)),
            );
        }
        mode.eval();
        let mut gs: Vec<Tensor> = acc
            .into_iter()
            .zip(&all)
            .map(|(g, (_, v))| g.map_or_else(|| v.as_tensor().zeros_like(), Ok))
            .collect::<candle_core::Result<_>>()?;
        let grad_norm = clip_grad_norm(&mut gs, cfg.max_grad_norm)?;
        let lo = cfg.lr * cfg.lr_floor;
        let lr = warmup_cosine(step, total_steps, warmup, cfg.lr, lo, lo);
        opt.set_lr(lr);
        opt.step_with(|p| {
            all.iter()
                .position(|(_, v)| v.as_tensor().id() == p.id())
                .map(|i| gs[i].clone())
        })?;
        state.step += 1;
        let secs = t0.elapsed().as_secs_f64();
        let rec = StepRecord {
            step: state.step,
            epoch: (state.step * eff as u64) as f64 / n as f64,
            loss: loss_sum,
            lr,
            grad_norm,
            seconds: secs,
            tokens,
            tokens_per_s: tokens as f64 / secs.max(1e-9),
            rewards: needs_ref.then_some(rw),
        };
        obs.step(&rec);
        state.history.steps.push(rec);

        if state.step.is_multiple_of(eval_steps) || state.step == total_steps {
            evaluate(mode.dec, &mut state, obs)?;
            // checkpoint, then metrics (both atomic)
            state.dropout_calls = adapter.dropout_calls();
            let (adam_steps, mut tensors) = opt.state("adam")?;
            state.adam_steps = adam_steps;
            for (name, v) in &params {
                tensors.push((format!("adapter.{name}"), v.as_tensor().clone()));
            }
            for ((name, _), t) in params.iter().zip(&init) {
                tensors.push((format!("initial.{name}"), t.clone()));
            }
            if let Some(c) = cond {
                tensors.extend(
                    c.tensors()
                        .into_iter()
                        .map(|(k, v)| (format!("cond.{k}"), v)),
                );
            }
            let meta =
                serde_json::to_string(&state).map_err(|e| LlmrecError::Config(e.to_string()))?;
            rudder_nn::checkpoint::save_state(&tensors, &meta, &files.checkpoint())?;
            write_atomic(&files.metrics(), state.history.jsonl().as_bytes())?;
        }
        if !obs.keep_going(state.step) {
            completed = state.step >= total_steps;
            break;
        }
    }
    if completed {
        write_atomic(&files.metrics(), state.history.jsonl().as_bytes())?;
        let _ = std::fs::remove_file(files.checkpoint());
    }
    Ok(LmTrainReport {
        history: state.history,
        best_val: state.best_val,
        best_step: state.best_step,
        total_steps,
        completed,
        resumed_from,
    })
}

fn set_all(params: &[(String, candle_core::Var)], vals: &[Tensor]) -> Result<()> {
    for ((_, v), t) in params.iter().zip(vals) {
        v.set(t)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{Catalog, RecExample, candidates_for};
    use crate::lmdata::{Tokenize, tokenize};
    use crate::prompts::Templates;
    use rudder_lm::config::Arch;
    use rudder_lm::fixtures::{TinySpec, write_hf_dir};
    use rudder_lm::loader::{LanguageModel, LoadOptions, load};

    /// A tiny model over 30 items `x0..x29` whose next item is the first history item + 2, and
    /// 24 questions with histories at `offsets` from their first item.
    fn world(dir: &Path, offsets: &[u32]) -> (LanguageModel, Catalog, Vec<RecExample>, Templates) {
        let spec = TinySpec {
            context: 256,
            ..TinySpec::new(Arch::Llama)
        };
        write_hf_dir(&dir.join("m"), &spec).unwrap();
        let lm = load(&dir.join("m"), &LoadOptions::default()).unwrap();
        let cat = Catalog::new((0..30).map(|i| format!("x{i}")).collect());
        let ex: Vec<RecExample> = (0..24u32)
            .map(|i| {
                let h: Vec<u32> = offsets.iter().map(|o| (i + o) % 30).collect();
                let t = (i + 2) % 30;
                RecExample {
                    candidates: candidates_for(&h, t, 30, 4, 1).unwrap(),
                    history: h,
                    target: t,
                }
            })
            .collect();
        let tpl = Templates::from_text("t", "h [HistoryHere] c [CansHere] a:").unwrap();
        (lm, cat, ex, tpl)
    }

    fn setup(dir: &Path) -> (LanguageModel, Vec<LmExample>, Vec<LmExample>) {
        // the next item is the first history item + 2: learnable from the prompt
        let (lm, cat, ex, tpl) = world(dir, &[0, 1]);
        let opt = Tokenize {
            negatives: 2,
            ..Tokenize::default()
        };
        let all = tokenize(&ex, &cat, &tpl, &lm.tok, 256, &opt).unwrap();
        (lm, all[..16].to_vec(), all[16..].to_vec())
    }

    fn cfg(objective: Objective) -> LmTrainConfig {
        LmTrainConfig {
            lr: 5e-3,
            epochs: 2.0,
            micro_batch: 2,
            effective_batch: 4,
            eval_every: 0.5,
            negatives: if objective == Objective::Sdpo { 2 } else { 1 },
            ..LmTrainConfig::reference(objective)
        }
    }

    struct StopAt(u64);
    impl LmObserver for StopAt {
        fn keep_going(&mut self, step: u64) -> bool {
            step < self.0
        }
    }

    fn adapter_values(a: &Adapter) -> Vec<Vec<f32>> {
        a.params
            .iter()
            .map(|(_, v)| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
            .collect()
    }

    #[test]
    fn sft_lowers_the_validation_loss() {
        let d = tempfile::tempdir().unwrap();
        let (mut lm, tr, va) = setup(d.path());
        let ad = lm.decoder.attach_lora(&LoraConfig::default(), 1).unwrap();
        let files = RunFiles {
            dir: d.path().join("run"),
        };
        std::fs::create_dir_all(&files.dir).unwrap();
        let c = LmTrainConfig {
            epochs: 6.0,
            ..cfg(Objective::Sft)
        };
        let rep = train(
            &mut lm.decoder,
            &ad,
            &c,
            &tr,
            &va,
            lm.tok.pad,
            "tiny",
            &files,
            false,
            None,
            &mut Silent,
        )
        .unwrap();
        assert!(rep.completed && rep.total_steps == 24);
        // the starting adapter is validated first (step 0)
        assert_eq!(rep.history.evals[0].step, 0);
        let first = rep.history.evals.first().unwrap().val_loss;
        assert!(rep.best_val < first * 0.9, "{first} → {}", rep.best_val);
        assert!(
            files
                .best_adapter()
                .join("adapter_model.safetensors")
                .exists()
        );
        assert!(
            !files.checkpoint().exists(),
            "a finished run leaves no checkpoint"
        );
        let lines = std::fs::read_to_string(files.metrics()).unwrap();
        assert_eq!(
            lines
                .lines()
                .filter(|l| l.contains("\"kind\":\"step\""))
                .count(),
            24
        );
        // warmup then decay
        let lrs: Vec<f64> = rep.history.steps.iter().map(|s| s.lr).collect();
        assert!(lrs[0] == 0.0 && lrs[2] > lrs[23]);
    }

    #[test]
    fn sdpo_resumes_exactly_and_its_shortcuts_change_nothing() {
        let d = tempfile::tempdir().unwrap();
        let (mut lm, tr, va) = setup(d.path());
        let c = cfg(Objective::Sdpo);
        let run = |lm: &mut LanguageModel,
                   name: &str,
                   c: &LmTrainConfig,
                   stop: Option<u64>,
                   resume: bool| {
            let files = RunFiles {
                dir: d.path().join(name),
            };
            std::fs::create_dir_all(&files.dir).unwrap();
            let ad = lm.decoder.attach_lora(&c.lora, 7).unwrap();
            // a non-trivial starting adapter (as after SFT), the reference of the run
            for (k, (_, v)) in ad.params.iter().enumerate() {
                let t =
                    (v.as_tensor().ones_like().unwrap() * (0.01 * (k % 5) as f64 - 0.02)).unwrap();
                v.set(&t).unwrap();
            }
            let rep = train(
                &mut lm.decoder,
                &ad,
                c,
                &tr,
                &va,
                lm.tok.pad,
                "tiny",
                &files,
                resume,
                None,
                &mut StopAt(stop.unwrap_or(u64::MAX)),
            )
            .unwrap();
            (rep, adapter_values(&ad))
        };
        let (full, want) = run(&mut lm, "full", &c, None, false);
        assert_eq!(full.total_steps, 8);
        assert!(full.history.steps.iter().all(|s| s.rewards.is_some()));
        // killed after step 5 (last checkpoint at step 4), then resumed
        let (part, _) = run(&mut lm, "cut", &c, Some(5), false);
        assert!(!part.completed);
        let (res, got) = run(&mut lm, "cut", &c, None, true);
        assert_eq!(res.resumed_from, Some(4));
        assert_eq!(got, want, "resumed run must equal the uninterrupted one");
        let m1 = std::fs::read_to_string(d.path().join("full/metrics.jsonl")).unwrap();
        let m2 = std::fs::read_to_string(d.path().join("cut/metrics.jsonl")).unwrap();
        let strip = |m: &str| {
            m.lines()
                .map(|l| {
                    let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                    for k in ["seconds", "tokens_per_s"] {
                        v.as_object_mut().unwrap().remove(k);
                    }
                    v
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(strip(&m1), strip(&m2));
        // without prefix sharing and without the reference cache: the same losses (dropout
        // off: its masks depend on the tensor shapes)
        let c0 = LmTrainConfig {
            lora: LoraConfig {
                dropout: 0.0,
                ..c.lora.clone()
            },
            ..c.clone()
        };
        let (shared, _) = run(&mut lm, "shared", &c0, None, false);
        let (plain, _) = run(
            &mut lm,
            "plain",
            &LmTrainConfig {
                prefix_sharing: false,
                cache_reference: false,
                ..c0.clone()
            },
            None,
            false,
        );
        for (a, b) in shared.history.steps.iter().zip(&plain.history.steps) {
            assert!(
                (a.loss - b.loss).abs() < 1e-3 * (1.0 + b.loss.abs()),
                "{} vs {}",
                a.loss,
                b.loss
            );
        }
        // a DPO config with several negatives is refused
        let e = LmTrainConfig {
            negatives: 3,
            ..LmTrainConfig::reference(Objective::Dpo)
        }
        .validate();
        assert!(e.is_err());
    }

    /// Tiny LM, a tiny SASRec over the same 30 items, and hybrid examples.
    fn hybrid_setup(
        dir: &Path,
    ) -> (
        LanguageModel,
        Vec<LmExample>,
        Vec<LmExample>,
        Box<dyn crate::seqrec::SeqModel + Send + Sync>,
    ) {
        let (lm, cat, ex, tpl) = world(dir, &[0, 1, 5]);
        let opt = Tokenize::default();
        let mut all = tokenize(&ex, &cat, &tpl, &lm.tok, 256, &opt).unwrap();
        crate::hybrid::attach_hybrid(&mut all, &ex, &cat, &tpl, &lm.tok, 256, &opt).unwrap();
        let h = all[0].hybrid.as_ref().unwrap();
        assert_eq!(h.slots.len(), 3 + 4);
        for &(p, _) in &h.slots {
            assert_eq!(h.prompt[p], lm.tok.pad, "a marker sits at every slot");
        }
        let sc = crate::seqrec::SeqConfig {
            hidden: 16,
            ..crate::seqrec::SeqConfig::new(crate::seqrec::SeqKind::Sasrec)
        };
        let seq = crate::seqtrain::build(30, &sc).unwrap();
        (lm, all[..16].to_vec(), all[16..].to_vec(), seq)
    }

    /// A MoE adapter set to 0.05 everywhere, in training mode.
    fn moe_adapter(lm: &mut LanguageModel, moe: &LoraConfig) -> Adapter {
        let ad = lm.decoder.attach_lora(moe, 3).unwrap();
        for (_, v) in &ad.params {
            v.set(&(v.as_tensor().ones_like().unwrap() * 0.05).unwrap())
                .unwrap();
        }
        ad.set_training(true);
        lm.decoder.differentiable = true;
        ad
    }

    /// The gradients of one conditioned training pass over `exs`' answers.
    fn conditioned_grads(
        lm: &LanguageModel,
        c: &dyn Conditioner,
        ad: &Adapter,
        exs: &[&LmExample],
        hybrid: bool,
    ) -> candle_core::backprop::GradStore {
        let mut prep = c.prepare(exs, hybrid, true, ad).unwrap();
        let (lp, _, _) = logprobs(
            &lm.decoder,
            exs,
            Objective::Sft,
            false,
            lm.tok.pad,
            &mut prep,
        )
        .unwrap();
        let grads = lp.sum_all().unwrap().backward().unwrap();
        ad.set_gate(None).unwrap();
        grads
    }

    #[test]
    fn ilora_trains_every_part_and_resumes_exactly() {
        use crate::ilora::{Curriculum, SeqConditioner};
        use crate::router::RouterKind;
        let d = tempfile::tempdir().unwrap();
        let moe = LoraConfig {
            r: 8,
            experts: 4,
            ..LoraConfig::default()
        };
        let cond_with = |seq, curriculum, kind| {
            SeqConditioner::new(seq, 10, 30, 64, 2, Some((kind, 4)), curriculum, 5).unwrap()
        };
        let cond = |seq, curriculum| cond_with(seq, curriculum, RouterKind::Resnet);
        // per-layer gates (the reference's Dense gating): each layer's gate learns
        {
            let (mut lm, tr, _, seq) = hybrid_setup(&d.path().join("l"));
            assert_eq!(lm.decoder.cfg.num_layers, 2);
            let c = cond_with(seq, Curriculum::Hybrid, RouterKind::Layer);
            let ad = moe_adapter(&mut lm, &moe);
            let exs: Vec<&LmExample> = tr[..2].iter().collect();
            let grads = conditioned_grads(&lm, &c, &ad, &exs, true);
            let router = &c.groups()[1].params;
            assert_eq!(router.len(), 2);
            rudder_nn::grad::assert_all_receive_gradient(&grads, router);
        }
        // gradient coverage: projector, router and every expert of every adapted layer
        {
            let (mut lm, tr, _, seq) = hybrid_setup(&d.path().join("g"));
            assert_eq!(lm.decoder.cfg.hidden_size, 64);
            let c = cond(seq, Curriculum::Hybrid);
            let ad = moe_adapter(&mut lm, &moe);
            let exs: Vec<&LmExample> = tr[..3].iter().collect();
            let pass = |hybrid: bool| conditioned_grads(&lm, &c, &ad, &exs, hybrid);
            let grads = pass(true);
            rudder_nn::grad::assert_all_receive_gradient(&grads, &ad.params);
            for g in c.groups() {
                rudder_nn::grad::assert_all_receive_gradient(&grads, &g.params);
            }
            // a text-only pass still gates the experts (the router learns), the projector idles
            let grads = pass(false);
            let router = &c.groups()[1].params;
            rudder_nn::grad::assert_all_receive_gradient(&grads, router);
            assert!(grads.get(c.projector.w1.as_tensor()).is_none());
            // a history longer than the SASRec window, or naming an unknown item, is refused
            let long = [1u32; 11];
            let e = c
                .check_histories([&long[..]], "question")
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("question 0: a history of 11 items") && e.contains("window of 10"),
                "{e}"
            );
            let e = c.users(&[&[3u32, 31][..]]).unwrap_err().to_string();
            assert!(e.contains("item 31 is outside"), "{e}");
            // the adapter's expert count must match the router's
            lm.decoder.detach_lora();
            let plain = lm.decoder.attach_lora(&LoraConfig::default(), 3).unwrap();
            let e = c
                .prepare(&exs, true, false, &plain)
                .err()
                .unwrap()
                .to_string();
            assert!(e.contains("router has 4 experts, the adapter 1"), "{e}");
        }
        // training through the one loop; killed and resumed equals uninterrupted, with the
        // router's batch-norm statistics and the projector restored
        let run = |name: &str, stop: Option<u64>, resume: bool| {
            let (mut lm, tr, va, seq) = hybrid_setup(&d.path().join("m"));
            let c = cond(seq, Curriculum::Linear);
            let files = RunFiles {
                dir: d.path().join(name),
            };
            std::fs::create_dir_all(&files.dir).unwrap();
            let ad = lm.decoder.attach_lora(&moe, 7).unwrap();
            let cfgs = LmTrainConfig {
                lora: moe.clone(),
                lr_floor: 0.01,
                ..cfg(Objective::Sft)
            };
            let rep = train(
                &mut lm.decoder,
                &ad,
                &cfgs,
                &tr,
                &va,
                lm.tok.pad,
                "tiny",
                &files,
                resume,
                Some(&c),
                &mut StopAt(stop.unwrap_or(u64::MAX)),
            )
            .unwrap();
            let mut vals = adapter_values(&ad);
            for (_, t) in c.tensors() {
                vals.push(t.flatten_all().unwrap().to_vec1().unwrap());
            }
            (rep, vals, files)
        };
        let (full, want, files) = run("full", None, false);
        assert_eq!(full.total_steps, 8);
        assert!(files.best_adapter().join(CONDITIONER_FILE).exists());
        let first = full.history.evals.first().unwrap().val_loss;
        assert!(
            full.best_val < first,
            "validation loss {first} → {}",
            full.best_val
        );
        let (part, _, _) = run("cut", Some(5), false);
        assert!(!part.completed);
        let (res, got, _) = run("cut", None, true);
        assert_eq!(res.resumed_from, Some(4));
        let diff = got.iter().zip(&want).position(|(a, b)| a != b);
        assert!(
            got.len() == want.len() && diff.is_none(),
            "resumed iLoRA run must equal the uninterrupted one (tensor {diff:?} differs)"
        );
    }
}
