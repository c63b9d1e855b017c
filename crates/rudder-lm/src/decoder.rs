//! The decoder-only transformer shared by the Llama and Qwen2 families, with the residual
//! stream visible at every hook site.
//!
//! Block `l`: `ResidPre(l)` → attention (RMSNorm, RoPE, grouped-query attention with a KV
//! cache) → `AttnOut(l)` → residual add → `ResidMid(l)` → SwiGLU MLP → `MlpOut(l)` → residual
//! add → `ResidPost(l)`; after the last block the final norm → `FinalNorm`, then the LM head.
//! Batches are left-padded; a per-row pad count keeps positions and masks right.
//! `differentiable = true` switches RMSNorm, attention, RoPE and the SiLU gate to the training
//! ops of `rudder_nn::fused`, which carry their own backward (candle's fused inference versions
//! record no gradient).

use candle_core::{Device, Tensor};

use crate::config::DecoderConfig;
use crate::hooks::{Hook, HookCtx, Phase, Site};
use crate::linear::{Linear, Weight, forward_many, rms_norm};
use crate::weights::Weights;
use crate::{LmError, Result};

pub struct Layer {
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
    pub ln_attn: Tensor,
    pub ln_mlp: Tensor,
}

pub struct Decoder {
    pub cfg: DecoderConfig,
    pub embed: Tensor,
    pub layers: Vec<Layer>,
    pub norm: Tensor,
    pub lm_head: Linear,
    pub(crate) inv_freq: Vec<f32>,
    pub differentiable: bool,
}

/// Per-sequence state across forward calls: keys/values of every layer, the padding of each
/// row, and how many columns have been processed.
pub struct KvCache {
    /// Preallocated per-layer key/value buffers (grown when full), so that a decode step
    /// writes one column instead of copying the whole history.
    kv: Vec<Option<candle_nn::kv_cache::KvCache>>,
    /// The differentiable path concatenates instead (in-place writes record no gradient).
    kv_grad: Vec<Option<(Tensor, Tensor)>>,
    pub pad: Vec<usize>,
    /// Columns processed so far (padding included).
    pub len: usize,
    /// Columns `[0, prompt_cols)` are prompt; set by the first (prefill) call.
    pub prompt_cols: usize,
}

impl KvCache {
    pub fn new(layers: usize, pad: Vec<usize>) -> Self {
        KvCache {
            kv: (0..layers).map(|_| None).collect(),
            kv_grad: vec![None; layers],
            pad,
            len: 0,
            prompt_cols: 0,
        }
    }
    pub fn batch(&self) -> usize {
        self.pad.len()
    }

    /// A cache whose row `i` is row `rows[i]` of this one (keys, values and padding): one
    /// prompt's prefix shared by several continuations. Differentiable on the gradient path.
    pub fn expand_rows(&self, rows: &[u32]) -> Result<KvCache> {
        let dev = Device::Cpu;
        let idx = Tensor::from_slice(rows, rows.len(), &dev)?;
        let mut out = KvCache::new(
            self.kv.len(),
            rows.iter().map(|&r| self.pad[r as usize]).collect(),
        );
        out.len = self.len;
        out.prompt_cols = self.prompt_cols;
        for l in 0..self.kv.len() {
            if let Some((k, v)) = &self.kv_grad[l] {
                out.kv_grad[l] = Some((
                    k.contiguous()?.index_select(&idx, 0)?,
                    v.contiguous()?.index_select(&idx, 0)?,
                ));
            }
            if let Some(c) = &self.kv[l]
                && let (Some(k), Some(v)) = (c.k()?, c.v()?)
            {
                let k = k.contiguous()?.index_select(&idx, 0)?;
                let v = v.contiguous()?.index_select(&idx, 0)?;
                let mut nc = candle_nn::kv_cache::KvCache::new(2, k.dim(2)? + 128);
                nc.append(&k, &v)?;
                out.kv[l] = Some(nc);
            }
        }
        Ok(out)
    }
}

fn lin(
    w: &mut Weights,
    name: &str,
    out: usize,
    inp: usize,
    bias: bool,
    deq: bool,
) -> Result<Linear> {
    let weight = w.matrix(&format!("{name}.weight"), out, inp, deq)?;
    let bias = if bias {
        Some(w.dense(&format!("{name}.bias"), &[out])?)
    } else {
        None
    };
    Ok(Linear::new(weight, bias))
}

impl Decoder {
    /// Build from a weight source using Hugging Face tensor names. `dequantize` turns GGUF
    /// weights into f32 (needed for training and for exact parity with f32 peers).
    pub fn load(cfg: DecoderConfig, w: &mut Weights, dequantize: bool) -> Result<Self> {
        cfg.validate()?;
        let (d, f, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim);
        let (qd, kvd) = (cfg.num_heads * hd, cfg.num_kv_heads * hd);
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for l in 0..cfg.num_layers {
            let p = format!("model.layers.{l}");
            layers.push(Layer {
                q: lin(
                    w,
                    &format!("{p}.self_attn.q_proj"),
                    qd,
                    d,
                    cfg.qkv_bias,
                    dequantize,
                )?,
                k: lin(
                    w,
                    &format!("{p}.self_attn.k_proj"),
                    kvd,
                    d,
                    cfg.qkv_bias,
                    dequantize,
                )?,
                v: lin(
                    w,
                    &format!("{p}.self_attn.v_proj"),
                    kvd,
                    d,
                    cfg.qkv_bias,
                    dequantize,
                )?,
                o: lin(
                    w,
                    &format!("{p}.self_attn.o_proj"),
                    d,
                    qd,
                    false,
                    dequantize,
                )?,
                gate: lin(w, &format!("{p}.mlp.gate_proj"), f, d, false, dequantize)?,
                up: lin(w, &format!("{p}.mlp.up_proj"), f, d, false, dequantize)?,
                down: lin(w, &format!("{p}.mlp.down_proj"), d, f, false, dequantize)?,
                ln_attn: w.dense(&format!("{p}.input_layernorm.weight"), &[d])?,
                ln_mlp: w.dense(&format!("{p}.post_attention_layernorm.weight"), &[d])?,
            });
        }
        let embed = w.dense("model.embed_tokens.weight", &[cfg.vocab_size, d])?;
        let norm = w.dense("model.norm.weight", &[d])?;
        let lm_head = if w.contains("lm_head.weight") && !cfg.tie_word_embeddings {
            Linear::new(
                w.matrix("lm_head.weight", cfg.vocab_size, d, dequantize)?,
                None,
            )
        } else if dequantize {
            Linear::new(Weight::Dense(embed.clone()), None)
        } else if !matches!(w, Weights::Gguf { .. }) {
            // Tied head for inference: a packed copy of the embedding matrix.
            Linear::new(Weight::packed(&embed)?, None)
        } else {
            // Tied GGUF head: keep the (quantized) token embedding matrix as the head.
            Linear::new(
                w.matrix("model.embed_tokens.weight", cfg.vocab_size, d, false)?,
                None,
            )
        };
        let inv_freq = cfg.inv_freq();
        Ok(Decoder {
            cfg,
            embed,
            layers,
            norm,
            lm_head,
            inv_freq,
            differentiable: false,
        })
    }

    pub fn new_cache(&self, pad: Vec<usize>) -> KvCache {
        KvCache::new(self.cfg.num_layers, pad)
    }

    /// cos/sin tables `[b, t, hd/2]` for the columns of this call.
    fn rope_tables(
        &self,
        b: usize,
        t: usize,
        cache: &KvCache,
        dev: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let half = self.cfg.head_dim / 2;
        let mut cos = Vec::with_capacity(b * t * half);
        let mut sin = Vec::with_capacity(b * t * half);
        for r in 0..b {
            for c in 0..t {
                let pos = (cache.len + c).saturating_sub(cache.pad[r]) as f32;
                for &f in &self.inv_freq {
                    let a = pos * f;
                    cos.push(a.cos());
                    sin.push(a.sin());
                }
            }
        }
        Ok((
            Tensor::from_vec(cos, (b, t, half), dev)?,
            Tensor::from_vec(sin, (b, t, half), dev)?,
        ))
    }

    /// Rotary embedding of `x [b, t, heads, hd]`, returned as `[b, heads, t, hd]`.
    fn rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let interleaved = self.cfg.rope_interleaved;
        if self.differentiable {
            // one op with its backward (candle's fused rope records no gradient)
            return Ok(rudder_nn::fused::rope_heads(x, cos, sin, interleaved)?);
        }
        let x = x.transpose(1, 2)?.contiguous()?;
        Ok(if interleaved {
            candle_nn::rotary_emb::rope_i(&x, cos, sin)?
        } else {
            candle_nn::rotary_emb::rope(&x, cos, sin)?
        })
    }

    /// Additive attention mask `[b, 1, 1, t, T]`, or `None` when nothing is masked.
    fn attn_mask(
        &self,
        b: usize,
        t: usize,
        cache: &KvCache,
        dev: &Device,
    ) -> Result<Option<Tensor>> {
        let total = cache.len + t;
        if t == 1 && cache.pad.iter().all(|&p| p == 0) {
            return Ok(None);
        }
        let mut m = vec![0f32; b * t * total];
        for r in 0..b {
            for i in 0..t {
                let q = cache.len + i;
                for j in 0..total {
                    let ok = (j <= q && j >= cache.pad[r]) || j == q;
                    if !ok {
                        m[(r * t + i) * total + j] = f32::NEG_INFINITY;
                    }
                }
            }
        }
        Ok(Some(Tensor::from_vec(m, (b, 1, 1, t, total), dev)?))
    }

    fn softmax(&self, x: &Tensor) -> Result<Tensor> {
        if self.differentiable {
            Ok(rudder_nn::ops::softmax(x)?)
        } else {
            Ok(candle_nn::ops::softmax_last_dim(&x.contiguous()?)?)
        }
    }

    pub(crate) fn norm(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        rms_norm(x, w, self.cfg.rms_norm_eps, self.differentiable)
    }

    fn attention(
        &self,
        l: usize,
        x: &Tensor,
        cache: &mut KvCache,
        rope: &(Tensor, Tensor),
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let c = &self.cfg;
        let layer = &self.layers[l];
        let (b, t, _) = x.dims3()?;
        let (h, kvh, hd) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let [q, k, v]: [Tensor; 3] = forward_many(&[&layer.q, &layer.k, &layer.v], x)?
            .try_into()
            .map_err(|_| LmError::Config("q/k/v projection count".into()))?;
        let v = v.reshape((b, t, kvh, hd))?.transpose(1, 2)?.contiguous()?;
        let q = self.rope(&q.reshape((b, t, h, hd))?, &rope.0, &rope.1)?;
        let k = self.rope(&k.reshape((b, t, kvh, hd))?, &rope.0, &rope.1)?;
        let (k, v) = if self.differentiable {
            let kv = match cache.kv_grad[l].take() {
                Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
                None => (k, v),
            };
            cache.kv_grad[l] = Some(kv.clone());
            kv
        } else {
            let kv =
                cache.kv[l].get_or_insert_with(|| candle_nn::kv_cache::KvCache::new(2, t + 128));
            kv.append(&k.contiguous()?, &v)?
        };
        if self.differentiable {
            // one op that keeps no score matrices for the backward (`rudder_nn::fused`)
            let y = rudder_nn::fused::causal_attention(
                &q,
                &k,
                &v,
                kvh,
                1.0 / (hd as f64).sqrt(),
                rudder_nn::fused::CausalMask {
                    start: cache.len,
                    pad: cache.pad.clone(),
                },
            )?;
            let y = y.transpose(1, 2)?.reshape((b, t, h * hd))?;
            return layer.o.forward(&y);
        }
        let total = k.dim(2)?;
        let rep = h / kvh;
        let q = q.reshape((b, kvh, rep * t, hd))?;
        let scores = (q.matmul(&k.t()?)? * (1.0 / (hd as f64).sqrt()))?;
        let scores = match mask {
            Some(m) => scores
                .reshape((b, kvh, rep, t, total))?
                .broadcast_add(m)?
                .reshape((b, kvh, rep * t, total))?,
            None => scores,
        };
        let p = self.softmax(&scores)?;
        let y = p.matmul(&v)?; // [b, kvh, rep*t, hd]
        let y = y
            .reshape((b, h, t, hd))?
            .transpose(1, 2)?
            .reshape((b, t, h * hd))?;
        layer.o.forward(&y)
    }

    pub(crate) fn mlp(&self, l: usize, x: &Tensor) -> Result<Tensor> {
        let layer = &self.layers[l];
        let gu = forward_many(&[&layer.gate, &layer.up], x)?;
        let (g, u) = (&gu[0], &gu[1]);
        let act = if self.differentiable {
            rudder_nn::fused::silu_mul(g, u)?
        } else {
            crate::rowwise::silu_mul(g, u)?
        };
        layer.down.forward(&act)
    }

    /// Run `ids` (`[b, t]`, u32) through the model, appending to `cache`. Returns the final-norm
    /// hidden states `[b, t, d]` (feed them to [`Decoder::logits`]).
    pub fn forward(
        &self,
        ids: &Tensor,
        cache: &mut KvCache,
        phase: Phase,
        hook: &mut dyn Hook,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        if b != cache.batch() {
            return Err(LmError::Config(format!(
                "batch of {b} rows but the cache has {}",
                cache.batch()
            )));
        }
        let limit = self.cfg.max_position_embeddings;
        if cache.len + t > limit {
            return Err(LmError::TooLong {
                len: cache.len + t,
                ctx: limit,
                detail: "max_position_embeddings".into(),
            });
        }
        // A caller that reads a long prompt in chunks sets `prompt_cols` to the whole prompt
        // first; otherwise the first prefill call is the prompt.
        if phase == Phase::Prefill && cache.len == 0 && cache.prompt_cols == 0 {
            cache.prompt_cols = t;
        }
        let dev = ids.device().clone();
        let pad = cache.pad.clone();
        let ctx = HookCtx {
            phase,
            start: cache.len,
            pad: &pad,
            prompt_cols: cache.prompt_cols,
        };
        let mut h = self.embed.index_select(&ids.flatten_all()?, 0)?.reshape((
            b,
            t,
            self.cfg.hidden_size,
        ))?;
        let rope = self.rope_tables(b, t, cache, &dev)?;
        let mask = self.attn_mask(b, t, cache, &dev)?;
        for l in 0..self.cfg.num_layers {
            hook.at(Site::ResidPre(l), &ctx, &mut h)?;
            let xn = self.norm(&h, &self.layers[l].ln_attn)?;
            let mut a = self.attention(l, &xn, cache, &rope, mask.as_ref())?;
            hook.at(Site::AttnOut(l), &ctx, &mut a)?;
            h = (h + a)?;
            hook.at(Site::ResidMid(l), &ctx, &mut h)?;
            let xn = self.norm(&h, &self.layers[l].ln_mlp)?;
            let mut m = self.mlp(l, &xn)?;
            hook.at(Site::MlpOut(l), &ctx, &mut m)?;
            h = (h + m)?;
            hook.at(Site::ResidPost(l), &ctx, &mut h)?;
        }
        cache.len += t;
        let mut out = self.norm(&h, &self.norm)?;
        hook.at(Site::FinalNorm, &ctx, &mut out)?;
        Ok(out)
    }

    /// LM-head logits `[.., vocab]` of final-norm hidden states `[.., d]`.
    pub fn logits(&self, h: &Tensor) -> Result<Tensor> {
        self.lm_head.forward(h)
    }

    /// [`Decoder::logits`] of `[rows, d]` hidden states as one row-major `[rows, vocab]` vector
    /// (no copy out of a tensor: a 32-row decode step's logits are 6 MB).
    pub fn logits_vec(&self, h: &Tensor) -> Result<Vec<f32>> {
        crate::linear::forward_many_vecs(&[&self.lm_head], h)?
            .pop()
            .ok_or_else(|| LmError::Config("no LM head output".into()))
    }

    /// Approximate weight memory in bytes.
    pub fn weight_bytes(&self) -> usize {
        let w = |l: &Linear| match &l.weight {
            Weight::Dense(t) => t.elem_count() * 4,
            Weight::Packed(p) => p.rows * p.cols * 4,
            Weight::Quant(q) => q.rows * q.cols / 32 * q.format.block_bytes(),
            Weight::Candle(_, (o, i)) => o * i,
        };
        let mut s = self.embed.elem_count() * 4 + w(&self.lm_head);
        for l in &self.layers {
            s += [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down]
                .iter()
                .map(|x| w(x))
                .sum::<usize>();
        }
        s
    }
}
