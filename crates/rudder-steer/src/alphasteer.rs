//! AlphaSteer: null-space-constrained refusal steering (reference/steering-seeds.md §3).
//!
//! Per steered layer `l` (activations at `ResidPre(l)`, last prompt token):
//!
//! 1. the null-space basis `Q` (d×k) of the benign activations `H_b`: the eigenvectors of the
//!    **uncentred** Gram matrix `G = H_bᵀH_b` with the k smallest eigenvalues (f64, symmetric
//!    eigensolver), `k = ⌊d·p⌋` as the reference, or the reference's unused tolerance rule;
//!    `P̂ = QQᵀ`;
//! 2. the reference's regularised fit `Δ̃ = pinv(XᵀX + α·P̂ᵀP̂)·XᵀY` with `X = H_m·P̂`,
//!    steering matrix `S = P̂·Δ̃`. Because `A = P̂(H_mᵀH_m + αI)P̂ = Q·C·Qᵀ` with
//!    `C = (H_mQ)ᵀ(H_mQ) + αI` (k×k, positive definite for α > 0), `pinv(A) = Q·C⁻¹·Qᵀ` and
//!    `S = Q·C⁻¹·Qᵀ·H_mᵀ·Y` exactly — a k×k Cholesky solve instead of a d×d pseudo-inverse;
//! 3. with the reference's constant target (every row of `Y` is the refusal direction `r`),
//!    `S = u·rᵀ`, `u = Q·C⁻¹·Qᵀ·Σᵢh_i`: a learned harmfulness gate in the benign null space.
//!    Two d-vectors per layer; [`fit_matrix`] keeps the general path for per-sample targets.
//!
//! Application (§3.8): at `ResidPre(l)`, during prefill only, `h ← h + λ·(u·h_last)·r` at
//! every prompt position, `h_last` being the last prompt token's current (already steered)
//! residual — rudder-lm's `gated_add` edit.
//!
//! Sign convention (recorded in every steering file): `r = mean(harmful) − mean(benign)` at
//! the same site (or `mean(refused) − mean(complied)` over the training prompts, by the
//! model's own judged responses: [`Direction::RefusedComplied`]), so **positive λ steers
//! towards refusal**. (The reference's borrowed vector
//! points away from refusal, hence its negative λ grid.)

use std::collections::BTreeMap;
use std::path::Path;

use faer::prelude::Solve;
use faer::{Mat, MatRef, Side};
use rudder_lm::hooks::{Edit, Intervention, Interventions, Phases, Positions, Site};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::{Result, SteerError};

/// How the null-space dimension k is chosen.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NullSpace {
    /// `k = ⌊d·p⌋`, 0 < p < 1 (the reference's configs).
    Ratio(f64),
    /// The reference's fallback: directions whose singular value of `H_b` is below
    /// `max · ε_f32 · max(N_b, d)`, and at least `0.1·d`.
    Tolerance,
}

impl NullSpace {
    pub fn check(&self) -> Result<()> {
        match *self {
            NullSpace::Ratio(p) if !(p > 0.0 && p < 1.0) => Err(SteerError::Invalid(format!(
                "null-space ratio p = {p} must lie in (0, 1)"
            ))),
            _ => Ok(()),
        }
    }
}

/// The null-space basis of one layer's benign activations.
pub struct NullBasis {
    /// d×k, orthonormal columns.
    pub q: Mat<f64>,
    /// Eigenvalues of the uncentred Gram matrix, ascending.
    pub eigenvalues: Vec<f64>,
}

/// `Q` from the benign activations (rows are samples).
pub fn null_basis(benign: MatRef<'_, f64>, rule: NullSpace) -> Result<NullBasis> {
    rule.check()?;
    let (n, d) = (benign.nrows(), benign.ncols());
    if n == 0 || d == 0 {
        return Err(SteerError::Invalid(
            "the benign activation matrix is empty".into(),
        ));
    }
    if !benign.is_all_finite() {
        return Err(SteerError::Invalid(
            "the benign activations contain NaN or infinite values".into(),
        ));
    }
    let g = crate::probe::gram(benign);
    let evd = g
        .self_adjoint_eigen(Side::Lower)
        .map_err(|e| SteerError::Invalid(format!("eigendecomposition failed: {e:?}")))?;
    let s = evd.S().column_vector();
    let eigenvalues: Vec<f64> = (0..d).map(|i| s[i]).collect();
    let k = match rule {
        NullSpace::Ratio(p) => ((d as f64) * p).floor() as usize,
        NullSpace::Tolerance => {
            let sv: Vec<f64> = eigenvalues.iter().map(|&e| e.max(0.0).sqrt()).collect();
            let max = sv.iter().cloned().fold(0.0, f64::max);
            let tol = max * f32::EPSILON as f64 * n.max(d) as f64;
            let below = sv.iter().filter(|&&v| v < tol).count();
            below.max((0.1 * d as f64).ceil() as usize)
        }
    };
    if k == 0 || k >= d {
        return Err(SteerError::Invalid(format!(
            "null-space dimension {k} of {d}: choose p so that 0 < ⌊d·p⌋ < d"
        )));
    }
    let u = evd.U();
    let q = Mat::from_fn(d, k, |i, j| u[(i, j)]);
    Ok(NullBasis { q, eigenvalues })
}

/// `C = (H_mQ)ᵀ(H_mQ) + αI`, Cholesky-factored.
fn gram_in_null_space(
    q: MatRef<'_, f64>,
    harmful: MatRef<'_, f64>,
    alpha: f64,
) -> Result<faer::linalg::solvers::Llt<f64>> {
    let hq = harmful * q;
    let mut c = crate::probe::gram(hq.as_ref());
    for j in 0..c.ncols() {
        c[(j, j)] += alpha;
    }
    c.llt(Side::Lower).map_err(|_| {
        SteerError::Invalid(format!(
            "the regularised malicious Gram matrix in the null space is singular (α = {alpha}); use α > 0"
        ))
    })
}

/// The gate `u = Q·C⁻¹·Qᵀ·Σᵢh_i` of the rank-1 steering matrix `S = u·rᵀ`.
pub fn fit_gate(q: MatRef<'_, f64>, harmful: MatRef<'_, f64>, alpha: f64) -> Result<Vec<f64>> {
    check_harmful(q, harmful, alpha)?;
    let llt = gram_in_null_space(q, harmful, alpha)?;
    let d = harmful.ncols();
    let sum = Mat::from_fn(d, 1, |j, _| {
        (0..harmful.nrows()).map(|i| harmful[(i, j)]).sum::<f64>()
    });
    let z = llt.solve(q.transpose() * &sum);
    let u = q * &z;
    Ok((0..d).map(|j| u[(j, 0)]).collect())
}

/// The general steering matrix `S = Q·C⁻¹·Qᵀ·H_mᵀ·Y` (d×d, row convention: `h·S`) for
/// per-sample targets `Y` (N_m×d).
pub fn fit_matrix(
    q: MatRef<'_, f64>,
    harmful: MatRef<'_, f64>,
    targets: MatRef<'_, f64>,
    alpha: f64,
) -> Result<Mat<f64>> {
    check_harmful(q, harmful, alpha)?;
    if targets.nrows() != harmful.nrows() || targets.ncols() != harmful.ncols() {
        return Err(SteerError::Invalid(format!(
            "targets are {}×{}, the malicious activations {}×{}",
            targets.nrows(),
            targets.ncols(),
            harmful.nrows(),
            harmful.ncols()
        )));
    }
    let llt = gram_in_null_space(q, harmful, alpha)?;
    let rhs = q.transpose() * (harmful.transpose() * targets);
    Ok(q * llt.solve(rhs))
}

fn check_harmful(q: MatRef<'_, f64>, harmful: MatRef<'_, f64>, alpha: f64) -> Result<()> {
    if harmful.nrows() == 0 {
        return Err(SteerError::Invalid(
            "the malicious activation matrix is empty".into(),
        ));
    }
    if harmful.ncols() != q.nrows() {
        return Err(SteerError::Invalid(format!(
            "malicious activations have width {}, the benign ones {}",
            harmful.ncols(),
            q.nrows()
        )));
    }
    if !harmful.is_all_finite() {
        return Err(SteerError::Invalid(
            "the malicious activations contain NaN or infinite values".into(),
        ));
    }
    if !(alpha >= 0.0) {
        return Err(SteerError::Invalid(format!("α = {alpha} must be ≥ 0")));
    }
    Ok(())
}

/// Difference of means `mean(a) − mean(b)` of two activation matrices.
pub fn mean_difference(a: MatRef<'_, f64>, b: MatRef<'_, f64>) -> Vec<f64> {
    let mean = |m: MatRef<'_, f64>, j: usize| {
        (0..m.nrows()).map(|i| m[(i, j)]).sum::<f64>() / m.nrows().max(1) as f64
    };
    (0..a.ncols()).map(|j| mean(a, j) - mean(b, j)).collect()
}

/// One steered layer of a fitted file.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LayerSteer {
    pub layer: usize,
    /// Null-space dimension k (of d).
    pub k: usize,
    pub p: Option<f64>,
    pub gate: Vec<f32>,
    pub vector: Vec<f32>,
}

/// Diagnostics of one layer's fit.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LayerReport {
    pub layer: usize,
    pub k: usize,
    pub refusal_norm: f64,
    /// Mean gate `u·h` over the malicious and benign training rows (the fit drives the first
    /// towards 1 and the second towards 0).
    pub gate_harmful_mean: f64,
    pub gate_benign_mean: f64,
    /// Largest and k-th smallest eigenvalue of the benign Gram matrix.
    pub eig_max: f64,
    pub eig_k: f64,
    pub seconds: f64,
}

/// Fitting settings.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FitConfig {
    pub layers: Vec<usize>,
    /// One rule for every layer, or per-layer ratios.
    pub null_space: NullSpace,
    #[serde(default)]
    pub per_layer_p: BTreeMap<usize, f64>,
    /// Ridge regularisation α (the reference: 10).
    pub alpha: f64,
    /// How the refusal direction `r` is read from the training prompts.
    #[serde(default)]
    pub direction: Direction,
}

/// The refusal direction's two groups.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// `mean(harmful) − mean(benign)` over the training prompts.
    #[default]
    HarmfulBenign,
    /// `mean(refused) − mean(complied)` over all training prompts (benign and harmful), as the
    /// model's own responses were judged ([`Refusals`]).
    RefusedComplied,
}

/// Which training prompts the model refused (per row of the benign and the harmful set), for
/// [`Direction::RefusedComplied`].
#[derive(Clone, Debug, Default)]
pub struct Refusals {
    pub benign: Vec<bool>,
    pub harmful: Vec<bool>,
}

/// `mean(refused rows) − mean(complied rows)` over the rows of `b` and `m` together.
fn refused_minus_complied(b: MatRef<'_, f64>, m: MatRef<'_, f64>, r: &Refusals) -> Vec<f64> {
    let d = b.ncols();
    let (mut sr, mut sc) = (vec![0f64; d], vec![0f64; d]);
    let (mut nr, mut nc) = (0usize, 0usize);
    for (mat, flags) in [(b, &r.benign), (m, &r.harmful)] {
        for (i, &refused) in flags.iter().enumerate() {
            let (acc, n) = if refused {
                (&mut sr, &mut nr)
            } else {
                (&mut sc, &mut nc)
            };
            *n += 1;
            for (j, a) in acc.iter_mut().enumerate() {
                *a += mat[(i, j)];
            }
        }
    }
    (0..d)
        .map(|j| sr[j] / nr.max(1) as f64 - sc[j] / nc.max(1) as f64)
        .collect()
}

/// Fit every layer from captured activations (`ResidPre(l)` at the last prompt token) of the
/// benign and malicious training prompts.
/// `refusals` (the judged responses) is needed for [`Direction::RefusedComplied`] only.
pub fn fit(
    benign: &crate::activations::ActivationSet,
    harmful: &crate::activations::ActivationSet,
    cfg: &FitConfig,
    refusals: Option<&Refusals>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(Vec<LayerSteer>, Vec<LayerReport>)> {
    if cfg.layers.is_empty() {
        return Err(SteerError::Invalid("no layers to steer".into()));
    }
    if cfg.direction == Direction::RefusedComplied {
        let r = refusals.ok_or_else(|| {
            SteerError::Invalid(
                "the refused-vs-complied direction needs the model's judged responses".into(),
            )
        })?;
        if r.benign.len() != benign.len() || r.harmful.len() != harmful.len() {
            return Err(SteerError::Invalid(format!(
                "refusal flags for {} benign and {} harmful prompts, activations of {} and {}",
                r.benign.len(),
                r.harmful.len(),
                benign.len(),
                harmful.len()
            )));
        }
        let refused = r.benign.iter().chain(&r.harmful).filter(|&&x| x).count();
        let total = r.benign.len() + r.harmful.len();
        if refused == 0 || refused == total {
            return Err(SteerError::Invalid(format!(
                "the model refused {refused} of {total} training prompts (keyword judge): the \
                 refused-vs-complied direction needs both groups; use the harmful-vs-benign one"
            )));
        }
    }
    if benign.hidden != harmful.hidden {
        return Err(SteerError::Invalid(format!(
            "benign activations have width {}, malicious ones {}",
            benign.hidden, harmful.hidden
        )));
    }
    let mut steer = Vec::new();
    let mut report = Vec::new();
    for (i, &l) in cfg.layers.iter().enumerate() {
        let t0 = std::time::Instant::now();
        let site = Site::ResidPre(l);
        let hb = benign.matrix(site, None)?;
        let hm = harmful.matrix(site, None)?;
        let rule = match cfg.per_layer_p.get(&l) {
            Some(&p) => NullSpace::Ratio(p),
            None => cfg.null_space,
        };
        let nb = null_basis(hb.as_ref(), rule)
            .map_err(|e| SteerError::Invalid(format!("layer {l}: {e}")))?;
        let u = fit_gate(nb.q.as_ref(), hm.as_ref(), cfg.alpha)
            .map_err(|e| SteerError::Invalid(format!("layer {l}: {e}")))?;
        let r = match (cfg.direction, refusals) {
            (Direction::RefusedComplied, Some(f)) => {
                refused_minus_complied(hb.as_ref(), hm.as_ref(), f)
            }
            _ => mean_difference(hm.as_ref(), hb.as_ref()),
        };
        let gate_mean = |m: &Mat<f64>| mean(&row_gates(m.as_ref(), &u));
        let k = nb.q.ncols();
        report.push(LayerReport {
            layer: l,
            k,
            refusal_norm: r.iter().map(|v| v * v).sum::<f64>().sqrt(),
            gate_harmful_mean: gate_mean(&hm),
            gate_benign_mean: gate_mean(&hb),
            eig_max: *nb.eigenvalues.last().unwrap_or(&0.0),
            eig_k: nb.eigenvalues[k - 1],
            seconds: t0.elapsed().as_secs_f64(),
        });
        steer.push(LayerSteer {
            layer: l,
            k,
            p: match rule {
                NullSpace::Ratio(p) => Some(p),
                NullSpace::Tolerance => None,
            },
            gate: u.iter().map(|&v| v as f32).collect(),
            vector: r.iter().map(|&v| v as f32).collect(),
        });
        progress(i + 1, cfg.layers.len());
    }
    Ok((steer, report))
}

/// The gate `u·h` of every row `h` of `m`.
fn row_gates(m: MatRef<'_, f64>, u: &[f64]) -> Vec<f64> {
    (0..m.nrows())
        .map(|i| u.iter().enumerate().map(|(j, &w)| m[(i, j)] * w).sum())
        .collect()
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// Mean gate `u·h` per steered layer over the rows of an activation set (prompts held out of
/// the fit: the gate should stay near 0 on benign and near 1 on harmful ones), and the share of
/// rows whose gate exceeds 0.5.
pub fn gate_on(
    steer: &[LayerSteer],
    set: &crate::activations::ActivationSet,
) -> Result<Vec<(usize, f64, f64)>> {
    steer
        .iter()
        .map(|ls| {
            let m = set.matrix(Site::ResidPre(ls.layer), None)?;
            if m.ncols() != ls.gate.len() {
                return Err(SteerError::Invalid(format!(
                    "layer {}: activations of width {}, a gate of width {}",
                    ls.layer,
                    m.ncols(),
                    ls.gate.len()
                )));
            }
            let u: Vec<f64> = ls.gate.iter().map(|&g| g as f64).collect();
            let gates = row_gates(m.as_ref(), &u);
            let n = gates.len().max(1) as f64;
            Ok((
                ls.layer,
                mean(&gates),
                gates.iter().filter(|&&g| g > 0.5).count() as f64 / n,
            ))
        })
        .collect()
}

/// A fitted AlphaSteer file: safetensors (`layer.{l}.gate`, `layer.{l}.vector`) + JSON.
pub struct SteerFile {
    pub layers: Vec<LayerSteer>,
    pub meta: Value,
}

pub const FORMAT: &str = "rudder-alphasteer-v1";
pub const SIGN: &str = "vector = mean(harmful) - mean(benign) at the steered site; positive strength steers towards refusal";

impl SteerFile {
    pub fn save(&self, path: &Path) -> Result<()> {
        use candle_core::{Device, Tensor};
        let mut t = Vec::new();
        for l in &self.layers {
            t.push((
                format!("layer.{}.gate", l.layer),
                Tensor::from_slice(&l.gate, l.gate.len(), &Device::Cpu)?,
            ));
            t.push((
                format!("layer.{}.vector", l.layer),
                Tensor::from_slice(&l.vector, l.vector.len(), &Device::Cpu)?,
            ));
        }
        rudder_nn::checkpoint::save(&t, path).map_err(|e| SteerError::file(path, e))?;
        let body = json!({
            "format": FORMAT,
            "sign": SIGN,
            "site": "resid_pre",
            "application": "gated_add at every prompt position during prefill; gate from the last prompt token",
            "layers": self.layers.iter().map(|l| json!({"layer": l.layer, "k": l.k, "p": l.p})).collect::<Vec<_>>(),
            "meta": self.meta,
        });
        crate::study::write_json(&crate::activations::index_path(path), &body)
    }

    /// Whether `path` is an AlphaSteer file (its JSON index says so).
    pub fn is_one(path: &Path) -> bool {
        std::fs::read(crate::activations::index_path(path))
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .is_some_and(|v| v["format"] == FORMAT)
    }

    pub fn load(path: &Path) -> Result<Self> {
        let sp = crate::activations::index_path(path);
        let idx: Value = std::fs::read(&sp)
            .map_err(|e| SteerError::file(&sp, e))
            .and_then(|b| {
                serde_json::from_slice(&b)
                    .map_err(|e| SteerError::file(&sp, format!("invalid JSON: {e}")))
            })?;
        if idx["format"] != FORMAT {
            return Err(SteerError::file(
                &sp,
                format!(
                    "format {:?}, expected {FORMAT:?} (is this an AlphaSteer file?)",
                    idx["format"]
                ),
            ));
        }
        let t = candle_core::safetensors::load(path, &candle_core::Device::Cpu)
            .map_err(|e| SteerError::file(path, e))?;
        let entries = idx["layers"]
            .as_array()
            .ok_or_else(|| SteerError::file(&sp, "field \"layers\" is missing"))?;
        let mut layers = Vec::new();
        for (i, e) in entries.iter().enumerate() {
            let l = e["layer"].as_u64().ok_or_else(|| {
                SteerError::file(&sp, format!("layers[{i}].layer is not a number"))
            })? as usize;
            let get = |name: String| -> Result<Vec<f32>> {
                let x = t
                    .get(&name)
                    .ok_or_else(|| SteerError::file(path, format!("tensor {name} is missing")))?;
                x.to_vec1::<f32>()
                    .map_err(|e| SteerError::file(path, format!("{name}: {e}")))
            };
            let (gate, vector) = (
                get(format!("layer.{l}.gate"))?,
                get(format!("layer.{l}.vector"))?,
            );
            if gate.len() != vector.len() {
                return Err(SteerError::file(
                    path,
                    format!("layer {l}: gate and vector differ in length"),
                ));
            }
            layers.push(LayerSteer {
                layer: l,
                k: e["k"].as_u64().unwrap_or(0) as usize,
                p: e["p"].as_f64(),
                gate,
                vector,
            });
        }
        if layers.is_empty() {
            return Err(SteerError::file(&sp, "no layers"));
        }
        layers.sort_by_key(|l| l.layer);
        Ok(SteerFile {
            layers,
            meta: idx["meta"].clone(),
        })
    }

    /// Check width and layer count against a model.
    pub fn check(&self, layers: usize, hidden: usize, path: &Path) -> Result<()> {
        for l in &self.layers {
            if l.layer >= layers {
                return Err(SteerError::file(
                    path,
                    format!("steers layer {} but the model has {layers} layers", l.layer),
                ));
            }
            if l.gate.len() != hidden {
                return Err(SteerError::file(
                    path,
                    format!(
                        "layer {}: vectors of width {}, the model's hidden size is {hidden} (a file for another model?)",
                        l.layer,
                        l.gate.len()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// AlphaSteer at strength λ: gated edits at `ResidPre(l)`, prompt positions, prefill only,
    /// in layer order.
    pub fn interventions(&self, strength: f32) -> Interventions {
        Interventions::new(
            self.layers
                .iter()
                .map(|l| Intervention {
                    site: Site::ResidPre(l.layer),
                    edit: Edit::GatedAdd {
                        gate: l.gate.clone(),
                        vector: l.vector.clone(),
                    },
                    alpha: strength,
                    positions: Positions::Prompt,
                    phases: Phases::Prefill,
                })
                .collect(),
        )
    }

    /// The over-refusing baseline: the plain refusal vector added with a fixed strength at the
    /// same layers, prompt positions, prefill only (the reference's naive steering models).
    pub fn vector_baseline(&self, strength: f32) -> Interventions {
        Interventions::new(
            self.layers
                .iter()
                .map(|l| Intervention {
                    site: Site::ResidPre(l.layer),
                    edit: Edit::AddVector {
                        vector: l.vector.clone(),
                    },
                    alpha: strength,
                    positions: Positions::Prompt,
                    phases: Phases::Prefill,
                })
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: u64) -> impl FnMut() -> f64 {
        let mut s = seed;
        move || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
        }
    }

    /// Benign rows live mostly in the first half of the coordinates, malicious rows have a
    /// component in the second half.
    fn data(d: usize, nb: usize, nm: usize) -> (Mat<f64>, Mat<f64>) {
        let mut r = lcg(7);
        let hb = Mat::from_fn(nb, d, |_, j| if j < d / 2 { r() * 3.0 } else { r() * 0.01 });
        let hm = Mat::from_fn(nm, d, |_, j| {
            if j < d / 2 {
                r() * 3.0
            } else {
                1.0 + r() * 0.2
            }
        });
        (hb, hm)
    }

    #[test]
    fn refused_minus_complied_groups_rows_of_both_sets_by_the_judge() {
        let (hb, hm) = data(6, 5, 4);
        // refused: benign row 1, harmful rows 0 and 3; every other row complied
        let flags = Refusals {
            benign: vec![false, true, false, false, false],
            harmful: vec![true, false, false, true],
        };
        let r = refused_minus_complied(hb.as_ref(), hm.as_ref(), &flags);
        for j in 0..6 {
            let refused = (hb[(1, j)] + hm[(0, j)] + hm[(3, j)]) / 3.0;
            let complied =
                (hb[(0, j)] + hb[(2, j)] + hb[(3, j)] + hb[(4, j)] + hm[(1, j)] + hm[(2, j)]) / 6.0;
            assert!((r[j] - (refused - complied)).abs() < 1e-12, "column {j}");
        }
        // all harmful refused, all benign complied: the harmful-vs-benign direction
        let split = Refusals {
            benign: vec![false; 5],
            harmful: vec![true; 4],
        };
        let a = refused_minus_complied(hb.as_ref(), hm.as_ref(), &split);
        let b = mean_difference(hm.as_ref(), hb.as_ref());
        assert!(a.iter().zip(&b).all(|(x, y)| (x - y).abs() < 1e-12));
    }

    #[test]
    fn null_space_is_the_low_variance_span_of_the_benign_rows() {
        let (hb, _) = data(16, 200, 50);
        let nb = null_basis(hb.as_ref(), NullSpace::Ratio(0.5)).unwrap();
        assert_eq!(nb.q.ncols(), 8);
        // orthonormal
        let qtq = nb.q.transpose() * &nb.q;
        for i in 0..8 {
            for j in 0..8 {
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((qtq[(i, j)] - want).abs() < 1e-10);
            }
        }
        // benign rows have almost nothing in it
        let proj = &hb * &nb.q;
        let e: f64 = proj.norm_l2() / hb.norm_l2();
        assert!(e < 0.01, "{e}");
        assert!(nb.eigenvalues.windows(2).all(|w| w[0] <= w[1]));
        // tolerance rule: at least 10 % of d
        let t = null_basis(hb.as_ref(), NullSpace::Tolerance).unwrap();
        assert!(t.q.ncols() >= 2);
    }

    #[test]
    fn rank_one_gate_equals_the_general_matrix_and_the_reference_closed_form() {
        let d = 12;
        let (hb, hm) = data(d, 150, 40);
        let nb = null_basis(hb.as_ref(), NullSpace::Ratio(0.5)).unwrap();
        let alpha = 10.0;
        let u = fit_gate(nb.q.as_ref(), hm.as_ref(), alpha).unwrap();
        let r: Vec<f64> = (0..d).map(|j| (j as f64 * 0.3).sin()).collect();
        let y = Mat::from_fn(hm.nrows(), d, |_, j| r[j]);
        let s = fit_matrix(nb.q.as_ref(), hm.as_ref(), y.as_ref(), alpha).unwrap();
        for i in 0..d {
            for j in 0..d {
                assert!((s[(i, j)] - u[i] * r[j]).abs() < 1e-9 * (1.0 + s[(i, j)].abs()));
            }
        }
        // the reference's literal algorithm: P = QQᵀ, X = H P, pinv(XᵀX + α PᵀP) XᵀY, S = P Δ̃
        let p = &nb.q * nb.q.transpose();
        let x = &hm * &p;
        let mut a = x.transpose() * &x + (p.transpose() * &p) * faer::Scale(alpha);
        // symmetrise before the pseudo-inverse (A is symmetric up to rounding)
        a = (&a + a.transpose()) * faer::Scale(0.5);
        let evd = a.self_adjoint_eigen(Side::Lower).unwrap();
        let (ev, vecs) = (evd.S().column_vector(), evd.U());
        let max = (0..d).map(|i| ev[i].abs()).fold(0.0, f64::max);
        let pinv = Mat::from_fn(d, d, |i, j| {
            (0..d)
                .filter(|&k| ev[k].abs() > max * 1e-10)
                .map(|k| vecs[(i, k)] * vecs[(j, k)] / ev[k])
                .sum::<f64>()
        });
        let s_ref = &p * (&pinv * (x.transpose() * &y));
        let rel = (&s_ref - &s).norm_l2() / s_ref.norm_l2();
        assert!(rel < 1e-8, "relative difference {rel}");
        // the gate separates: ≈ 1 on malicious rows, ≈ 0 on benign ones
        let g = |m: &Mat<f64>| {
            (0..m.nrows())
                .map(|i| (0..d).map(|j| m[(i, j)] * u[j]).sum::<f64>())
                .sum::<f64>()
                / m.nrows() as f64
        };
        assert!(g(&hm) > 0.5, "{}", g(&hm));
        assert!(g(&hb).abs() < 0.05, "{}", g(&hb));
    }

    #[test]
    fn bad_settings_are_refused_with_reasons() {
        let (hb, hm) = data(8, 40, 10);
        for p in [0.0, 1.0, -0.2, 1.5] {
            let e = null_basis(hb.as_ref(), NullSpace::Ratio(p)).err().unwrap();
            assert!(e.to_string().contains("(0, 1)"), "{e}");
        }
        let e = null_basis(Mat::<f64>::zeros(0, 8).as_ref(), NullSpace::Ratio(0.5))
            .err()
            .unwrap();
        assert!(e.to_string().contains("empty"));
        let nb = null_basis(hb.as_ref(), NullSpace::Ratio(0.5)).unwrap();
        let narrow = Mat::<f64>::zeros(3, 7);
        assert!(
            fit_gate(nb.q.as_ref(), narrow.as_ref(), 1.0)
                .err()
                .unwrap()
                .to_string()
                .contains("width")
        );
        // α = 0 with fewer malicious rows than null-space directions: singular, named
        let few = Mat::from_fn(2, 8, |i, j| (i + j) as f64);
        let e = fit_gate(nb.q.as_ref(), few.as_ref(), 0.0)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("singular"), "{e}");
        let mut nan = hm.clone();
        nan[(0, 0)] = f64::NAN;
        assert!(fit_gate(nb.q.as_ref(), nan.as_ref(), 1.0).is_err());
    }

    #[test]
    fn steering_files_round_trip_and_refuse_other_models() {
        let tmp = tempfile::tempdir().unwrap();
        let f = SteerFile {
            layers: vec![
                LayerSteer {
                    layer: 3,
                    k: 4,
                    p: Some(0.5),
                    gate: vec![0.5; 8],
                    vector: vec![1.0; 8],
                },
                LayerSteer {
                    layer: 1,
                    k: 4,
                    p: Some(0.5),
                    gate: vec![0.25; 8],
                    vector: vec![-1.0; 8],
                },
            ],
            meta: json!({"model": "tiny"}),
        };
        let p = tmp.path().join("steer.safetensors");
        f.save(&p).unwrap();
        let back = SteerFile::load(&p).unwrap();
        assert_eq!(
            back.layers.iter().map(|l| l.layer).collect::<Vec<_>>(),
            vec![1, 3]
        );
        assert_eq!(back.layers[1].gate, vec![0.5; 8]);
        back.check(4, 8, &p).unwrap();
        assert!(
            back.check(3, 8, &p)
                .err()
                .unwrap()
                .to_string()
                .contains("has 3 layers")
        );
        assert!(
            back.check(4, 16, &p)
                .err()
                .unwrap()
                .to_string()
                .contains("hidden size is 16")
        );
        let iv = back.interventions(0.5);
        assert_eq!(iv.interventions.len(), 2);
        assert!(iv.needs_whole_prompt());
        assert!(!back.vector_baseline(1.0).needs_whole_prompt());
        // a vector file is not an AlphaSteer file
        std::fs::write(
            tmp.path().join("x.safetensors.json"),
            r#"{"format": "rudder-steering-vectors-v1"}"#,
        )
        .unwrap();
        let e = SteerFile::load(&tmp.path().join("x.safetensors"))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("AlphaSteer"), "{e}");
    }
}
