//! BPR, sampled InfoNCE and AdvInfoNCE on one batch of (user, positive, N negatives).

use crate::Result;
use crate::config::AdvConfig;
use candle_core::{D, Device, Tensor, Var};
use rudder_data::sampler::Batch;
use rudder_nn::init::xavier_normal;
use rudder_nn::ops::{l2_normalize, log_sigmoid, log_softmax};
use rudder_nn::sampled::sampled_dot;
use std::sync::Arc;

/// Index tensors of a batch.
pub struct BatchIdx {
    pub users: Tensor,
    pub pos: Tensor,
    pub neg: Tensor,
    pub neg_ids: Arc<Vec<u32>>,
    pub user_ids: Arc<Vec<u32>>,
    pub pos_ids: Arc<Vec<u32>>,
    pub b: usize,
    pub n: usize,
}

impl BatchIdx {
    pub fn new(batch: &Batch, dev: &Device) -> Result<BatchIdx> {
        Ok(BatchIdx {
            users: Tensor::from_slice(&batch.users, batch.len(), dev)?,
            pos: Tensor::from_slice(&batch.pos, batch.len(), dev)?,
            neg: Tensor::from_slice(&batch.neg, batch.neg.len(), dev)?,
            neg_ids: Arc::new(batch.neg.clone()),
            user_ids: Arc::new(batch.users.clone()),
            pos_ids: Arc::new(batch.pos.clone()),
            b: batch.len(),
            n: batch.n_neg,
        })
    }
}

/// Batch embeddings `u (B×d)`, `i (B×d)` and the negatives: for a few negatives (BPR) their
/// rows are gathered together with the positives in one `index_select` (one table-sized
/// gradient in backward instead of several); for many, they are scored with the sampled-dot op.
pub struct BatchEmb {
    pub u: Tensor,
    pub i: Tensor,
    neg: Neg,
    n: usize,
}

enum Neg {
    /// `B×N×d` gathered rows
    Rows(Tensor),
    /// the (normalised) item table and the negative ids
    Table(Tensor, Arc<Vec<u32>>),
}

impl BatchEmb {
    pub fn gather(
        users: &Tensor,
        items: &Tensor,
        idx: &BatchIdx,
        cosine: bool,
    ) -> Result<BatchEmb> {
        let d = users.dim(1)?;
        // normalising the tables once and then gathering equals gathering then normalising
        let (users, items) = if cosine {
            (l2_normalize(users, 1e-12)?, l2_normalize(items, 1e-12)?)
        } else {
            (users.clone(), items.clone())
        };
        let u = users.index_select(&idx.users, 0)?;
        if idx.n <= 4 {
            let both = Tensor::cat(&[&idx.pos, &idx.neg], 0)?;
            let rows = items.index_select(&both, 0)?;
            let i = rows.narrow(0, 0, idx.b)?;
            let j = rows
                .narrow(0, idx.b, idx.b * idx.n)?
                .reshape((idx.b, idx.n, d))?;
            Ok(BatchEmb {
                u,
                i,
                neg: Neg::Rows(j),
                n: idx.n,
            })
        } else {
            let i = items.index_select(&idx.pos, 0)?;
            Ok(BatchEmb {
                u,
                i,
                neg: Neg::Table(items, idx.neg_ids.clone()),
                n: idx.n,
            })
        }
    }

    /// Positive scores `(B)` and negative scores `(B×N)`.
    pub fn scores(&self) -> Result<(Tensor, Tensor)> {
        let pos = (&self.u * &self.i)?.sum(D::Minus1)?;
        let neg = match &self.neg {
            Neg::Rows(j) => j.matmul(&self.u.unsqueeze(2)?)?.squeeze(2)?,
            Neg::Table(items, ids) => sampled_dot(&self.u, items, ids.clone(), self.n)?,
        };
        Ok((pos, neg))
    }
}

/// `−mean log σ(s⁺ − s⁻)` with one negative per row.
pub fn bpr(pos: &Tensor, neg: &Tensor) -> Result<Tensor> {
    let neg = neg.narrow(1, 0, 1)?.squeeze(1)?;
    Ok(log_sigmoid(&(pos - neg)?)?.mean_all()?.neg()?)
}

/// `mean[ −log( e^{s⁺/τ} / (e^{s⁺/τ} + Σ_j e^{s_j/τ}) ) ]`.
pub fn infonce(pos: &Tensor, neg: &Tensor, tau: f64) -> Result<Tensor> {
    let logits = Tensor::cat(&[pos.unsqueeze(1)?, neg.clone()], 1)?.affine(1.0 / tau, 0.0)?;
    Ok(log_softmax(&logits)?.narrow(1, 0, 1)?.mean_all()?.neg()?)
}

/// AdvInfoNCE: `mean[ −log( e^{s⁺} / (e^{s⁺} + k_neg·N·Σ_j p_j e^{s_j}) ) ]` with
/// `p = softmax_j(hardness logits)` and scores divided by τ. Computed in log space.
pub fn advinfonce(
    pos: &Tensor,
    neg: &Tensor,
    hard_logits: &Tensor,
    tau: f64,
    k_neg: f64,
) -> Result<Tensor> {
    let n = neg.dim(1)? as f64;
    let logp = log_softmax(hard_logits)?;
    let neg_term = (neg.affine(1.0 / tau, (k_neg * n).ln())? + logp)?;
    let logits = Tensor::cat(&[pos.affine(1.0 / tau, 0.0)?.unsqueeze(1)?, neg_term], 1)?;
    Ok(log_softmax(&logits)?.narrow(1, 0, 1)?.mean_all()?.neg()?)
}

/// `reg · ½(‖e_u⁰‖² + ‖e_i⁰‖² + ‖e_j⁰‖²) / B` over the batch's layer-0 rows. With
/// `faithful_typo`, the negatives' term is `0.5^{‖E_j⁰‖_F}` as in the AdvInfoNCE reference.
pub fn l2_reg(
    ego_users: &Tensor,
    ego_items: &Tensor,
    idx: &BatchIdx,
    reg: f64,
    faithful_typo: bool,
) -> Result<Option<Tensor>> {
    if reg == 0.0 {
        return Ok(None);
    }
    let u = ego_users.index_select(&idx.users, 0)?.sqr()?.sum_all()?;
    let i = ego_items.index_select(&idx.pos, 0)?.sqr()?.sum_all()?;
    // Σ over the B·N negative rows of ‖E_j‖²; for many negatives as Σ_items count_j · ‖E_j‖²
    // (no B×N×d gather)
    let jsq = if idx.n <= 4 {
        ego_items.index_select(&idx.neg, 0)?.sqr()?.sum_all()?
    } else {
        count_weighted_sq(ego_items, &idx.neg_ids)?
    };
    let j = if faithful_typo {
        // 0.5 ** ‖E_j‖_F = exp(ln 0.5 · ‖E_j‖_F)
        jsq.sqrt()?.affine(0.5f64.ln(), 0.0)?.exp()?
    } else {
        jsq.affine(0.5, 0.0)?
    };
    let s = ((u.affine(0.5, 0.0)? + i.affine(0.5, 0.0)?)? + j)?;
    Ok(Some(s.affine(reg / idx.b as f64, 0.0)?))
}

/// `Σ_k ‖table[ids[k]]‖²` as `Σ_rows count · ‖row‖²`, without gathering a `len(ids)×d` tensor.
fn count_weighted_sq(table: &Tensor, ids: &[u32]) -> Result<Tensor> {
    let n = table.dim(0)?;
    let mut counts = vec![0f32; n];
    for &j in ids {
        counts[j as usize] += 1.0;
    }
    let counts = Tensor::from_vec(counts, n, table.device())?;
    Ok((table.sqr()?.sum(D::Minus1)? * counts)?.sum_all()?)
}

/// The AdvInfoNCE adversary: hardness embeddings `P_U`, `P_I` (xavier-normal, width w).
pub struct Hardness {
    pub users: Var,
    pub items: Var,
}

impl Hardness {
    pub fn new(
        n_users: usize,
        n_items: usize,
        cfg: &AdvConfig,
        seed: u64,
        dev: &Device,
    ) -> Result<Hardness> {
        Ok(Hardness {
            users: Var::from_tensor(&xavier_normal(n_users, cfg.w_dim, seed, 11, dev)?)?,
            items: Var::from_tensor(&xavier_normal(n_items, cfg.w_dim, seed, 12, dev)?)?,
        })
    }

    /// Raw dot products `P_U[u] · P_I[j]`, shape `(B×N)`.
    pub fn logits(&self, idx: &BatchIdx) -> Result<Tensor> {
        let pu = self.users.as_tensor().index_select(&idx.users, 0)?;
        Ok(sampled_dot(
            &pu,
            self.items.as_tensor(),
            idx.neg_ids.clone(),
            idx.n,
        )?)
    }

    /// Mean KL(p ‖ uniform) = Σ_j p_j log(p_j N) over the batch (the reference's "eta").
    pub fn kl_to_uniform(&self, idx: &BatchIdx) -> Result<f64> {
        let logp = log_softmax(&self.logits(idx)?)?;
        let n = idx.n as f64;
        let kl = (logp.exp()? * logp.affine(1.0, n.ln())?)?
            .sum(D::Minus1)?
            .mean_all()?;
        Ok(kl.to_scalar::<f32>()? as f64)
    }

    /// `reg · ½(‖P_U[u]‖² + Σ_j ‖P_I[j]‖²) / B` over the batch's hardness rows.
    pub fn l2(&self, idx: &BatchIdx, reg: f64) -> Result<Tensor> {
        let u = self
            .users
            .as_tensor()
            .index_select(&idx.users, 0)?
            .sqr()?
            .sum_all()?;
        let j = count_weighted_sq(self.items.as_tensor(), &idx.neg_ids)?;
        Ok((u + j)?.affine(0.5 * reg / idx.b as f64, 0.0)?)
    }

    pub fn params(&self) -> Vec<(String, Var)> {
        vec![
            ("hard_user_emb".into(), self.users.clone()),
            ("hard_item_emb".into(), self.items.clone()),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: &[f32], shape: (usize, usize)) -> Tensor {
        Tensor::from_slice(v, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn hand_computed_loss_values() -> Result<()> {
        let dev = Device::Cpu;
        let pos = Tensor::from_slice(&[2.0f32, 0.0], 2, &dev)?;
        let neg = t(&[1.0, 0.0, 0.5, -1.0], (2, 2));
        // BPR on the first negative: −mean(log σ(1), log σ(−0.5))
        let want =
            -(((1.0f64 / (1.0 + (-1.0f64).exp())).ln() + (1.0 / (1.0 + 0.5f64.exp())).ln()) / 2.0);
        let got = bpr(&pos, &neg)?.to_scalar::<f32>()? as f64;
        assert!((got - want).abs() < 1e-6, "bpr {got} vs {want}");
        // InfoNCE with τ = 0.5
        let row = |p: f64, n: &[f64]| {
            -((p / 0.5).exp() / ((p / 0.5).exp() + n.iter().map(|x| (x / 0.5).exp()).sum::<f64>()))
                .ln()
        };
        let want = (row(2.0, &[1.0, 0.0]) + row(0.0, &[0.5, -1.0])) / 2.0;
        let got = infonce(&pos, &neg, 0.5)?.to_scalar::<f32>()? as f64;
        assert!((got - want).abs() < 1e-5, "infonce {got} vs {want}");
        // AdvInfoNCE with uniform hardness equals InfoNCE with the negative term scaled by k_neg
        let h = t(&[0.0, 0.0, 0.0, 0.0], (2, 2));
        let rowk = |p: f64, n: &[f64], k: f64| {
            -((p / 0.5).exp()
                / ((p / 0.5).exp() + k * n.iter().map(|x| (x / 0.5).exp()).sum::<f64>()))
            .ln()
        };
        let want = (rowk(2.0, &[1.0, 0.0], 3.0) + rowk(0.0, &[0.5, -1.0], 3.0)) / 2.0;
        let got = advinfonce(&pos, &neg, &h, 0.5, 3.0)?.to_scalar::<f32>()? as f64;
        assert!((got - want).abs() < 1e-5, "adv {got} vs {want}");
        // non-uniform hardness: p = softmax([ln 3, 0]) = [0.75, 0.25], k_neg = 1, N = 2
        let h = t(&[3f32.ln(), 0.0, 0.0, 0.0], (2, 2));
        let r0 = -((4.0f64).exp() / ((4.0f64).exp() + 2.0 * (0.75 * 2.0f64.exp() + 0.25))).ln();
        let want = (r0 + rowk(0.0, &[0.5, -1.0], 1.0)) / 2.0;
        let got = advinfonce(&pos, &neg, &h, 0.5, 1.0)?.to_scalar::<f32>()? as f64;
        assert!((got - want).abs() < 1e-5, "adv hard {got} vs {want}");
        Ok(())
    }
}
