//! `rudder steer …`: activation sets, probes, directions, control vectors and the
//! reasoning-strength study (flags → rudder-steer calls → run folders with plots).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use rudder_lm::hooks::{Phases, Positions, Site};
use rudder_lm::loader::{LanguageModel, LoadOptions, load};
use rudder_steer::activations::{ActivationSet, CaptureConfig, capture};
use rudder_steer::cvec::ControlVector;
use rudder_steer::direction::SteeringVectors;
use rudder_steer::probe::ProbeKind;
use rudder_steer::prompts::{PromptSet, Rendering};
use rudder_steer::study::{self, PlanConfig};
use serde_json::{Value, json};

#[derive(Subcommand)]
pub enum SteerCmd {
    /// Run the whole reasoning-strength study (labels → probes → direction → sweep → logits →
    /// overthinking detector → efficient reasoning), resuming where a previous run stopped.
    Plan(PlanArgs),
    /// Capture activations of a prompt set (chat template applied, last prompt token by
    /// default) into one safetensors file + JSON index; resumes after an interruption.
    Capture(CaptureArgs),
    /// Fit a linear probe per captured site against a target, report MSE/R²/Pearson/Spearman
    /// per layer and plot the layer curve.
    Probe(ProbeArgs),
    /// Difference-of-means steering vectors between label groups (norms, cosine matrices).
    Vector(VectorArgs),
    /// Generate with a steering vector at each strength of a grid (all layers and positions, or
    /// a layer band): mean response length and accuracy per α (and per label).
    Sweep(SweepArgs),
    /// Logits of the end-of-reasoning token (EOS without one), EOS and random tokens at the
    /// first generated position under each strength, with the top-20 movers.
    Logits(LogitsArgs),
    /// Overthinking detector: probe-predicted length as a per-prompt score on benign vs attacked
    /// prompts (AUROC, TPR at a calibrated threshold, prompt-length baseline, ROC plot).
    Detect(DetectArgs),
    /// Export steering vectors to llama.cpp's control-vector GGUF.
    Export(ExportArgs),
    /// Turn a vector file (rudder safetensors or llama.cpp GGUF) into an intervention list
    /// (for `--interventions`, `rudder serve --steer`).
    Import(ImportArgs),
    /// AlphaSteer: null-space-constrained refusal steering.
    #[command(subcommand)]
    Alphasteer(crate::alphasteer_cmd::AlphaSteerCmd),
    /// Safety/utility evaluation of refusal steering: greedy generation over the harmful,
    /// jailbreak, XSTest-safe, math and AlpacaEval sets for the unsteered model, AlphaSteer at
    /// each strength and the plain refusal-vector baseline; keyword and LLM refusal judges;
    /// trade-off table and plots. Resumes after an interruption.
    EvalRefusal(crate::alphasteer_cmd::EvalArgs),
    /// Refusal rates of responses that already exist (any JSON/JSONL with one or several
    /// response fields), by keywords and optionally an LLM judge.
    Judge(crate::alphasteer_cmd::JudgeArgs),
}

#[derive(Args, Clone)]
pub struct RenderArgs {
    /// User-message template with {problem} (default: the reasoning-strength prompt for
    /// `plan`, the bare text for `capture`).
    #[arg(long)]
    pub template: Option<String>,
    /// Feed the text raw instead of through the chat template.
    #[arg(long)]
    pub raw: bool,
}

impl RenderArgs {
    fn rendering(&self, default: Rendering) -> Rendering {
        let mut r = default;
        if let Some(t) = &self.template {
            r.template = t.clone();
        }
        if self.raw {
            r.chat = false;
        }
        r
    }
}

#[derive(Args)]
pub struct PlanArgs {
    #[arg(long, short, default_value = "smollm2-135m-instruct")]
    pub model: String,
    /// MATH-style questions with a `level` field (e.g. ../shared/data/steering/reasoning/math.json).
    #[arg(long)]
    pub questions: PathBuf,
    #[arg(long, short)]
    pub out: PathBuf,
    /// Questions per level for labels and probes (0 = all).
    #[arg(long, default_value_t = 40)]
    pub per_level: usize,
    /// Rollouts per question for the length labels (reference: 8).
    #[arg(long, default_value_t = 2)]
    pub rollouts: usize,
    #[command(flatten)]
    pub rollout: RolloutArgs,
    /// Probe: lasso (reference, α=10) or ridge.
    #[arg(long, default_value = "lasso")]
    pub probe: String,
    #[arg(long, default_value_t = 10.0)]
    pub probe_alpha: f64,
    /// Strength grid (reference: −0.2…0.2 in steps of 0.05).
    #[arg(long, value_delimiter = ',', allow_hyphen_values = true)]
    pub alphas: Option<Vec<f64>>,
    /// Questions per level in the steering sweep.
    #[arg(long, default_value_t = 6)]
    pub sweep_per_level: usize,
    #[arg(long, default_value_t = 1)]
    pub sweep_rollouts: usize,
    /// Prompts for the end-of-reasoning logit check.
    #[arg(long, default_value_t = 60)]
    pub logit_questions: usize,
    /// Benign prompts for the overthinking detector (e.g. alpacaeval.json).
    #[arg(long)]
    pub benign: Option<PathBuf>,
    /// Attacked prompts for the detector (e.g. alpacaeval_overthink_attack.json).
    #[arg(long)]
    pub attack: Option<PathBuf>,
    #[command(flatten)]
    pub render: RenderArgs,
}

/// How rollouts are generated (plan and sweep).
#[derive(Args, Clone)]
pub struct RolloutArgs {
    /// New-token cap per rollout (reference: 16,384).
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// Sampling temperature, 0 = greedy (reference: 0.6).
    #[arg(long, default_value_t = 0.6)]
    pub temperature: f32,
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// End-of-reasoning marker (e.g. "</think>" for R1-distill models). Without it the whole
    /// response (up to EOS) is the reasoning — right for models that do not think.
    #[arg(long)]
    pub marker: Option<String>,
    /// Generations decoded together.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Number format of the key/value cache while generating: f16 halves what attention reads
    /// per step (long batched rollouts run faster; numbers differ from f32 by that rounding),
    /// f32 gives exactly the padded decoder's numbers.
    #[arg(long, default_value = "f16")]
    pub kv: rudder_lm::ragged::KvPrecision,
}

#[derive(Args)]
pub struct CaptureArgs {
    #[arg(long, short, default_value = "smollm2-135m-instruct")]
    pub model: String,
    #[arg(long)]
    pub prompts: PathBuf,
    /// Text field (default: problem, query, prompt, question, instruction or text).
    #[arg(long)]
    pub field: Option<String>,
    /// Label field stored with the rows (e.g. level).
    #[arg(long)]
    pub label: Option<String>,
    /// hf (embeddings + every block input + final norm), resid_pre, resid_post, or a
    /// comma-separated list of site names.
    #[arg(long, default_value = "hf")]
    pub sites: String,
    #[arg(long, default_value = "last")]
    pub positions: String,
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Only the first N prompts.
    #[arg(long, default_value_t = 0)]
    pub limit: usize,
    #[command(flatten)]
    pub render: RenderArgs,
    #[arg(long, short)]
    pub out: PathBuf,
}

#[derive(Args)]
pub struct ProbeArgs {
    /// An activation set from `rudder steer capture`.
    #[arg(long)]
    pub acts: PathBuf,
    /// Targets: a JSON array / JSONL with one record per row, in row order.
    #[arg(long)]
    pub targets: Option<PathBuf>,
    /// The numeric target field of those records.
    #[arg(long, default_value = "mean_reasoning_tokens")]
    pub target_field: String,
    /// Use the set's own labels as the target (numbers, or "Level k" → k).
    #[arg(long, conflicts_with = "targets")]
    pub from_labels: bool,
    /// lasso, ridge or logistic (0/1 targets).
    #[arg(long, default_value = "lasso")]
    pub probe: String,
    /// α for lasso/ridge, C for logistic.
    #[arg(long, default_value_t = 10.0)]
    pub alpha: f64,
    /// Lasso: stop when the duality gap is below tol · ‖y − ȳ‖² (scikit-learn's rule).
    #[arg(long, default_value_t = 1e-4)]
    pub tol: f64,
    /// Lasso: coordinate-descent sweeps at most.
    #[arg(long, default_value_t = 10_000)]
    pub max_iter: usize,
    #[arg(long, default_value_t = 0.1)]
    pub test_fraction: f64,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Also run k-fold cross-validation (k ≥ 2).
    #[arg(long, default_value_t = 0)]
    pub folds: usize,
    #[arg(long, short)]
    pub out: PathBuf,
}

#[derive(Args)]
pub struct VectorArgs {
    #[arg(long)]
    pub acts: PathBuf,
    /// The reference label group.
    #[arg(long, default_value = "Level 1")]
    pub reference: String,
    #[arg(long, short)]
    pub out: PathBuf,
}

#[derive(Args)]
pub struct SweepArgs {
    #[arg(long, short, default_value = "smollm2-135m-instruct")]
    pub model: String,
    /// Steering vectors (rudder safetensors or llama.cpp GGUF).
    #[arg(long)]
    pub vector: PathBuf,
    #[arg(long)]
    pub prompts: PathBuf,
    #[arg(long)]
    pub field: Option<String>,
    /// Label field for per-label means (e.g. level).
    #[arg(long)]
    pub label: Option<String>,
    #[arg(long, default_value_t = 0)]
    pub limit: usize,
    #[arg(
        long,
        value_delimiter = ',',
        allow_hyphen_values = true,
        default_value = "-0.2,-0.15,-0.1,-0.05,0,0.05,0.1,0.15,0.2"
    )]
    pub alphas: Vec<f64>,
    /// Only these layers, e.g. 10..20 or 8-14,16.
    #[arg(long)]
    pub layers: Option<String>,
    /// all, prompt, last, generated or from:K.
    #[arg(long, default_value = "all")]
    pub positions: String,
    #[arg(long, default_value_t = 1)]
    pub rollouts: usize,
    #[command(flatten)]
    pub rollout: RolloutArgs,
    #[command(flatten)]
    pub render: RenderArgs,
    #[arg(long, short)]
    pub out: PathBuf,
}

#[derive(Args)]
pub struct LogitsArgs {
    #[arg(long, short, default_value = "smollm2-135m-instruct")]
    pub model: String,
    #[arg(long)]
    pub vector: PathBuf,
    #[arg(long)]
    pub prompts: PathBuf,
    #[arg(long)]
    pub field: Option<String>,
    #[arg(long, default_value_t = 100)]
    pub limit: usize,
    #[arg(
        long,
        value_delimiter = ',',
        allow_hyphen_values = true,
        default_value = "-0.2,-0.1,0,0.1,0.2"
    )]
    pub alphas: Vec<f64>,
    /// The end-of-reasoning token (default: EOS).
    #[arg(long)]
    pub marker: Option<String>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub render: RenderArgs,
    #[arg(long, short)]
    pub out: PathBuf,
}

#[derive(Args)]
pub struct DetectArgs {
    /// Probes from `rudder steer probe` (probes.safetensors).
    #[arg(long)]
    pub probes: PathBuf,
    /// Activations of benign prompts at the probes' sites.
    #[arg(long)]
    pub benign: PathBuf,
    /// Activations of attacked prompts.
    #[arg(long)]
    pub attack: PathBuf,
    /// Only this site's probe (default: the mean over all probes, as the reference).
    #[arg(long)]
    pub site: Option<String>,
    #[arg(long, default_value_t = 0.05)]
    pub fpr: f64,
    #[arg(long, short)]
    pub out: PathBuf,
}

#[derive(Args)]
pub struct ExportArgs {
    /// A vector file from `rudder steer vector` (or `plan`'s vector.safetensors).
    #[arg(long)]
    pub vector: PathBuf,
    #[arg(long, default_value = "")]
    pub model_hint: String,
    #[arg(long, short)]
    pub out: PathBuf,
}

#[derive(Args)]
pub struct ImportArgs {
    /// rudder safetensors or llama.cpp control-vector GGUF.
    #[arg(long)]
    pub vector: PathBuf,
    #[arg(long, default_value_t = 1.0, allow_hyphen_values = true)]
    pub strength: f32,
    /// all, prompt, last, generated or from:K.
    #[arg(long, default_value = "all")]
    pub positions: String,
    #[arg(long, short)]
    pub out: PathBuf,
}

pub(crate) fn open_model(m: &str) -> Result<LanguageModel> {
    let path = crate::lm_cmd::resolve_model(m)?;
    let sp = crate::progress::spinner(&format!("loading {}", path.display()));
    let lm = load(&path, &LoadOptions::default())?;
    sp.finish_and_clear();
    Ok(lm)
}

/// One progress bar per step of a long run: a new bar when the step's label changes.
#[derive(Default)]
pub(crate) struct StepBars(Option<(String, indicatif::ProgressBar)>);

impl StepBars {
    pub(crate) fn update(&mut self, label: &str, done: usize, total: usize) {
        if self.0.as_ref().is_none_or(|(l, _)| l != label) {
            self.finish();
            self.0 = Some((label.to_string(), bar(label, total as u64)));
        }
        if let Some((_, b)) = &self.0 {
            b.set_position(done as u64);
        }
    }

    pub(crate) fn finish(&mut self) {
        if let Some((_, b)) = self.0.take() {
            b.finish();
        }
    }
}

pub(crate) fn bar(label: &str, total: u64) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::new(total);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg:>18} {bar:30} {pos}/{len} [{elapsed} < {eta}]",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    pb.set_message(label.to_string());
    pb
}

pub fn run(cmd: SteerCmd) -> Result<()> {
    match cmd {
        SteerCmd::Plan(a) => run_plan(a),
        SteerCmd::Capture(a) => run_capture(a),
        SteerCmd::Probe(a) => run_probe(a),
        SteerCmd::Vector(a) => run_vector(a),
        SteerCmd::Sweep(a) => run_sweep(a),
        SteerCmd::Logits(a) => run_logits(a),
        SteerCmd::Detect(a) => run_detect(a),
        SteerCmd::Export(a) => run_export(a),
        SteerCmd::Import(a) => run_import(a),
        SteerCmd::Alphasteer(c) => crate::alphasteer_cmd::run_alphasteer(c),
        SteerCmd::EvalRefusal(a) => crate::alphasteer_cmd::run_eval(a),
        SteerCmd::Judge(a) => crate::alphasteer_cmd::run_judge(a),
    }
}

fn probe_kind(name: &str, alpha: f64) -> Result<ProbeKind> {
    Ok(match name {
        "lasso" => ProbeKind::lasso(alpha),
        "ridge" => ProbeKind::Ridge { alpha },
        "logistic" => ProbeKind::Logistic { c: alpha },
        o => bail!("--probe {o:?}: expected lasso, ridge or logistic"),
    })
}

fn run_plan(a: PlanArgs) -> Result<()> {
    let lm = Arc::new(open_model(&a.model)?);
    let mut cfg = PlanConfig::new(a.questions.clone());
    cfg.per_level = a.per_level;
    cfg.rollouts = a.rollouts.max(1);
    cfg.max_tokens = a.rollout.max_tokens.max(1);
    cfg.temperature = a.rollout.temperature;
    cfg.top_p = a.rollout.top_p;
    cfg.seed = a.rollout.seed;
    cfg.marker = a.rollout.marker.clone();
    cfg.rendering = a.render.rendering(Rendering::reasoning());
    cfg.probe = probe_kind(&a.probe, a.probe_alpha)?;
    if let Some(al) = &a.alphas {
        cfg.alphas = al.clone();
    }
    cfg.sweep_per_level = a.sweep_per_level;
    cfg.sweep_rollouts = a.sweep_rollouts.max(1);
    cfg.logit_questions = a.logit_questions;
    cfg.benign = a.benign.clone();
    cfg.attack = a.attack.clone();
    cfg.batch = a.rollout.batch.max(1);
    cfg.kv = a.rollout.kv;
    let t0 = std::time::Instant::now();
    let mut bars = StepBars::default();
    let metrics = study::plan(lm.clone(), &cfg, &a.out, &mut |step, d, t| {
        bars.update(step, d, t)
    })?;
    bars.finish();
    plots_and_summary(&a.out, &metrics, t0.elapsed().as_secs_f64())?;
    eprintln!("study written to {} (summary.md)", a.out.display());
    Ok(())
}

fn read(path: &Path) -> Result<Value> {
    Ok(serde_json::from_slice(
        &std::fs::read(path).with_context(|| path.display().to_string())?,
    )?)
}

fn pts(v: &Value, x: &str, y: &str) -> Vec<(f64, f64)> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|r| Some((r[x].as_f64()?, r[y].as_f64()?)))
                .filter(|p| p.1.is_finite())
                .collect()
        })
        .unwrap_or_default()
}

fn plot(res: Result<(), String>, what: &str) {
    if let Err(e) = res {
        tracing::warn!("{what} plot skipped: {e}");
    }
}

/// Histogram of values as a step line: (bin centre, count).
fn histogram(v: &[f64], bins: usize, lo: f64, hi: f64) -> Vec<(f64, f64)> {
    let w = ((hi - lo) / bins as f64).max(1e-12);
    let mut c = vec![0f64; bins];
    for &x in v {
        let b = (((x - lo) / w) as isize).clamp(0, bins as isize - 1) as usize;
        c[b] += 1.0;
    }
    c.iter()
        .enumerate()
        .map(|(i, &n)| (lo + (i as f64 + 0.5) * w, n))
        .collect()
}

fn plots_and_summary(out: &Path, m: &Value, seconds: f64) -> Result<()> {
    let probes = read(&out.join("probes.json"))?;
    let layers = &probes["layers"];
    plot(
        crate::plots::lines(
            &out.join("probe_layers.png"),
            "Probe on question activations: test Spearman ρ and R² per layer",
            "layer (resid_pre)",
            &[
                ("test Spearman", pts(layers, "layer", "test_spearman")),
                ("train Spearman", pts(layers, "layer", "train_spearman")),
                ("test R²", pts(layers, "layer", "test_r2")),
            ],
        ),
        "probe",
    );
    let sweep = &m["sweep"];
    plot(
        crate::plots::lines(
            &out.join("length_vs_alpha.png"),
            "Steering strength vs mean response length",
            "α",
            &[(
                "mean reasoning tokens",
                pts(sweep, "alpha", "mean_reasoning_tokens"),
            )],
        ),
        "sweep",
    );
    let mut lv: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    if let Some(rows) = sweep.as_array() {
        for r in rows {
            if let Some(pl) = r["per_level"].as_object() {
                for (l, v) in pl {
                    let e = match lv.iter_mut().find(|x| &x.0 == l) {
                        Some(e) => e,
                        None => {
                            lv.push((l.clone(), Vec::new()));
                            lv.last_mut().unwrap()
                        }
                    };
                    if let (Some(a), Some(t)) =
                        (r["alpha"].as_f64(), v["mean_reasoning_tokens"].as_f64())
                    {
                        e.1.push((a, t));
                    }
                }
            }
        }
    }
    let lv_ref: Vec<(&str, Vec<(f64, f64)>)> =
        lv.iter().map(|(l, v)| (l.as_str(), v.clone())).collect();
    plot(
        crate::plots::lines(
            &out.join("length_vs_alpha_by_level.png"),
            "Mean response length per level vs α",
            "α",
            &lv_ref,
        ),
        "sweep by level",
    );
    plot(
        crate::plots::lines(
            &out.join("accuracy_vs_alpha.png"),
            "Steering strength vs accuracy",
            "α",
            &[("accuracy", pts(sweep, "alpha", "accuracy"))],
        ),
        "accuracy",
    );
    if let Ok(l) = read(&out.join("logits.json")) {
        let rows = l["rows"].as_array().cloned().unwrap_or_default();
        let all: Vec<f64> = rows
            .iter()
            .flat_map(|r| r["marker_logit"].as_array().cloned().unwrap_or_default())
            .filter_map(|v| v.as_f64())
            .collect();
        if !all.is_empty() {
            let lo = all.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = all.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let series: Vec<(String, Vec<(f64, f64)>)> = rows
                .iter()
                .map(|r| {
                    let v: Vec<f64> = r["marker_logit"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default()
                        .iter()
                        .filter_map(|x| x.as_f64())
                        .collect();
                    (format!("α = {}", r["alpha"]), histogram(&v, 20, lo, hi))
                })
                .collect();
            let sref: Vec<(&str, Vec<(f64, f64)>)> = series
                .iter()
                .map(|(a, b)| (a.as_str(), b.clone()))
                .collect();
            plot(
                crate::plots::lines(
                    &out.join("marker_logit_hist.png"),
                    &format!(
                        "Logit of {} at the first generated position",
                        l["marker_token"].as_str().unwrap_or("the marker")
                    ),
                    "logit",
                    &sref,
                ),
                "logits",
            );
        }
    }
    let d = &m["detect"];
    if !d.is_null() {
        let roc = |v: &Value| -> Vec<(f64, f64)> {
            v["roc"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|p| Some((p[0].as_f64()?, p[1].as_f64()?)))
                        .collect()
                })
                .unwrap_or_default()
        };
        plot(
            crate::plots::lines(
                &out.join("detect_roc.png"),
                "Overthinking detector: ROC (benign vs attacked prompts)",
                "false positive rate",
                &[
                    (
                        "probe (mean over layers)",
                        roc(&d["probe_mean_over_layers"]),
                    ),
                    ("probe (best layer)", roc(&d["probe_best_layer"]["result"])),
                    ("prompt length", roc(&d["prompt_length_baseline"])),
                    ("chance", vec![(0.0, 0.0), (1.0, 1.0)]),
                ],
            ),
            "roc",
        );
    }
    // summary
    let mut s = String::new();
    s.push_str("# Reasoning-strength study\n\n");
    s.push_str(&format!(
        "Model {} (template hash {}), {} questions × {} rollouts (≤ {} new tokens), reasoning length = tokens before {}. Wall time this invocation {:.0} s.\n\n",
        m["model"]["path"].as_str().unwrap_or("?"),
        m["template_hash"].as_str().unwrap_or("?"),
        m["questions"], m["rollouts_per_question"], m["max_tokens"],
        m["marker"].as_str().unwrap_or("EOS"), seconds
    ));
    if m["marker"].as_str().is_some_and(|x| x.starts_with("EOS")) {
        s.push_str("The model does not emit an end-of-reasoning marker, so this study measures its whole response length (EOS marker), as the paper's idea transfers to plain response length; a reasoning model (e.g. DeepSeek-R1-Distill-Qwen-1.5B with `--marker \"</think>\"`) runs the paper's setting unchanged.\n\n");
    }
    s.push_str(&format!(
        "Labels: mean length {:.1} tokens, accuracy {:.3}, {} rollouts cut by the token cap.\n\n",
        m["labels"]["mean_reasoning_tokens"]
            .as_f64()
            .unwrap_or(f64::NAN),
        m["labels"]["accuracy"].as_f64().unwrap_or(f64::NAN),
        m["labels"]["truncated_rollouts"]
    ));
    s.push_str("## Probes (test split)\n\n| site | test Spearman | test R² | test MSE | non-zero weights |\n|---|---|---|---|---|\n");
    for r in layers.as_array().cloned().unwrap_or_default() {
        s.push_str(&format!(
            "| {} | {:.3} | {:.3} | {:.1} | {} |\n",
            r["site"].as_str().unwrap_or(""),
            r["test_spearman"].as_f64().unwrap_or(f64::NAN),
            r["test_r2"].as_f64().unwrap_or(f64::NAN),
            r["test_mse"].as_f64().unwrap_or(f64::NAN),
            r["nonzero"]
        ));
    }
    s.push_str("\n## Steering sweep (all layers, all positions, prefill and decode)\n\n| α | mean length | accuracy | rollouts | cut by cap |\n|---|---|---|---|---|\n");
    for r in sweep.as_array().cloned().unwrap_or_default() {
        s.push_str(&format!(
            "| {} | {:.1} | {:.3} | {} | {} |\n",
            r["alpha"],
            r["mean_reasoning_tokens"].as_f64().unwrap_or(f64::NAN),
            r["accuracy"].as_f64().unwrap_or(f64::NAN),
            r["rollouts"],
            r["finished_by_length"]
        ));
    }
    s.push_str("\n## End-of-reasoning logit at the first generated position\n\n| α | marker logit | EOS logit | random-token logit | marker prob (T=0.6) |\n|---|---|---|---|---|\n");
    for r in m["logits"].as_array().cloned().unwrap_or_default() {
        s.push_str(&format!(
            "| {} | {:.3} | {:.3} | {:.3} | {:.4} |\n",
            r["alpha"],
            r["marker_logit"].as_f64().unwrap_or(f64::NAN),
            r["eos_logit"].as_f64().unwrap_or(f64::NAN),
            r["random_logit"].as_f64().unwrap_or(f64::NAN),
            r["marker_prob"].as_f64().unwrap_or(f64::NAN)
        ));
    }
    if !d.is_null() {
        s.push_str("\n## Overthinking detector (threshold at the benign 95th percentile)\n\n| score | AUROC | TPR | FPR |\n|---|---|---|---|\n");
        for (name, v) in [
            ("probe, mean over layers", &d["probe_mean_over_layers"]),
            ("probe, best layer", &d["probe_best_layer"]["result"]),
            ("prompt length (baseline)", &d["prompt_length_baseline"]),
        ] {
            s.push_str(&format!(
                "| {name} | {:.3} | {:.3} | {:.3} |\n",
                v["auroc"].as_f64().unwrap_or(f64::NAN),
                v["tpr"].as_f64().unwrap_or(f64::NAN),
                v["fpr"].as_f64().unwrap_or(f64::NAN)
            ));
        }
    }
    let eff = m["efficient_level1"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if !eff.is_empty() {
        s.push_str("\n## Efficient reasoning on Level 1 (negative α)\n\n| α | tokens | tokens at α=0 | accuracy | accuracy at α=0 |\n|---|---|---|---|---|\n");
        for r in eff {
            s.push_str(&format!(
                "| {} | {:.1} | {:.1} | {:.3} | {:.3} |\n",
                r["alpha"],
                r["tokens"].as_f64().unwrap_or(f64::NAN),
                r["tokens_at_0"].as_f64().unwrap_or(f64::NAN),
                r["accuracy"].as_f64().unwrap_or(f64::NAN),
                r["accuracy_at_0"].as_f64().unwrap_or(f64::NAN)
            ));
        }
    }
    if let Some(t) = m["seconds_per_step"].as_object().filter(|t| !t.is_empty()) {
        s.push_str("\n## Time (summed over resumptions)\n\n| step | seconds |\n|---|---|\n");
        for (k, v) in t {
            s.push_str(&format!("| {k} | {:.1} |\n", v.as_f64().unwrap_or(0.0)));
        }
        let lt = t.get("labels").and_then(|v| v.as_f64()).unwrap_or(0.0);
        let lg = m["generated_tokens"]["labels"].as_f64().unwrap_or(0.0);
        if lt > 1.0 && lg > 0.0 {
            let tps = lg / lt;
            // the paper's labels: 7,500 MATH questions × 8 rollouts; ~10^8 generated tokens
            let paper = 1e8;
            s.push_str(&format!(
                "\nLabel generation ran at {tps:.0} generated tokens/s ({lg:.0} tokens in {lt:.0} s). At that rate the paper's label budget (7,500 questions × 8 rollouts, about 10⁸ tokens for a thinking model, reference §2.12) would take {:.0} h on this model and machine; the down-scaled protocol of §2.12 (300 questions per level × 4 rollouts × ≤ 8k tokens, at most {:.1}·10⁷ tokens) at most {:.0} h. A larger model decodes proportionally slower.\n",
                paper / tps / 3600.0,
                1500.0 * 4.0 * 8192.0 / 1e7,
                1500.0 * 4.0 * 8192.0 / tps / 3600.0
            ));
        }
    }
    s.push_str("\nPlots: probe_layers.png, length_vs_alpha.png, length_vs_alpha_by_level.png, accuracy_vs_alpha.png, marker_logit_hist.png, detect_roc.png. Data: labels.json, probes.json/.safetensors, vector.safetensors/.json, sweep.json, logits.json, detect.json, rollouts.jsonl (every rollout with its text), metrics.json.\n");
    std::fs::write(out.join("summary.md"), s)?;
    Ok(())
}

fn parse_sites(s: &str, layers: usize) -> Result<Vec<Site>> {
    Ok(match s {
        "hf" => Site::hf_hidden_states(layers),
        "resid_pre" => (0..layers).map(Site::ResidPre).collect(),
        "resid_post" => (0..layers).map(Site::ResidPost).collect(),
        list => list
            .split(',')
            .map(|x| x.trim().parse())
            .collect::<Result<_, _>>()?,
    })
}

fn run_capture(a: CaptureArgs) -> Result<()> {
    let lm = open_model(&a.model)?;
    let set =
        PromptSet::load(&a.prompts, a.field.as_deref(), a.label.as_deref())?.truncate(a.limit);
    let rendering = a.render.rendering(Rendering::plain(true));
    let ids: Vec<Vec<u32>> = set
        .items
        .iter()
        .map(|p| rendering.ids(&lm, &p.text))
        .collect::<rudder_steer::Result<_>>()?;
    let cfg = CaptureConfig {
        sites: parse_sites(&a.sites, lm.decoder.cfg.num_layers)?,
        positions: a.positions.parse()?,
        batch: a.batch.max(1),
        shard_batches: 8,
    };
    let pb = bar("capture", ids.len() as u64);
    let t0 = std::time::Instant::now();
    let labels = set.labels();
    let acts = capture(
        &lm,
        &ids,
        labels.as_deref(),
        &cfg,
        None,
        &a.out,
        json!({"template_hash": rendering.template_hash(&lm), "rendering": rendering, "prompts": a.prompts, "field": set.field, "label_field": set.label_field}),
        &mut |d, _| pb.set_position(d as u64),
    )?;
    pb.finish_and_clear();
    eprintln!(
        "captured {} rows × {} sites (d = {}) in {:.1} s → {}",
        acts.len(),
        acts.sites.len(),
        acts.hidden,
        t0.elapsed().as_secs_f64(),
        a.out.display()
    );
    Ok(())
}

fn run_probe(a: ProbeArgs) -> Result<()> {
    let acts = ActivationSet::load(&a.acts)?;
    let targets: Vec<f64> = if a.from_labels {
        let l = acts
            .labels
            .as_ref()
            .context("the activation set has no labels")?;
        l.iter()
            .map(|s| {
                s.trim_start_matches("Level ")
                    .parse::<f64>()
                    .with_context(|| format!("label {s:?} is not a number"))
            })
            .collect::<Result<_>>()?
    } else {
        let p = a
            .targets
            .as_ref()
            .context("give --targets FILE or --from-labels")?;
        let text = std::fs::read_to_string(p).with_context(|| p.display().to_string())?;
        let recs: Vec<Value> = if text.trim_start().starts_with('[') {
            serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", p.display()))?
        } else {
            text.lines()
                .enumerate()
                .filter(|(_, l)| !l.trim().is_empty())
                .map(|(i, l)| {
                    serde_json::from_str(l)
                        .with_context(|| format!("{}:{}: invalid JSON", p.display(), i + 1))
                })
                .collect::<Result<_>>()?
        };
        recs.iter()
            .enumerate()
            .map(|(i, r)| {
                r[&a.target_field].as_f64().with_context(|| {
                    format!(
                        "{}: record {i}: no numeric field {:?}",
                        p.display(),
                        a.target_field
                    )
                })
            })
            .collect::<Result<_>>()?
    };
    let kind = match probe_kind(&a.probe, a.alpha)? {
        ProbeKind::Lasso { alpha, .. } => ProbeKind::Lasso {
            alpha,
            tol: a.tol,
            max_iter: a.max_iter.max(1),
        },
        k => k,
    };
    let split = rudder_steer::stats::train_test_split(acts.len(), a.test_fraction, a.seed);
    std::fs::create_dir_all(&a.out)?;
    let pb = bar("probes", acts.sites.len() as u64);
    let t0 = std::time::Instant::now();
    let (rows, models) = study::probe_sites(&acts, &targets, kind, &split, &mut |d, _| {
        pb.set_position(d as u64)
    })?;
    pb.finish_and_clear();
    let secs = t0.elapsed().as_secs_f64();
    let mut cv = Vec::new();
    if a.folds >= 2 {
        for (f, sp) in rudder_steer::stats::k_folds(acts.len(), a.folds, a.seed)
            .iter()
            .enumerate()
        {
            let (r, _) = study::probe_sites(&acts, &targets, kind, sp, &mut |_, _| {})?;
            cv.push(json!({"fold": f, "layers": r}));
        }
    }
    study::save_probes(&models, &a.out.join("probes.safetensors"))?;
    let report = json!({"probe": kind, "split": split, "layers": rows, "cv": cv, "seconds": secs, "acts": a.acts});
    std::fs::write(
        a.out.join("probes.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    plot(
        crate::plots::lines(
            &a.out.join("probe_layers.png"),
            &format!("{} probe: test Spearman per layer", kind.name()),
            "layer",
            &[
                (
                    "test Spearman",
                    pts(&report["layers"], "layer", "test_spearman"),
                ),
                ("test R²", pts(&report["layers"], "layer", "test_r2")),
            ],
        ),
        "probe",
    );
    println!("site\ttest_spearman\ttest_r2\ttest_mse");
    for r in &rows {
        println!(
            "{}\t{:.4}\t{:.4}\t{:.2}",
            r.site, r.test_spearman, r.test_r2, r.test_mse
        );
    }
    eprintln!("{} probes in {secs:.2} s → {}", rows.len(), a.out.display());
    Ok(())
}

fn run_vector(a: VectorArgs) -> Result<()> {
    let acts = ActivationSet::load(&a.acts)?;
    let (v, report) = study::level_vectors(&acts, &a.reference)?;
    v.save(&a.out)?;
    let mut p = a.out.as_os_str().to_owned();
    p.push(".report.json");
    std::fs::write(PathBuf::from(p), serde_json::to_string_pretty(&report)?)?;
    for r in &report {
        println!(
            "{}\tmean cosine {:.3}\t‖r‖ {:.3}\tnorms {}",
            r["site"].as_str().unwrap_or(""),
            r["mean_cosine"].as_f64().unwrap_or(f64::NAN),
            r["vector_norm"].as_f64().unwrap_or(f64::NAN),
            r["norms"]
        );
    }
    eprintln!("{} vectors → {}", v.vectors.len(), a.out.display());
    Ok(())
}

fn run_export(a: ExportArgs) -> Result<()> {
    let v = SteeringVectors::load(&a.vector)?;
    let (cv, skipped) = ControlVector::from_sites(&a.model_hint, &v.vectors);
    if cv.layers.is_empty() {
        bail!(
            "none of the vectors is at a site llama.cpp can steer (ResidPost(k) / ResidPre(k+1), k ≥ 1)"
        );
    }
    if !skipped.is_empty() {
        eprintln!(
            "note: llama.cpp cannot steer {} (its control vectors start at block 1's output); left out",
            skipped
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    cv.save(&a.out)?;
    eprintln!(
        "{} layers → {} (llama.cpp: --control-vector {})",
        cv.layers.len(),
        a.out.display(),
        a.out.display()
    );
    Ok(())
}

fn run_import(a: ImportArgs) -> Result<()> {
    let v = SteeringVectors::load(&a.vector)?;
    let positions: Positions = a.positions.parse()?;
    let iv = v.interventions(a.strength, None, positions, Phases::Both);
    let body = serde_json::to_string(&iv.interventions)?;
    std::fs::write(&a.out, body)?;
    eprintln!(
        "{} interventions → {}",
        iv.interventions.len(),
        a.out.display()
    );
    Ok(())
}

/// Layer lists for `--layers`: "8-14,16" or "8..14,16" → [8, …, 14, 16], checked against the
/// model's layer count.
pub(crate) fn parse_layers(s: &str, layers: usize) -> Result<Vec<usize>> {
    let mut v = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (a, b) = match part.split_once("..").or_else(|| part.split_once('-')) {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (part, part),
        };
        let a: usize = a
            .parse()
            .with_context(|| format!("--layers {part:?}: not a layer number"))?;
        let b: usize = b
            .parse()
            .with_context(|| format!("--layers {part:?}: not a layer number"))?;
        if a > b || b >= layers {
            bail!("--layers {part:?}: the model has layers 0..{}", layers - 1);
        }
        v.extend(a..=b);
    }
    v.sort();
    v.dedup();
    if v.is_empty() {
        bail!("--layers {s:?}: no layers");
    }
    Ok(v)
}

fn run_sweep(a: SweepArgs) -> Result<()> {
    use rudder_steer::rollouts::{Journal, RolloutConfig, run};
    let lm = Arc::new(open_model(&a.model)?);
    let vectors = SteeringVectors::load(&a.vector)?;
    vectors.check(
        lm.decoder.cfg.num_layers,
        lm.decoder.cfg.hidden_size,
        &a.vector,
    )?;
    let set =
        PromptSet::load(&a.prompts, a.field.as_deref(), a.label.as_deref())?.truncate(a.limit);
    let rendering = a.render.rendering(Rendering::plain(true));
    let ids: Vec<Vec<u32>> = set
        .items
        .iter()
        .map(|p| rendering.ids(&lm, &p.text))
        .collect::<rudder_steer::Result<_>>()?;
    let gold: Vec<Option<String>> = set
        .items
        .iter()
        .map(|p| study::gold_answer(&p.record))
        .collect();
    let band = a
        .layers
        .as_deref()
        .map(|s| parse_layers(s, lm.decoder.cfg.num_layers))
        .transpose()?;
    let positions: Positions = a.positions.parse()?;
    std::fs::create_dir_all(&a.out)?;
    let engine = rudder_lm::engine::Engine::start(
        lm.clone(),
        rudder_lm::engine::EngineConfig {
            kv: a.rollout.kv,
            ..rudder_lm::engine::EngineConfig::offline(a.rollout.batch)
        },
    );
    let mut journal = Journal::open(&a.out.join("rollouts.jsonl"))?;
    let rc = RolloutConfig {
        per_prompt: a.rollouts.max(1),
        sampling: rudder_lm::generate::GenConfig {
            max_new_tokens: a.rollout.max_tokens.max(1),
            temperature: a.rollout.temperature,
            top_p: a.rollout.top_p,
            seed: a.rollout.seed,
            ..Default::default()
        },
        marker: a.rollout.marker.clone(),
    };
    let mut rows = Vec::new();
    for &alpha in &a.alphas {
        let iv = vectors.interventions(alpha as f32, band.as_deref(), positions, Phases::Both);
        let pb = bar(&format!("α = {alpha}"), (ids.len() * rc.per_prompt) as u64);
        run(
            &engine,
            "sweep",
            &ids,
            &gold,
            &rc,
            alpha,
            (alpha != 0.0).then_some(&iv),
            &mut journal,
            &mut |d, _| pb.set_position(d as u64),
        )?;
        pb.finish_and_clear();
        let rs: Vec<_> = journal
            .tagged("sweep")
            .filter(|r| r.alpha == alpha)
            .collect();
        let mut per_label = serde_json::Map::new();
        if let Some(labels) = set.labels() {
            for l in rudder_steer::direction::distinct(&labels) {
                let sub = rudder_steer::rollouts::summarise(
                    rs.iter().copied().filter(|r| labels[r.question] == l),
                );
                per_label.insert(l, json!(sub));
            }
        }
        let mut row = json!(rudder_steer::rollouts::summarise(rs.iter().copied()));
        row["alpha"] = json!(alpha);
        row["per_label"] = json!(per_label);
        row["interventions"] = json!(iv.interventions.iter().map(|i| json!({"site": i.site.to_string(), "alpha": i.alpha, "positions": i.positions, "phases": i.phases})).collect::<Vec<_>>());
        println!(
            "α = {alpha:>6}: mean length {:.1}, accuracy {:.3}",
            row["mean_reasoning_tokens"].as_f64().unwrap_or(f64::NAN),
            row["accuracy"].as_f64().unwrap_or(f64::NAN)
        );
        rows.push(row);
    }
    std::fs::write(
        a.out.join("sweep.json"),
        serde_json::to_string_pretty(&rows)?,
    )?;
    plot(
        crate::plots::lines(
            &a.out.join("length_vs_alpha.png"),
            "Steering strength vs mean length",
            "α",
            &[(
                "mean length",
                pts(
                    &Value::Array(rows.clone()),
                    "alpha",
                    "mean_reasoning_tokens",
                ),
            )],
        ),
        "sweep",
    );
    Ok(())
}

fn run_logits(a: LogitsArgs) -> Result<()> {
    let lm = open_model(&a.model)?;
    let vectors = SteeringVectors::load(&a.vector)?;
    vectors.check(
        lm.decoder.cfg.num_layers,
        lm.decoder.cfg.hidden_size,
        &a.vector,
    )?;
    let set = PromptSet::load(&a.prompts, a.field.as_deref(), None)?.truncate(a.limit);
    let rendering = a.render.rendering(Rendering::plain(true));
    let ids: Vec<Vec<u32>> = set
        .items
        .iter()
        .map(|p| rendering.ids(&lm, &p.text))
        .collect::<rudder_steer::Result<_>>()?;
    let marker =
        match &a.marker {
            Some(m) => lm.tok.inner.token_to_id(m).with_context(|| {
                format!("--marker {m:?} is not a single token of this vocabulary")
            })?,
            None => *lm.tok.eos.first().context("the model has no EOS token")?,
        };
    let pb = bar("logits", (ids.len() * a.alphas.len()) as u64);
    let (rows, movers) = study::logit_check(
        &lm,
        &ids,
        &vectors,
        &a.alphas,
        marker,
        a.seed,
        8,
        &mut |d, _| pb.set_position(d as u64),
    )?;
    pb.finish_and_clear();
    std::fs::create_dir_all(&a.out)?;
    std::fs::write(
        a.out.join("logits.json"),
        serde_json::to_string_pretty(
            &json!({"marker_id": marker, "rows": rows, "movers": movers}),
        )?,
    )?;
    for r in &rows {
        let m = |v: &[f32]| v.iter().map(|&x| x as f64).sum::<f64>() / v.len().max(1) as f64;
        println!(
            "α = {:>5}: marker logit {:.3}, EOS {:.3}, random {:.3}",
            r.alpha,
            m(&r.marker_logit),
            m(&r.eos_logit),
            m(&r.random_logit)
        );
    }
    Ok(())
}

fn run_detect(a: DetectArgs) -> Result<()> {
    let mut probes = study::load_probes(&a.probes)?;
    if let Some(s) = &a.site {
        let site: Site = s.parse()?;
        probes.retain(|(x, _)| *x == site);
        if probes.is_empty() {
            bail!("{}: no probe at {s}", a.probes.display());
        }
    }
    let b = study::probe_scores(&ActivationSet::load(&a.benign)?, &probes)?;
    let t = study::probe_scores(&ActivationSet::load(&a.attack)?, &probes)?;
    let d = study::detection(&b, &t, a.fpr);
    std::fs::create_dir_all(&a.out)?;
    std::fs::write(a.out.join("detect.json"), serde_json::to_string_pretty(&d)?)?;
    let roc: Vec<(f64, f64)> = d["roc"]
        .as_array()
        .map(|v| {
            v.iter()
                .filter_map(|p| Some((p[0].as_f64()?, p[1].as_f64()?)))
                .collect()
        })
        .unwrap_or_default();
    plot(
        crate::plots::lines(
            &a.out.join("roc.png"),
            "Overthinking detector ROC",
            "false positive rate",
            &[("probe", roc), ("chance", vec![(0.0, 0.0), (1.0, 1.0)])],
        ),
        "roc",
    );
    println!(
        "AUROC {:.3}; threshold {:.1} → TPR {:.3} at FPR {:.3}",
        d["auroc"].as_f64().unwrap_or(f64::NAN),
        d["threshold"].as_f64().unwrap_or(f64::NAN),
        d["tpr"].as_f64().unwrap_or(f64::NAN),
        d["fpr"].as_f64().unwrap_or(f64::NAN)
    );
    Ok(())
}

pub(crate) fn write_json(path: &Path, v: &Value) -> Result<()> {
    rudder_data::io::write_bytes_atomic(path, serde_json::to_string_pretty(v)?.as_bytes())?;
    Ok(())
}

/// `study::steering_file`, checked against `lm` when given.
pub(crate) fn steering_file(
    path: &Path,
    strength: f32,
    lm: Option<&LanguageModel>,
) -> Result<rudder_lm::hooks::Interventions> {
    let dims = lm.map(|lm| (lm.decoder.cfg.num_layers, lm.decoder.cfg.hidden_size));
    Ok(study::steering_file(path, strength, dims)?)
}
