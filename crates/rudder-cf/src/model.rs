//! The backbone contract: final user/item embeddings from trainable parameters.

use crate::config::{CfConfig, ModelKind};
use crate::{Result, alpharec::AlphaRec, lightgcn::LightGcn, mf::Mf};
use candle_core::{Device, Tensor, Var};
use rudder_data::Interactions;

pub trait Backbone {
    /// Final user and item embeddings (`n_users × d`, `n_items × d`).
    fn forward(&self) -> Result<(Tensor, Tensor)>;
    /// Layer-0 (ego) user and item tables, for L2 regularisation.
    fn ego(&self) -> Result<(Tensor, Tensor)>;
    fn params(&self) -> Vec<(String, Var)>;
    /// Whether `forward` returns the layer-0 tables themselves (MF).
    fn ego_is_final(&self) -> bool {
        false
    }
    /// Trained state outside the main optimizer (AdvDrop's mask network): checkpointed and
    /// restored with the parameters.
    fn extra_state(&self) -> Vec<(String, Var)> {
        Vec::new()
    }
    /// An optimizer the model owns and steps itself (AdvDrop's mask-network Adam): its state is
    /// checkpointed with the trainer's.
    fn inner_optimizer(&self) -> Option<&std::cell::RefCell<rudder_nn::optim::Adam>> {
        None
    }
    /// A model-specific training loss for a batch (AdvDrop's two views + invariance); `None`
    /// uses the configured loss on `forward()`.
    fn custom_loss(&self, _idx: &crate::loss::BatchIdx, _step: u64) -> Option<Result<Tensor>> {
        None
    }
    /// A model-specific adversarial phase before the epoch's recommender steps (AdvDrop's ARM
    /// updates of the mask network); when it ran, returns named diagnostics for the epoch's
    /// record in `metrics.jsonl`.
    fn adversarial(
        &self,
        _epoch: usize,
        _n_batches: usize,
    ) -> Option<Result<Vec<(&'static str, f64)>>> {
        None
    }
    /// The concrete model, for model-specific features (AlphaRec's projector for intents).
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        None
    }
}

/// Data a model needs beyond the interactions (AlphaRec: item language features, rows aligned
/// with the dataset's dense item ids).
#[derive(Default, Clone)]
pub struct ModelInputs {
    pub item_features: Option<Tensor>,
}

/// A user table and an item table of ID embeddings (xavier-normal, as the references), the
/// layer-0 parameters of MF and LightGCN.
pub struct IdTables {
    pub users: Var,
    pub items: Var,
}

impl IdTables {
    pub fn new(
        n_users: usize,
        n_items: usize,
        dim: usize,
        seed: u64,
        dev: &Device,
    ) -> Result<IdTables> {
        use rudder_nn::init::xavier_normal;
        Ok(IdTables {
            users: Var::from_tensor(&xavier_normal(n_users, dim, seed, 1, dev)?)?,
            items: Var::from_tensor(&xavier_normal(n_items, dim, seed, 2, dev)?)?,
        })
    }

    pub fn tensors(&self) -> (Tensor, Tensor) {
        (
            self.users.as_tensor().clone(),
            self.items.as_tensor().clone(),
        )
    }

    pub fn params(&self) -> Vec<(String, Var)> {
        vec![
            ("user_emb".into(), self.users.clone()),
            ("item_emb".into(), self.items.clone()),
        ]
    }
}

/// Build the configured backbone for a train split.
pub fn build(
    cfg: &CfConfig,
    train: &Interactions,
    inputs: &ModelInputs,
    dev: &Device,
) -> Result<Box<dyn Backbone>> {
    Ok(match cfg.model {
        ModelKind::Advdrop => {
            let reg = match cfg.loss {
                crate::LossConfig::Bpr { reg } => reg,
                _ => 0.0,
            };
            Box::new(crate::advdrop::AdvDrop::new(
                train,
                cfg.dim,
                cfg.n_layers,
                reg,
                &cfg.advdrop,
                cfg.seed,
                dev,
            )?)
        }
        ModelKind::Alpharec => {
            let f = inputs.item_features.as_ref().ok_or_else(|| {
                crate::CfError::Config("AlphaRec needs item language features".into())
            })?;
            Box::new(AlphaRec::new(
                train,
                f,
                &cfg.alpharec,
                cfg.dim,
                cfg.n_layers,
                cfg.seed,
                dev,
            )?)
        }
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
    inputs: &ModelInputs,
    tensors: &std::collections::HashMap<String, Tensor>,
    dev: &Device,
) -> Result<Box<dyn Backbone>> {
    let m = build(cfg, train, inputs, dev)?;
    for (name, var) in m.params().into_iter().chain(m.extra_state()) {
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
