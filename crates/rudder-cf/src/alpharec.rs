//! AlphaRec (cf-seeds.md §1): collaborative filtering without ID embeddings. Every item is a
//! frozen language-model embedding of its title, every user the mean of their train items'
//! embeddings; one projector shared by users and items (MLP `d_lm → h → d` with LeakyReLU
//! 0.01, or a linear map) turns them into `d`-dimensional vectors, which LightGCN propagates
//! (mean of layers 0..L); training is cosine InfoNCE with sampled negatives. Because nothing
//! is tied to ids, a trained projector recommends on another dataset from item text alone.

use candle_core::{D, Device, Tensor, Var};
use rudder_data::Interactions;
use rudder_nn::graph::{lightgcn, norm_adj};
use rudder_nn::sparse::SparseOperator;
use serde::{Deserialize, Serialize};

use crate::model::Backbone;
use crate::{CfError, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Projector {
    /// `Linear(d_lm → h) → LeakyReLU(0.01) → Linear(h → d)` (the reference's `mlp`).
    Mlp,
    /// `Linear(d_lm → d, no bias)` (the reference's `homo`, the paper's linear-mapping study).
    Linear,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AlphaRecConfig {
    pub projector: Projector,
    /// Hidden width `h = hidden_mult · d_lm` (reference: ½ for 3072-d, 2 for 1536-d, 8 for
    /// 768-d inputs, keeping about 5 M parameters).
    pub hidden_mult: f64,
    /// Text encoder for item titles when no feature file is given (folder or asset name): a
    /// BERT-family sentence encoder, or a decoder LM (Llama/Qwen2 folder or GGUF).
    pub encoder: String,
    /// Decoder LMs only: mean over the title's tokens or the last token's hidden state.
    pub pooling: crate::features::Pooling,
    /// Precomputed item features (safetensors with `<file>.json` ids from `rudder embed`, or a
    /// `.npy` whose rows are the dataset's items in order); empty = encode titles in process.
    pub features: String,
}

impl Default for AlphaRecConfig {
    fn default() -> Self {
        AlphaRecConfig {
            projector: Projector::Mlp,
            hidden_mult: 2.0,
            encoder: "all-minilm-l6-v2".into(),
            pooling: Default::default(),
            features: String::new(),
        }
    }
}

pub struct AlphaRec {
    /// `[n_users + n_items, d_lm]`: user means then item features (frozen).
    x: Tensor,
    w1: Var,
    b1: Option<Var>,
    w2: Option<(Var, Var)>,
    adj: SparseOperator,
    n_layers: usize,
    n_users: usize,
}

/// Each user's mean of their train items' rows of `items` (zero for users without any).
pub fn user_means(train: &Interactions, items: &Tensor) -> Result<Tensor> {
    let d = items.dim(1)?;
    let it = items.to_vec2::<f32>()?;
    let mut out = vec![0f32; train.n_users() * d];
    for u in 0..train.n_users() {
        let row = &mut out[u * d..(u + 1) * d];
        let mut n = 0usize;
        for &i in train.items(u as u32) {
            for (o, v) in row.iter_mut().zip(&it[i as usize]) {
                *o += v;
            }
            n += 1;
        }
        if n > 0 {
            row.iter_mut().for_each(|o| *o /= n as f32);
        }
    }
    Ok(Tensor::from_vec(out, (train.n_users(), d), items.device())?)
}

impl AlphaRec {
    pub fn new(
        train: &Interactions,
        item_features: &Tensor,
        cfg: &AlphaRecConfig,
        dim: usize,
        n_layers: usize,
        seed: u64,
        dev: &Device,
    ) -> Result<AlphaRec> {
        let (n_items, d_lm) = item_features.dims2()?;
        if n_items != train.n_items() {
            return Err(CfError::Config(format!(
                "item features have {n_items} rows but the data has {} items",
                train.n_items()
            )));
        }
        let x = Tensor::cat(
            &[
                user_means(train, item_features)?,
                item_features.to_device(dev)?,
            ],
            0,
        )?;
        let (w1, b1, w2) = match cfg.projector {
            Projector::Mlp => {
                let h = ((cfg.hidden_mult * d_lm as f64).round() as usize).max(1);
                let (w1, b1) = rudder_nn::init::linear_uniform(h, d_lm, seed, 1, dev)?;
                let (w2, b2) = rudder_nn::init::linear_uniform(dim, h, seed, 2, dev)?;
                (
                    Var::from_tensor(&w1)?,
                    Some(Var::from_tensor(&b1)?),
                    Some((Var::from_tensor(&w2)?, Var::from_tensor(&b2)?)),
                )
            }
            Projector::Linear => {
                let (w, _) = rudder_nn::init::linear_uniform(dim, d_lm, seed, 1, dev)?;
                (Var::from_tensor(&w)?, None, None)
            }
        };
        Ok(AlphaRec {
            x,
            w1,
            b1,
            w2,
            adj: norm_adj(train),
            n_layers,
            n_users: train.n_users(),
        })
    }

    /// The projector applied to language vectors `[n, d_lm]`.
    pub fn project(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.matmul(&self.w1.as_tensor().t()?)?;
        if let Some(b) = &self.b1 {
            h = h.broadcast_add(b.as_tensor())?;
        }
        if let Some((w2, b2)) = &self.w2 {
            // LeakyReLU(0.01) = max(h, 0.01·h)
            h = h.maximum(&(&h * 0.01)?)?;
            h = h
                .matmul(&w2.as_tensor().t()?)?
                .broadcast_add(b2.as_tensor())?;
        }
        Ok(h)
    }

    pub fn lm_dim(&self) -> usize {
        self.x.dim(D::Minus1).unwrap_or(0)
    }
}

impl Backbone for AlphaRec {
    fn forward(&self) -> Result<(Tensor, Tensor)> {
        let e0 = self.project(&self.x)?;
        let e = lightgcn(&e0, &self.adj, self.n_layers)?;
        let n_items = e.dim(0)? - self.n_users;
        Ok((
            e.narrow(0, 0, self.n_users)?,
            e.narrow(0, self.n_users, n_items)?,
        ))
    }
    fn ego(&self) -> Result<(Tensor, Tensor)> {
        // No ID tables: the layer-0 vectors are projections (AlphaRec has no L2 term).
        let e0 = self.project(&self.x)?;
        let n_items = e0.dim(0)? - self.n_users;
        Ok((
            e0.narrow(0, 0, self.n_users)?,
            e0.narrow(0, self.n_users, n_items)?,
        ))
    }
    fn params(&self) -> Vec<(String, Var)> {
        let mut v = vec![("proj_w1".to_string(), self.w1.clone())];
        if let Some(b) = &self.b1 {
            v.push(("proj_b1".into(), b.clone()));
        }
        if let Some((w, b)) = &self.w2 {
            v.push(("proj_w2".into(), w.clone()));
            v.push(("proj_b2".into(), b.clone()));
        }
        v
    }
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
}

/// A user's final vector moved toward an intent (AlphaRec's user-intention capture): the
/// intent's language vector goes through the same projector, and
/// `e'_u = (1 − α)·ê_u + α·q̂` (hats: unit length). Cosine scoring then ranks items for both
/// the user's history and the stated intent.
pub fn shift_toward_intent(
    model: &AlphaRec,
    user: &Tensor,
    intent_lm: &Tensor,
    alpha: f64,
) -> Result<Tensor> {
    if intent_lm.dim(D::Minus1)? != model.lm_dim() {
        return Err(CfError::Config(format!(
            "the intent vector has {} dimensions, the model's language features {}",
            intent_lm.dim(D::Minus1)?,
            model.lm_dim()
        )));
    }
    let q = model.project(&intent_lm.reshape((1, model.lm_dim()))?)?;
    let q = rudder_nn::ops::l2_normalize(&q, 1e-12)?.squeeze(0)?;
    let u =
        rudder_nn::ops::l2_normalize(&user.reshape((1, user.elem_count()))?, 1e-12)?.squeeze(0)?;
    Ok(((u * (1.0 - alpha))? + (q * alpha)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_projector_and_user_means_by_hand() {
        let dev = Device::Cpu;
        // 2 users, 3 items: user 0 has items 0 and 2, user 1 has item 1.
        let train = Interactions::from_lists(3, &[vec![0, 2], vec![1]]);
        let feats = Tensor::new(&[[1f32, 0.0], [0.0, 1.0], [3.0, 2.0]], &dev).unwrap();
        let m = user_means(&train, &feats)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(m, vec![vec![2.0, 1.0], vec![0.0, 1.0]]);
        let cfg = AlphaRecConfig {
            projector: Projector::Linear,
            ..Default::default()
        };
        let a = AlphaRec::new(&train, &feats, &cfg, 2, 0, 1, &dev).unwrap();
        a.w1.set(&Tensor::new(&[[1f32, 2.0], [0.0, -1.0]], &dev).unwrap())
            .unwrap();
        // With 0 layers the output is the projection: [x0 + 2·x1, −x1].
        let (u, i) = a.forward().unwrap();
        assert_eq!(
            u.to_vec2::<f32>().unwrap(),
            vec![vec![4.0, -1.0], vec![2.0, -1.0]]
        );
        assert_eq!(i.to_vec2::<f32>().unwrap()[2], vec![7.0, -2.0]);
        // MLP: LeakyReLU keeps 1% of negatives.
        let mlp = AlphaRec::new(
            &train,
            &feats,
            &AlphaRecConfig {
                hidden_mult: 1.0,
                ..Default::default()
            },
            1,
            0,
            1,
            &dev,
        )
        .unwrap();
        mlp.w1
            .set(&Tensor::new(&[[1f32, 0.0], [0.0, -1.0]], &dev).unwrap())
            .unwrap();
        mlp.b1
            .as_ref()
            .unwrap()
            .set(&Tensor::new(&[0f32, 0.0], &dev).unwrap())
            .unwrap();
        let (w2, b2) = mlp.w2.as_ref().unwrap();
        w2.set(&Tensor::new(&[[1f32, 1.0]], &dev).unwrap()).unwrap();
        b2.set(&Tensor::new(&[0.5f32], &dev).unwrap()).unwrap();
        let out = mlp
            .project(&Tensor::new(&[[2f32, 3.0]], &dev).unwrap())
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert!((out[0][0] - (2.0 - 0.03 + 0.5)).abs() < 1e-6, "{out:?}");
    }
}
