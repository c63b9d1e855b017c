//! iLoRA's gate: the expert weights of a sequence from its frozen SASRec user vector `u ∈ R^d`
//! (llmrec-seeds.md §2.4).
//!
//! - [`RouterKind::Resnet`]: the reference's shared router (`nlpr.py`): `u` read as a
//!   one-channel signal of length `d`; `Conv1d(1→16, k3, p1)` → BN → ReLU; three stages of
//!   three basic blocks (16, 32, 64 channels, the second and third starting with stride 2, the
//!   shortcut subsampling and zero-padding channels: ResNet "option A"); average pooling;
//!   `Linear(64→K)`; softmax. Batch norm uses batch statistics in training and running
//!   statistics (momentum 0.1, unbiased variance) in evaluation, as PyTorch's does.
//! - [`RouterKind::Linear`]: an ablation, `softmax(W u)` with `W ∈ R^{K×d}` and no bias, one
//!   gate shared by every layer.
//! - [`RouterKind::Layer`]: the reference's per-layer `Dense` gates (built in `gating.py` but
//!   bypassed by `--router share`): every decoder layer mixes its experts by its own
//!   `softmax(W_l u)`.

use std::sync::Mutex;

use candle_core::{D, DType, Device, Tensor, Var};
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::{LlmrecError, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RouterKind {
    Resnet,
    Linear,
    Layer,
}

struct BatchNorm {
    name: String,
    gamma: Var,
    beta: Var,
    /// running mean and variance
    stats: Mutex<(Tensor, Tensor)>,
}

const BN_EPS: f64 = 1e-5;
const BN_MOMENTUM: f64 = 0.1;

impl BatchNorm {
    fn new(name: String, c: usize) -> Result<Self> {
        let dev = &Device::Cpu;
        Ok(BatchNorm {
            name,
            gamma: Var::ones(c, DType::F32, dev)?,
            beta: Var::zeros(c, DType::F32, dev)?,
            stats: Mutex::new((
                Tensor::zeros(c, DType::F32, dev)?,
                Tensor::ones(c, DType::F32, dev)?,
            )),
        })
    }

    /// `x [B, C, L]`.
    fn forward(&self, x: &Tensor, training: bool) -> Result<Tensor> {
        let (b, c, l) = x.dims3()?;
        let (mean, var) = if training {
            let mean = x.mean_keepdim(2)?.mean_keepdim(0)?; // [1, C, 1]
            let dev = x.broadcast_sub(&mean)?;
            let var = dev.sqr()?.mean_keepdim(2)?.mean_keepdim(0)?;
            let n = (b * l) as f64;
            let mut st = self.stats.lock().unwrap_or_else(|e| e.into_inner());
            let m1 = mean.detach().reshape(c)?;
            let v1 = (var.detach().reshape(c)? * (n / (n - 1.0).max(1.0)))?;
            st.0 = ((&st.0 * (1.0 - BN_MOMENTUM))? + (m1 * BN_MOMENTUM)?)?;
            st.1 = ((&st.1 * (1.0 - BN_MOMENTUM))? + (v1 * BN_MOMENTUM)?)?;
            (mean, var)
        } else {
            let st = self.stats.lock().unwrap_or_else(|e| e.into_inner());
            (st.0.reshape((1, c, 1))?, st.1.reshape((1, c, 1))?)
        };
        let xn = x
            .broadcast_sub(&mean)?
            .broadcast_div(&(var + BN_EPS)?.sqrt()?)?;
        Ok(xn
            .broadcast_mul(&self.gamma.as_tensor().reshape((1, c, 1))?)?
            .broadcast_add(&self.beta.as_tensor().reshape((1, c, 1))?)?)
    }
}

struct Conv {
    name: String,
    w: Var,
    stride: usize,
}

impl Conv {
    /// Kaiming-normal (fan-out, ReLU) as the reference's `_weights_init` does for conv layers.
    fn new(
        name: String,
        out: usize,
        inp: usize,
        stride: usize,
        rng: &mut impl Rng,
    ) -> Result<Self> {
        let std = (2.0 / (out * 3) as f64).sqrt();
        let v: Vec<f32> = (0..out * inp * 3)
            .map(|_| (normal(rng) * std) as f32)
            .collect();
        Ok(Conv {
            name,
            w: Var::from_tensor(&Tensor::from_vec(v, (out, inp, 3), &Device::Cpu)?)?,
            stride,
        })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.conv1d(self.w.as_tensor(), 1, self.stride, 1, 1)?)
    }
}

fn normal(rng: &mut impl Rng) -> f64 {
    // Box–Muller
    let u1: f64 = rng.random_range(f64::EPSILON..1.0);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

struct Block {
    c1: Conv,
    b1: BatchNorm,
    c2: Conv,
    b2: BatchNorm,
    /// option A shortcut: (stride, channels added on each side)
    shortcut: Option<(usize, usize)>,
}

impl Block {
    fn forward(&self, x: &Tensor, training: bool) -> Result<Tensor> {
        let h = self.b1.forward(&self.c1.forward(x)?, training)?.relu()?;
        let h = self.b2.forward(&self.c2.forward(&h)?, training)?;
        let s = match self.shortcut {
            None => x.clone(),
            Some((stride, padc)) => {
                let (b, _, l) = x.dims3()?;
                let idx: Vec<u32> = (0..l).step_by(stride).map(|i| i as u32).collect();
                let n = idx.len();
                let sub = x.index_select(&Tensor::from_vec(idx, n, &Device::Cpu)?, 2)?;
                let z = Tensor::zeros((b, padc, n), DType::F32, &Device::Cpu)?;
                Tensor::cat(&[&z, &sub, &z], 1)?
            }
        };
        Ok((h + s)?.relu()?)
    }
}

/// The gate network (parameters, batch-norm state) for `K` experts over `d`-dim user vectors.
pub struct Router {
    pub kind: RouterKind,
    pub experts: usize,
    pub dim: usize,
    stem: Option<(Conv, BatchNorm)>,
    blocks: Vec<Block>,
    fc: Var,
    fc_b: Option<Var>,
    /// per-layer gates (`RouterKind::Layer`)
    per_layer: Vec<Var>,
}

impl Router {
    /// `layers`: the decoder's layer count (used by [`RouterKind::Layer`]).
    pub fn new(
        kind: RouterKind,
        dim: usize,
        experts: usize,
        layers: usize,
        seed: u64,
    ) -> Result<Router> {
        if experts < 2 {
            return Err(LlmrecError::Config(format!(
                "a router needs at least 2 experts, not {experts}"
            )));
        }
        let mut rng = rudder_data::rng::stream(seed, &[0x120_7E7]);
        let lin = |rng: &mut rudder_data::rng::Rng, out: usize, inp: usize| -> Result<Var> {
            let bound = 1.0 / (inp as f64).sqrt();
            let v: Vec<f32> = (0..out * inp)
                .map(|_| rng.random_range(-bound..bound) as f32)
                .collect();
            Ok(Var::from_tensor(&Tensor::from_vec(
                v,
                (out, inp),
                &Device::Cpu,
            )?)?)
        };
        match kind {
            RouterKind::Linear | RouterKind::Layer => Ok(Router {
                kind,
                experts,
                dim,
                stem: None,
                blocks: Vec::new(),
                fc: lin(&mut rng, experts, dim)?,
                fc_b: None,
                per_layer: if kind == RouterKind::Layer {
                    (0..layers.max(1))
                        .map(|_| lin(&mut rng, experts, dim))
                        .collect::<Result<_>>()?
                } else {
                    Vec::new()
                },
            }),
            RouterKind::Resnet => {
                if dim < 4 {
                    return Err(LlmrecError::Config(format!(
                        "the ResNet router needs user vectors of at least 4 dimensions, not {dim}"
                    )));
                }
                let stem = (
                    Conv::new("conv1".into(), 16, 1, 1, &mut rng)?,
                    BatchNorm::new("bn1".into(), 16)?,
                );
                let mut blocks = Vec::new();
                let mut inp = 16;
                for (stage, planes) in [16usize, 32, 64].into_iter().enumerate() {
                    for i in 0..3 {
                        let stride = if stage > 0 && i == 0 { 2 } else { 1 };
                        let p = format!("layer{}.{i}", stage + 1);
                        let shortcut =
                            (stride != 1 || inp != planes).then_some((stride, planes / 4));
                        blocks.push(Block {
                            c1: Conv::new(format!("{p}.conv1"), planes, inp, stride, &mut rng)?,
                            b1: BatchNorm::new(format!("{p}.bn1"), planes)?,
                            c2: Conv::new(format!("{p}.conv2"), planes, planes, 1, &mut rng)?,
                            b2: BatchNorm::new(format!("{p}.bn2"), planes)?,
                            shortcut,
                        });
                        inp = planes;
                    }
                }
                let fc = lin(&mut rng, experts, 64)?;
                let bound = 1.0 / 8.0;
                let bv: Vec<f32> = (0..experts)
                    .map(|_| rng.random_range(-bound..bound) as f32)
                    .collect();
                Ok(Router {
                    kind,
                    experts,
                    dim,
                    stem: Some(stem),
                    blocks,
                    fc,
                    fc_b: Some(Var::from_tensor(&Tensor::from_vec(
                        bv,
                        experts,
                        &Device::Cpu,
                    )?)?),
                    per_layer: Vec::new(),
                })
            }
        }
    }

    /// The gates to apply: one `[B, K]` for every layer, or one per layer
    /// ([`RouterKind::Layer`]).
    pub fn gates(&self, u: &Tensor, training: bool) -> Result<Vec<Tensor>> {
        if self.per_layer.is_empty() {
            return Ok(vec![self.forward(u, training)?]);
        }
        self.check(u)?;
        self.per_layer
            .iter()
            .map(|w| Ok(rudder_nn::ops::softmax(&u.matmul(&w.as_tensor().t()?)?)?))
            .collect()
    }

    fn check(&self, u: &Tensor) -> Result<()> {
        let (_, d) = u.dims2()?;
        if d != self.dim {
            return Err(LlmrecError::Config(format!(
                "router built for {}-dim user vectors, given {d}",
                self.dim
            )));
        }
        Ok(())
    }

    /// Expert weights `[B, K]` (rows sum to 1) of user vectors `u [B, d]`; for per-layer gates,
    /// their mean over the layers (diagnostics).
    pub fn forward(&self, u: &Tensor, training: bool) -> Result<Tensor> {
        if !self.per_layer.is_empty() {
            let g = self.gates(u, training)?;
            let n = g.len() as f64;
            return Ok((Tensor::stack(&g, 0)?.sum(0)? / n)?);
        }
        self.check(u)?;
        let logits = match &self.stem {
            None => u.matmul(&self.fc.as_tensor().t()?)?,
            Some((conv, bn)) => {
                let mut h = bn
                    .forward(&conv.forward(&u.unsqueeze(1)?)?, training)?
                    .relu()?;
                for b in &self.blocks {
                    h = b.forward(&h, training)?;
                }
                let pooled = h.mean(D::Minus1)?; // [B, 64]
                let y = pooled.matmul(&self.fc.as_tensor().t()?)?;
                match &self.fc_b {
                    Some(b) => y.broadcast_add(b.as_tensor())?,
                    None => y,
                }
            }
        };
        Ok(rudder_nn::ops::softmax(&logits)?)
    }

    /// Trainable parameters by name.
    pub fn params(&self) -> Vec<(String, Var)> {
        let mut v = Vec::new();
        let bn = |v: &mut Vec<(String, Var)>, b: &BatchNorm| {
            v.push((format!("{}.weight", b.name), b.gamma.clone()));
            v.push((format!("{}.bias", b.name), b.beta.clone()));
        };
        if let Some((c, b)) = &self.stem {
            v.push((format!("{}.weight", c.name), c.w.clone()));
            bn(&mut v, b);
        }
        for blk in &self.blocks {
            v.push((format!("{}.weight", blk.c1.name), blk.c1.w.clone()));
            bn(&mut v, &blk.b1);
            v.push((format!("{}.weight", blk.c2.name), blk.c2.w.clone()));
            bn(&mut v, &blk.b2);
        }
        if self.per_layer.is_empty() {
            v.push(("linear.weight".into(), self.fc.clone()));
        }
        if let Some(b) = &self.fc_b {
            v.push(("linear.bias".into(), b.clone()));
        }
        for (l, w) in self.per_layer.iter().enumerate() {
            v.push((format!("layers.{l}.weight"), w.clone()));
        }
        v
    }

    fn norms(&self) -> Vec<&BatchNorm> {
        let mut v: Vec<&BatchNorm> = self.stem.iter().map(|(_, b)| b).collect();
        for blk in &self.blocks {
            v.push(&blk.b1);
            v.push(&blk.b2);
        }
        v
    }

    /// Parameters and batch-norm running statistics, for checkpoints.
    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = self
            .params()
            .into_iter()
            .map(|(n, p)| (n, p.as_tensor().clone()))
            .collect();
        for b in self.norms() {
            let st = b.stats.lock().unwrap_or_else(|e| e.into_inner());
            v.push((format!("{}.running_mean", b.name), st.0.clone()));
            v.push((format!("{}.running_var", b.name), st.1.clone()));
        }
        v
    }

    /// Restore what [`Router::tensors`] gave, under `prefix`.
    pub fn load(
        &self,
        map: &std::collections::HashMap<String, Tensor>,
        prefix: &str,
        source: &std::path::Path,
    ) -> Result<()> {
        let get = |n: &str, dims: &[usize]| {
            crate::error::named_tensor(map, &format!("{prefix}{n}"), dims, source)
        };
        for (n, v) in self.params() {
            v.set(&get(&n, v.dims())?)?;
        }
        for b in self.norms() {
            let mut st = b.stats.lock().unwrap_or_else(|e| e.into_inner());
            let c = st.0.dims().to_vec();
            *st = (
                get(&format!("{}.running_mean", b.name), &c)?,
                get(&format!("{}.running_var", b.name), &c)?,
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_routers_give_distributions_and_every_parameter_learns() -> Result<()> {
        let u = Tensor::randn(0f32, 1.0, (5, 64), &Device::Cpu)?;
        for kind in [RouterKind::Resnet, RouterKind::Linear, RouterKind::Layer] {
            let r = Router::new(kind, 64, 4, 3, 7)?;
            let gs = r.gates(&u, true)?;
            assert_eq!(gs.len(), if kind == RouterKind::Layer { 3 } else { 1 });
            if kind == RouterKind::Layer {
                assert_ne!(gs[0].to_vec2::<f32>()?, gs[1].to_vec2::<f32>()?);
            }
            let g = r.forward(&u, true)?;
            assert_eq!(g.dims(), &[5, 4]);
            for row in g.to_vec2::<f32>()? {
                assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
            }
            let w = Tensor::randn(0f32, 1.0, (5, 4), &Device::Cpu)?;
            let grads = (g * w)?.sum_all()?.backward()?;
            rudder_nn::grad::assert_all_receive_gradient(&grads, &r.params());
        }
        // the ResNet router: 3 + 2·9 norms, ~90K parameters at 4 experts (the reference's size)
        let r = Router::new(RouterKind::Resnet, 64, 4, 3, 7)?;
        let n: usize = r.params().iter().map(|(_, v)| v.elem_count()).sum();
        assert!((70_000..100_000).contains(&n), "{n} parameters");
        Ok(())
    }

    #[test]
    fn batch_norm_tracks_running_statistics_and_round_trips() -> Result<()> {
        let r = Router::new(RouterKind::Resnet, 16, 2, 3, 1)?;
        let u = (Tensor::randn(0f32, 1.0, (6, 16), &Device::Cpu)? * 3.0)?;
        let before = r.forward(&u, false)?.to_vec2::<f32>()?;
        for _ in 0..3 {
            r.forward(&u, true)?;
        }
        let after = r.forward(&u, false)?.to_vec2::<f32>()?;
        assert_ne!(
            before, after,
            "evaluation uses the updated running statistics"
        );
        let d = tempfile::tempdir().unwrap();
        let map: std::collections::HashMap<String, Tensor> = r
            .tensors()
            .into_iter()
            .map(|(k, v)| (format!("router.{k}"), v))
            .collect();
        let r2 = Router::new(RouterKind::Resnet, 16, 2, 3, 99)?;
        r2.load(&map, "router.", d.path())?;
        assert_eq!(r2.forward(&u, false)?.to_vec2::<f32>()?, after);
        let small: std::collections::HashMap<String, Tensor> = map
            .iter()
            .filter(|(k, _)| !k.ends_with("bn1.running_var"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let e = r2
            .load(&small, "router.", d.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("running_var is missing"), "{e}");
        assert!(Router::new(RouterKind::Linear, 64, 1, 3, 0).is_err());
        assert!(
            r.forward(&Tensor::zeros((2, 8), DType::F32, &Device::Cpu)?, false)
                .is_err()
        );
        Ok(())
    }
}
