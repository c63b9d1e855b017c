//! rudder's language-model engine.
//!
//! - [`loader::load`] opens a Hugging Face folder (safetensors, sharded or not) or a single
//!   `.gguf` file (quantized weights stay quantized; tokenizer and chat template come from the
//!   metadata) of the Llama or Qwen2 families.
//! - [`decoder::Decoder::forward`] runs a batch through the model with a KV cache, calling a
//!   [`hooks::Hook`] at every named site; [`hooks::Capture`] and [`hooks::Interventions`] are
//!   the two hooks everyone needs.
//! - [`generate::generate`] samples continuations; [`score::score`] returns log-probabilities
//!   of continuations.
//! - [`bert::TextEncoder`] embeds texts with a BERT-family sentence encoder (all-MiniLM-L6-v2).

pub mod bert;
pub mod chat;
pub mod config;
pub mod constrain;
pub mod decoder;
pub mod dense;
pub mod engine;
pub mod error;
#[doc(hidden)]
pub mod fixtures;
pub mod generate;
pub mod hooks;
pub mod linear;
pub mod llama;
pub mod loader;
pub mod lora;
pub mod quant;
pub mod qwen2;
pub mod ragged;
pub mod rowwise;
pub mod score;
pub mod team;
pub mod tokenizer;
pub mod weights;

pub use error::{LmError, Result};
