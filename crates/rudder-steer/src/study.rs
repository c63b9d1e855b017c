//! The reasoning-strength study (steering-seeds.md §2) as library steps, each usable alone and
//! chained by [`plan`]: labels (rollouts → mean reasoning length and accuracy per question),
//! question activations, probes per layer, the difference-of-means direction, the steering
//! sweep, the end-of-reasoning logit check, the overthinking detector and the efficient-
//! reasoning read-out. Every step writes its artefact into the run folder and is skipped when
//! the artefact exists, so a killed run resumes where it stopped (rollouts resume per rollout
//! through their journal).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{Device, IndexOp, Tensor};
use rudder_lm::engine::{Engine, EngineConfig};
use rudder_lm::generate::{GenConfig, left_pad, length_batches, log_normaliser};
use rudder_lm::hooks::{Interventions, NoHook, Phase, Phases, Positions, Site};
use rudder_lm::loader::LanguageModel;
use rudder_lm::ragged::KvPrecision;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::activations::{ActivationSet, CaptureConfig, capture};
use crate::direction::{SteeringVectors, diff_of_means};
use crate::probe::{Linear, ProbeKind, fit};
use crate::prompts::{PromptSet, Rendering};
use crate::rollouts::{Journal, RolloutConfig, per_question, run, summarise};
use crate::stats::{self, Split, train_test_split};
use crate::{Result, SteerError};

/// The reference's strength grid (scripts/generate_all.sh).
pub const ALPHAS: [f64; 9] = [-0.2, -0.15, -0.1, -0.05, 0.0, 0.05, 0.1, 0.15, 0.2];
/// The reference's logit-check grid.
pub const LOGIT_ALPHAS: [f64; 5] = [-0.2, -0.1, 0.0, 0.1, 0.2];

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PlanConfig {
    pub questions: PathBuf,
    /// Questions per MATH level used for labels and probes (0: all).
    pub per_level: usize,
    pub rollouts: usize,
    pub max_tokens: usize,
    pub temperature: f32,
    pub top_p: f32,
    pub seed: u64,
    /// End-of-reasoning marker; none (the default for a model that does not think): the whole
    /// response up to EOS counts as reasoning.
    pub marker: Option<String>,
    pub rendering: Rendering,
    pub probe: ProbeKind,
    pub test_fraction: f64,
    pub split_seed: u64,
    pub alphas: Vec<f64>,
    /// Questions per level in the steering sweep.
    pub sweep_per_level: usize,
    pub sweep_rollouts: usize,
    pub logit_alphas: Vec<f64>,
    pub logit_questions: usize,
    pub benign: Option<PathBuf>,
    pub attack: Option<PathBuf>,
    /// Rows decoded together by the engine.
    pub batch: usize,
    /// Number format of the engine's key/value cache for the rollouts (f16 by default: label
    /// generation is the study's dominant cost and its long rows are bound by reading the
    /// cache; f32 reproduces the padded decoder's numbers exactly).
    #[serde(default)]
    pub kv: KvPrecision,
}

impl PlanConfig {
    pub fn new(questions: PathBuf) -> Self {
        PlanConfig {
            questions,
            per_level: 40,
            rollouts: 2,
            max_tokens: 256,
            temperature: 0.6,
            top_p: 0.95,
            seed: 0,
            marker: None,
            rendering: Rendering::reasoning(),
            probe: ProbeKind::lasso(10.0),
            test_fraction: 0.1,
            split_seed: 42,
            alphas: ALPHAS.to_vec(),
            sweep_per_level: 6,
            sweep_rollouts: 1,
            logit_alphas: LOGIT_ALPHAS.to_vec(),
            logit_questions: 60,
            benign: None,
            attack: None,
            batch: 32,
            kv: KvPrecision::F16,
        }
    }
}

/// JSON has no NaN: a metric that is undefined (e.g. Spearman of a constant prediction) is
/// written as null and read back as NaN.
fn nan_or<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// Per-site probe results.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProbeRow {
    pub site: String,
    pub layer: Option<usize>,
    #[serde(deserialize_with = "nan_or")]
    pub train_mse: f64,
    #[serde(deserialize_with = "nan_or")]
    pub test_mse: f64,
    #[serde(deserialize_with = "nan_or")]
    pub train_r2: f64,
    #[serde(deserialize_with = "nan_or")]
    pub test_r2: f64,
    #[serde(deserialize_with = "nan_or")]
    pub test_pearson: f64,
    #[serde(deserialize_with = "nan_or")]
    pub test_spearman: f64,
    #[serde(deserialize_with = "nan_or")]
    pub train_spearman: f64,
    pub nonzero: usize,
    pub iterations: usize,
    pub converged: bool,
    #[serde(deserialize_with = "nan_or")]
    pub seconds: f64,
}

/// Fit one probe per site on `targets`, with the given split. Returns the rows and the models.
pub fn probe_sites(
    acts: &ActivationSet,
    targets: &[f64],
    kind: ProbeKind,
    split: &Split,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(Vec<ProbeRow>, Vec<(Site, Linear)>)> {
    if targets.len() != acts.len() {
        return Err(SteerError::Invalid(format!(
            "{} targets for {} activation rows",
            targets.len(),
            acts.len()
        )));
    }
    let ytr: Vec<f64> = split.train.iter().map(|&i| targets[i]).collect();
    let yte: Vec<f64> = split.test.iter().map(|&i| targets[i]).collect();
    let fit_site = |site: Site| -> Result<(ProbeRow, (Site, Linear))> {
        let t0 = std::time::Instant::now();
        let xtr = acts.matrix(site, Some(&split.train))?;
        let xte = acts.matrix(site, Some(&split.test))?;
        let m = fit(kind, xtr.as_ref(), &ytr)?;
        let ptr = m.predict(xtr.as_ref());
        let pte = m.predict(xte.as_ref());
        Ok((
            ProbeRow {
                site: site.to_string(),
                layer: site.layer(),
                train_mse: stats::mse(&ytr, &ptr),
                test_mse: stats::mse(&yte, &pte),
                train_r2: stats::r2(&ytr, &ptr),
                test_r2: stats::r2(&yte, &pte),
                test_pearson: stats::pearson(&yte, &pte),
                test_spearman: stats::spearman(&yte, &pte),
                train_spearman: stats::spearman(&ytr, &ptr),
                nonzero: m.coef.iter().filter(|&&w| w != 0.0).count(),
                iterations: m.iterations,
                converged: m.converged,
                seconds: t0.elapsed().as_secs_f64(),
            },
            (site, m),
        ))
    };
    // sites side by side (one per worker thread): a d×d problem per site is too small to keep
    // every core busy inside one factorisation. Each fit is the same whatever runs beside it.
    let mut rows = Vec::new();
    let mut models = Vec::new();
    let width = rayon::current_num_threads().max(1);
    let mut done = 0;
    for chunk in acts.sites.chunks(width) {
        use rayon::prelude::*;
        let res: Vec<Result<(ProbeRow, (Site, Linear))>> =
            chunk.par_iter().map(|&s| fit_site(s)).collect();
        for r in res {
            let (row, m) = r?;
            rows.push(row);
            models.push(m);
        }
        done += chunk.len();
        progress(done, acts.sites.len());
    }
    Ok((rows, models))
}

/// Save probe coefficients (safetensors: `<site>.coef` [d] f64 as f32, `<site>.intercept`).
pub fn save_probes(models: &[(Site, Linear)], path: &Path) -> Result<()> {
    let mut t = Vec::new();
    for (s, m) in models {
        let c: Vec<f32> = m.coef.iter().map(|&v| v as f32).collect();
        t.push((
            format!("{s}.coef"),
            Tensor::from_slice(&c, c.len(), &Device::Cpu)?,
        ));
        t.push((
            format!("{s}.intercept"),
            Tensor::from_slice(&[m.intercept as f32], 1, &Device::Cpu)?,
        ));
    }
    rudder_nn::checkpoint::save(&t, path).map_err(|e| SteerError::file(path, e))
}

pub fn load_probes(path: &Path) -> Result<Vec<(Site, Linear)>> {
    let t = candle_core::safetensors::load(path, &Device::Cpu)
        .map_err(|e| SteerError::file(path, e))?;
    let mut out = Vec::new();
    for (name, tensor) in &t {
        if let Some(site) = name.strip_suffix(".coef") {
            let s: Site = site
                .parse()
                .map_err(|e| SteerError::file(path, format!("{name}: {e}")))?;
            let b = t
                .get(&format!("{site}.intercept"))
                .ok_or_else(|| SteerError::file(path, format!("no {site}.intercept")))?
                .to_vec1::<f32>()?;
            out.push((
                s,
                Linear {
                    coef: tensor
                        .to_vec1::<f32>()?
                        .into_iter()
                        .map(|v| v as f64)
                        .collect(),
                    intercept: b.first().copied().unwrap_or(0.0) as f64,
                    iterations: 0,
                    converged: true,
                },
            ));
        }
    }
    out.sort_by_key(|(s, _)| *s);
    Ok(out)
}

/// Level difference-of-means vectors at every `ResidPre` site (the final-norm site is
/// dropped, as the reference does), and the per-layer report.
pub fn level_vectors(
    acts: &ActivationSet,
    reference: &str,
) -> Result<(SteeringVectors, Vec<Value>)> {
    let labels = acts.labels.as_ref().ok_or_else(|| {
        SteerError::Invalid(format!(
            "{}: the activation set has no labels (capture with --label level)",
            acts.path.display()
        ))
    })?;
    let mut others: Vec<String> = crate::direction::distinct(labels)
        .into_iter()
        .filter(|l| l != reference)
        .collect();
    others.sort();
    let mut vectors = Vec::new();
    let mut report = Vec::new();
    for &site in &acts.sites {
        if !matches!(site, Site::ResidPre(_)) {
            continue;
        }
        let dm = diff_of_means(acts.get(site)?, acts.hidden, labels, reference, &others)?;
        report.push(json!({
            "site": site.to_string(), "layer": site.layer(),
            "norms": dm.others.iter().cloned().zip(dm.norms.iter().copied()).collect::<BTreeMap<_, _>>(),
            "mean_cosine": dm.mean_cosine, "cosines": dm.cosines,
            "vector_norm": crate::direction::norm(&dm.vector),
        }));
        vectors.push((site, dm.vector.iter().map(|&v| v as f32).collect()));
    }
    if vectors.is_empty() {
        return Err(SteerError::Invalid(
            "no resid_pre sites in the activation set".into(),
        ));
    }
    Ok((
        SteeringVectors {
            vectors,
            meta: json!({
                "reference": reference, "others": others,
                "sign": "vector = mean(other levels' mean − reference mean); positive strength pushes toward harder levels",
                "source": acts.path, "capture": acts.meta,
            }),
        },
        report,
    ))
}

/// The end-of-reasoning logit check at the first generated position (steering-seeds.md §2.9).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LogitRow {
    pub alpha: f64,
    pub marker_logit: Vec<f32>,
    pub eos_logit: Vec<f32>,
    pub random_logit: Vec<f32>,
    /// Probabilities at temperature 0.6.
    pub marker_prob: Vec<f32>,
    pub eos_prob: Vec<f32>,
    /// Mean probability of every token over the prompts (for the movers).
    #[serde(skip)]
    pub mean_probs: Vec<f64>,
}

/// Logits of the first generated token under `α·v` for each α.
#[allow(clippy::too_many_arguments)]
pub fn logit_check(
    lm: &LanguageModel,
    prompts: &[Vec<u32>],
    vectors: &SteeringVectors,
    alphas: &[f64],
    marker_id: u32,
    seed: u64,
    batch: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(Vec<LogitRow>, Value)> {
    let eos = *lm
        .tok
        .eos
        .first()
        .ok_or_else(|| SteerError::Invalid("the model has no EOS token".into()))?;
    let v = lm.decoder.cfg.vocab_size;
    let pool = (eos as usize).min(v).max(1);
    let mut rng = rudder_data::rng::stream(seed, &[0x106175]);
    use rand::Rng;
    let random: Vec<u32> = (0..2000)
        .map(|_| rng.random_range(0..pool as u32))
        .collect();
    let mut rows = Vec::new();
    let total = alphas.len() * prompts.len();
    let mut done = 0;
    for &a in alphas {
        let mut iv = vectors.interventions(a as f32, None, Positions::All, Phases::Both);
        let mut row = LogitRow {
            alpha: a,
            marker_logit: vec![],
            eos_logit: vec![],
            random_logit: vec![],
            marker_prob: vec![],
            eos_prob: vec![],
            mean_probs: vec![0.0; v],
        };
        let lens: Vec<usize> = prompts.iter().map(|p| p.len()).collect();
        let mut per_prompt: Vec<Option<(f32, f32, f32, f32, f32)>> = vec![None; prompts.len()];
        for group in length_batches(&lens, batch.max(1), crate::activations::BATCH_TOKENS) {
            let chunk: Vec<Vec<u32>> = group.iter().map(|&i| prompts[i].clone()).collect();
            let (t, pads) = left_pad(&chunk, lm.tok.pad)?;
            let mut cache = lm.decoder.new_cache(pads);
            let tlen = t.dim(1)?;
            let h = if iv.is_empty() {
                lm.decoder
                    .forward(&t, &mut cache, Phase::Prefill, &mut NoHook)?
            } else {
                lm.decoder
                    .forward(&t, &mut cache, Phase::Prefill, &mut iv)?
            };
            let logits = lm
                .decoder
                .logits(&h.i((.., tlen - 1..tlen, ..))?)?
                .squeeze(1)?
                .to_vec2::<f32>()?;
            for (l, &pi) in logits.iter().zip(&group) {
                let scaled: Vec<f32> = l.iter().map(|x| x / 0.6).collect();
                let lse = log_normaliser(&scaled);
                per_prompt[pi] = Some((
                    l[marker_id as usize],
                    l[eos as usize],
                    random.iter().map(|&i| l[i as usize]).sum::<f32>() / random.len() as f32,
                    (scaled[marker_id as usize] - lse).exp(),
                    (scaled[eos as usize] - lse).exp(),
                ));
                for (m, x) in row.mean_probs.iter_mut().zip(&scaled) {
                    *m += ((x - lse) as f64).exp() / prompts.len() as f64;
                }
                done += 1;
                progress(done, total);
            }
        }
        for (m, e, r, mp, ep) in per_prompt.into_iter().flatten() {
            row.marker_logit.push(m);
            row.eos_logit.push(e);
            row.random_logit.push(r);
            row.marker_prob.push(mp);
            row.eos_prob.push(ep);
        }
        rows.push(row);
    }
    // top-20 movers between the extreme strengths and 0
    let zero = rows.iter().find(|r| r.alpha == 0.0);
    let mut movers = json!({});
    if let Some(z) = zero {
        for r in rows.iter().filter(|r| {
            r.alpha != 0.0
                && (r.alpha.abs() - alphas.iter().fold(0f64, |m, a| m.max(a.abs()))).abs() < 1e-12
        }) {
            let mut d: Vec<(usize, f64)> = r
                .mean_probs
                .iter()
                .zip(&z.mean_probs)
                .enumerate()
                .map(|(i, (a, b))| (i, a - b))
                .collect();
            d.sort_by(|a, b| b.1.total_cmp(&a.1));
            let tok = |i: usize| lm.tok.decode(&[i as u32], false).unwrap_or_default();
            movers[format!("alpha={}", r.alpha)] = json!({
                "up": d.iter().take(20).map(|(i, x)| json!({"token": tok(*i), "id": i, "delta_prob": x})).collect::<Vec<_>>(),
                "down": d.iter().rev().take(20).map(|(i, x)| json!({"token": tok(*i), "id": i, "delta_prob": x})).collect::<Vec<_>>(),
            });
        }
    }
    Ok((rows, movers))
}

/// Per-prompt overthinking scores: the probe-predicted reasoning length, averaged over the
/// probes' sites (as the reference averages over layers).
pub fn probe_scores(acts: &ActivationSet, probes: &[(Site, Linear)]) -> Result<Vec<f64>> {
    let mut s = vec![0f64; acts.len()];
    let mut k = 0;
    for (site, m) in probes {
        if !acts.sites.contains(site) {
            continue;
        }
        let x = acts.matrix(*site, None)?;
        for (a, p) in s.iter_mut().zip(m.predict(x.as_ref())) {
            *a += p;
        }
        k += 1;
    }
    if k == 0 {
        return Err(SteerError::Invalid(
            "no probe matches a site of the activation set".into(),
        ));
    }
    s.iter_mut().for_each(|v| *v /= k as f64);
    Ok(s)
}

/// A detector's read-out: AUROC, and TPR/FPR at the threshold set to the benign scores'
/// `1 − fpr` quantile.
pub fn detection(benign: &[f64], attack: &[f64], target_fpr: f64) -> Value {
    let scores: Vec<f64> = benign.iter().chain(attack).copied().collect();
    let pos: Vec<bool> = benign
        .iter()
        .map(|_| false)
        .chain(attack.iter().map(|_| true))
        .collect();
    let thr = stats::quantile(benign, 1.0 - target_fpr);
    let tpr = attack.iter().filter(|&&s| s > thr).count() as f64 / attack.len().max(1) as f64;
    let fpr = benign.iter().filter(|&&s| s > thr).count() as f64 / benign.len().max(1) as f64;
    json!({
        "auroc": stats::auroc(&scores, &pos),
        "threshold": thr, "tpr": tpr, "fpr": fpr, "target_fpr": target_fpr,
        "benign_mean": stats::mean(benign), "attack_mean": stats::mean(attack),
        "roc": stats::roc(&scores, &pos),
    })
}

pub(crate) fn write_json(path: &Path, v: &impl Serialize) -> Result<()> {
    crate::activations::write_atomic(
        path,
        serde_json::to_string_pretty(v)
            .unwrap_or_default()
            .as_bytes(),
    )
}

fn read_json(path: &Path) -> Result<Value> {
    serde_json::from_slice(&std::fs::read(path).map_err(|e| SteerError::file(path, e))?)
        .map_err(|e| SteerError::file(path, format!("invalid JSON: {e}")))
}

/// Progress reports: (step name, done, total).
pub type Progress<'a> = &'a mut dyn FnMut(&str, usize, usize);

/// The gold answer of a MATH-style record: `answer`, else the last `\boxed{}` of `solution`.
pub fn gold_answer(record: &Value) -> Option<String> {
    match record.get("answer") {
        Some(Value::String(s)) if !s.is_empty() => return Some(s.clone()),
        Some(Value::Number(n)) => return Some(n.to_string()),
        _ => {}
    }
    record
        .get("solution")
        .and_then(|s| s.as_str())
        .and_then(crate::grade::last_boxed)
}

/// Pick up to `per_level` questions of each label, in file order (all when 0).
pub fn balanced(set: &PromptSet, per_level: usize) -> Vec<usize> {
    if per_level == 0 {
        return (0..set.len()).collect();
    }
    let mut count: BTreeMap<String, usize> = BTreeMap::new();
    let mut out = Vec::new();
    for (i, p) in set.items.iter().enumerate() {
        let l = p.label.clone().unwrap_or_default();
        let c = count.entry(l).or_default();
        if *c < per_level {
            *c += 1;
            out.push(i);
        }
    }
    out
}

/// Seconds spent in each step of a study, summed over every resumption (`timings.json`).
struct Timings {
    path: std::path::PathBuf,
    map: BTreeMap<String, f64>,
}

impl Timings {
    fn open(path: std::path::PathBuf) -> Self {
        let map = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Timings { path, map }
    }

    fn add(&mut self, step: &str, t0: std::time::Instant) -> Result<()> {
        *self.map.entry(step.to_string()).or_default() += t0.elapsed().as_secs_f64();
        write_json(&self.path, &self.map)
    }
}

/// Run (or resume) the whole study into `out`. Returns the metrics.
pub fn plan(
    lm: Arc<LanguageModel>,
    cfg: &PlanConfig,
    out: &Path,
    progress: Progress,
) -> Result<Value> {
    std::fs::create_dir_all(out).map_err(|e| SteerError::file(out, e))?;
    let cfg_path = out.join("config.json");
    let cfg_v = serde_json::to_value(cfg).unwrap_or_default();
    if cfg_path.exists() {
        // read back through the type, so settings added since (with their defaults) compare
        let old: PlanConfig = serde_json::from_value(read_json(&cfg_path)?)
            .map_err(|e| SteerError::file(&cfg_path, e))?;
        if serde_json::to_value(&old).unwrap_or_default() != cfg_v {
            return Err(SteerError::file(
                out,
                "this run folder was started with other settings (config.json differs); use a new folder",
            ));
        }
    } else {
        write_json(&cfg_path, &cfg_v)?;
    }
    let set = PromptSet::load(&cfg.questions, None, Some("level"))?;
    let chosen = balanced(&set, cfg.per_level);
    let labels: Vec<String> = chosen
        .iter()
        .map(|&i| set.items[i].label.clone().unwrap_or_default())
        .collect();
    let gold: Vec<Option<String>> = chosen
        .iter()
        .map(|&i| gold_answer(&set.items[i].record))
        .collect();
    let ids: Vec<Vec<u32>> = chosen
        .iter()
        .map(|&i| cfg.rendering.ids(&lm, &set.items[i].text))
        .collect::<Result<_>>()?;
    let template_hash = cfg.rendering.template_hash(&lm);
    let engine = Engine::start(
        lm.clone(),
        EngineConfig {
            kv: cfg.kv,
            ..EngineConfig::offline(cfg.batch)
        },
    );
    let mut journal = Journal::open(&out.join("rollouts.jsonl"))?;
    let mut timings = Timings::open(out.join("timings.json"));
    let rc = RolloutConfig {
        per_prompt: cfg.rollouts,
        sampling: GenConfig {
            max_new_tokens: cfg.max_tokens,
            temperature: cfg.temperature,
            top_p: cfg.top_p,
            seed: cfg.seed,
            ..GenConfig::default()
        },
        marker: cfg.marker.clone(),
    };
    // 1. labels
    let t0 = std::time::Instant::now();
    let fresh = run(
        &engine,
        "labels",
        &ids,
        &gold,
        &rc,
        0.0,
        None,
        &mut journal,
        &mut |d, t| progress("labels", d, t),
    )?;
    if fresh > 0 {
        timings.add("labels", t0)?;
    }
    let pq = per_question(&journal.tagged("labels").collect::<Vec<_>>(), ids.len());
    let targets: Vec<f64> = pq.iter().map(|p| p.0).collect();
    write_json(
        &out.join("labels.json"),
        &chosen
            .iter()
            .enumerate()
            .map(|(k, &i)| json!({"question": i, "level": labels[k], "mean_reasoning_tokens": pq[k].0, "accuracy": pq[k].1, "gold": gold[k]}))
            .collect::<Vec<_>>(),
    )?;
    // 2. activations at every HF hidden-state site, last prompt token
    let acts_path = out.join("acts.safetensors");
    let acts = if acts_path.exists() {
        ActivationSet::load(&acts_path)?
    } else {
        let t0 = std::time::Instant::now();
        let ccfg = CaptureConfig {
            sites: Site::hf_hidden_states(lm.decoder.cfg.num_layers),
            positions: Positions::LastPrompt,
            batch: 16,
            shard_batches: 4,
        };
        let acts = capture(
            &lm,
            &ids,
            Some(&labels),
            &ccfg,
            None,
            &acts_path,
            json!({"template_hash": template_hash, "rendering": cfg.rendering, "questions": cfg.questions, "chosen": chosen}),
            &mut |d, t| progress("capture", d, t),
        )?;
        timings.add("capture", t0)?;
        acts
    };
    // 3. probes
    let split = train_test_split(ids.len(), cfg.test_fraction, cfg.split_seed);
    let probes_json = out.join("probes.json");
    let probes_st = out.join("probes.safetensors");
    let (probe_rows, models): (Vec<ProbeRow>, Vec<(Site, Linear)>) =
        if probes_json.exists() && probes_st.exists() {
            (
                serde_json::from_value(read_json(&probes_json)?["layers"].clone())
                    .map_err(|e| SteerError::file(&probes_json, e))?,
                load_probes(&probes_st)?,
            )
        } else {
            let t0 = std::time::Instant::now();
            let (rows, models) = probe_sites(&acts, &targets, cfg.probe, &split, &mut |d, t| {
                progress("probes", d, t)
            })?;
            save_probes(&models, &probes_st)?;
            write_json(
                &probes_json,
                &json!({"probe": cfg.probe, "split": split, "layers": rows}),
            )?;
            timings.add("probes", t0)?;
            (rows, models)
        };
    // 4. the direction
    let vec_path = out.join("vector.safetensors");
    let (vectors, vreport) = level_vectors(&acts, "Level 1")?;
    if !vec_path.exists() {
        vectors.save(&vec_path)?;
    }
    let probe_effect: Vec<Value> = vectors
        .vectors
        .iter()
        .filter_map(|(s, v)| {
            models.iter().find(|(ms, _)| ms == s).map(|(_, m)| {
                let wr: f64 = m.coef.iter().zip(v).map(|(a, b)| a * *b as f64).sum();
                json!({"site": s.to_string(), "w_dot_r": wr, "w_dot_r_plus_b": wr + m.intercept, "positive": wr + m.intercept > 0.0})
            })
        })
        .collect();
    write_json(
        &out.join("vector.json"),
        &json!({"layers": vreport, "probe_effect": probe_effect}),
    )?;
    // 5. sweep
    let sweep_idx = {
        let mut c: BTreeMap<&str, usize> = BTreeMap::new();
        let mut v = Vec::new();
        for (k, l) in labels.iter().enumerate() {
            let e = c.entry(l.as_str()).or_default();
            if *e < cfg.sweep_per_level {
                *e += 1;
                v.push(k);
            }
        }
        v
    };
    let sweep_ids: Vec<Vec<u32>> = sweep_idx.iter().map(|&k| ids[k].clone()).collect();
    let sweep_gold: Vec<Option<String>> = sweep_idx.iter().map(|&k| gold[k].clone()).collect();
    let src = RolloutConfig {
        per_prompt: cfg.sweep_rollouts,
        ..rc.clone()
    };
    let mut sweep_rows = Vec::new();
    for &a in &cfg.alphas {
        let iv = vectors.interventions(a as f32, None, Positions::All, Phases::Both);
        let ivr = (!iv.is_empty() && a != 0.0).then_some(&iv);
        let t0 = std::time::Instant::now();
        let fresh = run(
            &engine,
            "sweep",
            &sweep_ids,
            &sweep_gold,
            &src,
            a,
            ivr,
            &mut journal,
            &mut |d, t| progress(&format!("sweep α={a}"), d, t),
        )?;
        if fresh > 0 {
            timings.add("sweep", t0)?;
        }
        let rows: Vec<&crate::rollouts::Rollout> =
            journal.tagged("sweep").filter(|r| r.alpha == a).collect();
        let mut per_level: BTreeMap<String, Vec<&crate::rollouts::Rollout>> = BTreeMap::new();
        for r in &rows {
            per_level
                .entry(labels[sweep_idx[r.question]].clone())
                .or_default()
                .push(r);
        }
        let mut row = serde_json::to_value(summarise(rows.iter().copied()))
            .map_err(|e| SteerError::Invalid(e.to_string()))?;
        row["alpha"] = json!(a);
        row["per_level"] = json!(
            per_level
                .iter()
                .map(|(l, v)| (l.clone(), json!(summarise(v.iter().copied()))))
                .collect::<BTreeMap<_, _>>()
        );
        row["interventions"] = json!({"sites": vectors.vectors.len(), "kind": "add_vector", "alpha": a, "positions": "all", "phases": "both", "vector_file": vec_path});
        sweep_rows.push(row);
    }
    write_json(&out.join("sweep.json"), &sweep_rows)?;
    drop(engine);
    // 6. logits at the first generated position
    let marker_id = cfg
        .marker
        .as_deref()
        .and_then(|m| lm.tok.inner.token_to_id(m))
        .or_else(|| lm.tok.eos.first().copied())
        .ok_or_else(|| SteerError::Invalid("no end-of-reasoning token and no EOS".into()))?;
    let logits_path = out.join("logits.json");
    let logit_rows = if logits_path.exists() {
        serde_json::from_value(read_json(&logits_path)?["rows"].clone()).unwrap_or_default()
    } else {
        let t0 = std::time::Instant::now();
        let lp: Vec<Vec<u32>> = ids
            .iter()
            .take(cfg.logit_questions.max(1))
            .cloned()
            .collect();
        let (rows, movers) = logit_check(
            &lm,
            &lp,
            &vectors,
            &cfg.logit_alphas,
            marker_id,
            cfg.seed,
            8,
            &mut |d, t| progress("logits", d, t),
        )?;
        write_json(
            &logits_path,
            &json!({"marker_token": lm.tok.decode(&[marker_id], false).unwrap_or_default(), "marker_id": marker_id, "rows": rows, "movers": movers}),
        )?;
        timings.add("logits", t0)?;
        rows
    };
    // 7. overthinking detector
    let mut detect = Value::Null;
    if let (Some(b), Some(a)) = (&cfg.benign, &cfg.attack) {
        let dpath = out.join("detect.json");
        if dpath.exists() {
            detect = read_json(&dpath)?;
        } else {
            let t0 = std::time::Instant::now();
            let mut sets = Vec::new();
            for (name, p) in [("benign", b), ("attack", a)] {
                let ps = PromptSet::load(p, None, None)?;
                let pids: Vec<Vec<u32>> = ps
                    .items
                    .iter()
                    .map(|x| cfg.rendering.ids(&lm, &x.text))
                    .collect::<Result<_>>()?;
                let apath = out.join(format!("acts_{name}.safetensors"));
                let acts = if apath.exists() {
                    ActivationSet::load(&apath)?
                } else {
                    capture(
                        &lm,
                        &pids,
                        None,
                        &CaptureConfig {
                            sites: models.iter().map(|(s, _)| *s).collect(),
                            positions: Positions::LastPrompt,
                            batch: 8,
                            shard_batches: 4,
                        },
                        None,
                        &apath,
                        json!({"template_hash": template_hash, "prompts": p}),
                        &mut |d, t| progress(&format!("capture {name}"), d, t),
                    )?
                };
                let lens: Vec<f64> = pids.iter().map(|p| p.len() as f64).collect();
                sets.push((probe_scores(&acts, &models)?, lens));
            }
            // the best single layer by test Spearman, too
            let best = probe_rows
                .iter()
                .filter(|r| r.test_spearman.is_finite())
                .max_by(|a, b| a.test_spearman.total_cmp(&b.test_spearman))
                .map(|r| r.site.clone());
            let best_scores = match &best {
                Some(s) => {
                    let site: Site = s.parse().map_err(SteerError::Lm)?;
                    let m: Vec<(Site, Linear)> =
                        models.iter().filter(|(x, _)| *x == site).cloned().collect();
                    let mut v = Vec::new();
                    for name in ["benign", "attack"] {
                        v.push(probe_scores(
                            &ActivationSet::load(&out.join(format!("acts_{name}.safetensors")))?,
                            &m,
                        )?);
                    }
                    Some(v)
                }
                None => None,
            };
            detect = json!({
                "probe_mean_over_layers": detection(&sets[0].0, &sets[1].0, 0.05),
                "probe_best_layer": best_scores.map(|v| json!({"site": best, "result": detection(&v[0], &v[1], 0.05)})),
                "prompt_length_baseline": detection(&sets[0].1, &sets[1].1, 0.05),
                "benign": b, "attack": a,
            });
            write_json(&dpath, &detect)?;
            timings.add("detect", t0)?;
        }
    }
    // 8. efficient reasoning on Level 1: negative strengths vs 0
    let lvl1 = |a: f64| -> Option<(f64, f64)> {
        let s = sweep_rows.iter().find(|r| r["alpha"].as_f64() == Some(a))?;
        let l = &s["per_level"]["Level 1"];
        Some((
            l["mean_reasoning_tokens"].as_f64()?,
            l["accuracy"].as_f64().unwrap_or(f64::NAN),
        ))
    };
    let efficient: Vec<Value> = cfg
        .alphas
        .iter()
        .filter(|&&a| a < 0.0)
        .filter_map(|&a| {
            let (t0, a0) = lvl1(0.0)?;
            let (t, acc) = lvl1(a)?;
            Some(json!({"alpha": a, "tokens": t, "tokens_at_0": t0, "tokens_saved": t0 - t, "accuracy": acc, "accuracy_at_0": a0, "accuracy_change": acc - a0}))
        })
        .collect();
    let best = probe_rows
        .iter()
        .filter(|r| r.test_spearman.is_finite())
        .max_by(|a, b| a.test_spearman.total_cmp(&b.test_spearman));
    let metrics = json!({
        "model": lm.info, "template_hash": template_hash,
        "questions": chosen.len(), "rollouts_per_question": cfg.rollouts, "max_tokens": cfg.max_tokens,
        "marker": cfg.marker.clone().unwrap_or_else(|| "EOS (whole response)".into()),
        "labels": {
            "mean_reasoning_tokens": stats::mean(&targets),
            "accuracy": stats::mean(&pq.iter().map(|p| p.1).filter(|v| v.is_finite()).collect::<Vec<_>>()),
            "truncated_rollouts": journal.tagged("labels").filter(|r| r.finish == rudder_lm::generate::Finish::Length).count(),
        },
        "probe_best": best.map(|b| json!({"site": b.site, "test_spearman": b.test_spearman, "test_r2": b.test_r2})),
        "sweep": sweep_rows, "efficient_level1": efficient, "detect": detect,
        // wall time is not a result: reported, never compared (see the resume test)
        "seconds_per_step": timings.map,
        "generated_tokens": {
            "labels": journal.tagged("labels").map(|r| r.generated_tokens).sum::<usize>(),
            "sweep": journal.tagged("sweep").map(|r| r.generated_tokens).sum::<usize>(),
        },
        "logits": logit_rows.iter().map(|r: &LogitRow| json!({
            "alpha": r.alpha, "marker_logit": stats::mean(&r.marker_logit.iter().map(|&v| v as f64).collect::<Vec<_>>()),
            "eos_logit": stats::mean(&r.eos_logit.iter().map(|&v| v as f64).collect::<Vec<_>>()),
            "random_logit": stats::mean(&r.random_logit.iter().map(|&v| v as f64).collect::<Vec<_>>()),
            "marker_prob": stats::mean(&r.marker_prob.iter().map(|&v| v as f64).collect::<Vec<_>>()),
        })).collect::<Vec<_>>(),
    });
    write_json(&out.join("metrics.json"), &metrics)?;
    Ok(metrics)
}

/// A steering file as interventions at `strength`: an AlphaSteer file (gated, prefill only),
/// a steering-vector file or llama.cpp control vector (added at every position), or an
/// intervention list (its strengths scaled). Checked against `(layers, hidden)` when given.
pub fn steering_file(
    path: &Path,
    strength: f32,
    dims: Option<(usize, usize)>,
) -> Result<Interventions> {
    if crate::alphasteer::SteerFile::is_one(path) {
        let f = crate::alphasteer::SteerFile::load(path)?;
        if let Some((l, d)) = dims {
            f.check(l, d, path)?;
        }
        return Ok(f.interventions(strength));
    }
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    if ext == "safetensors" || ext == "gguf" {
        let v = SteeringVectors::load(path)?;
        if let Some((l, d)) = dims {
            v.check(l, d, path)?;
        }
        return Ok(v.interventions(strength, None, Positions::All, Phases::Both));
    }
    let mut iv = Interventions::from_json_file(path)?;
    for i in &mut iv.interventions {
        i.alpha *= strength;
    }
    if let Some((l, d)) = dims {
        iv.validate(l, d).map_err(|e| SteerError::file(path, e))?;
    }
    Ok(iv)
}
