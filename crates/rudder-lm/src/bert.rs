//! BERT-family sentence encoder (all-MiniLM-L6-v2 and friends): mean pooling over real tokens
//! and L2 normalisation, as sentence-transformers' Transformer → Pooling → Normalize.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;
use tokenizers::{Tokenizer, TruncationParams};

use crate::linear::{Linear, Weight};
use crate::weights::Weights;
use crate::{LmError, Result};

fn default_eps() -> f64 {
    1e-12
}
fn default_act() -> String {
    "gelu".into()
}

/// Mirrors Hugging Face `BertConfig` (`config.json`).
#[derive(Clone, Debug, Deserialize)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub type_vocab_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    pub model_type: Option<String>,
}

struct LayerNorm {
    w: Tensor,
    b: Tensor,
}

struct BertLayer {
    /// Query, key and value projections fused into one `[3d, d]` matrix (one GEMM).
    qkv: Linear,
    o: Linear,
    ln1: LayerNorm,
    up: Linear,
    down: Linear,
    ln2: LayerNorm,
}

pub struct TextEncoder {
    pub cfg: BertConfig,
    tok: Tokenizer,
    word: Tensor,
    pos: Tensor,
    typ: Option<Tensor>,
    ln: LayerNorm,
    layers: Vec<BertLayer>,
    pub max_len: usize,
    pub normalize: bool,
}

impl TextEncoder {
    /// Load a sentence-transformers folder: `config.json`, `model.safetensors`,
    /// `tokenizer.json`, and optionally `sentence_bert_config.json` (max length) and
    /// `modules.json` (whether a Normalize module follows pooling).
    pub fn load(dir: &Path) -> Result<Self> {
        let cp = dir.join("config.json");
        let text = std::fs::read_to_string(&cp).map_err(|e| LmError::file(&cp, e))?;
        let cfg: BertConfig = serde_json::from_str(&text)
            .map_err(|e| LmError::file(&cp, format!("invalid BERT config: {e}")))?;
        match cfg.model_type.as_deref() {
            Some("bert") | None => {}
            Some(other) => {
                return Err(LmError::file(
                    &cp,
                    format!("field model_type: {other:?} is not a BERT-family encoder"),
                ));
            }
        }
        if cfg.hidden_act != "gelu" && cfg.hidden_act != "gelu_new" {
            return Err(LmError::file(
                &cp,
                format!(
                    "field hidden_act: {:?} is not supported (gelu)",
                    cfg.hidden_act
                ),
            ));
        }
        let mut max_len = cfg.max_position_embeddings;
        let sb = dir.join("sentence_bert_config.json");
        if let Ok(t) = std::fs::read_to_string(&sb) {
            let v: serde_json::Value = serde_json::from_str(&t)
                .map_err(|e| LmError::file(&sb, format!("invalid JSON: {e}")))?;
            if let Some(m) = v.get("max_seq_length").and_then(|m| m.as_u64()) {
                max_len = max_len.min(m as usize);
            }
        }
        let normalize = std::fs::read_to_string(dir.join("modules.json"))
            .map(|t| t.contains("Normalize"))
            .unwrap_or(true);
        let tp = dir.join("tokenizer.json");
        if !tp.exists() {
            return Err(LmError::file(&tp, "tokenizer missing"));
        }
        let mut tok = crate::tokenizer::tokenizer_from_file(&tp)?;
        tok.with_padding(None);
        tok.with_truncation(Some(TruncationParams {
            max_length: max_len,
            ..Default::default()
        }))
        .map_err(|e| LmError::file(&tp, e))?;
        let mut w = Weights::open_safetensors_dir(dir)?;
        let prefix = if w.contains("bert.embeddings.word_embeddings.weight") {
            "bert."
        } else {
            ""
        };
        let (d, f) = (cfg.hidden_size, cfg.intermediate_size);
        let mut dense = |name: &str, shape: &[usize]| w.dense(&format!("{prefix}{name}"), shape);
        let word = dense("embeddings.word_embeddings.weight", &[cfg.vocab_size, d])?;
        let pos = dense(
            "embeddings.position_embeddings.weight",
            &[cfg.max_position_embeddings, d],
        )?;
        let typ = if cfg.type_vocab_size > 0 {
            Some(dense(
                "embeddings.token_type_embeddings.weight",
                &[cfg.type_vocab_size, d],
            )?)
        } else {
            None
        };
        let ln = LayerNorm {
            w: dense("embeddings.LayerNorm.weight", &[d])?,
            b: dense("embeddings.LayerNorm.bias", &[d])?,
        };
        let mut layers = Vec::new();
        for l in 0..cfg.num_hidden_layers {
            let p = format!("encoder.layer.{l}");
            let mut lin = |name: &str, out: usize, inp: usize| -> Result<Linear> {
                Ok(Linear::new(
                    Weight::Dense(dense(&format!("{p}.{name}.weight"), &[out, inp])?),
                    Some(dense(&format!("{p}.{name}.bias"), &[out])?),
                ))
            };
            let parts = [
                lin("attention.self.query", d, d)?,
                lin("attention.self.key", d, d)?,
                lin("attention.self.value", d, d)?,
            ];
            let w: Vec<Tensor> = parts
                .iter()
                .map(|l| l.weight.to_dense())
                .collect::<Result<_>>()?;
            let b: Vec<Tensor> = parts.iter().filter_map(|l| l.bias.clone()).collect();
            let qkv = Linear::new(
                Weight::Dense(Tensor::cat(&w, 0)?),
                Some(Tensor::cat(&b, 0)?),
            );
            let o = lin("attention.output.dense", d, d)?;
            let up = lin("intermediate.dense", f, d)?;
            let down = lin("output.dense", d, f)?;
            let ln1 = LayerNorm {
                w: dense(&format!("{p}.attention.output.LayerNorm.weight"), &[d])?,
                b: dense(&format!("{p}.attention.output.LayerNorm.bias"), &[d])?,
            };
            let ln2 = LayerNorm {
                w: dense(&format!("{p}.output.LayerNorm.weight"), &[d])?,
                b: dense(&format!("{p}.output.LayerNorm.bias"), &[d])?,
            };
            layers.push(BertLayer {
                qkv,
                o,
                ln1,
                up,
                down,
                ln2,
            });
        }
        Ok(TextEncoder {
            cfg,
            tok,
            word,
            pos,
            typ,
            ln,
            layers,
            max_len,
            normalize,
        })
    }

    pub fn dim(&self) -> usize {
        self.cfg.hidden_size
    }

    fn layer_norm(&self, x: &Tensor, ln: &LayerNorm) -> Result<Tensor> {
        Ok(candle_nn::ops::layer_norm(
            &x.contiguous()?,
            &ln.w,
            &ln.b,
            self.cfg.layer_norm_eps as f32,
        )?)
    }

    /// Embeddings of one padded batch of token ids.
    fn forward(&self, ids: &[Vec<u32>]) -> Result<Tensor> {
        let dev = Device::Cpu;
        let b = ids.len();
        let t = ids.iter().map(|v| v.len()).max().unwrap_or(1).max(1);
        let (h, hd) = (
            self.cfg.num_attention_heads,
            self.cfg.hidden_size / self.cfg.num_attention_heads,
        );
        let d = self.cfg.hidden_size;
        let mut flat = vec![0u32; b * t];
        let mut mask = vec![0f32; b * t];
        for (r, v) in ids.iter().enumerate() {
            flat[r * t..r * t + v.len()].copy_from_slice(v);
            mask[r * t..r * t + v.len()]
                .iter_mut()
                .for_each(|m| *m = 1.0);
        }
        let ids_t = Tensor::from_vec(flat, b * t, &dev)?;
        let mut x = self.word.index_select(&ids_t, 0)?.reshape((b, t, d))?;
        x = x.broadcast_add(&self.pos.narrow(0, 0, t)?.unsqueeze(0)?)?;
        if let Some(typ) = &self.typ {
            x = x.broadcast_add(&typ.narrow(0, 0, 1)?.unsqueeze(0)?)?;
        }
        x = self.layer_norm(&x, &self.ln)?;
        let mask_t = Tensor::from_vec(mask, (b, t), &dev)?;
        // Padded keys get a large negative score.
        let bias = ((mask_t.clone() - 1.0)? * 1e9)?.reshape((b, 1, 1, t))?;
        let scale = 1.0 / (hd as f64).sqrt();
        for l in &self.layers {
            let split = |y: Tensor| -> Result<Tensor> {
                Ok(y.reshape((b, t, h, hd))?.transpose(1, 2)?.contiguous()?)
            };
            let qkv = l.qkv.forward(&x)?;
            let q = split(qkv.narrow(2, 0, d)?)?;
            let k = split(qkv.narrow(2, d, d)?)?;
            let v = split(qkv.narrow(2, 2 * d, d)?)?;
            let s = (q.matmul(&k.t()?)? * scale)?.broadcast_add(&bias)?;
            let p = candle_nn::ops::softmax_last_dim(&s)?;
            let c = p.matmul(&v)?.transpose(1, 2)?.reshape((b, t, d))?;
            x = self.layer_norm(&(l.o.forward(&c)? + &x)?, &l.ln1)?;
            let m = l.down.forward(&gelu_erf(&l.up.forward(&x)?)?)?;
            x = self.layer_norm(&(m + &x)?, &l.ln2)?;
        }
        let m = mask_t.unsqueeze(2)?;
        let summed = x.broadcast_mul(&m)?.sum(1)?;
        let counts = m.sum(1)?.clamp(1e-9, f64::INFINITY)?;
        let mut e = summed.broadcast_div(&counts)?;
        if self.normalize {
            e = rudder_nn::ops::l2_normalize(&e, 1e-12)?;
        }
        Ok(e.to_dtype(DType::F32)?)
    }

    /// Token ids of each text (truncated to the model's maximum length).
    pub fn tokenize(&self, texts: &[&str]) -> Result<Vec<Vec<u32>>> {
        texts
            .iter()
            .map(|t| {
                self.tok
                    .encode_fast(*t, true)
                    .map(|e| e.get_ids().to_vec())
                    .map_err(|e| LmError::Tokenizer(e.to_string()))
            })
            .collect()
    }

    /// `[n, dim]` embeddings of `texts`, in input order. Texts are sorted by length into
    /// batches of `batch` to limit padding; `progress(done)` is called after every batch.
    pub fn embed(
        &self,
        texts: &[&str],
        batch: usize,
        progress: &mut dyn FnMut(usize),
    ) -> Result<Tensor> {
        let ids = self.tokenize(texts)?;
        let mut order: Vec<usize> = (0..ids.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(ids[i].len()));
        let d = self.dim();
        let mut out = vec![0f32; ids.len() * d];
        let mut done = 0;
        for chunk in order.chunks(batch.max(1)) {
            let b: Vec<Vec<u32>> = chunk.iter().map(|&i| ids[i].clone()).collect();
            let e = self.forward(&b)?.to_vec2::<f32>()?;
            for (k, &i) in chunk.iter().enumerate() {
                out[i * d..(i + 1) * d].copy_from_slice(&e[k]);
            }
            done += chunk.len();
            progress(done);
        }
        Ok(Tensor::from_vec(out, (ids.len(), d), &Device::Cpu)?)
    }
}

/// GELU with the exact (erf) form, fast: erf by Abramowitz & Stegun 7.1.26 (absolute error
/// below 1.5e-7) with a polynomial exp, in loops the compiler vectorises; candle's version
/// calls libm's scalar erf per element. Inference only (no gradient).
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    use rayon::prelude::*;
    let shape = x.dims().to_vec();
    let v = rudder_nn::cpu::with_f32(x, "gelu", |xs| {
        let mut out = xs.to_vec();
        out.par_chunks_mut(16 * 1024).for_each(gelu_slice);
        Ok(out)
    })?;
    Ok(Tensor::from_vec(v, shape, x.device())?)
}

fn gelu_slice(v: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::quant::simd_available() {
        // SAFETY: AVX2 and FMA were detected at run time.
        unsafe { gelu_avx2(v) };
        return;
    }
    gelu_generic(v)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gelu_avx2(v: &mut [f32]) {
    gelu_generic(v)
}

#[inline(always)]
fn gelu_generic(v: &mut [f32]) {
    for x in v.iter_mut() {
        *x = gelu1(*x);
    }
}

#[inline(always)]
pub(crate) fn exp_neg(x: f32) -> f32 {
    // e^x for x ≤ 0: x = n·ln2 + r, |r| ≤ ln2/2, e^r by a degree-6 Taylor polynomial.
    let x = x.max(-87.0);
    let n = (x * std::f32::consts::LOG2_E + 12582912.0) - 12582912.0;
    let r = x - n * 0.693_145_75 - n * 1.428_606_8e-6;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

#[inline(always)]
fn gelu1(x: f32) -> f32 {
    let z = x * std::f32::consts::FRAC_1_SQRT_2;
    let a = z.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152 + t * 1.061_405_4))));
    let erf_abs = 1.0 - poly * exp_neg(-a * a);
    let erf = if z < 0.0 { -erf_abs } else { erf_abs };
    0.5 * x * (1.0 + erf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_gelu_matches_candle() {
        let xs: Vec<f32> = (-2000..2000).map(|i| i as f32 / 200.0).collect();
        let t = Tensor::from_vec(xs, 4000, &Device::Cpu).unwrap();
        let ours = gelu_erf(&t).unwrap().to_vec1::<f32>().unwrap();
        let theirs = t.gelu_erf().unwrap().to_vec1::<f32>().unwrap();
        for (a, b) in ours.iter().zip(&theirs) {
            assert!((a - b).abs() < 2e-6, "{a} vs {b}");
        }
    }
}
