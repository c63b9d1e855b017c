//! The Qwen2 family (Qwen2, Qwen2.5, DeepSeek-R1-Distill-Qwen): Llama plus biases on Q/K/V,
//! rotate-half RoPE in GGUF files too, and usually tied embeddings in the small sizes.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;
use serde::Deserialize;

use crate::Result;
use crate::config::{Arch, DecoderConfig};
use crate::llama::{GgufMeta, RopeScaling, llama3_scaling};

fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    1_000_000.0
}
fn default_ctx() -> usize {
    32768
}

/// Mirrors Hugging Face `Qwen2Config` (`config.json`).
#[derive(Clone, Debug, Deserialize)]
pub struct Qwen2Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    #[serde(default = "default_ctx")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
}

impl Qwen2Config {
    pub fn into_decoder(self) -> Result<DecoderConfig> {
        Ok(DecoderConfig {
            arch: Arch::Qwen2,
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_hidden_layers,
            num_heads: self.num_attention_heads,
            num_kv_heads: self.num_key_value_heads.unwrap_or(self.num_attention_heads),
            head_dim: self.hidden_size / self.num_attention_heads.max(1),
            rms_norm_eps: self.rms_norm_eps,
            rope_theta: self.rope_theta,
            rope_scaling: llama3_scaling(&self.rope_scaling)?,
            rope_interleaved: false,
            max_position_embeddings: self.max_position_embeddings,
            tie_word_embeddings: self.tie_word_embeddings,
            qkv_bias: true,
        })
    }
}

pub fn gguf_config(md: &HashMap<String, Value>, vocab: usize, tied: bool) -> Result<DecoderConfig> {
    let mut c = GgufMeta { md, arch: "qwen2" }.decoder(Arch::Qwen2, vocab, tied)?;
    c.qkv_bias = true;
    Ok(c)
}
