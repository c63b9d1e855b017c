//! LightGCN: ID embeddings propagated over `Â` (symmetric-normalised bipartite graph of the
//! train split, no self-loops) and averaged over layers 0..L (cf-seeds.md [S3]). The whole
//! graph is propagated for every batch, as in the reference code.

use crate::Result;
use crate::model::Backbone;
use candle_core::{Device, Tensor, Var};
use rudder_data::Interactions;
use rudder_nn::graph::{lightgcn, norm_adj};
use rudder_nn::init::xavier_normal;
use rudder_nn::sparse::SparseOperator;

pub struct LightGcn {
    pub users: Var,
    pub items: Var,
    pub adj: SparseOperator,
    pub n_layers: usize,
    n_users: usize,
}

impl LightGcn {
    pub fn new(
        train: &Interactions,
        dim: usize,
        n_layers: usize,
        seed: u64,
        dev: &Device,
    ) -> Result<LightGcn> {
        Ok(LightGcn {
            users: Var::from_tensor(&xavier_normal(train.n_users(), dim, seed, 1, dev)?)?,
            items: Var::from_tensor(&xavier_normal(train.n_items(), dim, seed, 2, dev)?)?,
            adj: norm_adj(train),
            n_layers,
            n_users: train.n_users(),
        })
    }
}

impl Backbone for LightGcn {
    fn forward(&self) -> Result<(Tensor, Tensor)> {
        let e0 = Tensor::cat(&[self.users.as_tensor(), self.items.as_tensor()], 0)?;
        let e = lightgcn(&e0, &self.adj, self.n_layers)?;
        let n_items = e.dim(0)? - self.n_users;
        Ok((
            e.narrow(0, 0, self.n_users)?,
            e.narrow(0, self.n_users, n_items)?,
        ))
    }
    fn ego(&self) -> (Tensor, Tensor) {
        (
            self.users.as_tensor().clone(),
            self.items.as_tensor().clone(),
        )
    }
    fn params(&self) -> Vec<(String, Var)> {
        vec![
            ("user_emb".into(), self.users.clone()),
            ("item_emb".into(), self.items.clone()),
        ]
    }
}
