//! Generative user agents that browse a recommender: Agent4Rec (SIGIR 2024) re-implemented
//! over rudder's LLM client layer.
//!
//! - [`parse`]: tolerant readers of the agents' replies, keyed by position on the page.
//! - [`prompts`]: the role-play prompts P1–P6 and the trait texts.
//! - [`profile`]: an agent's traits, taste and rating tendency from the data's user table.
//! - [`memory`]: the memory stream (embedding retrieval, logical clock, satisfaction
//!   reflection).
//! - [`pages`]: the recommender in the loop (CF scores, the reference's popularity rule, plain
//!   popularity, random) with masking and a seeded stable tie-break.
//! - [`journal`]: the append-only journal every LLM exchange and agent step goes to; resume.
//! - [`agent4rec`]: the episode, the taste-discrimination test, the concurrent runner, rounds
//!   with retraining (filter bubble), metrics.

pub mod agent4rec;
pub mod agentrec;
pub mod calls;
pub mod fixtures;
pub mod journal;
pub mod memory;
pub mod pages;
pub mod parse;
pub mod profile;
pub mod prompts;
pub mod store;
pub mod tasks;
pub mod tool;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Data(#[from] rudder_data::DataError),
    #[error(transparent)]
    Client(#[from] rudder_client::ClientError),
    #[error(transparent)]
    Cf(#[from] rudder_cf::CfError),
    #[error(transparent)]
    Lm(#[from] rudder_lm::LmError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    /// Bad input: names the file/field and the reason.
    #[error("{0}")]
    Input(String),
    /// A journal line that is not what this run wrote.
    #[error("{path}:{line}: {reason}")]
    Journal {
        path: String,
        line: usize,
        reason: String,
    },
}

pub type Result<T> = std::result::Result<T, AgentError>;

pub(crate) fn io_err(path: &std::path::Path, source: std::io::Error) -> AgentError {
    AgentError::Io {
        path: path.display().to_string(),
        source,
    }
}
