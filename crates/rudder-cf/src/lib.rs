//! rudder-cf: graph collaborative filtering (cf-seeds.md §0, §2, §4).
//!
//! - [`mf`] and [`lightgcn`]: the backbones (ID embeddings; LightGCN propagates them over the
//!   normalised user–item graph and averages layers 0..L).
//! - [`advdrop`]: AdvDrop (two LightGCN views over adversarially dropped edges).
//! - [`alpharec`]: AlphaRec (MLP of frozen item language features, user means, LightGCN).
//! - [`loss`]: BPR, sampled InfoNCE and AdvInfoNCE.
//! - [`trainer`]: the one training loop (sampler → batches → loss → Adam; evaluation every k
//!   epochs on validation, early stopping, best weights restored, final test on every test set).
//! - [`scorer`]: full-ranking scores from final embeddings (dot or cosine) for the evaluator.

pub mod advdrop;
pub mod alpharec;
pub mod config;
pub mod features;
pub mod fused;
pub mod lightgcn;
pub mod loss;
pub mod mf;
pub mod model;
pub mod presets;
pub mod scorer;
pub mod trainer;

pub use config::{CfConfig, LossConfig, ModelKind};
pub use trainer::{
    Checkpointing, TrainObserver, TrainReport, train, train_checkpointed, train_with,
};

#[derive(Debug, thiserror::Error)]
pub enum CfError {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Data(#[from] rudder_data::DataError),
    #[error("{0}")]
    Config(String),
}

pub type Result<T> = std::result::Result<T, CfError>;
