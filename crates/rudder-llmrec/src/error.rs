use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum LlmrecError {
    #[error(transparent)]
    Data(#[from] rudder_data::error::DataError),
    #[error(transparent)]
    Lm(#[from] rudder_lm::LmError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Input(String),
}

impl LlmrecError {
    pub fn file(path: &std::path::Path, reason: impl std::fmt::Display) -> Self {
        LlmrecError::File {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        }
    }
}

pub type Result<T> = std::result::Result<T, LlmrecError>;
