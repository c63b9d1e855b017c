//! Row-wise element-wise ops of inference (RMS norm, the SwiGLU gate), shared out by the
//! decoding team ([`crate::team`]) and vectorised with AVX2 when the CPU has it.
//!
//! A batched decode step runs these between the weight products: with candle's versions they
//! ran on one thread (its parallel element-wise path starts at 64k values; a 32-row step has
//! 18k–49k) while the team's other workers spun, and SiLU called libm's scalar `expf` once per
//! value. Inference only: no gradient (training uses `rudder_nn::fused`).

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};

use crate::Result;
use crate::team::{SendPtr, Team};

/// Rows per team task, so a task holds at least ~4k values (a 576-wide row alone is too little
/// to be worth handing to another core).
fn rows_per_task(width: usize) -> usize {
    4096usize.div_ceil(width.max(1)).max(1)
}

/// Run `f(first_row, rows)` over `[0, n)` in blocks, on the team when there is more than one.
pub(crate) fn for_row_blocks(n: usize, width: usize, f: &(dyn Fn(usize, usize) + Sync)) {
    let per = rows_per_task(width);
    let tasks = n.div_ceil(per);
    if tasks <= 1 {
        f(0, n);
        return;
    }
    Team::global().run(tasks, &|t| {
        let r0 = t * per;
        f(r0, per.min(n - r0));
    });
}

/// A fresh `rows × width` output made block by block on the team: `f(first_row, rows, out)`
/// writes every value of its block (see [`crate::team::unwritten`]: a serial memset of a
/// prefill chunk's output was ~1 % of its step while the team waited).
fn team_output(
    rows: usize,
    width: usize,
    f: &(dyn Fn(usize, usize, &mut [f32]) + Sync),
) -> Vec<f32> {
    let len = rows * width;
    let mut y = crate::team::unwritten(len);
    let yp = SendPtr(y.as_mut_ptr());
    for_row_blocks(rows, width, &|r0, n| {
        // SAFETY: blocks of rows are disjoint, and inside `y`'s capacity.
        let ys = unsafe { std::slice::from_raw_parts_mut(yp.at(r0 * width), n * width) };
        f(r0, n, ys);
    });
    // SAFETY: the blocks cover every row, and `f` writes all of its block.
    unsafe { y.set_len(len) };
    y
}

/// `x / rms(x) * w` over the last dimension.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    Ok(x.contiguous()?
        .apply_op2_no_bwd(&w.contiguous()?, &RmsNorm { eps: eps as f32 })?)
}

/// `silu(g) ⊙ u`, the gated MLP's product.
pub fn silu_mul(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    Ok(g.contiguous()?
        .apply_op2_no_bwd(&u.contiguous()?, &SILU_MUL)?)
}

/// `a + b` (same shapes), the residual stream's additions.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok(a.contiguous()?.apply_op2_no_bwd(&b.contiguous()?, &ADD)?)
}

struct RmsNorm {
    eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "team-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = rudder_nn::cpu::f32_slice(s1, l1, "rms norm")?;
        let w = rudder_nn::cpu::f32_slice(s2, l2, "rms norm")?;
        let dim = w.len();
        if dim == 0 || !x.len().is_multiple_of(dim) {
            candle_core::bail!("rms norm: input {:?}, weight of {dim}", l1.shape());
        }
        let eps = self.eps;
        let y = team_output(x.len() / dim, dim, &|r0, n, ys| {
            norm_rows(&x[r0 * dim..(r0 + n) * dim], w, eps, ys)
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }
}

/// An element-wise op of two same-shaped inputs, row blocks on the team.
struct Elementwise {
    name: &'static str,
    f: fn(&[f32], &[f32], &mut [f32]),
}

const SILU_MUL: Elementwise = Elementwise {
    name: "team-silu-mul",
    f: silu_mul_into,
};

const ADD: Elementwise = Elementwise {
    name: "team-add",
    f: add_into,
};

impl CustomOp2 for Elementwise {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let a = rudder_nn::cpu::f32_slice(s1, l1, self.name)?;
        let b = rudder_nn::cpu::f32_slice(s2, l2, self.name)?;
        if l1.shape() != l2.shape() {
            candle_core::bail!("{}: {:?} and {:?}", self.name, l1.shape(), l2.shape());
        }
        let dim = l1.shape().dims().last().copied().unwrap_or(1).max(1);
        let y = team_output(a.len() / dim, dim, &|r0, n, ys| {
            let (i, j) = (r0 * dim, (r0 + n) * dim);
            (self.f)(&a[i..j], &b[i..j], ys);
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }
}

fn add_into(a: &[f32], b: &[f32], y: &mut [f32]) {
    for ((o, &p), &q) in y.iter_mut().zip(a).zip(b) {
        *o = p + q;
    }
}

fn norm_rows(x: &[f32], w: &[f32], eps: f32, y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::quant::simd_available() {
        // SAFETY: AVX2 and FMA were detected at run time.
        return unsafe { norm_rows_avx2(x, w, eps, y) };
    }
    norm_rows_impl(x, w, eps, y)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn norm_rows_avx2(x: &[f32], w: &[f32], eps: f32, y: &mut [f32]) {
    norm_rows_impl(x, w, eps, y)
}

#[inline(always)]
fn norm_rows_impl(x: &[f32], w: &[f32], eps: f32, y: &mut [f32]) {
    let dim = w.len();
    for (yr, xr) in y.chunks_exact_mut(dim).zip(x.chunks_exact(dim)) {
        // eight partial sums so the loop vectorises
        let mut acc = [0f32; 8];
        let chunks = xr.chunks_exact(8);
        let rest: f32 = chunks.remainder().iter().map(|v| v * v).sum();
        for c in chunks {
            for i in 0..8 {
                acc[i] += c[i] * c[i];
            }
        }
        let ss = acc.iter().sum::<f32>() + rest;
        let r = 1.0 / (ss / dim as f32 + eps).sqrt();
        for ((o, &a), &g) in yr.iter_mut().zip(xr).zip(w) {
            *o = a * r * g;
        }
    }
}

fn silu_mul_into(g: &[f32], u: &[f32], y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::quant::simd_available() {
        // SAFETY: AVX2 and FMA were detected at run time.
        return unsafe { silu_mul_avx2(g, u, y) };
    }
    silu_mul_impl(g, u, y)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn silu_mul_avx2(g: &[f32], u: &[f32], y: &mut [f32]) {
    silu_mul_impl(g, u, y)
}

/// `g · σ(g) · u` with σ from one polynomial `e^{-|g|}` (no branch, so the loop vectorises):
/// σ(g) = 1/(1+e) for g ≥ 0 and e/(1+e) below.
#[inline(always)]
fn silu_mul_impl(g: &[f32], u: &[f32], y: &mut [f32]) {
    for ((o, &a), &b) in y.iter_mut().zip(g).zip(u) {
        let e = crate::bert::exp_neg(-a.abs());
        let num = if a >= 0.0 { 1.0 } else { e };
        *o = a * (num / (1.0 + e)) * b;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ((x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect()
    }

    #[test]
    fn team_ops_equal_candle_on_every_row_count() -> Result<()> {
        let dev = Device::Cpu;
        // widths of SmolLM2 (576 hidden, 1536 MLP) and an odd one; row counts below, at and
        // above one team task, and values far into both tails of the exponential
        for (rows, dim) in [(1, 576), (7, 576), (8, 576), (33, 576), (32, 1536), (5, 37)] {
            let n = rows * dim;
            let x = Tensor::from_vec(values(n, 1, 3.0), (rows, dim), &dev)?;
            let w = Tensor::from_vec(values(dim, 2, 1.5), dim, &dev)?;
            let want = candle_nn::ops::rms_norm(&x, &w, 1e-5)?;
            let got = rms_norm(&x, &w, 1e-5)?;
            let d = (want - got)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(d < 1e-5, "rms norm {rows}x{dim}: {d}");

            let g = Tensor::from_vec(values(n, 3, 30.0), (rows, dim), &dev)?;
            let u = Tensor::from_vec(values(n, 4, 2.0), (rows, dim), &dev)?;
            let want = (candle_nn::ops::silu(&g)? * &u)?;
            let got = silu_mul(&g, &u)?;
            let rel = ((&want - &got)?.abs()? / (want.abs()? + 1e-3)?)?
                .max_all()?
                .to_scalar::<f32>()?;
            assert!(rel < 1e-5, "silu-mul {rows}x{dim}: {rel}");

            // bit for bit what candle's addition gives (and no value left unwritten: the
            // outputs start as NaN under test)
            let want = (&g + &u)?.flatten_all()?.to_vec1::<f32>()?;
            let got = add(&g, &u)?.flatten_all()?.to_vec1::<f32>()?;
            assert_eq!(want, got, "add {rows}x{dim}");
        }
        Ok(())
    }

    #[test]
    fn portable_and_vector_loops_agree() {
        let g = values(1000, 5, 40.0);
        let u = values(1000, 6, 1.0);
        let (mut a, mut b) = (vec![0f32; 1000], vec![0f32; 1000]);
        silu_mul_impl(&g, &u, &mut a);
        silu_mul_into(&g, &u, &mut b);
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= 1e-6 * x.abs().max(1.0), "{x} vs {y}");
        }
        let w = values(100, 7, 1.0);
        let (mut a, mut b) = (vec![0f32; 1000], vec![0f32; 1000]);
        norm_rows_impl(&g, &w, 1e-6, &mut a);
        norm_rows(&g, &w, 1e-6, &mut b);
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= 1e-5 * x.abs().max(1.0), "{x} vs {y}");
        }
    }
}
