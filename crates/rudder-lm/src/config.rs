//! The resolved decoder configuration every family file produces.
//!
//! `llama.rs` and `qwen2.rs` each mirror their Hugging Face `config.json` and GGUF metadata and
//! convert into this one struct, which is all the shared decoder (`decoder.rs`) reads.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    Llama,
    Qwen2,
}

impl Arch {
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
        }
    }
}

/// Llama-3 style frequency-dependent RoPE scaling (`rope_scaling.rope_type = "llama3"`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Llama3RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DecoderConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<Llama3RopeScaling>,
    /// GGUF Llama files store Q/K rows permuted for interleaved (GPT-J style) rotation;
    /// Hugging Face checkpoints and Qwen2 use the rotate-half (NeoX) layout.
    pub rope_interleaved: bool,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Bias on the Q, K and V projections (Qwen2).
    pub qkv_bias: bool,
}

impl DecoderConfig {
    pub fn validate(&self) -> crate::Result<()> {
        let bad = |m: String| Err(crate::LmError::Config(m));
        if self.num_layers == 0 || self.hidden_size == 0 || self.vocab_size == 0 {
            return bad(format!(
                "config has zero layers, hidden size or vocabulary: {self:?}"
            ));
        }
        if self.num_heads == 0
            || self.num_kv_heads == 0
            || !self.num_heads.is_multiple_of(self.num_kv_heads)
        {
            return bad(format!(
                "num_attention_heads {} must be a positive multiple of num_key_value_heads {}",
                self.num_heads, self.num_kv_heads
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return bad(format!(
                "head_dim {} must be even and positive",
                self.head_dim
            ));
        }
        // Sizes come from files: bound them far above any real model before anything is
        // allocated from them (a fuzzed block_count of 2^40 once reached Vec::with_capacity).
        for (name, v, max) in [
            ("num_hidden_layers", self.num_layers, 4096),
            ("hidden_size", self.hidden_size, 1 << 20),
            ("intermediate_size", self.intermediate_size, 1 << 22),
            ("vocab_size", self.vocab_size, 1 << 26),
            ("num_attention_heads", self.num_heads, 1 << 14),
            ("head_dim", self.head_dim, 1 << 16),
        ] {
            if v > max {
                return bad(format!("{name} {v} is beyond any real model (limit {max})"));
            }
        }
        if !(self.rms_norm_eps.is_finite() && self.rope_theta.is_finite() && self.rope_theta > 0.0)
        {
            return bad(format!(
                "rms_norm_eps {} and rope_theta {} must be finite (rope_theta positive)",
                self.rms_norm_eps, self.rope_theta
            ));
        }
        Ok(())
    }

    /// RoPE inverse frequencies, with Llama-3 scaling applied when configured.
    pub fn inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim;
        (0..d / 2)
            .map(|i| {
                let f = 1.0 / self.rope_theta.powf(2.0 * i as f64 / d as f64);
                let f = match &self.rope_scaling {
                    None => f,
                    Some(s) => {
                        let low_wavelen =
                            s.original_max_position_embeddings as f64 / s.low_freq_factor;
                        let high_wavelen =
                            s.original_max_position_embeddings as f64 / s.high_freq_factor;
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / s.factor
                        } else {
                            let smooth = (s.original_max_position_embeddings as f64 / wavelen
                                - s.low_freq_factor)
                                / (s.high_freq_factor - s.low_freq_factor);
                            (1.0 - smooth) * f / s.factor + smooth * f
                        }
                    }
                };
                f as f32
            })
            .collect()
    }
}
