//! Fused training ops for decoder language models: causal attention, RMSNorm and the LoRA
//! down-projection behind dropout, each one candle op with its own backward.
//!
//! Composed from candle's elementwise ops, the differentiable attention of one layer keeps the
//! scaled scores, the masked scores, the max-shifted scores, their exponentials, the
//! log-softmax and the probabilities alive until the backward pass (six `[b, h, t, T]`
//! tensors), RMSNorm five activations, and LoRA dropout a mask and a masked copy of the input
//! per adapted projection. These ops keep only what their backward cannot recompute cheaply:
//! attention its output and one log-sum-exp per query (the probabilities are recomputed, as
//! flash attention does), RMSNorm nothing beyond its input (the row scale is recomputed), dropout
//! its mask as one byte per value and no masked copy of the input. The maths is the composition's; the tests compare values
//! and gradients with it.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

/// `dst[m, n] (+)= A · B` on row-major slices, `A` given as `[m, k]` or (`at`) as `[k, m]`,
/// `B` as `[k, n]` or (`bt`) as `[n, k]`; `accumulate` adds to `dst`. One thread: the callers
/// parallelise over independent blocks.
#[allow(clippy::too_many_arguments)]
fn mm(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    a: &[f32],
    at: bool,
    b: &[f32],
    bt: bool,
    accumulate: bool,
    scale: f32,
) {
    assert!(dst.len() >= m * n && a.len() >= m * k && b.len() >= k * n);
    if m == 0 || n == 0 {
        return;
    }
    let (a_cs, a_rs) = if at { (m as isize, 1) } else { (1, k as isize) };
    let (b_cs, b_rs) = if bt { (k as isize, 1) } else { (1, n as isize) };
    // SAFETY: the asserts above bound every index the strides reach.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            if accumulate { 1.0 } else { 0.0 },
            scale,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// Binds `$s` to the f32 data of tensor `$t` (made contiguous if needed) without copying it;
/// the storage stays read-locked for the rest of the scope.
macro_rules! view {
    ($t:expr, $s:ident, $op:expr) => {
        let owned = $t.contiguous()?;
        let (guard, layout) = owned.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*guard else {
            candle_core::bail!("{}: CPU tensors expected", $op);
        };
        let $s = crate::cpu::f32_slice(cpu, layout, $op)?;
    };
}

// ---------------------------------------------------------------------------------------------
// Causal attention

/// Which keys a query sees: query `i` of row `r` sits at absolute position `start + i` and
/// sees keys `pad[r] ≤ j ≤ start + i`, and always itself (a left-padding position sees only
/// itself, so no row of the softmax is empty). This is the decoder's additive mask.
#[derive(Clone, Debug)]
pub struct CausalMask {
    pub start: usize,
    pub pad: Vec<usize>,
}

impl CausalMask {
    #[inline]
    fn range(&self, r: usize, i: usize) -> (usize, usize) {
        let q = self.start + i;
        let p = self.pad.get(r).copied().unwrap_or(0);
        if p > q { (q, q + 1) } else { (p, q + 1) }
    }
}

struct Attention {
    heads: usize,
    kv_heads: usize,
    scale: f32,
    mask: CausalMask,
    /// Log-sum-exp of every query's scaled scores, `[b, h, t]`, written by the forward.
    lse: Mutex<Option<Arc<Vec<f32>>>>,
}

/// The shapes of one call: batch, query length, total keys, head size.
struct Dims {
    t: usize,
    total: usize,
    hd: usize,
    rep: usize,
}

impl Attention {
    fn dims(&self, q: &Shape, k: &Shape, v: &Shape) -> Result<Dims> {
        let (b, h, t, hd) = q.dims4()?;
        let (bk, kvh, total, hdk) = k.dims4()?;
        if h != self.heads || kvh != self.kv_heads || bk != b || hdk != hd || k != v {
            candle_core::bail!(
                "fused attention: q {q:?}, k {k:?}, v {v:?} for {} heads over {} key/value heads",
                self.heads,
                self.kv_heads
            );
        }
        if kvh == 0 || !h.is_multiple_of(kvh) || total != self.mask.start + t {
            candle_core::bail!(
                "fused attention: {h} heads over {kvh} key/value heads, {total} keys for {t} queries from position {}",
                self.mask.start
            );
        }
        if !self.mask.pad.is_empty() && self.mask.pad.len() != b {
            candle_core::bail!(
                "fused attention: {} padding entries for {b} rows",
                self.mask.pad.len()
            );
        }
        Ok(Dims {
            t,
            total,
            hd,
            rep: h / kvh,
        })
    }

    /// The masked, scaled scores of one (row, key/value head) block: `s[rep·t, total]`, masked
    /// entries −∞ (their probabilities are 0).
    fn scores(&self, d: &Dims, r: usize, q: &[f32], k: &[f32], s: &mut [f32]) {
        mm(
            (d.rep * d.t, d.total, d.hd),
            s,
            q,
            false,
            k,
            true,
            false,
            self.scale,
        );
        for (qi, row) in s.chunks_exact_mut(d.total).enumerate() {
            let (lo, hi) = self.mask.range(r, qi % d.t);
            row[..lo].fill(f32::NEG_INFINITY);
            row[hi..].fill(f32::NEG_INFINITY);
        }
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "fused-causal-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = self.dims(l1.shape(), l2.shape(), l3.shape())?;
        let q = crate::cpu::f32_slice(s1, l1, "fused attention")?;
        let k = crate::cpu::f32_slice(s2, l2, "fused attention")?;
        let v = crate::cpu::f32_slice(s3, l3, "fused attention")?;
        let (qb, kb) = (d.rep * d.t * d.hd, d.total * d.hd);
        let mut y = vec![0f32; q.len()];
        let mut lse = vec![0f32; q.len() / d.hd];
        y.par_chunks_mut(qb)
            .zip(lse.par_chunks_mut(d.rep * d.t))
            .enumerate()
            .for_each(|(blk, (yb, lb))| {
                let r = blk / self.kv_heads;
                let mut s = vec![0f32; d.rep * d.t * d.total];
                self.scores(&d, r, &q[blk * qb..][..qb], &k[blk * kb..][..kb], &mut s);
                for (row, l) in s.chunks_exact_mut(d.total).zip(lb.iter_mut()) {
                    let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                    let mut sum = 0f32;
                    for x in row.iter_mut() {
                        *x = (*x - m).exp();
                        sum += *x;
                    }
                    let inv = 1.0 / sum;
                    row.iter_mut().for_each(|x| *x *= inv);
                    *l = m + sum.ln();
                }
                mm(
                    (d.rep * d.t, d.hd, d.total),
                    yb,
                    &s,
                    false,
                    &v[blk * kb..][..kb],
                    false,
                    false,
                    1.0,
                );
            });
        *self.lse.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(lse));
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = self.dims(q.shape(), k.shape(), v.shape())?;
        let lse = self
            .lse
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| candle_core::Error::Msg("fused attention: no forward ran".into()))?;
        view!(q, qv, "fused attention");
        view!(k, kv, "fused attention");
        view!(v, vv, "fused attention");
        view!(res, yv, "fused attention");
        view!(grad, gv, "fused attention");
        let (qb, kb) = (d.rep * d.t * d.hd, d.total * d.hd);
        let mut dq = vec![0f32; qv.len()];
        let mut dk = vec![0f32; kv.len()];
        let mut dv = vec![0f32; vv.len()];
        dq.par_chunks_mut(qb)
            .zip(dk.par_chunks_mut(kb).zip(dv.par_chunks_mut(kb)))
            .enumerate()
            .for_each(|(blk, (dqb, (dkb, dvb)))| {
                let r = blk / self.kv_heads;
                let (qs, ks, vs) = (
                    &qv[blk * qb..][..qb],
                    &kv[blk * kb..][..kb],
                    &vv[blk * kb..][..kb],
                );
                let (ys, gs) = (&yv[blk * qb..][..qb], &gv[blk * qb..][..qb]);
                let ls = &lse[blk * d.rep * d.t..][..d.rep * d.t];
                let n = d.rep * d.t;
                // P, recomputed from the stored log-sum-exp
                let mut p = vec![0f32; n * d.total];
                self.scores(&d, r, qs, ks, &mut p);
                for (row, &l) in p.chunks_exact_mut(d.total).zip(ls) {
                    row.iter_mut().for_each(|x| *x = (*x - l).exp());
                }
                // dV = Pᵀ · dY
                mm((d.total, d.hd, n), dvb, &p, true, gs, false, false, 1.0);
                // dP = dY · Vᵀ, then dS = P ⊙ (dP − rowsum(dY ⊙ Y)), scaled
                let mut ds = vec![0f32; n * d.total];
                mm((n, d.total, d.hd), &mut ds, gs, false, vs, true, false, 1.0);
                for i in 0..n {
                    let dot: f32 = gs[i * d.hd..][..d.hd]
                        .iter()
                        .zip(&ys[i * d.hd..][..d.hd])
                        .map(|(a, b)| a * b)
                        .sum();
                    let (pr, dr) = (
                        &p[i * d.total..][..d.total],
                        &mut ds[i * d.total..][..d.total],
                    );
                    for (x, &pp) in dr.iter_mut().zip(pr) {
                        *x = pp * (*x - dot) * self.scale;
                    }
                }
                // dQ = dS · K, dK = dSᵀ · Q
                mm((n, d.hd, d.total), dqb, &ds, false, ks, false, false, 1.0);
                mm((d.total, d.hd, n), dkb, &ds, true, qs, false, false, 1.0);
            });
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), dev)?),
            Some(Tensor::from_vec(dk, k.shape(), dev)?),
            Some(Tensor::from_vec(dv, v.shape(), dev)?),
        ))
    }
}

/// `softmax(q·kᵀ·scale + mask) · v` for `q [b, h, t, hd]` and `k`, `v` `[b, kv_heads,
/// start + t, hd]` (grouped-query attention: query head `i` reads key/value head
/// `i / (h / kv_heads)`), under the causal, left-padded mask of [`CausalMask`]. Differentiable
/// in all three inputs; keeps only the output and one log-sum-exp per query for the backward.
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    kv_heads: usize,
    scale: f64,
    mask: CausalMask,
) -> Result<Tensor> {
    let op = Attention {
        heads: q.dim(1)?,
        kv_heads,
        scale: scale as f32,
        mask,
        lse: Mutex::new(None),
    };
    q.contiguous()?
        .apply_op3_arc(&k.contiguous()?, &v.contiguous()?, Arc::new(Box::new(op)))
}

// ---------------------------------------------------------------------------------------------
// RMSNorm

struct RmsNorm {
    eps: f32,
}

fn inv_rms(row: &[f32], eps: f32) -> f32 {
    let ss: f32 = row.iter().map(|x| x * x).sum();
    1.0 / (ss / row.len() as f32 + eps).sqrt()
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = crate::cpu::f32_slice(s1, l1, "fused rms norm")?;
        let w = crate::cpu::f32_slice(s2, l2, "fused rms norm")?;
        let dim = w.len();
        if dim == 0 || !x.len().is_multiple_of(dim) {
            candle_core::bail!("fused rms norm: input {:?}, weight {dim}", l1.shape());
        }
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(dim * 64)
            .zip(x.par_chunks(dim * 64))
            .for_each(|(yb, xb)| {
                for (yr, xr) in yb.chunks_exact_mut(dim).zip(xb.chunks_exact(dim)) {
                    let r = inv_rms(xr, self.eps);
                    for ((o, &a), &g) in yr.iter_mut().zip(xr).zip(w) {
                        *o = a * r * g;
                    }
                }
            });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        view!(x, xv, "fused rms norm");
        view!(w, wv, "fused rms norm");
        view!(grad, gv, "fused rms norm");
        let dim = wv.len();
        let mut dx = vec![0f32; xv.len()];
        // per chunk of rows: dx, and the chunk's share of dw
        let dw_parts: Vec<Vec<f32>> = dx
            .par_chunks_mut(dim * 64)
            .zip(xv.par_chunks(dim * 64).zip(gv.par_chunks(dim * 64)))
            .map(|(db, (xb, gb))| {
                let mut dw = vec![0f32; dim];
                for ((dr, xr), gr) in db
                    .chunks_exact_mut(dim)
                    .zip(xb.chunks_exact(dim))
                    .zip(gb.chunks_exact(dim))
                {
                    let r = inv_rms(xr, self.eps);
                    // y = x·r·w: dx = r·(g⊙w) − x·r³·mean((g⊙w)⊙x), dw = Σ g⊙x·r
                    let mut dot = 0f32;
                    for ((&g, &a), &ww) in gr.iter().zip(xr).zip(wv) {
                        dot += g * ww * a;
                    }
                    let c = r * r * r * dot / dim as f32;
                    for (((o, &g), &a), (&ww, dwj)) in dr
                        .iter_mut()
                        .zip(gr)
                        .zip(xr)
                        .zip(wv.iter().zip(dw.iter_mut()))
                    {
                        *o = r * g * ww - a * c;
                        *dwj += g * a * r;
                    }
                }
                dw
            })
            .collect();
        let mut dw = vec![0f32; dim];
        for part in dw_parts {
            dw.iter_mut().zip(part).for_each(|(a, b)| *a += b);
        }
        let dev = x.device();
        Ok((
            x.track_op()
                .then(|| Tensor::from_vec(dx, x.shape(), dev))
                .transpose()?,
            w.track_op()
                .then(|| Tensor::from_vec(dw, w.shape(), dev))
                .transpose()?,
        ))
    }
}

/// `x / sqrt(mean(x²) + eps) · w` over the last dimension, as one differentiable op.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op2_arc(
        &w.contiguous()?,
        Arc::new(Box::new(RmsNorm { eps: eps as f32 })),
    )
}

// ---------------------------------------------------------------------------------------------
// The LoRA pieces: dropout kept as flags, the frozen product plus the low-rank term

/// Activation rows per parallel task of the row-split products.
const ROWS: usize = 64;

/// An inverted-dropout mask as one flag byte per value (1: kept, scaled by `keep`), drawn from
/// [`crate::frozen::dropout_mask`]'s stream once in the forward and read again in the backward.
struct KeptMask {
    flags: Vec<u8>,
    keep: f32,
}

impl KeptMask {
    /// `None` when `p ≤ 0` (no dropout).
    fn draw(len: usize, p: f64, seed: u64, stream: u64) -> Option<Self> {
        (p > 0.0).then(|| KeptMask {
            flags: crate::frozen::dropout_mask(len, p, seed, stream)
                .iter()
                .map(|&m| u8::from(m != 0.0))
                .collect(),
            keep: (1.0 / (1.0 - p)) as f32,
        })
    }

    /// `x ⊙ mask` for `x [.., width]`.
    fn masked(&self, x: &[f32], width: usize) -> Vec<f32> {
        let mut xm = vec![0f32; x.len()];
        xm.par_chunks_mut(width * ROWS)
            .zip(x.par_chunks(width * ROWS))
            .zip(self.flags.par_chunks(width * ROWS))
            .for_each(|((d, xs), fs)| {
                for ((d, &v), &f) in d.iter_mut().zip(xs).zip(fs) {
                    *d = v * (f as f32 * self.keep);
                }
            });
        xm
    }
}

/// `x ⊙ mask`, or `x` itself without dropout.
fn masked<'a>(mask: Option<&KeptMask>, x: &'a [f32], width: usize) -> std::borrow::Cow<'a, [f32]> {
    match mask {
        Some(m) => std::borrow::Cow::Owned(m.masked(x, width)),
        None => std::borrow::Cow::Borrowed(x),
    }
}

/// `h[n, r] = x[n, in] · aᵀ`, rows split over the thread pool.
fn par_rows_mm(r: usize, inp: usize, h: &mut [f32], x: &[f32], a: &[f32]) {
    h.par_chunks_mut(r * ROWS)
        .zip(x.par_chunks(inp * ROWS))
        .for_each(|(hb, xb)| {
            let rows = xb.len() / inp.max(1);
            mm((rows, r, inp), hb, xb, false, a, true, false, 1.0);
        });
}

/// `dx += (gh · a) ⊙ mask` for `gh [n, r]`, `a [r, in]`: the input gradient through
/// `dropout(x) · aᵀ`.
fn add_dropout_project_grad(
    dx: &mut [f32],
    gh: &[f32],
    a: &[f32],
    mask: Option<&KeptMask>,
    (r, inp): (usize, usize),
) {
    dx.par_chunks_mut(inp * ROWS)
        .zip(gh.par_chunks(r * ROWS))
        .enumerate()
        .for_each(|(c, (db, hb))| {
            let rows = hb.len() / r;
            let mut t = vec![0f32; rows * inp];
            mm((rows, inp, r), &mut t, hb, false, a, false, false, 1.0);
            match mask {
                Some(m) => {
                    let f = &m.flags[c * inp * ROWS..][..rows * inp];
                    for ((d, &v), &k) in db.iter_mut().zip(&t).zip(f) {
                        *d += v * (k as f32 * m.keep);
                    }
                }
                None => db.iter_mut().zip(&t).for_each(|(d, v)| *d += v),
            }
        });
}

/// `dst[m, n] = A[m, k] · B` with `B` row-major `[k, n]` or (`bt`) `[n, k]`, the rows of `A`
/// split evenly over the thread pool (for the large products).
fn mm_par((m, n, k): (usize, usize, usize), dst: &mut [f32], a: &[f32], b: &[f32], bt: bool) {
    let rows = m.div_ceil(rayon::current_num_threads().max(1)).max(1);
    dst[..m * n]
        .par_chunks_mut(rows * n)
        .zip(a[..m * k].par_chunks(rows * k))
        .for_each(|(d, a)| mm((a.len() / k.max(1), n, k), d, a, false, b, bt, false, 1.0));
}

/// `dropout(x) · aᵀ` keeping the mask as flags for the backward.
struct DropoutProject {
    p: f64,
    seed: u64,
    stream: u64,
    mask: Mutex<Option<KeptMask>>,
}

impl CustomOp2 for DropoutProject {
    fn name(&self) -> &'static str {
        "dropout-project"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = crate::cpu::f32_slice(s1, l1, "dropout-project")?;
        let a = crate::cpu::f32_slice(s2, l2, "dropout-project")?;
        let (n, inp) = l1.shape().dims2()?;
        let (r, ain) = l2.shape().dims2()?;
        if ain != inp {
            candle_core::bail!("dropout-project: input width {inp}, matrix [{r}, {ain}]");
        }
        let mask = KeptMask::draw(x.len(), self.p, self.seed, self.stream);
        let mut h = vec![0f32; n * r];
        par_rows_mm(r, inp, &mut h, &masked(mask.as_ref(), x, inp), a);
        *self.mask.lock().unwrap_or_else(|e| e.into_inner()) = mask;
        Ok((CpuStorage::F32(h), Shape::from((n, r))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (n, inp) = x.dims2()?;
        let r = a.dim(0)?;
        view!(x, xv, "dropout-project");
        view!(a, av, "dropout-project");
        view!(grad, gv, "dropout-project");
        let dev = x.device();
        let mask = self.mask.lock().unwrap_or_else(|e| e.into_inner()).take();
        // dA = gᵀ · (x ⊙ m)   [r, in]
        let da = a
            .track_op()
            .then(|| {
                let mut da = vec![0f32; r * inp];
                mm(
                    (r, inp, n),
                    &mut da,
                    gv,
                    true,
                    &masked(mask.as_ref(), xv, inp),
                    false,
                    false,
                    1.0,
                );
                Tensor::from_vec(da, (r, inp), dev)
            })
            .transpose()?;
        // dx = (g · A) ⊙ m   [n, in]
        let dx = x
            .track_op()
            .then(|| {
                let mut dx = vec![0f32; n * inp];
                add_dropout_project_grad(&mut dx, gv, av, mask.as_ref(), (r, inp));
                Tensor::from_vec(dx, (n, inp), dev)
            })
            .transpose()?;
        Ok((dx, da))
    }
}

/// `dropout(x) · aᵀ` for `x [n, in]`, `a [r, in]`, with the mask of
/// [`crate::frozen::dropout_mask`] for the same `p`, `seed` and `stream` (the same numbers as
/// `frozen::dropout_stream` then a matmul), as one op that keeps the mask as one byte per value
/// and no masked copy of the input.
pub fn dropout_project(x: &Tensor, a: &Tensor, p: f64, seed: u64, stream: u64) -> Result<Tensor> {
    x.contiguous()?.apply_op2_arc(
        &a.contiguous()?,
        Arc::new(Box::new(DropoutProject {
            p,
            seed,
            stream,
            mask: Mutex::new(None),
        })),
    )
}

/// Shapes of `y[n, out] = x[n, in] · wᵀ + scale · h[n, r] · b[out, r]ᵀ`.
#[derive(Clone, Copy)]
struct LowRank {
    n: usize,
    inp: usize,
    out: usize,
    r: usize,
}

/// The forward of the frozen product plus the low-rank term.
fn frozen_low_rank_fwd(
    w: &Tensor,
    x: &[f32],
    h: &[f32],
    b: &[f32],
    d: LowRank,
    scale: f32,
) -> Result<Vec<f32>> {
    let mut y = vec![0f32; d.n * d.out];
    crate::cpu::with_f32(w, "frozen + low rank", |w| {
        mm_par((d.n, d.out, d.inp), &mut y, x, w, true);
        Ok(())
    })?;
    y.par_chunks_mut(d.out * ROWS)
        .zip(h.par_chunks(d.r * ROWS))
        .for_each(|(yb, hb)| {
            let rows = hb.len() / d.r;
            mm((rows, d.out, d.r), yb, hb, false, b, true, true, scale);
        });
    Ok(y)
}

/// Its backward: `dx = g · w` (when `want_dx`), `dh = scale · g · b`, `db = scale · gᵀ · h`
/// (when `want_db`); no gradient for the frozen `w`.
#[allow(clippy::type_complexity)]
fn frozen_low_rank_bwd(
    w: &Tensor,
    g: &[f32],
    h: &[f32],
    b: &[f32],
    d: LowRank,
    scale: f32,
    (want_dx, want_db): (bool, bool),
) -> Result<(Option<Vec<f32>>, Vec<f32>, Option<Vec<f32>>)> {
    let mut dh = vec![0f32; d.n * d.r];
    dh.par_chunks_mut(d.r * ROWS)
        .zip(g.par_chunks(d.out * ROWS))
        .for_each(|(hb, gb)| {
            let rows = gb.len() / d.out;
            mm((rows, d.r, d.out), hb, gb, false, b, false, false, scale);
        });
    let db = want_db.then(|| {
        let mut db = vec![0f32; d.out * d.r];
        mm((d.out, d.r, d.n), &mut db, g, true, h, false, false, scale);
        db
    });
    let dx = if want_dx {
        let mut dx = vec![0f32; d.n * d.inp];
        crate::cpu::with_f32(w, "frozen + low rank", |w| {
            mm_par((d.n, d.inp, d.out), &mut dx, g, w, false);
            Ok(())
        })?;
        Some(dx)
    } else {
        None
    };
    Ok((dx, dh, db))
}

fn low_rank_dims(x: &Shape, w: &Tensor, h: (usize, usize), b: &Shape, op: &str) -> Result<LowRank> {
    let (n, inp) = x.dims2()?;
    let (out, br) = b.dims2()?;
    let (hn, r) = h;
    if w.dims2()? != (out, inp) || hn != n || br != r {
        candle_core::bail!(
            "{op}: input [{n}, {inp}], weight {:?}, rank activations [{hn}, {r}], B [{out}, {br}]",
            w.shape()
        );
    }
    Ok(LowRank { n, inp, out, r })
}

/// What the LoRA layer's backward needs beyond its inputs.
struct LoraSaved {
    h: Vec<f32>,
    mask: Option<KeptMask>,
}

struct LoraLinear {
    /// The frozen `[out, in]` weight.
    w: Tensor,
    scale: f32,
    p: f64,
    seed: u64,
    stream: u64,
    saved: Mutex<Option<LoraSaved>>,
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "lora-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = crate::cpu::f32_slice(s1, l1, "lora linear")?;
        let a = crate::cpu::f32_slice(s2, l2, "lora linear")?;
        let b = crate::cpu::f32_slice(s3, l3, "lora linear")?;
        let (n, inp) = l1.shape().dims2()?;
        let (r, ain) = l2.shape().dims2()?;
        if ain != inp {
            candle_core::bail!("lora linear: input [{n}, {inp}], A [{r}, {ain}]");
        }
        let d = low_rank_dims(l1.shape(), &self.w, (n, r), l3.shape(), "lora linear")?;
        let mask = KeptMask::draw(x.len(), self.p, self.seed, self.stream);
        let mut h = vec![0f32; n * r];
        par_rows_mm(r, inp, &mut h, &masked(mask.as_ref(), x, inp), a);
        let y = frozen_low_rank_fwd(&self.w, x, &h, b, d, self.scale)?;
        *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some(LoraSaved { h, mask });
        Ok((CpuStorage::F32(y), Shape::from((n, d.out))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let saved = self
            .saved
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or_else(|| candle_core::Error::Msg("lora linear: no forward ran".into()))?;
        let r = a.dim(0)?;
        let d = low_rank_dims(x.shape(), &self.w, (x.dim(0)?, r), b.shape(), "lora linear")?;
        view!(x, xv, "lora linear");
        view!(a, av, "lora linear");
        view!(b, bv, "lora linear");
        view!(grad, gv, "lora linear");
        let dev = x.device();
        let (dx, gh, db) = frozen_low_rank_bwd(
            &self.w,
            gv,
            &saved.h,
            bv,
            d,
            self.scale,
            (x.track_op(), b.track_op()),
        )?;
        // dA = ghᵀ · x̃   [r, in]
        let da = a
            .track_op()
            .then(|| {
                let mut da = vec![0f32; r * d.inp];
                let xm = masked(saved.mask.as_ref(), xv, d.inp);
                mm((r, d.inp, d.n), &mut da, &gh, true, &xm, false, false, 1.0);
                Tensor::from_vec(da, (r, d.inp), dev)
            })
            .transpose()?;
        // dx = g · W + (gh · A) ⊙ mask
        let dx = dx
            .map(|mut dx| {
                add_dropout_project_grad(&mut dx, &gh, av, saved.mask.as_ref(), (r, d.inp));
                Tensor::from_vec(dx, (d.n, d.inp), dev)
            })
            .transpose()?;
        let db = db
            .map(|db| Tensor::from_vec(db, (d.out, r), dev))
            .transpose()?;
        Ok((dx, da, db))
    }
}

/// `x · wᵀ + scale · dropout(x) · aᵀ · bᵀ` for `x [n, in]`, a frozen `w [out, in]` and the
/// adapter `a [r, in]`, `b [out, r]`, as one op: the dropout mask is the one
/// [`crate::frozen::dropout_mask`] draws for `p`, `seed`, `stream` (the same numbers as the
/// composed layer), kept as one byte per value; no gradient is computed for `w`.
#[allow(clippy::too_many_arguments)]
pub fn lora_linear(
    x: &Tensor,
    w: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    p: f64,
    seed: u64,
    stream: u64,
) -> Result<Tensor> {
    let op = LoraLinear {
        w: w.contiguous()?,
        scale: scale as f32,
        p,
        seed,
        stream,
        saved: Mutex::new(None),
    };
    x.contiguous()?
        .apply_op3_arc(&a.contiguous()?, &b.contiguous()?, Arc::new(Box::new(op)))
}

/// `x · wᵀ + scale · h · bᵀ` with a frozen `w`: the LoRA layer when the rank activations `h`
/// are computed outside (MoE-LoRA gates them per sequence).
struct FrozenPlusLowRank {
    w: Tensor,
    scale: f32,
}

impl CustomOp3 for FrozenPlusLowRank {
    fn name(&self) -> &'static str {
        "frozen-plus-low-rank"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = crate::cpu::f32_slice(s1, l1, "frozen + low rank")?;
        let h = crate::cpu::f32_slice(s2, l2, "frozen + low rank")?;
        let b = crate::cpu::f32_slice(s3, l3, "frozen + low rank")?;
        let d = low_rank_dims(
            l1.shape(),
            &self.w,
            l2.shape().dims2()?,
            l3.shape(),
            "frozen + low rank",
        )?;
        let y = frozen_low_rank_fwd(&self.w, x, h, b, d, self.scale)?;
        Ok((CpuStorage::F32(y), Shape::from((d.n, d.out))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        h: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = low_rank_dims(
            x.shape(),
            &self.w,
            h.dims2()?,
            b.shape(),
            "frozen + low rank",
        )?;
        view!(h, hv, "frozen + low rank");
        view!(b, bv, "frozen + low rank");
        view!(grad, gv, "frozen + low rank");
        let dev = x.device();
        let (dx, dh, db) = frozen_low_rank_bwd(
            &self.w,
            gv,
            hv,
            bv,
            d,
            self.scale,
            (x.track_op(), b.track_op()),
        )?;
        Ok((
            dx.map(|v| Tensor::from_vec(v, (d.n, d.inp), dev))
                .transpose()?,
            h.track_op()
                .then(|| Tensor::from_vec(dh, (d.n, d.r), dev))
                .transpose()?,
            db.map(|v| Tensor::from_vec(v, (d.out, d.r), dev))
                .transpose()?,
        ))
    }
}

/// `x · wᵀ + scale · h · bᵀ` for `x [n, in]`, a frozen `w [out, in]`, rank activations
/// `h [n, r]` and `b [out, r]`, as one op (no gradient for `w`; `h` and `b` get theirs).
pub fn frozen_plus_low_rank(
    x: &Tensor,
    w: &Tensor,
    h: &Tensor,
    b: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let op = FrozenPlusLowRank {
        w: w.contiguous()?,
        scale: scale as f32,
    };
    x.contiguous()?
        .apply_op3_arc(&h.contiguous()?, &b.contiguous()?, Arc::new(Box::new(op)))
}

// ---------------------------------------------------------------------------------------------
// Rotary position embedding, with the head transpose

struct RopeHeads {
    cos: Tensor,
    sin: Tensor,
    interleaved: bool,
}

impl RopeHeads {
    /// The pair indices of one head vector: `(first, second)` of pair `i`.
    #[inline]
    fn pair(&self, i: usize, half: usize) -> (usize, usize) {
        if self.interleaved {
            (2 * i, 2 * i + 1)
        } else {
            (i, i + half)
        }
    }

    /// Rotates `src` (`[b, t, h, hd]` when `forward`, else `[b, h, t, hd]`) into `dst` (the
    /// other layout), by `+θ` (forward) or `−θ` (backward: the rotation's transpose).
    fn rotate(
        &self,
        src: &[f32],
        dst: &mut [f32],
        (b, t, h, hd): (usize, usize, usize, usize),
        forward: bool,
    ) -> Result<()> {
        let half = hd / 2;
        crate::cpu::with_f32(&self.cos, "rope", |cos| {
            crate::cpu::with_f32(&self.sin, "rope", |sin| {
                // one task per (row, head): its output block [t, hd] is contiguous in
                // [b, h, t, hd]; in [b, t, h, hd] it is strided
                let sign = if forward { 1.0f32 } else { -1.0 };
                let blocks: Vec<(usize, usize)> =
                    (0..b).flat_map(|r| (0..h).map(move |hh| (r, hh))).collect();
                if forward {
                    dst.par_chunks_mut(t * hd)
                        .zip(&blocks)
                        .for_each(|(o, &(r, hh))| {
                            for i in 0..t {
                                let x = &src[((r * t + i) * h + hh) * hd..][..hd];
                                let (c, s) = (
                                    &cos[(r * t + i) * half..][..half],
                                    &sin[(r * t + i) * half..][..half],
                                );
                                let y = &mut o[i * hd..][..hd];
                                for j in 0..half {
                                    let (p, q) = self.pair(j, half);
                                    let sj = sign * s[j];
                                    y[p] = x[p] * c[j] - x[q] * sj;
                                    y[q] = x[q] * c[j] + x[p] * sj;
                                }
                            }
                        });
                } else {
                    // [b, h, t, hd] → [b, t, h, hd]: one task per (row, position)
                    dst.par_chunks_mut(h * hd).enumerate().for_each(|(ri, o)| {
                        let (r, i) = (ri / t, ri % t);
                        let (c, s) = (&cos[ri * half..][..half], &sin[ri * half..][..half]);
                        for hh in 0..h {
                            let x = &src[((r * h + hh) * t + i) * hd..][..hd];
                            let y = &mut o[hh * hd..][..hd];
                            for j in 0..half {
                                let (p, q) = self.pair(j, half);
                                let sj = sign * s[j];
                                y[p] = x[p] * c[j] - x[q] * sj;
                                y[q] = x[q] * c[j] + x[p] * sj;
                            }
                        }
                    });
                }
                Ok(())
            })
        })
    }
}

impl candle_core::CustomOp1 for RopeHeads {
    fn name(&self) -> &'static str {
        "rope-heads"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = crate::cpu::f32_slice(st, l, "rope")?;
        let (b, t, h, hd) = l.shape().dims4()?;
        let (cb, ct, half) = self.cos.dims3()?;
        if cb != b || ct != t || 2 * half != hd || self.sin.dims3()? != (b, t, half) {
            candle_core::bail!(
                "rope: input [{b}, {t}, {h}, {hd}], tables {:?}",
                self.cos.shape()
            );
        }
        let mut y = vec![0f32; x.len()];
        self.rotate(x, &mut y, (b, t, h, hd), true)?;
        Ok((CpuStorage::F32(y), Shape::from((b, h, t, hd))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (b, t, h, hd) = arg.dims4()?;
        view!(grad, g, "rope");
        let mut dx = vec![0f32; g.len()];
        self.rotate(g, &mut dx, (b, t, h, hd), false)?;
        Ok(Some(Tensor::from_vec(dx, (b, t, h, hd), arg.device())?))
    }
}

/// Rotary embedding of `x [b, t, h, hd]` (a projection's output split into heads) with the
/// tables `cos`, `sin` `[b, t, hd/2]`, returned as `[b, h, t, hd]` (the attention layout), as
/// one differentiable op; `interleaved` rotates pairs `(2i, 2i+1)` instead of `(i, i+hd/2)`.
pub fn rope_heads(x: &Tensor, cos: &Tensor, sin: &Tensor, interleaved: bool) -> Result<Tensor> {
    x.contiguous()?.apply_op1_arc(Arc::new(Box::new(RopeHeads {
        cos: cos.contiguous()?,
        sin: sin.contiguous()?,
        interleaved,
    })))
}

// ---------------------------------------------------------------------------------------------
// SiLU gate

struct SiluMul;

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "silu-mul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = crate::cpu::f32_slice(s1, l1, "silu-mul")?;
        let u = crate::cpu::f32_slice(s2, l2, "silu-mul")?;
        if l1.shape() != l2.shape() {
            candle_core::bail!("silu-mul: {:?} and {:?}", l1.shape(), l2.shape());
        }
        let mut y = vec![0f32; g.len()];
        y.par_chunks_mut(1 << 14)
            .zip(g.par_chunks(1 << 14).zip(u.par_chunks(1 << 14)))
            .for_each(|(y, (g, u))| {
                for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
                    *y = g / (1.0 + (-g).exp()) * u;
                }
            });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        view!(g, gv, "silu-mul");
        view!(u, uv, "silu-mul");
        view!(grad, dy, "silu-mul");
        let mut dg = vec![0f32; gv.len()];
        let mut du = vec![0f32; gv.len()];
        const C: usize = 1 << 14;
        dg.par_chunks_mut(C)
            .zip(du.par_chunks_mut(C))
            .zip(gv.par_chunks(C).zip(uv.par_chunks(C)).zip(dy.par_chunks(C)))
            .for_each(|((dg, du), ((gs, us), ys))| {
                for i in 0..gs.len() {
                    let sig = 1.0 / (1.0 + (-gs[i]).exp());
                    // d silu(g)/dg = σ(g)·(1 + g·(1 − σ(g)))
                    dg[i] = ys[i] * us[i] * sig * (1.0 + gs[i] * (1.0 - sig));
                    du[i] = ys[i] * gs[i] * sig;
                }
            });
        let dev = g.device();
        Ok((
            g.track_op()
                .then(|| Tensor::from_vec(dg, g.shape(), dev))
                .transpose()?,
            u.track_op()
                .then(|| Tensor::from_vec(du, u.shape(), dev))
                .transpose()?,
        ))
    }
}

/// `silu(g) ⊙ u` (the gated MLP's product) as one differentiable op.
pub fn silu_mul(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    g.contiguous()?
        .apply_op2_arc(&u.contiguous()?, Arc::new(Box::new(SiluMul)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{D, Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// The decoder's composed attention, as the reference.
    fn composed_attention(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        kvh: usize,
        mask: &CausalMask,
    ) -> Tensor {
        let (b, h, t, hd) = q.dims4().unwrap();
        let total = k.dim(2).unwrap();
        let rep = h / kvh;
        let mut m = vec![0f32; b * t * total];
        for r in 0..b {
            for i in 0..t {
                let (lo, hi) = mask.range(r, i);
                for j in 0..total {
                    if j < lo || j >= hi {
                        m[(r * t + i) * total + j] = f32::NEG_INFINITY;
                    }
                }
            }
        }
        let m = Tensor::from_vec(m, (b, 1, 1, t, total), q.device()).unwrap();
        let q = q.reshape((b, kvh, rep * t, hd)).unwrap();
        let s = (q.matmul(&k.t().unwrap()).unwrap() * (1.0 / (hd as f64).sqrt())).unwrap();
        let s = s
            .reshape((b, kvh, rep, t, total))
            .unwrap()
            .broadcast_add(&m)
            .unwrap()
            .reshape((b, kvh, rep * t, total))
            .unwrap();
        let p = crate::ops::softmax(&s).unwrap();
        p.matmul(v).unwrap().reshape((b, h, t, hd)).unwrap()
    }

    #[test]
    fn attention_values_and_gradients_equal_the_composition() -> Result<()> {
        let dev = Device::Cpu;
        // 2 rows, 6 query heads over 2 key/value heads, 5 new positions after 3 cached ones,
        // row 1 left-padded by 4 (two of its queries see only themselves)
        let (b, h, kvh, t, start, hd) = (2, 6, 2, 5, 3, 8);
        let mask = CausalMask {
            start,
            pad: vec![0, 4],
        };
        let q = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, h, t, hd), &dev)?)?;
        let k = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, kvh, start + t, hd), &dev)?)?;
        let v = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, kvh, start + t, hd), &dev)?)?;
        let up = Tensor::randn(0f32, 1.0, (b, h, t, hd), &dev)?;
        let fused = causal_attention(
            q.as_tensor(),
            k.as_tensor(),
            v.as_tensor(),
            kvh,
            1.0 / (hd as f64).sqrt(),
            mask.clone(),
        )?;
        let plain = composed_attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), kvh, &mask);
        assert!(
            max_diff(&fused, &plain) < 1e-5,
            "{}",
            max_diff(&fused, &plain)
        );
        let gf = (fused * &up)?.sum_all()?.backward()?;
        let gp = (plain * &up)?.sum_all()?.backward()?;
        for var in [&q, &k, &v] {
            let (a, b) = (
                gf.get(var.as_tensor()).unwrap(),
                gp.get(var.as_tensor()).unwrap(),
            );
            let scale = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            assert!(scale > 1e-3, "the reference gradient is not trivially zero");
            assert!(max_diff(a, b) < 1e-4 * scale.max(1.0), "{}", max_diff(a, b));
        }
        // a padded query sees only itself: its output is its own value row
        let y = causal_attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), kvh, 0.3, mask)?;
        let own = v.as_tensor().get(1)?.get(0)?.get(start)?; // row 1, kv head 0, position 3
        assert!(max_diff(&y.get(1)?.get(0)?.get(0)?, &own) < 1e-6);
        Ok(())
    }

    #[test]
    fn rms_norm_values_and_gradients_equal_the_composition() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 70, 24), &dev)?)?;
        let w = Var::from_tensor(&Tensor::randn(1f32, 0.2, 24, &dev)?)?;
        let up = Tensor::randn(0f32, 1.0, (3, 70, 24), &dev)?;
        let eps = 1e-5;
        let fused = rms_norm(x.as_tensor(), w.as_tensor(), eps)?;
        let ms = x.as_tensor().sqr()?.mean_keepdim(D::Minus1)?;
        let plain = x
            .as_tensor()
            .broadcast_div(&(ms + eps)?.sqrt()?)?
            .broadcast_mul(w.as_tensor())?;
        assert!(max_diff(&fused, &plain) < 1e-5);
        let gf = (fused * &up)?.sum_all()?.backward()?;
        let gp = (plain * &up)?.sum_all()?.backward()?;
        for var in [&x, &w] {
            let (a, b) = (
                gf.get(var.as_tensor()).unwrap(),
                gp.get(var.as_tensor()).unwrap(),
            );
            assert!(max_diff(a, b) < 1e-4, "{}", max_diff(a, b));
        }
        // a constant weight gets no gradient
        let c = w.as_tensor().detach();
        let g = rms_norm(x.as_tensor(), &c, eps)?.sum_all()?.backward()?;
        assert!(g.get(&c).is_none() && g.get(x.as_tensor()).is_some());
        Ok(())
    }

    #[test]
    fn dropout_project_equals_dropout_then_matmul() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (150, 40), &dev)?)?;
        let a = Var::from_tensor(&Tensor::randn(0f32, 1.0, (8, 40), &dev)?)?;
        let up = Tensor::randn(0f32, 1.0, (150, 8), &dev)?;
        let fused = dropout_project(x.as_tensor(), a.as_tensor(), 0.25, 7, 3)?;
        let plain = crate::frozen::dropout_stream(x.as_tensor(), 0.25, 7, 3)?
            .matmul(&a.as_tensor().t()?)?;
        assert!(max_diff(&fused, &plain) < 1e-5);
        let other = dropout_project(x.as_tensor(), a.as_tensor(), 0.25, 7, 4)?;
        assert!(
            max_diff(&fused, &other) > 1e-2,
            "another stream, another mask"
        );
        let gf = (fused * &up)?.sum_all()?.backward()?;
        let gp = (plain * &up)?.sum_all()?.backward()?;
        for var in [&x, &a] {
            let (f, p) = (
                gf.get(var.as_tensor()).unwrap(),
                gp.get(var.as_tensor()).unwrap(),
            );
            assert!(max_diff(f, p) < 1e-4, "{}", max_diff(f, p));
        }
        // an input that records no graph gets no gradient computed
        let c = x.as_tensor().detach();
        let g = dropout_project(&c, a.as_tensor(), 0.25, 7, 3)?
            .sum_all()?
            .backward()?;
        assert!(g.get(&c).is_none() && g.get(a.as_tensor()).is_some());
        Ok(())
    }

    #[test]
    fn lora_linear_equals_the_composed_layer() -> Result<()> {
        let dev = Device::Cpu;
        // 150 rows: more than two row blocks, the last one partial
        let (n, inp, out, r) = (150, 40, 24, 4);
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, inp), &dev)?)?;
        let w = Tensor::randn(0f32, 0.3, (out, inp), &dev)?;
        let a = Var::from_tensor(&Tensor::randn(0f32, 0.3, (r, inp), &dev)?)?;
        let b = Var::from_tensor(&Tensor::randn(0f32, 0.3, (out, r), &dev)?)?;
        let up = Tensor::randn(0f32, 1.0, (n, out), &dev)?;
        for p in [0.0, 0.3] {
            let fused = lora_linear(
                x.as_tensor(),
                &w,
                a.as_tensor(),
                b.as_tensor(),
                2.5,
                p,
                11,
                5,
            )?;
            let xd = crate::frozen::dropout_stream(x.as_tensor(), p, 11, 5)?;
            let plain = (crate::frozen::matmul_t(x.as_tensor(), &w)?
                + (xd
                    .matmul(&a.as_tensor().t()?)?
                    .matmul(&b.as_tensor().t()?)?
                    * 2.5)?)?;
            assert!(
                max_diff(&fused, &plain) < 1e-4,
                "p {p}: {}",
                max_diff(&fused, &plain)
            );
            let gf = (fused * &up)?.sum_all()?.backward()?;
            let gp = (plain * &up)?.sum_all()?.backward()?;
            for var in [&x, &a, &b] {
                let (f, q) = (
                    gf.get(var.as_tensor()).unwrap(),
                    gp.get(var.as_tensor()).unwrap(),
                );
                assert!(max_diff(f, q) < 1e-3, "p {p}: {}", max_diff(f, q));
            }
            assert!(gf.get(&w).is_none(), "no gradient for the frozen weight");
        }
        Ok(())
    }

    #[test]
    fn rope_heads_and_silu_mul_equal_their_compositions() -> Result<()> {
        let dev = Device::Cpu;
        let (b, t, h, hd) = (2, 5, 3, 8);
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, t, h, hd), &dev)?)?;
        let ang = Tensor::randn(0f32, 2.0, (b, t, hd / 2), &dev)?;
        let (cos, sin) = (ang.cos()?, ang.sin()?);
        let up = Tensor::randn(0f32, 1.0, (b, h, t, hd), &dev)?;
        for interleaved in [false, true] {
            let fused = rope_heads(x.as_tensor(), &cos, &sin, interleaved)?;
            let xt = x.as_tensor().transpose(1, 2)?;
            let (c, s) = (cos.unsqueeze(1)?, sin.unsqueeze(1)?);
            let plain = if interleaved {
                let xr = xt.reshape((b, h, t, hd / 2, 2))?;
                let x1 = xr.narrow(D::Minus1, 0, 1)?.squeeze(D::Minus1)?;
                let x2 = xr.narrow(D::Minus1, 1, 1)?.squeeze(D::Minus1)?;
                let r1 = (x1.broadcast_mul(&c)? - x2.broadcast_mul(&s)?)?;
                let r2 = (x1.broadcast_mul(&s)? + x2.broadcast_mul(&c)?)?;
                Tensor::stack(&[r1, r2], D::Minus1)?.reshape((b, h, t, hd))?
            } else {
                let x1 = xt.narrow(D::Minus1, 0, hd / 2)?;
                let x2 = xt.narrow(D::Minus1, hd / 2, hd / 2)?;
                let r1 = (x1.broadcast_mul(&c)? - x2.broadcast_mul(&s)?)?;
                let r2 = (x2.broadcast_mul(&c)? + x1.broadcast_mul(&s)?)?;
                Tensor::cat(&[r1, r2], D::Minus1)?
            };
            assert!(max_diff(&fused, &plain) < 1e-5);
            let gf = (fused * &up)?.sum_all()?.backward()?;
            let gp = (plain * &up)?.sum_all()?.backward()?;
            let (f, p) = (
                gf.get(x.as_tensor()).unwrap(),
                gp.get(x.as_tensor()).unwrap(),
            );
            assert!(max_diff(f, p) < 1e-5, "{}", max_diff(f, p));
        }
        let g = Var::from_tensor(&Tensor::randn(0f32, 2.0, (7, 300), &dev)?)?;
        let u = Var::from_tensor(&Tensor::randn(0f32, 1.0, (7, 300), &dev)?)?;
        let up = Tensor::randn(0f32, 1.0, (7, 300), &dev)?;
        let fused = silu_mul(g.as_tensor(), u.as_tensor())?;
        let plain = (candle_nn_free_silu(g.as_tensor())? * u.as_tensor())?;
        assert!(max_diff(&fused, &plain) < 1e-5);
        let gf = (fused * &up)?.sum_all()?.backward()?;
        let gp = (plain * &up)?.sum_all()?.backward()?;
        for var in [&g, &u] {
            let (f, p) = (
                gf.get(var.as_tensor()).unwrap(),
                gp.get(var.as_tensor()).unwrap(),
            );
            assert!(max_diff(f, p) < 1e-4, "{}", max_diff(f, p));
        }
        Ok(())
    }

    /// `g · σ(g)` from candle's elementwise ops.
    fn candle_nn_free_silu(g: &Tensor) -> Result<Tensor> {
        g * (g.neg()?.exp()? + 1.0)?.recip()?
    }

    #[test]
    fn frozen_plus_low_rank_equals_the_composition() -> Result<()> {
        let dev = Device::Cpu;
        let (n, inp, out, r) = (150, 40, 24, 4);
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, inp), &dev)?)?;
        let w = Tensor::randn(0f32, 0.3, (out, inp), &dev)?;
        let h = Var::from_tensor(&Tensor::randn(0f32, 0.3, (n, r), &dev)?)?;
        let b = Var::from_tensor(&Tensor::randn(0f32, 0.3, (out, r), &dev)?)?;
        let up = Tensor::randn(0f32, 1.0, (n, out), &dev)?;
        let fused = frozen_plus_low_rank(x.as_tensor(), &w, h.as_tensor(), b.as_tensor(), 1.5)?;
        let plain = (crate::frozen::matmul_t(x.as_tensor(), &w)?
            + (h.as_tensor().matmul(&b.as_tensor().t()?)? * 1.5)?)?;
        assert!(max_diff(&fused, &plain) < 1e-4);
        let gf = (fused * &up)?.sum_all()?.backward()?;
        let gp = (plain * &up)?.sum_all()?.backward()?;
        for var in [&x, &h, &b] {
            let (f, q) = (
                gf.get(var.as_tensor()).unwrap(),
                gp.get(var.as_tensor()).unwrap(),
            );
            assert!(max_diff(f, q) < 1e-3, "{}", max_diff(f, q));
        }
        assert!(gf.get(&w).is_none());
        Ok(())
    }
}
