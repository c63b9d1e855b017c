//! Errors of the data layer. Every reader reports bad input with the file, the 1-based line
//! (0 when the problem concerns the whole file) and a reason a person can act on.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}:{line}: {reason}", path.display())]
    Parse {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("{}: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },
    #[error("asset `{name}`: {reason}")]
    Asset { name: String, reason: String },
    #[error("{0}")]
    Config(String),
}

pub type Result<T> = std::result::Result<T, DataError>;

impl DataError {
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }
    pub fn parse(path: impl AsRef<Path>, line: usize, reason: impl Into<String>) -> Self {
        DataError::Parse {
            path: path.as_ref().to_path_buf(),
            line,
            reason: reason.into(),
        }
    }
    pub fn invalid(path: impl AsRef<Path>, reason: impl Into<String>) -> Self {
        DataError::Invalid {
            path: path.as_ref().to_path_buf(),
            reason: reason.into(),
        }
    }
    pub fn asset(name: impl Into<String>, reason: impl Into<String>) -> Self {
        DataError::Asset {
            name: name.into(),
            reason: reason.into(),
        }
    }
}
