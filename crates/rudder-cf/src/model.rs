//! The backbone contract: final user/item embeddings from trainable parameters.

use crate::config::{CfConfig, ModelKind};
use crate::{Result, lightgcn::LightGcn, mf::Mf};
use candle_core::{Device, Tensor, Var};
use rudder_data::Interactions;

pub trait Backbone {
    /// Final user and item embeddings (`n_users × d`, `n_items × d`).
    fn forward(&self) -> Result<(Tensor, Tensor)>;
    /// Layer-0 (ego) user and item tables, for L2 regularisation.
    fn ego(&self) -> (Tensor, Tensor);
    fn params(&self) -> Vec<(String, Var)>;
    /// Whether `forward` returns the layer-0 tables themselves (MF).
    fn ego_is_final(&self) -> bool {
        false
    }
}

/// Build the configured backbone for a train split.
pub fn build(cfg: &CfConfig, train: &Interactions, dev: &Device) -> Result<Box<dyn Backbone>> {
    Ok(match cfg.model {
        ModelKind::Mf => Box::new(Mf::new(
            train.n_users(),
            train.n_items(),
            cfg.dim,
            cfg.seed,
            dev,
        )?),
        ModelKind::Lightgcn => {
            Box::new(LightGcn::new(train, cfg.dim, cfg.n_layers, cfg.seed, dev)?)
        }
    })
}

/// Rebuild a trained backbone from its config, train split and checkpoint tensors.
pub fn restore(
    cfg: &CfConfig,
    train: &Interactions,
    tensors: &std::collections::HashMap<String, Tensor>,
    dev: &Device,
) -> Result<Box<dyn Backbone>> {
    let m = build(cfg, train, dev)?;
    for (name, var) in m.params() {
        let t = tensors
            .get(&name)
            .ok_or_else(|| crate::CfError::Config(format!("checkpoint has no tensor `{name}`")))?;
        if t.dims() != var.as_tensor().dims() {
            return Err(crate::CfError::Config(format!(
                "checkpoint tensor `{name}` has shape {:?}, the model expects {:?} (different data or config?)",
                t.dims(),
                var.as_tensor().dims()
            )));
        }
        var.set(t)?;
    }
    Ok(m)
}
