//! Sampled dot products `S[b, n] = ⟨U[b], V[idx[b·N + n]]⟩` as one candle op with a hand-written
//! backward (∂U[b] = Σ_n ∂S[b,n]·V[idx], ∂V[idx] += ∂S[b,n]·U[b]). It replaces gathering a
//! `B×N×d` tensor (or scoring all items) for every batch of the contrastive losses.

use crate::cpu::{f32_slice, with_f32};
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Arc;

struct SampledDot {
    idx: Arc<Vec<u32>>,
    n: usize,
}

impl SampledDot {
    /// (∂U, ∂V) for output gradient `g`.
    fn grads(
        &self,
        uv: &[f32],
        vv: &[f32],
        g: &[f32],
        b: usize,
        ni: usize,
        d: usize,
    ) -> (Vec<f32>, Vec<f32>) {
        let n = self.n;
        let mut gu = vec![0f32; b * d];
        gu.par_chunks_mut(d).enumerate().for_each(|(r, o)| {
            for k in 0..n {
                let w = g[r * n + k];
                let vr = &vv[self.idx[r * n + k] as usize * d..][..d];
                for (x, y) in o.iter_mut().zip(vr) {
                    *x += w * y;
                }
            }
        });
        // item gradients: each thread accumulates a slice of rows, so no write conflicts
        let mut gv = vec![0f32; ni * d];
        let threads = rayon::current_num_threads().max(1);
        let rows_per = ni.div_ceil(threads).max(1);
        gv.par_chunks_mut(rows_per * d)
            .enumerate()
            .for_each(|(c, o)| {
                let lo = c * rows_per;
                let hi = lo + o.len() / d;
                for r in 0..b {
                    for k in 0..n {
                        let i = self.idx[r * n + k] as usize;
                        if i >= lo && i < hi {
                            let w = g[r * n + k];
                            let ur = &uv[r * d..(r + 1) * d];
                            for (x, y) in o[(i - lo) * d..(i - lo + 1) * d].iter_mut().zip(ur) {
                                *x += w * y;
                            }
                        }
                    }
                }
            });
        (gu, gv)
    }
}

impl CustomOp2 for SampledDot {
    fn name(&self) -> &'static str {
        "sampled-dot"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, d) = l1.shape().dims2()?;
        let (ni, d2) = l2.shape().dims2()?;
        if d != d2 || self.idx.len() != b * self.n {
            candle_core::bail!(
                "sampled-dot: shapes {:?} / {:?} with {} indices, N = {}",
                l1.shape(),
                l2.shape(),
                self.idx.len(),
                self.n
            );
        }
        if let Some(&bad) = self.idx.iter().find(|&&i| i as usize >= ni) {
            candle_core::bail!("sampled-dot: index {bad} out of range ({ni} rows)");
        }
        let u = f32_slice(s1, l1, "sampled-dot")?;
        let v = f32_slice(s2, l2, "sampled-dot")?;
        let n = self.n;
        let mut out = vec![0f32; b * n];
        out.par_chunks_mut(n).enumerate().for_each(|(r, o)| {
            let ur = &u[r * d..(r + 1) * d];
            for (k, ok) in o.iter_mut().enumerate() {
                let vr = &v[self.idx[r * n + k] as usize * d..][..d];
                *ok = ur.iter().zip(vr).map(|(a, b)| a * b).sum();
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((b, n))))
    }

    fn bwd(
        &self,
        u: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (b, d) = u.dims2()?;
        let (ni, _) = v.dims2()?;
        let g = grad.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        // borrow U and V instead of copying them
        let (gu, gv) = with_f32(u, "sampled-dot", |uv| {
            with_f32(v, "sampled-dot", |vv| Ok(self.grads(uv, vv, &g, b, ni, d)))
        })?;
        let dev = u.device();
        Ok((
            Some(Tensor::from_vec(gu, (b, d), dev)?),
            Some(Tensor::from_vec(gv, (ni, d), dev)?),
        ))
    }
}

/// `S[b, n] = ⟨U[b], V[idx[b·N + n]]⟩` for `U: B×d`, `V: I×d`; differentiable in `U` and `V`.
pub fn sampled_dot(u: &Tensor, v: &Tensor, idx: Arc<Vec<u32>>, n: usize) -> Result<Tensor> {
    u.contiguous()?
        .apply_op2(&v.contiguous()?, SampledDot { idx, n })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn matches_gather_forward_and_backward() -> Result<()> {
        let dev = Device::Cpu;
        let (b, n, d, ni) = (5, 3, 4, 7);
        let uv: Vec<f32> = (0..b * d)
            .map(|x| ((x * 7 % 11) as f32) / 5.0 - 1.0)
            .collect();
        let vv: Vec<f32> = (0..ni * d)
            .map(|x| ((x * 5 % 13) as f32) / 6.0 - 1.0)
            .collect();
        let idx: Vec<u32> = (0..b * n).map(|x| ((x * 3 + 1) % ni) as u32).collect();
        let u = Var::from_slice(&uv, (b, d), &dev)?;
        let v = Var::from_slice(&vv, (ni, d), &dev)?;
        let w = Tensor::from_vec(
            (0..b * n).map(|x| x as f32 - 4.0).collect::<Vec<_>>(),
            (b, n),
            &dev,
        )?;
        let fast = sampled_dot(u.as_tensor(), v.as_tensor(), Arc::new(idx.clone()), n)?;
        let it = Tensor::from_slice(&idx, b * n, &dev)?;
        let slow = v
            .as_tensor()
            .index_select(&it, 0)?
            .reshape((b, n, d))?
            .matmul(&u.as_tensor().unsqueeze(2)?)?
            .squeeze(2)?;
        let diff = (fast.clone() - slow.clone())?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(diff < 1e-5);
        let gf = (fast * &w)?.sum_all()?.backward()?;
        let gs = (slow * &w)?.sum_all()?.backward()?;
        for x in [&u, &v] {
            let d = (gf.get(x.as_tensor()).unwrap() - gs.get(x.as_tensor()).unwrap())?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            assert!(d < 1e-4, "{d}");
        }
        Ok(())
    }
}
