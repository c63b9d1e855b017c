//! Matrix factorisation: a user table and an item table (xavier-normal), score = ⟨e_u, e_i⟩
//! (or cosine with the InfoNCE family).

use crate::Result;
use crate::model::Backbone;
use candle_core::{Device, Tensor, Var};
use rudder_nn::init::xavier_normal;

pub struct Mf {
    pub users: Var,
    pub items: Var,
}

impl Mf {
    pub fn new(n_users: usize, n_items: usize, dim: usize, seed: u64, dev: &Device) -> Result<Mf> {
        Ok(Mf {
            users: Var::from_tensor(&xavier_normal(n_users, dim, seed, 1, dev)?)?,
            items: Var::from_tensor(&xavier_normal(n_items, dim, seed, 2, dev)?)?,
        })
    }
}

impl Backbone for Mf {
    fn forward(&self) -> Result<(Tensor, Tensor)> {
        Ok((
            self.users.as_tensor().clone(),
            self.items.as_tensor().clone(),
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
    fn ego_is_final(&self) -> bool {
        true
    }
}
