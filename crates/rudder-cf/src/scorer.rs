//! Full-ranking scores from final embeddings, for the one evaluator.

use candle_core::{Device, Tensor};
use rudder_data::eval::Scorer;

/// Scores `⟨e_u, e_i⟩` (rows L2-normalised first when `cosine`).
pub struct EmbeddingScorer {
    users: Vec<f32>,
    items_t: Tensor,
    dim: usize,
}

impl EmbeddingScorer {
    pub fn new(users: &Tensor, items: &Tensor, cosine: bool) -> crate::Result<EmbeddingScorer> {
        let (users, items) = if cosine {
            (
                rudder_nn::ops::l2_normalize(users, 1e-12)?,
                rudder_nn::ops::l2_normalize(items, 1e-12)?,
            )
        } else {
            (users.clone(), items.clone())
        };
        let dim = users.dim(1)?;
        Ok(EmbeddingScorer {
            users: users.detach().flatten_all()?.to_vec1::<f32>()?,
            items_t: items.detach().t()?.contiguous()?,
            dim,
        })
    }
}

impl Scorer for EmbeddingScorer {
    fn score_users(&self, users: &[u32], n_items: usize, out: &mut [f32]) {
        let mut rows = Vec::with_capacity(users.len() * self.dim);
        for &u in users {
            rows.extend_from_slice(&self.users[u as usize * self.dim..(u as usize + 1) * self.dim]);
        }
        let r = Tensor::from_vec(rows, (users.len(), self.dim), &Device::Cpu)
            .and_then(|q| q.matmul(&self.items_t))
            .and_then(|s| s.flatten_all())
            .and_then(|s| s.to_vec1::<f32>())
            .expect("scoring a batch of users");
        out.copy_from_slice(&r[..users.len() * n_items]);
    }
}
