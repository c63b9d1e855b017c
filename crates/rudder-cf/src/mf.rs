//! Matrix factorisation: a user table and an item table (xavier-normal), score = ⟨e_u, e_i⟩
//! (or cosine with the InfoNCE family).

use crate::Result;
use crate::model::{Backbone, IdTables};
use candle_core::{Device, Tensor, Var};

pub struct Mf {
    pub tables: IdTables,
}

impl Mf {
    pub fn new(n_users: usize, n_items: usize, dim: usize, seed: u64, dev: &Device) -> Result<Mf> {
        Ok(Mf {
            tables: IdTables::new(n_users, n_items, dim, seed, dev)?,
        })
    }
}

impl Backbone for Mf {
    fn forward(&self) -> Result<(Tensor, Tensor)> {
        Ok(self.tables.tensors())
    }
    fn ego(&self) -> Result<(Tensor, Tensor)> {
        Ok(self.tables.tensors())
    }
    fn params(&self) -> Vec<(String, Var)> {
        self.tables.params()
    }
    fn ego_is_final(&self) -> bool {
        true
    }
}
