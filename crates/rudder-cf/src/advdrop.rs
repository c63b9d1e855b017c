//! AdvDrop (cf-seeds.md §3): debiasing LightGCN by adversarial edge dropout.
//!
//! Two ID-embedding views (main and dual) are propagated over stochastic graphs whose edges are
//! kept with probabilities from one attention mask network `M` (`Q, K: d → 10`; per edge
//! `sigmoid(⟨Q x̂_target, K x̂_source⟩ − mean over the target's edges)`): `π_dual = M(X_dual)`,
//! `π_main = 1 − M(X_main)`; kept values are `Â_e / keep_prob`. The recommender step minimises
//! BPR on both views + L2 + `inv_tau ·` a cross-view invariance InfoNCE over 100 random users
//! and 100 random items (on sigmoid scores, temperature `embed_tau`). Every `interval` epochs
//! the mask network takes `adv_epochs × batches` ARM steps that *increase* that invariance
//! loss: with shared uniforms `u`, views are propagated on `u > 1 − π` and on `u < π`, and the
//! surrogate `Σ_e stopgrad(g_e)·π_dual,e` with `g = grad_coeff·(b − a)·(u − ½)` is minimised.
//! Inference uses the main view on the full graph with dot-product scores.

use std::cell::RefCell;

use candle_core::{D, Device, Tensor, Var};
use rand::Rng;
use rayon::prelude::*;
use rudder_data::Interactions;
use rudder_nn::graph::{lightgcn, norm_adj};
use rudder_nn::optim::{Adam, AdamConfig};
use rudder_nn::sparse::{Reweightable, SparseOperator};
use serde::{Deserialize, Serialize};

use crate::Result;
use crate::loss::{BatchIdx, bpr};
use crate::model::{Backbone, IdTables};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AdvDropConfig {
    pub keep_prob: f64,
    pub inv_tau: f64,
    pub embed_tau: f64,
    pub num_samples: usize,
    pub att_dim: usize,
    pub grad_coeff: f64,
    /// Adversarial phase when `(epoch + 1) % interval == 0`.
    pub interval: usize,
    /// Passes over the batches in each adversarial phase.
    pub adv_epochs: usize,
    pub adv_lr: f64,
}

impl Default for AdvDropConfig {
    fn default() -> Self {
        AdvDropConfig {
            keep_prob: 0.8,
            inv_tau: 1.0,
            embed_tau: 0.1,
            num_samples: 100,
            att_dim: 10,
            grad_coeff: 5.0,
            interval: 7,
            adv_epochs: 10,
            adv_lr: 1e-2,
        }
    }
}

struct MaskNet {
    q_w: Var,
    q_b: Var,
    k_w: Var,
    k_b: Var,
}

pub struct AdvDrop {
    pub cfg: AdvDropConfig,
    main: IdTables,
    dual: IdTables,
    mask: MaskNet,
    mask_opt: RefCell<Adam>,
    adj: SparseOperator,
    /// `Â`'s pattern, reweighted for each dropped graph without re-transposing.
    pattern: Reweightable,
    /// Target (row) and source (column) node of every directed edge of `Â`, in CSR order.
    rows: Tensor,
    cols: Tensor,
    inv_deg: Tensor,
    n_layers: usize,
    n_users: usize,
    reg: f64,
    seed: u64,
}

impl AdvDrop {
    pub fn new(
        train: &Interactions,
        dim: usize,
        n_layers: usize,
        reg: f64,
        cfg: &AdvDropConfig,
        seed: u64,
        dev: &Device,
    ) -> Result<AdvDrop> {
        let main = IdTables::new(train.n_users(), train.n_items(), dim, seed, dev)?;
        let dual = IdTables::new(train.n_users(), train.n_items(), dim, seed ^ 0xD0A1, dev)?;
        let (qw, qb) = rudder_nn::init::linear_uniform(cfg.att_dim, dim, seed, 31, dev)?;
        let (kw, kb) = rudder_nn::init::linear_uniform(cfg.att_dim, dim, seed, 32, dev)?;
        let mask = MaskNet {
            q_w: Var::from_tensor(&qw)?,
            q_b: Var::from_tensor(&qb)?,
            k_w: Var::from_tensor(&kw)?,
            k_b: Var::from_tensor(&kb)?,
        };
        let mask_opt = RefCell::new(Adam::new(
            vec![
                mask.q_w.clone(),
                mask.q_b.clone(),
                mask.k_w.clone(),
                mask.k_b.clone(),
            ],
            AdamConfig::adam(cfg.adv_lr),
        )?);
        let adj = norm_adj(train);
        let a = &adj.a;
        let mut rows = Vec::with_capacity(a.indices.len());
        let mut deg = vec![0f32; a.n_rows];
        for r in 0..a.n_rows {
            for _ in a.indptr[r]..a.indptr[r + 1] {
                rows.push(r as u32);
            }
            deg[r] = (a.indptr[r + 1] - a.indptr[r]) as f32;
        }
        let inv_deg: Vec<f32> = deg
            .iter()
            .map(|&d| if d > 0.0 { 1.0 / d } else { 0.0 })
            .collect();
        let ne = rows.len();
        Ok(AdvDrop {
            cfg: cfg.clone(),
            main,
            dual,
            mask,
            mask_opt,
            rows: Tensor::from_vec(rows, ne, dev)?,
            cols: Tensor::from_slice(&a.indices, ne, dev)?,
            inv_deg: Tensor::from_vec(inv_deg, a.n_rows, dev)?,
            pattern: Reweightable::new(a.clone()),
            adj,
            n_layers,
            n_users: train.n_users(),
            reg,
            seed,
        })
    }

    fn stacked(t: &IdTables) -> Result<Tensor> {
        Ok(Tensor::cat(&[t.users.as_tensor(), t.items.as_tensor()], 0)?)
    }

    /// `M(X)`: per-edge keep scores in (0, 1), in CSR edge order (differentiable w.r.t. Q, K).
    pub fn mask_scores(&self, x: &Tensor) -> Result<Tensor> {
        let xn = rudder_nn::ops::l2_normalize(x, 1e-12)?;
        let q = xn
            .matmul(&self.mask.q_w.as_tensor().t()?)?
            .broadcast_add(self.mask.q_b.as_tensor())?;
        let k = xn
            .matmul(&self.mask.k_w.as_tensor().t()?)?
            .broadcast_add(self.mask.k_b.as_tensor())?;
        let a =
            (q.index_select(&self.rows, 0)? * k.index_select(&self.cols, 0)?)?.sum(D::Minus1)?;
        let n = x.dim(0)?;
        let sums = Tensor::zeros(n, a.dtype(), a.device())?.index_add(&self.rows, &a, 0)?;
        let means = (sums * &self.inv_deg)?.index_select(&self.rows, 0)?;
        candle_nn_sigmoid(&(a - means)?)
    }

    /// `M(X)` without a gradient, fused: one pass over each row's edges computes the
    /// query·key logits, their row mean and the centred sigmoid (what `mask_scores` computes
    /// through a dozen edge-sized tensors). Parallel over row blocks.
    fn keep_scores(&self, t: &IdTables) -> Result<Vec<f32>> {
        Ok(self.mask_forward(t)?.pi)
    }

    fn mask_forward(&self, t: &IdTables) -> Result<MaskForward> {
        let xn = rudder_nn::ops::l2_normalize(&Self::stacked(t)?.detach(), 1e-12)?;
        let proj = |w: &Var, b: &Var| -> Result<Vec<f32>> {
            Ok(xn
                .matmul(&w.as_tensor().t()?)?
                .broadcast_add(b.as_tensor())?
                .flatten_all()?
                .to_vec1::<f32>()?)
        };
        let (q, k) = (
            proj(&self.mask.q_w, &self.mask.q_b)?,
            proj(&self.mask.k_w, &self.mask.k_b)?,
        );
        let h = self.cfg.att_dim;
        let a = self.pattern.base();
        let pi = per_row_blocks(a, |r, p0, p1, out| {
            let qr = &q[r * h..(r + 1) * h];
            let mut sum = 0f32;
            for p in p0..p1 {
                let kc = &k[a.indices[p] as usize * h..][..h];
                let dot: f32 = qr.iter().zip(kc).map(|(x, y)| x * y).sum();
                sum += dot;
                out.push(dot);
            }
            if p1 > p0 {
                let mean = sum / (p1 - p0) as f32;
                let start = out.len() - (p1 - p0);
                for v in &mut out[start..] {
                    *v = 1.0 / (1.0 + (-(*v - mean)).exp());
                }
            }
        });
        Ok(MaskForward { xn, q, k, pi })
    }

    /// Gradients of `Σ_e g_e · M(X)_e` with respect to the mask network's parameters, by hand
    /// (the ARM surrogate; equal to autograd through `mask_scores`, tested): with
    /// `δ_e = g_e π_e (1 − π_e)`, the centred logits give `∂a_e = δ_e − mean_row(δ)`, then
    /// `∂q_r = Σ_e ∂a_e k_c`, `∂k_c = Σ_e ∂a_e q_r` (over the transpose), and the two linear maps.
    fn mask_grads(&self, f: &MaskForward, g: &[f32]) -> Result<Vec<(Var, Tensor)>> {
        let h = self.cfg.att_dim;
        let a = self.pattern.base();
        let da = per_row_blocks(a, |_, p0, p1, out| {
            let start = out.len();
            let mut sum = 0f32;
            for p in p0..p1 {
                let d = g[p] * f.pi[p] * (1.0 - f.pi[p]);
                sum += d;
                out.push(d);
            }
            if p1 > p0 {
                let mean = sum / (p1 - p0) as f32;
                out[start..].iter_mut().for_each(|v| *v -= mean);
            }
        });
        // ∂q = D·K and ∂k = Dᵀ·Q for D = Â's pattern carrying ∂a: the sparse products
        let d = self.pattern.with_values(&da);
        let n = a.n_rows;
        let dev = self.rows.device();
        let product = |m: &rudder_nn::sparse::Csr, x: &[f32]| -> Result<Tensor> {
            let mut out = vec![0f32; n * h];
            m.matmul_into(x, h, &mut out);
            Ok(Tensor::from_vec(out, (n, h), dev)?)
        };
        let (dq, dk) = (product(&d.a, &f.k)?, product(&d.at, &f.q)?);
        let m = &self.mask;
        Ok(vec![
            (m.q_w.clone(), dq.t()?.matmul(&f.xn)?),
            (m.q_b.clone(), dq.sum(0)?.reshape(m.q_b.dims())?),
            (m.k_w.clone(), dk.t()?.matmul(&f.xn)?),
            (m.k_b.clone(), dk.sum(0)?.reshape(m.k_b.dims())?),
        ])
    }

    /// Keep probabilities of the two views (no gradient).
    fn keep_probs(&self) -> Result<(Vec<f32>, Vec<f32>)> {
        Ok((self.keep_scores(&self.dual)?, self.main_keep_probs()?))
    }

    /// The main view keeps an edge with probability `1 − M(X_main)`.
    fn main_keep_probs(&self) -> Result<Vec<f32>> {
        Ok(self
            .keep_scores(&self.main)?
            .into_iter()
            .map(|p| 1.0 - p)
            .collect())
    }

    /// `Â` with only the edges where `keep[e]`, kept values divided by `keep_prob`.
    fn dropped(&self, keep: impl Fn(usize) -> bool + Sync) -> SparseOperator {
        let s = 1.0 / self.cfg.keep_prob as f32;
        let values: Vec<f32> = self
            .pattern
            .base()
            .values
            .par_iter()
            .enumerate()
            .map(|(e, &v)| if keep(e) { v * s } else { 0.0 })
            .collect();
        self.pattern.with_values(&values)
    }

    fn propagate(&self, t: &IdTables, graph: &SparseOperator) -> Result<(Tensor, Tensor)> {
        let e = lightgcn(&Self::stacked(t)?, graph, self.n_layers)?;
        let ni = e.dim(0)? - self.n_users;
        Ok((
            e.narrow(0, 0, self.n_users)?,
            e.narrow(0, self.n_users, ni)?,
        ))
    }

    /// One U(0, 1) draw per edge; generated in fixed chunks, each from its own stream, so the
    /// numbers depend on the seed and key only, not on the thread count.
    fn uniforms(&self, key: u64) -> Vec<f32> {
        const CHUNK: usize = 1 << 15;
        let mut u = vec![0f32; self.n_edges()];
        let seed = self.seed;
        u.par_chunks_mut(CHUNK).enumerate().for_each(|(c, ch)| {
            let mut r = rudder_data::rng::stream(seed, &[0xAD, key, c as u64]);
            ch.iter_mut().for_each(|v| *v = r.random::<f32>());
        });
        u
    }

    fn samples(&self, key: u64, n_items: usize) -> Result<(Tensor, Tensor)> {
        let mut r = rudder_data::rng::stream(self.seed, &[0x5A, key]);
        let ns = self.cfg.num_samples;
        let u: Vec<u32> = (0..ns)
            .map(|_| r.random_range(0..self.n_users as u32))
            .collect();
        let i: Vec<u32> = (0..ns).map(|_| r.random_range(0..n_items as u32)).collect();
        let dev = self.rows.device();
        Ok((Tensor::from_vec(u, ns, dev)?, Tensor::from_vec(i, ns, dev)?))
    }

    /// Cross-view invariance: InfoNCE matching each sampled row of view A to the same row of
    /// view B among the sampled rows, on `σ(a·b)/τ` scores; users and items summed.
    fn inv(
        &self,
        a: &(Tensor, Tensor),
        b: &(Tensor, Tensor),
        s: &(Tensor, Tensor),
    ) -> Result<Tensor> {
        let one = |x: &Tensor, y: &Tensor, idx: &Tensor| -> Result<Tensor> {
            cross_view_infonce(
                &x.index_select(idx, 0)?,
                &y.index_select(idx, 0)?,
                self.cfg.embed_tau,
            )
        };
        Ok((one(&a.0, &b.0, &s.0)? + one(&a.1, &b.1, &s.1)?)?)
    }

    /// The recommender step's loss for one batch (mask frozen).
    pub fn loss(&self, idx: &BatchIdx, step: u64) -> Result<Tensor> {
        let (pd, pm) = self.keep_probs()?;
        let u = self.uniforms(step.wrapping_mul(2));
        let u2 = self.uniforms(step.wrapping_mul(2) + 1);
        let gd = self.dropped(|e| u[e] + pd[e] >= 1.0);
        let gm = self.dropped(|e| u2[e] + pm[e] >= 1.0);
        let ed = self.propagate(&self.dual, &gd)?;
        let em = self.propagate(&self.main, &gm)?;
        let mut total: Option<Tensor> = None;
        for (view, t) in [(&ed, &self.dual), (&em, &self.main)] {
            let (users, items) = view;
            let eu = users.index_select(&idx.users, 0)?;
            let ep = items.index_select(&idx.pos, 0)?;
            let en = items.index_select(&idx.neg, 0)?;
            let pos = (&eu * &ep)?.sum(D::Minus1)?;
            let neg = (&eu * &en)?.sum(D::Minus1)?.unsqueeze(1)?;
            let mut l = bpr(&pos, &neg)?;
            if self.reg > 0.0 {
                let r = (t
                    .users
                    .as_tensor()
                    .index_select(&idx.users, 0)?
                    .sqr()?
                    .sum_all()?
                    + t.items
                        .as_tensor()
                        .index_select(&idx.pos, 0)?
                        .sqr()?
                        .sum_all()?
                    + t.items
                        .as_tensor()
                        .index_select(&idx.neg, 0)?
                        .sqr()?
                        .sum_all()?)?;
                l = (l + r.affine(0.5 * self.reg / idx.b as f64, 0.0)?)?;
            }
            total = Some(match total {
                Some(t) => (t + l)?,
                None => l,
            });
        }
        let s = self.samples(step, ed.1.dim(0)?)?;
        let inv = self.inv(&ed, &em, &s)?.affine(self.cfg.inv_tau, 0.0)?;
        Ok((total.expect("two views") + inv)?)
    }

    /// One ARM step of the mask network; returns the mean keep probability of the dual view.
    pub fn arm_step(&self, key: u64) -> Result<f64> {
        let f = self.mask_forward(&self.dual)?;
        let pd = &f.pi;
        let pm = self.main_keep_probs()?;
        let u = self.uniforms((1 << 40) + key);
        let s = self.samples((1 << 41) + key, self.main.items.as_tensor().dim(0)?)?;
        let views = |keep: &(dyn Fn(usize, f32) -> bool + Sync)| -> Result<Tensor> {
            let ed = self.propagate(&self.dual, &self.dropped(|e| keep(e, pd[e])))?;
            let em = self.propagate(&self.main, &self.dropped(|e| keep(e, pm[e])))?;
            self.inv(
                &(ed.0.detach(), ed.1.detach()),
                &(em.0.detach(), em.1.detach()),
                &s,
            )
        };
        let a = views(&|e, p| u[e] > 1.0 - p)?.to_scalar::<f32>()? as f64;
        let b = views(&|e, p| u[e] < p)?.to_scalar::<f32>()? as f64;
        let g: Vec<f32> = u
            .iter()
            .map(|&ue| (self.cfg.grad_coeff * (b - a) * (ue as f64 - 0.5)) as f32)
            .collect();
        let grads = self.mask_grads(&f, &g)?;
        self.mask_opt.borrow_mut().step_with(|t| {
            grads
                .iter()
                .find(|(v, _)| v.as_tensor().id() == t.id())
                .map(|(_, g)| g.clone())
        })?;
        Ok(f.pi.iter().map(|&p| p as f64).sum::<f64>() / f.pi.len().max(1) as f64)
    }

    /// Mask network parameters (trained by the ARM steps only).
    pub fn mask_params(&self) -> Vec<(String, Var)> {
        vec![
            ("mask_q_w".into(), self.mask.q_w.clone()),
            ("mask_q_b".into(), self.mask.q_b.clone()),
            ("mask_k_w".into(), self.mask.k_w.clone()),
            ("mask_k_b".into(), self.mask.k_b.clone()),
        ]
    }

    /// Per-edge keep probability of each view on the current embeddings, with the item of the
    /// edge (for the bias diagnostic): `(item, π_main, π_dual)` for user→item edges.
    pub fn item_keep_probs(&self) -> Result<Vec<(u32, f32, f32)>> {
        let (pd, pm) = self.keep_probs()?;
        let a = &self.adj.a;
        let mut out = Vec::new();
        for r in 0..self.n_users {
            for e in a.indptr[r]..a.indptr[r + 1] {
                out.push((a.indices[e] - self.n_users as u32, pm[e], pd[e]));
            }
        }
        Ok(out)
    }

    pub fn n_edges(&self) -> usize {
        self.adj.a.values.len()
    }
}

/// The no-gradient mask network's intermediate values, kept for the hand-written backward.
struct MaskForward {
    xn: Tensor,
    q: Vec<f32>,
    k: Vec<f32>,
    pi: Vec<f32>,
}

/// One value per stored entry of `a`, computed row by row (`f(row, first, end, out)` pushes the
/// row's values onto `out`) in parallel blocks of rows, concatenated in storage order.
fn per_row_blocks(
    a: &rudder_nn::sparse::Csr,
    f: impl Fn(usize, usize, usize, &mut Vec<f32>) + Sync,
) -> Vec<f32> {
    const BLOCK: usize = 2048;
    let blocks: Vec<Vec<f32>> = (0..a.n_rows.div_ceil(BLOCK))
        .into_par_iter()
        .map(|b| {
            let (r0, r1) = (b * BLOCK, ((b + 1) * BLOCK).min(a.n_rows));
            let mut out = Vec::with_capacity(a.indptr[r1] - a.indptr[r0]);
            for r in r0..r1 {
                f(r, a.indptr[r], a.indptr[r + 1], &mut out);
            }
            out
        })
        .collect();
    blocks.concat()
}

/// `mean_k −log( exp(σ(x_k·y_k)/τ) / Σ_l exp(σ(x_k·y_l)/τ) )`: row k of one view must match
/// row k of the other.
pub fn cross_view_infonce(x: &Tensor, y: &Tensor, tau: f64) -> Result<Tensor> {
    let r = candle_nn_sigmoid(&x.matmul(&y.t()?)?)?.affine(1.0 / tau, 0.0)?;
    let ls = rudder_nn::ops::log_softmax(&r)?;
    let n = ls.dim(0)?;
    let eye = Tensor::eye(n, ls.dtype(), ls.device())?;
    Ok((ls * eye)?.sum_all()?.affine(-1.0 / n as f64, 0.0)?)
}

/// How the learned keep probabilities relate to item popularity.
#[derive(Debug, Clone, Serialize)]
pub struct BiasReport {
    /// Spearman rank correlation between an item's train popularity and the mean keep
    /// probability of its user→item edges, main view (`1 − M`).
    pub spearman_main: f64,
    /// Same for the dual view (`M`).
    pub spearman_dual: f64,
    /// `(item, popularity, mean π_main, mean π_dual)` for items with train edges.
    pub items: Vec<(u32, usize, f64, f64)>,
}

/// Spearman's ρ with average ranks for ties.
pub fn spearman(x: &[f64], y: &[f64]) -> f64 {
    fn ranks(v: &[f64]) -> Vec<f64> {
        let mut idx: Vec<usize> = (0..v.len()).collect();
        idx.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
        let mut r = vec![0.0; v.len()];
        let mut i = 0;
        while i < idx.len() {
            let mut j = i;
            while j + 1 < idx.len() && v[idx[j + 1]] == v[idx[i]] {
                j += 1;
            }
            let avg = (i + j) as f64 / 2.0 + 1.0;
            for k in i..=j {
                r[idx[k]] = avg;
            }
            i = j + 1;
        }
        r
    }
    let (rx, ry) = (ranks(x), ranks(y));
    let n = x.len() as f64;
    let (mx, my) = (rx.iter().sum::<f64>() / n, ry.iter().sum::<f64>() / n);
    let cov: f64 = rx.iter().zip(&ry).map(|(a, b)| (a - mx) * (b - my)).sum();
    let vx: f64 = rx.iter().map(|a| (a - mx).powi(2)).sum();
    let vy: f64 = ry.iter().map(|b| (b - my).powi(2)).sum();
    if vx == 0.0 || vy == 0.0 {
        0.0
    } else {
        cov / (vx * vy).sqrt()
    }
}

impl AdvDrop {
    pub fn bias_report(&self) -> Result<BiasReport> {
        let edges = self.item_keep_probs()?;
        let n_items = self.main.items.as_tensor().dim(0)?;
        let mut acc = vec![(0usize, 0f64, 0f64); n_items];
        for (i, pm, pd) in edges {
            let a = &mut acc[i as usize];
            a.0 += 1;
            a.1 += pm as f64;
            a.2 += pd as f64;
        }
        let items: Vec<(u32, usize, f64, f64)> = acc
            .iter()
            .enumerate()
            .filter(|(_, a)| a.0 > 0)
            .map(|(i, a)| (i as u32, a.0, a.1 / a.0 as f64, a.2 / a.0 as f64))
            .collect();
        let pop: Vec<f64> = items.iter().map(|r| r.1 as f64).collect();
        let pm: Vec<f64> = items.iter().map(|r| r.2).collect();
        let pd: Vec<f64> = items.iter().map(|r| r.3).collect();
        Ok(BiasReport {
            spearman_main: spearman(&pop, &pm),
            spearman_dual: spearman(&pop, &pd),
            items,
        })
    }
}

fn candle_nn_sigmoid(x: &Tensor) -> Result<Tensor> {
    // σ(x) = 1 / (1 + e^{−x}), composed so that it records a gradient.
    Ok((x.neg()?.exp()? + 1.0)?.recip()?)
}

impl Backbone for AdvDrop {
    fn forward(&self) -> Result<(Tensor, Tensor)> {
        self.propagate(&self.main, &self.adj)
    }
    fn ego(&self) -> Result<(Tensor, Tensor)> {
        Ok(self.main.tensors())
    }
    fn params(&self) -> Vec<(String, Var)> {
        let mut v = self.main.params();
        for (n, p) in self.dual.params() {
            v.push((format!("dual_{n}"), p));
        }
        v
    }
    fn extra_state(&self) -> Vec<(String, Var)> {
        self.mask_params()
    }
    fn custom_loss(&self, idx: &BatchIdx, step: u64) -> Option<Result<Tensor>> {
        Some(self.loss(idx, step))
    }
    fn inner_optimizer(&self) -> Option<&RefCell<Adam>> {
        Some(&self.mask_opt)
    }
    fn adversarial(
        &self,
        epoch: usize,
        n_batches: usize,
    ) -> Option<Result<Vec<(&'static str, f64)>>> {
        if !(epoch + 1).is_multiple_of(self.cfg.interval.max(1)) {
            return None;
        }
        let run = || -> Result<Vec<(&'static str, f64)>> {
            for rep in 0..self.cfg.adv_epochs {
                for b in 0..n_batches {
                    self.arm_step(((epoch * self.cfg.adv_epochs + rep) * n_batches + b) as u64)?;
                }
            }
            let (pd, pm) = self.keep_probs()?;
            let mean = |v: &[f32]| v.iter().map(|&x| x as f64).sum::<f64>() / v.len().max(1) as f64;
            Ok(vec![
                ("adv_dual_keep", mean(&pd)),
                ("adv_main_keep", mean(&pm)),
            ])
        };
        Some(run())
    }
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cross_view_infonce_by_hand() {
        let dev = Device::Cpu;
        // x = y = I₂: scores σ(1) on the diagonal, σ(0) = ½ off it.
        let x = Tensor::eye(2, candle_core::DType::F32, &dev).unwrap();
        let l = cross_view_infonce(&x, &x, 0.1)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        let s1 = 1.0 / (1.0 + (-1f64).exp());
        let want = -((s1 / 0.1) - ((s1 / 0.1).exp() + (0.5f64 / 0.1).exp()).ln());
        assert!((l - want).abs() < 1e-5, "{l} vs {want}");
    }

    /// AdvDrop (d 8, default mask network) on a small synthetic world.
    fn tiny(n_users: usize, n_items: usize, seed: u64) -> AdvDrop {
        use rudder_data::synth::{SynthConfig, SynthWorld};
        let w = SynthWorld::generate(&SynthConfig {
            n_users,
            n_items,
            mean_interactions: 10.0,
            ..Default::default()
        });
        let cfg = AdvDropConfig::default();
        AdvDrop::new(&w.dataset.interactions, 8, 2, 0.0, &cfg, seed, &Device::Cpu).unwrap()
    }

    #[test]
    fn fused_keep_scores_equal_the_differentiable_mask() {
        let m = tiny(60, 90, 3);
        for t in [&m.main, &m.dual] {
            let fused = m.keep_scores(t).unwrap();
            let graph = m
                .mask_scores(&AdvDrop::stacked(t).unwrap())
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert_eq!(fused.len(), m.n_edges());
            for (a, b) in fused.iter().zip(&graph) {
                assert!((a - b).abs() < 1e-5, "{a} vs {b}");
            }
        }
        // the uniforms are reproducible and cover (0, 1)
        let (u1, u2) = (m.uniforms(7), m.uniforms(7));
        assert_eq!(u1, u2);
        assert_ne!(u1, m.uniforms(8));
        let mean = u1.iter().sum::<f32>() / u1.len() as f32;
        assert!((mean - 0.5).abs() < 0.05, "{mean}");
    }

    #[test]
    fn hand_written_mask_gradients_equal_autograd() {
        let m = tiny(50, 70, 5);
        let g: Vec<f32> = m.uniforms(3).iter().map(|u| 5.0 * (u - 0.5)).collect();
        let f = m.mask_forward(&m.dual).unwrap();
        let by_hand = m.mask_grads(&f, &g).unwrap();
        let x = AdvDrop::stacked(&m.dual).unwrap().detach();
        let gt = Tensor::from_slice(&g, g.len(), &Device::Cpu).unwrap();
        let auto = (m.mask_scores(&x).unwrap() * gt)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        // k_b's true gradient is 0 (a shift of every key adds a per-row constant that the
        // centring removes), so compare against the largest gradient entry overall
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let pairs: Vec<(Vec<f32>, Vec<f32>)> = by_hand
            .iter()
            .map(|(v, gh)| {
                let ga = auto
                    .get(v.as_tensor())
                    .expect("autograd reaches the parameter");
                assert_eq!(ga.dims(), gh.dims());
                (flat(ga), flat(gh))
            })
            .collect();
        let scale = pairs
            .iter()
            .flat_map(|(a, _)| a.iter())
            .fold(0f32, |s, x| s.max(x.abs()));
        assert!(scale > 0.0);
        for (ga, gh) in &pairs {
            for (x, y) in ga.iter().zip(gh) {
                assert!((x - y).abs() <= 1e-4 * scale, "{x} vs {y} (scale {scale})");
            }
        }
    }

    #[test]
    fn spearman_with_ties() {
        assert!((spearman(&[1.0, 2.0, 3.0], &[10.0, 20.0, 30.0]) - 1.0).abs() < 1e-12);
        assert!((spearman(&[1.0, 2.0, 3.0], &[3.0, 2.0, 1.0]) + 1.0).abs() < 1e-12);
        // ranks x: 1, 2.5, 2.5, 4; y: 1, 2, 3, 4 → ρ = 4.5 / √(4.5·5)
        let r = spearman(&[1.0, 2.0, 2.0, 3.0], &[1.0, 2.0, 3.0, 4.0]);
        assert!((r - 4.5 / (4.5f64 * 5.0).sqrt()).abs() < 1e-12, "{r}");
    }
}
