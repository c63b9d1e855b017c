//! rudder's representation-engineering core and the two activation-steering methods built on
//! it.
//!
//! - [`prompts`]: prompt sets (JSON arrays, JSON Lines, text) with a text field and optional
//!   labels, rendered through the model's own chat template (hash recorded).
//! - [`activations`]: capture at typed sites (`ResidPre(l)`, …) and positions into one
//!   safetensors file + JSON index keyed by explicit layer numbers; large sets stream to disk
//!   in shards and resume after an interruption.
//! - [`probe`]: ridge, Lasso (scikit-learn's objective) and logistic probes in f64 (faer);
//!   [`stats`]: MSE, R², Pearson, Spearman, AUROC, splits.
//! - [`direction`]: difference-of-means directions between label groups, norms, cosines,
//!   projections.
//! - [`cvec`]: steering vectors in llama.cpp's control-vector GGUF layout.
//! - [`alphasteer`]: null-space-constrained refusal steering (fit, steering files, gated
//!   prefill application).
//! - [`grade`]: answers (`\boxed{}` and fallbacks), reasoning spans, math grading.

pub mod activations;
pub mod alphasteer;
pub mod cvec;
pub mod direction;
pub mod grade;
pub mod probe;
pub mod prompts;
pub mod refusal;
pub mod rollouts;
pub mod stats;
pub mod study;

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum SteerError {
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Lm(#[from] rudder_lm::LmError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl SteerError {
    pub fn file(path: impl Into<PathBuf>, reason: impl std::fmt::Display) -> Self {
        SteerError::File {
            path: path.into(),
            reason: reason.to_string(),
        }
    }
}

pub type Result<T> = std::result::Result<T, SteerError>;
