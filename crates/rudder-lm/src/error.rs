//! One error type for the language-model engine.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum LmError {
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("{0}")]
    Config(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("prompt of {len} tokens does not fit the context window of {ctx} tokens ({detail})")]
    TooLong {
        len: usize,
        ctx: usize,
        detail: String,
    },
    #[error("hook: {0}")]
    Hook(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

pub type Result<T> = std::result::Result<T, LmError>;

impl LmError {
    pub fn file(path: impl Into<PathBuf>, reason: impl std::fmt::Display) -> Self {
        LmError::File {
            path: path.into(),
            reason: reason.to_string(),
        }
    }
}
