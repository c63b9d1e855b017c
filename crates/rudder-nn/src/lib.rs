//! rudder-nn: candle helpers shared by the CF, LM and LLM-recommender crates.
//!
//! - [`sparse`]: CSR matrices and a sparse × dense matmul as a candle custom op with backward
//!   (rayon-parallel on CPU).
//! - [`graph`]: the symmetric normalised bipartite adjacency and LightGCN propagation.
//! - [`ops`]: differentiable building blocks candle lacks or breaks (log-sigmoid, softplus,
//!   softmax, log-softmax, row L2-normalisation).
//! - [`optim`]: Adam with PyTorch semantics and AdamW, with parameter groups.
//! - [`checkpoint`]: safetensors checkpoints written atomically.
//! - [`fused`]: causal attention, RMSNorm and dropout-then-project as single ops with their
//!   own backward (training memory and time).
//! - [`grad`]: the gradient-coverage check every trainable model is tested with.

pub mod alloc;
pub mod checkpoint;
pub mod cpu;
pub mod frozen;
pub mod fused;
pub mod grad;
pub mod graph;
pub mod init;
pub mod ops;
pub mod optim;
pub mod sampled;
pub mod sparse;

pub use candle_core::{DType, Device, Tensor, Var};
