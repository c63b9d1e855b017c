//! Language-model recommenders (llmrec-seeds.md): a language model reads a user's history as
//! text and names the next item among 20 candidates.
//!
//! - [`data`]: examples (history, candidates, target) from LLaRA sequences or S-DPO prompt
//!   JSON; [`prompts`]: the reference templates.
//! - [`sasrec`], [`gru4rec`], [`caser`]: the sequential baselines, trained by the one loop in
//!   [`seqtrain`] and evaluated by full ranking and on the 20-candidate protocol.

pub mod caser;
pub mod data;
pub mod error;
pub mod gru4rec;
pub mod hybrid;
pub mod ilora;
pub mod lmdata;
pub mod lmeval;
pub mod lmtrain;
pub mod prompts;
pub mod router;
pub mod sasrec;
pub mod sdpo;
pub mod seqrec;
pub mod seqtrain;

pub use error::{LlmrecError, Result};
