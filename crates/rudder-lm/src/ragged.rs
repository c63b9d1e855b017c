//! Ragged batches for continuous batching: every row has its own KV cache and its own length,
//! and adds any number of new tokens to a step (a chunk of its prompt, or one decode token).
//!
//! The weight products (Q/K/V, O, gate/up/down, which are where decoding spends its time) run
//! once over the new tokens of all rows together; attention runs per row over that row's own
//! cache, so rows can enter and leave the batch between steps without padding or re-packing.
//! Hooks are called per row with a `[1, t, d]` view and that row's own [`HookCtx`], so each
//! request can carry its own interventions and captures. Inference only (no autograd).

use candle_core::{Device, Tensor};
use rayon::prelude::*;

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
        y.par_chunks_mut(qd).enumerate().for_each(|(t, yrow)| {
            let (kc, vc) = caches[row_of[t]];
            let qrow = &q[t * qd..(t + 1) * qd];
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
    attend_impl(sh, q, kc, vc, upto, out)
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
