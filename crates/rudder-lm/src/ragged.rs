//! Ragged batches for continuous batching: every row has its own KV cache and its own length,
//! and adds any number of new tokens to a step (a chunk of its prompt, or one decode token).
//!
//! The weight products (Q/K/V, O, gate/up/down, which are where decoding spends its time) run
//! once over the new tokens of all rows together; attention runs per row over that row's own
//! cache, so rows can enter and leave the batch between steps without padding or re-packing.
//! Hooks are called per row with a `[1, t, d]` view and that row's own [`HookCtx`], so each
//! request can carry its own interventions and captures. Inference only (no autograd).

use candle_core::{Device, Tensor};

use crate::config::DecoderConfig;
use crate::decoder::Decoder;
use crate::hooks::{Hook, HookCtx, Phase, Site};
use crate::linear::forward_many;
use crate::{LmError, Result};

/// One sequence's keys and values, per layer, position-major `[len, kv_heads, head_dim]`.
pub struct RowCache {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    /// Positions processed so far.
    pub len: usize,
    /// Positions `[0, prompt_len)` are prompt (what `Positions::Prompt/LastPrompt` select).
    pub prompt_len: usize,
}

impl RowCache {
    pub fn new(cfg: &DecoderConfig, prompt_len: usize) -> Self {
        let per = prompt_len * cfg.num_kv_heads * cfg.head_dim;
        RowCache {
            k: (0..cfg.num_layers)
                .map(|_| Vec::with_capacity(per))
                .collect(),
            v: (0..cfg.num_layers)
                .map(|_| Vec::with_capacity(per))
                .collect(),
            len: 0,
            prompt_len,
        }
    }

    /// A copy of the first `n` positions (at most `len`), with room for the whole prompt: the
    /// start of a row with the same prompt.
    pub fn prefix(&self, n: usize) -> Self {
        let n = n.min(self.len);
        let width = self.k.first().map_or(0, |k| k.len() / self.len.max(1));
        let take = |b: &Vec<Vec<f32>>| {
            b.iter()
                .map(|x| {
                    let mut v = Vec::with_capacity(self.prompt_len.max(n) * width);
                    v.extend_from_slice(&x[..n * width]);
                    v
                })
                .collect()
        };
        RowCache {
            k: take(&self.k),
            v: take(&self.v),
            len: n,
            prompt_len: self.prompt_len,
        }
    }

    /// Bytes held by the keys and values.
    pub fn bytes(&self) -> usize {
        self.k.iter().chain(&self.v).map(|b| b.capacity() * 4).sum()
    }
}

/// What one row adds to a step.
pub struct RaggedRow<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut RowCache,
    pub phase: Phase,
    pub hook: Option<&'a mut dyn Hook>,
}

const NO_PAD: [usize; 1] = [0];

impl Decoder {
    /// Run the new tokens of every row, appending to each row's cache. Returns the final-norm
    /// hidden state of each row's last new token, `[rows, d]` (feed it to [`Decoder::logits`]).
    pub fn forward_ragged(&self, rows: &mut [RaggedRow]) -> Result<Tensor> {
        let c = &self.cfg;
        let d = c.hidden_size;
        if rows.is_empty() {
            return Err(LmError::Config(
                "a ragged step needs at least one row".into(),
            ));
        }
        let mut offs = Vec::with_capacity(rows.len() + 1);
        offs.push(0usize);
        for (i, r) in rows.iter().enumerate() {
            if r.tokens.is_empty() {
                return Err(LmError::Config(format!("row {i} adds no tokens")));
            }
            if r.cache.k.len() != c.num_layers {
                return Err(LmError::Config(format!(
                    "row {i}: cache built for {} layers, the model has {}",
                    r.cache.k.len(),
                    c.num_layers
                )));
            }
            let total = r.cache.len + r.tokens.len();
            if total > c.max_position_embeddings {
                return Err(LmError::TooLong {
                    len: total,
                    ctx: c.max_position_embeddings,
                    detail: "max_position_embeddings".into(),
                });
            }
            offs.push(offs[i] + r.tokens.len());
        }
        let n = offs[rows.len()];
        let ids: Vec<u32> = rows.iter().flat_map(|r| r.tokens.iter().copied()).collect();
        let dev = Device::Cpu;
        let mut h = self
            .embed
            .index_select(&Tensor::from_vec(ids, n, &dev)?, 0)?;
        // absolute position of every new token, and its RoPE table row
        let pos: Vec<usize> = rows
            .iter()
            .flat_map(|r| (0..r.tokens.len()).map(|i| r.cache.len + i))
            .collect();
        let half = c.head_dim / 2;
        let mut cos = Vec::with_capacity(n * half);
        let mut sin = Vec::with_capacity(n * half);
        for &p in &pos {
            for &f in &self.inv_freq {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        for l in 0..c.num_layers {
            hook_rows(Site::ResidPre(l), rows, &offs, &mut h)?;
            let xn = self.norm(&h, &self.layers[l].ln_attn)?;
            let mut a = self.attention_ragged(l, &xn, rows, &offs, &pos, &cos, &sin)?;
            hook_rows(Site::AttnOut(l), rows, &offs, &mut a)?;
            h = (h + a)?;
            hook_rows(Site::ResidMid(l), rows, &offs, &mut h)?;
            let xn = self.norm(&h, &self.layers[l].ln_mlp)?;
            let layer = &self.layers[l];
            let gu = forward_many(&[&layer.gate, &layer.up], &xn)?;
            let mut m = layer
                .down
                .forward(&(candle_nn::ops::silu(&gu[0])? * &gu[1])?)?;
            hook_rows(Site::MlpOut(l), rows, &offs, &mut m)?;
            h = (h + m)?;
            hook_rows(Site::ResidPost(l), rows, &offs, &mut h)?;
        }
        let mut out = self.norm(&h, &self.norm)?;
        hook_rows(Site::FinalNorm, rows, &offs, &mut out)?;
        for r in rows.iter_mut() {
            r.cache.len += r.tokens.len();
        }
        let last: Vec<u32> = offs[1..].iter().map(|&o| (o - 1) as u32).collect();
        let k = last.len();
        let sel = out.index_select(&Tensor::from_vec(last, k, &dev)?, 0)?;
        debug_assert_eq!(sel.dims2()?, (k, d));
        Ok(sel)
    }

    #[allow(clippy::too_many_arguments)]
    fn attention_ragged(
        &self,
        l: usize,
        x: &Tensor,
        rows: &mut [RaggedRow],
        offs: &[usize],
        pos: &[usize],
        cos: &[f32],
        sin: &[f32],
    ) -> Result<Tensor> {
        let c = &self.cfg;
        let layer = &self.layers[l];
        let (h, kvh, hd) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let (qd, kvd) = (h * hd, kvh * hd);
        let n = x.dim(0)?;
        let [q, k, v]: [Tensor; 3] = forward_many(&[&layer.q, &layer.k, &layer.v], x)?
            .try_into()
            .map_err(|_| LmError::Config("q/k/v projection count".into()))?;
        let mut q = q.flatten_all()?.to_vec1::<f32>()?;
        let mut k = k.flatten_all()?.to_vec1::<f32>()?;
        let v = v.flatten_all()?.to_vec1::<f32>()?;
        let half = hd / 2;
        let inter = c.rope_interleaved;
        for t in 0..n {
            let (cs, sn) = (
                &cos[t * half..(t + 1) * half],
                &sin[t * half..(t + 1) * half],
            );
            for hh in 0..h {
                rope_in_place(
                    &mut q[t * qd + hh * hd..t * qd + (hh + 1) * hd],
                    cs,
                    sn,
                    inter,
                );
            }
            for g in 0..kvh {
                rope_in_place(
                    &mut k[t * kvd + g * hd..t * kvd + (g + 1) * hd],
                    cs,
                    sn,
                    inter,
                );
            }
        }
        // append the new keys/values, then read each row's cache immutably
        for (r, row) in rows.iter_mut().enumerate() {
            let (a, b) = (offs[r] * kvd, offs[r + 1] * kvd);
            row.cache.k[l].extend_from_slice(&k[a..b]);
            row.cache.v[l].extend_from_slice(&v[a..b]);
        }
        let row_of: Vec<usize> = (0..rows.len())
            .flat_map(|r| std::iter::repeat_n(r, offs[r + 1] - offs[r]))
            .collect();
        let caches: Vec<(&[f32], &[f32])> = rows
            .iter()
            .map(|r| (r.cache.k[l].as_slice(), r.cache.v[l].as_slice()))
            .collect();
        let shape = AttnShape {
            heads: h,
            kv_heads: kvh,
            head_dim: hd,
            scale: 1.0 / (hd as f32).sqrt(),
        };
        let mut y = vec![0f32; n * qd];
        let yp = crate::team::SendPtr(y.as_mut_ptr());
        // Tokens are shared out by the decoding team (rayon's workers would fall asleep between
        // the layers' short attention calls, see `crate::team`).
        crate::team::Team::global().run(n, &|t| {
            let (kc, vc) = caches[row_of[t]];
            let qrow = &q[t * qd..(t + 1) * qd];
            // SAFETY: task t alone writes row t of y.
            let yrow = unsafe { std::slice::from_raw_parts_mut(yp.at(t * qd), qd) };
            // causal: positions 0..=pos
            attend(&shape, qrow, kc, vc, pos[t] + 1, yrow);
        });
        layer
            .o
            .forward(&Tensor::from_vec(y, (n, qd), &Device::Cpu)?)
    }
}

struct AttnShape {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    scale: f32,
}

/// One token's attention over the first `upto` positions of its row's cache, all heads: the
/// query heads sharing a key/value head are scored together (each key and value is read once
/// per group), softmax with a polynomial exp, in loops the compiler vectorises — with AVX2/FMA
/// when the CPU has them.
fn attend(sh: &AttnShape, q: &[f32], kc: &[f32], vc: &[f32], upto: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::quant::simd_available() {
            // SAFETY: AVX2 and FMA were detected at run time.
            return unsafe { attend_avx2(sh, q, kc, vc, upto, out) };
        }
    }
    attend_impl(sh, q, kc, vc, upto, out)
}

/// [`attend_impl`] with AVX2 intrinsics (head widths that are a multiple of 8): scores for
/// eight positions at a time reduced with one horizontal-add tree, a vector exponential, and
/// the weighted sum of values kept in registers across positions.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_avx2(
    sh: &AttnShape,
    q: &[f32],
    kc: &[f32],
    vc: &[f32],
    upto: usize,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let (hd, kvd) = (sh.head_dim, sh.kv_heads * sh.head_dim);
    if hd % 8 != 0 {
        return attend_impl(sh, q, kc, vc, upto, out);
    }
    assert!(q.len() >= sh.heads * hd && out.len() >= sh.heads * hd);
    assert!(kc.len() >= upto * kvd && vc.len() >= upto * kvd);
    let (rep, nv) = (sh.heads / sh.kv_heads, hd / 8);
    let mut s = vec![0f32; rep * upto];
    // SAFETY: every pointer below stays inside the slices checked above (positions < upto,
    // heads < heads, lanes < head_dim).
    unsafe {
        let scale = _mm256_set1_ps(sh.scale);
        for g in 0..sh.kv_heads {
            let kg = kc.as_ptr().add(g * hd);
            let vg = vc.as_ptr().add(g * hd);
            for j in 0..rep {
                let qh = q.as_ptr().add((g * rep + j) * hd);
                let srow = s.as_mut_ptr().add(j * upto);
                let mut p = 0;
                while p + 8 <= upto {
                    let mut acc = [_mm256_setzero_ps(); 8];
                    for c in 0..nv {
                        let qv = _mm256_loadu_ps(qh.add(c * 8));
                        for (i, a) in acc.iter_mut().enumerate() {
                            let kv = _mm256_loadu_ps(kg.add((p + i) * kvd + c * 8));
                            *a = _mm256_fmadd_ps(qv, kv, *a);
                        }
                    }
                    _mm256_storeu_ps(srow.add(p), _mm256_mul_ps(hsum8(acc), scale));
                    p += 8;
                }
                for p in p..upto {
                    let mut a = _mm256_setzero_ps();
                    for c in 0..nv {
                        let kv = _mm256_loadu_ps(kg.add(p * kvd + c * 8));
                        a = _mm256_fmadd_ps(_mm256_loadu_ps(qh.add(c * 8)), kv, a);
                    }
                    *srow.add(p) = hsum(a) * sh.scale;
                }
                softmax_avx2(std::slice::from_raw_parts_mut(srow, upto));
            }
            for j in 0..rep {
                let srow = s.as_ptr().add(j * upto);
                let oh = out.as_mut_ptr().add((g * rep + j) * hd);
                let mut c0 = 0;
                while c0 < nv {
                    let cn = (nv - c0).min(8);
                    let mut acc = [_mm256_setzero_ps(); 8];
                    if cn == 8 {
                        for p in 0..upto {
                            let w = _mm256_set1_ps(*srow.add(p));
                            let vp = vg.add(p * kvd + c0 * 8);
                            for (c, a) in acc.iter_mut().enumerate() {
                                *a = _mm256_fmadd_ps(w, _mm256_loadu_ps(vp.add(c * 8)), *a);
                            }
                        }
                    } else {
                        for p in 0..upto {
                            let w = _mm256_set1_ps(*srow.add(p));
                            let vp = vg.add(p * kvd + c0 * 8);
                            for (c, a) in acc[..cn].iter_mut().enumerate() {
                                *a = _mm256_fmadd_ps(w, _mm256_loadu_ps(vp.add(c * 8)), *a);
                            }
                        }
                    }
                    for (c, a) in acc[..cn].iter().enumerate() {
                        let o = oh.add((c0 + c) * 8);
                        _mm256_storeu_ps(o, _mm256_add_ps(_mm256_loadu_ps(o), *a));
                    }
                    c0 += cn;
                }
            }
        }
    }
}

/// Lane `i` of the result is the sum of the eight lanes of `a[i]`.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
fn hsum8(a: [std::arch::x86_64::__m256; 8]) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let t0 = _mm256_hadd_ps(a[0], a[1]);
    let t1 = _mm256_hadd_ps(a[2], a[3]);
    let t2 = _mm256_hadd_ps(a[4], a[5]);
    let t3 = _mm256_hadd_ps(a[6], a[7]);
    let u0 = _mm256_hadd_ps(t0, t1);
    let u1 = _mm256_hadd_ps(t2, t3);
    _mm256_add_ps(
        _mm256_permute2f128_ps(u0, u1, 0x20),
        _mm256_permute2f128_ps(u0, u1, 0x31),
    )
}

/// The sum of the eight lanes.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
fn hsum(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
}

/// In-place softmax with the vector form of [`crate::bert::exp_neg`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn softmax_avx2(row: &mut [f32]) {
    use std::arch::x86_64::*;
    let mx = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let n8 = row.len() / 8 * 8;
    let mut zv = _mm256_setzero_ps();
    for c in row[..n8].chunks_exact_mut(8) {
        // SAFETY: c holds eight floats.
        unsafe {
            let x = _mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), _mm256_set1_ps(mx));
            let e = exp_neg8(x);
            _mm256_storeu_ps(c.as_mut_ptr(), e);
            zv = _mm256_add_ps(zv, e);
        }
    }
    let mut z = hsum(zv);
    for v in &mut row[n8..] {
        *v = crate::bert::exp_neg(*v - mx);
        z += *v;
    }
    let inv = 1.0 / z;
    row.iter_mut().for_each(|v| *v *= inv);
}

/// `e^x` for `x ≤ 0`, eight lanes: the same range reduction and polynomial as
/// [`crate::bert::exp_neg`].
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
fn exp_neg8(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let x = _mm256_max_ps(x, _mm256_set1_ps(-87.0));
    let magic = _mm256_set1_ps(12582912.0);
    let n = _mm256_sub_ps(
        _mm256_add_ps(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
            magic,
        ),
        magic,
    );
    let r = _mm256_sub_ps(
        _mm256_sub_ps(x, _mm256_mul_ps(n, _mm256_set1_ps(0.693_145_75))),
        _mm256_mul_ps(n, _mm256_set1_ps(1.428_606_8e-6)),
    );
    let mut p = _mm256_set1_ps(1.0 / 720.0);
    for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(c));
    }
    let e = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)),
        23,
    );
    _mm256_mul_ps(p, _mm256_castsi256_ps(e))
}

#[inline(always)]
fn attend_impl(sh: &AttnShape, q: &[f32], kc: &[f32], vc: &[f32], upto: usize, out: &mut [f32]) {
    let (hd, kvd) = (sh.head_dim, sh.kv_heads * sh.head_dim);
    let rep = sh.heads / sh.kv_heads;
    let mut s = vec![0f32; rep * upto];
    for g in 0..sh.kv_heads {
        for p in 0..upto {
            let k = &kc[p * kvd + g * hd..p * kvd + (g + 1) * hd];
            for j in 0..rep {
                let h = g * rep + j;
                s[j * upto + p] = dot(&q[h * hd..(h + 1) * hd], k) * sh.scale;
            }
        }
        for j in 0..rep {
            let row = &mut s[j * upto..(j + 1) * upto];
            let mx = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut z = 0f32;
            for v in row.iter_mut() {
                *v = crate::bert::exp_neg(*v - mx);
                z += *v;
            }
            let inv = 1.0 / z;
            row.iter_mut().for_each(|v| *v *= inv);
        }
        for p in 0..upto {
            let v = &vc[p * kvd + g * hd..p * kvd + (g + 1) * hd];
            for j in 0..rep {
                let h = g * rep + j;
                let w = s[j * upto + p];
                for (o, &x) in out[h * hd..(h + 1) * hd].iter_mut().zip(v) {
                    *o += w * x;
                }
            }
        }
    }
}

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    // eight independent accumulators so the loop vectorises
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// Rotate one head in place: rotate-half (NeoX / Hugging Face) or interleaved (GPT-J / GGUF
/// Llama), with the same f32 tables as the padded path.
fn rope_in_place(x: &mut [f32], cos: &[f32], sin: &[f32], interleaved: bool) {
    let half = cos.len();
    if interleaved {
        for i in 0..half {
            let (x1, x2) = (x[2 * i], x[2 * i + 1]);
            x[2 * i] = x1 * cos[i] - x2 * sin[i];
            x[2 * i + 1] = x1 * sin[i] + x2 * cos[i];
        }
    } else {
        for i in 0..half {
            let (x1, x2) = (x[i], x[i + half]);
            x[i] = x1 * cos[i] - x2 * sin[i];
            x[i + half] = x2 * cos[i] + x1 * sin[i];
        }
    }
}

/// Call each row's hook (if any) on its own `[1, t, d]` slice of the `[n, d]` activation.
fn hook_rows(site: Site, rows: &mut [RaggedRow], offs: &[usize], x: &mut Tensor) -> Result<()> {
    if !rows
        .iter()
        .any(|r| r.hook.as_ref().is_some_and(|h| h.touches(site)))
    {
        return Ok(());
    }
    let mut pieces = Vec::with_capacity(rows.len());
    let mut changed = false;
    for (r, row) in rows.iter_mut().enumerate() {
        let t = offs[r + 1] - offs[r];
        let piece = x.narrow(0, offs[r], t)?;
        match row.hook.as_mut().filter(|h| h.touches(site)) {
            None => pieces.push(piece),
            Some(hook) => {
                let ctx = HookCtx {
                    phase: row.phase,
                    start: row.cache.len,
                    pad: &NO_PAD,
                    prompt_cols: row.cache.prompt_len,
                };
                let orig = piece.unsqueeze(0)?;
                let mut p = orig.clone();
                hook.at(site, &ctx, &mut p)?;
                if p.id() != orig.id() {
                    changed = true;
                }
                pieces.push(p.squeeze(0)?);
            }
        }
    }
    if changed {
        *x = Tensor::cat(&pieces, 0)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut x = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((x >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
            })
            .collect()
    }

    #[test]
    fn vector_attention_equals_the_portable_loop() {
        // Head widths 64 and 128 (whole 8-lane chunks), 80 (a partial chunk of values), 12
        // (not a multiple of 8: the portable loop); context lengths around the 8-position blocks.
        for (heads, kv_heads, hd) in [(9, 3, 64), (4, 4, 128), (6, 2, 80), (4, 2, 12)] {
            let sh = AttnShape {
                heads,
                kv_heads,
                head_dim: hd,
                scale: 1.0 / (hd as f32).sqrt(),
            };
            for upto in [1, 7, 8, 9, 17, 300] {
                let q = values(heads * hd, 1);
                let kc = values(upto * kv_heads * hd, 2);
                let vc = values(upto * kv_heads * hd, 3);
                let mut want = vec![0f32; heads * hd];
                attend_impl(&sh, &q, &kc, &vc, upto, &mut want);
                let mut got = vec![0f32; heads * hd];
                attend(&sh, &q, &kc, &vc, upto, &mut got);
                for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                        "hd {hd} upto {upto} [{i}]: {a} vs {b}"
                    );
                }
            }
        }
    }
}
