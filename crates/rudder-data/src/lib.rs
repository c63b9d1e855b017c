//! rudder-data: the data layer of rudder.
//!
//! - [`Interactions`]: CSR user→items with optional rating and timestamp; [`Dataset`] with id
//!   maps, item/user tables and an optional [`Split`].
//! - [`formats`]: readers/writers for LightGCN lines, RecBole atomic files, raw MovieLens,
//!   LLaRA sequences, S-DPO prompts and Agent4Rec side files; format detection.
//! - [`preprocess`] (rating threshold, k-core) and [`split`] (ratio, leave-one-out, temporal).
//! - [`sampler`]: the reference repositories' epoch sampler, seeded and thread-independent.
//! - [`eval`]: the one ranking evaluator (full ranking with masks, or candidate lists).
//! - [`synth`]: a synthetic world with known ground truth.
//! - [`assets`]: the asset manifest and fetcher.

pub mod assets;
pub mod builder;
pub mod dataset;
pub mod error;
pub mod eval;
pub mod formats;
pub mod ids;
pub mod interactions;
pub mod io;
pub mod preprocess;
pub mod resolve;
pub mod rng;
pub mod sampler;
pub mod sequences;
pub mod split;
pub mod stats;
pub mod synth;
pub mod texts;

pub use dataset::{Dataset, Split, Table};
pub use error::{DataError, Result};
pub use ids::IdMap;
pub use interactions::{Interaction, Interactions};
