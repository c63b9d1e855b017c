//! LightGCN: ID embeddings propagated over `Â` (symmetric-normalised bipartite graph of the
//! train split, no self-loops) and averaged over layers 0..L (cf-seeds.md [S3]). The whole
//! graph is propagated for every batch, as in the reference code.

use crate::Result;
use crate::model::{Backbone, IdTables};
use candle_core::{Device, Tensor, Var};
use rudder_data::Interactions;
use rudder_nn::graph::{lightgcn, norm_adj};
use rudder_nn::sparse::SparseOperator;

pub struct LightGcn {
    pub tables: IdTables,
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
            tables: IdTables::new(train.n_users(), train.n_items(), dim, seed, dev)?,
            adj: norm_adj(train),
            n_layers,
            n_users: train.n_users(),
        })
    }
}

impl Backbone for LightGcn {
    fn forward(&self) -> Result<(Tensor, Tensor)> {
        let e0 = Tensor::cat(
            &[self.tables.users.as_tensor(), self.tables.items.as_tensor()],
            0,
        )?;
        let e = lightgcn(&e0, &self.adj, self.n_layers)?;
        let n_items = e.dim(0)? - self.n_users;
        Ok((
            e.narrow(0, 0, self.n_users)?,
            e.narrow(0, self.n_users, n_items)?,
        ))
    }
    fn ego(&self) -> Result<(Tensor, Tensor)> {
        Ok(self.tables.tensors())
    }
    fn params(&self) -> Vec<(String, Var)> {
        self.tables.params()
    }
}
