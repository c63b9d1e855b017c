//! A fused BPR step for models whose scores are plain dot products of layer-0 rows (MF):
//! loss, L2 term and both table gradients in one pass over the batch, instead of a dozen
//! tensor ops. Mathematically identical to `loss::bpr` + `loss::l2_reg` (tested below).

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rudder_nn::cpu::{f32_slice, with_f32};
use std::sync::Arc;

struct FusedBpr {
    users: Arc<Vec<u32>>,
    pos: Arc<Vec<u32>>,
    neg: Arc<Vec<u32>>,
    reg: f32,
}

#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// −log σ(x), stably.
#[inline]
fn neg_log_sigmoid(x: f32) -> f32 {
    if x >= 0.0 {
        (-x).exp().ln_1p()
    } else {
        -x + x.exp().ln_1p()
    }
}

impl FusedBpr {
    /// (∂U, ∂I) for output gradient `g`.
    fn grads(
        &self,
        uv: &[f32],
        iv: &[f32],
        g: f32,
        nu: usize,
        ni: usize,
        d: usize,
    ) -> (Vec<f32>, Vec<f32>) {
        let b = self.users.len();
        let scale = g / b as f32;
        let mut gu = vec![0f32; nu * d];
        let mut gi = vec![0f32; ni * d];
        for k in 0..b {
            let (uu, pi, nj) = (
                self.users[k] as usize,
                self.pos[k] as usize,
                self.neg[k] as usize,
            );
            let ur = &uv[uu * d..][..d];
            let ir = &iv[pi * d..][..d];
            let jr = &iv[nj * d..][..d];
            let x = dot(ur, ir) - dot(ur, jr);
            // d(−log σ(x))/dx = σ(x) − 1
            let c = scale * (1.0 / (1.0 + (-x).exp()) - 1.0);
            let r = scale * self.reg;
            for t in 0..d {
                gu[uu * d + t] += c * (ir[t] - jr[t]) + r * ur[t];
                gi[pi * d + t] += c * ur[t] + r * ir[t];
                gi[nj * d + t] += -c * ur[t] + r * jr[t];
            }
        }
        (gu, gi)
    }
}

impl CustomOp2 for FusedBpr {
    fn name(&self) -> &'static str {
        "fused-bpr"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, d) = l1.shape().dims2()?;
        let u = f32_slice(s1, l1, "fused-bpr")?;
        let it = f32_slice(s2, l2, "fused-bpr")?;
        let b = self.users.len();
        let mut loss = 0f64;
        let mut sq = 0f64;
        for k in 0..b {
            let ur = &u[self.users[k] as usize * d..][..d];
            let ir = &it[self.pos[k] as usize * d..][..d];
            let jr = &it[self.neg[k] as usize * d..][..d];
            loss += neg_log_sigmoid(dot(ur, ir) - dot(ur, jr)) as f64;
            sq += (dot(ur, ur) + dot(ir, ir) + dot(jr, jr)) as f64;
        }
        let v = loss / b as f64 + 0.5 * self.reg as f64 * sq / b as f64;
        Ok((CpuStorage::F32(vec![v as f32]), Shape::from(())))
    }

    fn bwd(
        &self,
        u: &Tensor,
        items: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (nu, d) = u.dims2()?;
        let (ni, _) = items.dims2()?;
        let g = grad.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?;
        // borrow the tables' storage instead of copying them
        let (gu, gi) = with_f32(u, "fused-bpr", |uv| {
            with_f32(
                items,
                "fused-bpr",
                |iv| Ok(self.grads(uv, iv, g, nu, ni, d)),
            )
        })?;
        let dev = u.device();
        Ok((
            Some(Tensor::from_vec(gu, (nu, d), dev)?),
            Some(Tensor::from_vec(gi, (ni, d), dev)?),
        ))
    }
}

/// Mean BPR loss `−log σ(⟨u,i⟩ − ⟨u,j⟩)` plus `reg · ½(‖u‖² + ‖i‖² + ‖j‖²) / B` over a batch with
/// one negative per row, differentiable in both tables.
pub fn fused_bpr(
    users: &Tensor,
    items: &Tensor,
    u: Arc<Vec<u32>>,
    i: Arc<Vec<u32>>,
    j: Arc<Vec<u32>>,
    reg: f64,
) -> Result<Tensor> {
    users.contiguous()?.apply_op2(
        &items.contiguous()?,
        FusedBpr {
            users: u,
            pos: i,
            neg: j,
            reg: reg as f32,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loss::{BatchEmb, BatchIdx, bpr, l2_reg};
    use candle_core::{Device, Var};
    use rudder_data::sampler::Batch;

    #[test]
    fn equals_the_generic_path() -> Result<()> {
        let dev = Device::Cpu;
        let (nu, ni, d) = (6, 9, 8);
        let uv: Vec<f32> = (0..nu * d)
            .map(|x| ((x * 7 % 13) as f32) / 6.0 - 1.0)
            .collect();
        let iv: Vec<f32> = (0..ni * d)
            .map(|x| ((x * 5 % 11) as f32) / 5.0 - 1.0)
            .collect();
        let batch = Batch {
            users: vec![0, 3, 3, 5],
            pos: vec![1, 2, 8, 1],
            neg: vec![4, 4, 0, 7],
            n_neg: 1,
        };
        let reg = 0.3;
        let mk = || -> Result<(Var, Var)> {
            Ok((
                Var::from_slice(&uv, (nu, d), &dev)?,
                Var::from_slice(&iv, (ni, d), &dev)?,
            ))
        };
        let (u1, i1) = mk()?;
        let idx =
            BatchIdx::new(&batch, &dev).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let emb = BatchEmb::gather(u1.as_tensor(), i1.as_tensor(), &idx, false)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let (p, n) = emb
            .scores()
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let generic = (bpr(&p, &n).map_err(|e| candle_core::Error::Msg(e.to_string()))?
            + l2_reg(u1.as_tensor(), i1.as_tensor(), &idx, reg, false)
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?
                .unwrap())?;
        let (u2, i2) = mk()?;
        let fused = fused_bpr(
            u2.as_tensor(),
            i2.as_tensor(),
            Arc::new(batch.users.clone()),
            Arc::new(batch.pos.clone()),
            Arc::new(batch.neg.clone()),
            reg,
        )?;
        let (a, b) = (generic.to_scalar::<f32>()?, fused.to_scalar::<f32>()?);
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        let (ga, gb) = (generic.backward()?, fused.backward()?);
        for (x, y) in [(&u1, &u2), (&i1, &i2)] {
            let diff = (ga.get(x.as_tensor()).unwrap() - gb.get(y.as_tensor()).unwrap())?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            assert!(diff < 1e-5, "{diff}");
        }
        Ok(())
    }
}
