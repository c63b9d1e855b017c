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

/// Tensor `key` of a loaded file with the expected shape; missing or misshaped names the file.
pub fn named_tensor(
    map: &std::collections::HashMap<String, candle_core::Tensor>,
    key: &str,
    dims: &[usize],
    source: &std::path::Path,
) -> Result<candle_core::Tensor> {
    let t = map
        .get(key)
        .ok_or_else(|| LlmrecError::file(source, format!("tensor {key} is missing")))?;
    if t.dims() != dims {
        return Err(LlmrecError::file(
            source,
            format!("tensor {key} has shape {:?}, expected {dims:?}", t.dims()),
        ));
    }
    Ok(t.clone())
}
