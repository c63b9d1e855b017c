//! The Llama family (SmolLM2, TinyLlama, Llama 2/3): `config.json` mirror and GGUF metadata.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;
use serde::Deserialize;

use crate::config::{Arch, DecoderConfig, Llama3RopeScaling};
use crate::{LmError, Result};

fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    10_000.0
}
fn default_ctx() -> usize {
    2048
}

#[derive(Clone, Debug, Deserialize)]
pub struct RopeScaling {
    #[serde(alias = "type")]
    pub rope_type: Option<String>,
    pub factor: Option<f64>,
    pub low_freq_factor: Option<f64>,
    pub high_freq_factor: Option<f64>,
    pub original_max_position_embeddings: Option<usize>,
}

/// Mirrors Hugging Face `LlamaConfig` (`config.json`).
#[derive(Clone, Debug, Deserialize)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    #[serde(default = "default_ctx")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub attention_bias: bool,
}

pub(crate) fn llama3_scaling(s: &Option<RopeScaling>) -> Result<Option<Llama3RopeScaling>> {
    let Some(s) = s else { return Ok(None) };
    match s.rope_type.as_deref() {
        Some("llama3") => Ok(Some(Llama3RopeScaling {
            factor: s.factor.unwrap_or(8.0),
            low_freq_factor: s.low_freq_factor.unwrap_or(1.0),
            high_freq_factor: s.high_freq_factor.unwrap_or(4.0),
            original_max_position_embeddings: s.original_max_position_embeddings.unwrap_or(8192),
        })),
        Some("default") | None => Ok(None),
        Some(other) => Err(LmError::Config(format!(
            "rope_scaling type {other:?} is not supported (supported: llama3)"
        ))),
    }
}

impl LlamaConfig {
    pub fn into_decoder(self) -> Result<DecoderConfig> {
        Ok(DecoderConfig {
            arch: Arch::Llama,
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_hidden_layers,
            num_heads: self.num_attention_heads,
            num_kv_heads: self.num_key_value_heads.unwrap_or(self.num_attention_heads),
            head_dim: self
                .head_dim
                .unwrap_or(self.hidden_size / self.num_attention_heads.max(1)),
            rms_norm_eps: self.rms_norm_eps,
            rope_theta: self.rope_theta,
            rope_scaling: llama3_scaling(&self.rope_scaling)?,
            rope_interleaved: false,
            max_position_embeddings: self.max_position_embeddings,
            tie_word_embeddings: self.tie_word_embeddings,
            qkv_bias: self.attention_bias,
        })
    }
}

/// Reads `{arch}.*` keys of GGUF metadata.
pub(crate) struct GgufMeta<'a> {
    pub md: &'a HashMap<String, Value>,
    pub arch: &'a str,
}

impl GgufMeta<'_> {
    pub fn u(&self, key: &str) -> Result<usize> {
        let k = format!("{}.{key}", self.arch);
        let v = self
            .md
            .get(&k)
            .ok_or_else(|| LmError::Config(format!("GGUF metadata key {k} is missing")))?;
        v.to_u64()
            .map(|x| x as usize)
            .or_else(|_| v.to_u32().map(|x| x as usize))
            .or_else(|_| v.to_i32().map(|x| x as usize))
            .map_err(|e| LmError::Config(format!("GGUF metadata key {k}: {e}")))
    }
    pub fn f(&self, key: &str) -> Option<f64> {
        let v = self.md.get(&format!("{}.{key}", self.arch))?;
        v.to_f32().map(|x| x as f64).or_else(|_| v.to_f64()).ok()
    }

    /// The parts every GGUF decoder shares; `vocab` comes from the embedding tensor's shape.
    pub fn decoder(&self, arch: Arch, vocab: usize, tied: bool) -> Result<DecoderConfig> {
        let d = self.u("embedding_length")?;
        let heads = self.u("attention.head_count")?;
        let kv = self.u("attention.head_count_kv").unwrap_or(heads);
        let hd = self
            .u("attention.key_length")
            .or_else(|_| self.u("rope.dimension_count"))
            .unwrap_or(d / heads.max(1));
        Ok(DecoderConfig {
            arch,
            vocab_size: vocab,
            hidden_size: d,
            intermediate_size: self.u("feed_forward_length")?,
            num_layers: self.u("block_count")?,
            num_heads: heads,
            num_kv_heads: kv,
            head_dim: hd,
            rms_norm_eps: self.f("attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
            rope_theta: self.f("rope.freq_base").unwrap_or(10_000.0),
            rope_scaling: None,
            // llama.cpp permutes Llama Q/K rows for interleaved rotation; Qwen2 keeps NeoX.
            rope_interleaved: arch == Arch::Llama,
            max_position_embeddings: self.u("context_length").unwrap_or(2048),
            tie_word_embeddings: tied,
            qkv_bias: false,
        })
    }
}

pub fn gguf_config(md: &HashMap<String, Value>, vocab: usize, tied: bool) -> Result<DecoderConfig> {
    let m = GgufMeta { md, arch: "llama" };
    let mut c = m.decoder(Arch::Llama, vocab, tied)?;
    if let (Some(factor), Ok(orig)) = (
        m.f("rope.scaling.factor"),
        m.u("rope.scaling.original_context_length"),
    ) {
        let kind = md
            .get("llama.rope.scaling.type")
            .and_then(|v| v.to_string().ok())
            .cloned();
        if kind.as_deref() == Some("llama3") || kind.is_none() {
            c.rope_scaling = Some(Llama3RopeScaling {
                factor,
                low_freq_factor: m.f("rope.scaling.low_freq_factor").unwrap_or(1.0),
                high_freq_factor: m.f("rope.scaling.high_freq_factor").unwrap_or(4.0),
                original_max_position_embeddings: orig,
            });
        }
    }
    Ok(c)
}
