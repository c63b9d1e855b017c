//! `x · Wᵀ` with a frozen `W`, as one op whose backward computes only `∂/∂x = g · W`.
//!
//! candle's matmul backward always computes the gradient of both operands, so a plain matmul
//! against a constant weight matrix spends a second matmul (and a weight-sized zero tensor and
//! add) per layer on a gradient nobody reads; for LoRA training over frozen base weights that
//! doubles the backward pass. The forward is candle's matmul on a copy of the input's
//! storage; when the input records no graph (inference) the plain matmul runs instead.

#[cfg(test)]
use candle_core::Device;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

struct FrozenMatmulT {
    w: Tensor,
}

impl CustomOp1 for FrozenMatmulT {
    fn name(&self) -> &'static str {
        "frozen-matmul-t"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = crate::cpu::f32_slice(s, l, "frozen matmul")?;
        let (n, inp) = l.shape().dims2()?;
        let (out, win) = self.w.dims2()?;
        if win != inp {
            candle_core::bail!("frozen matmul: input width {inp}, weight [{out}, {win}]");
        }
        // One gemm straight from the input's storage into the output (no copies):
        // dst[n, out] = x[n, in] · Wᵀ, Wᵀ read through W's row-major strides.
        let mut dst = vec![0f32; n * out];
        crate::cpu::with_f32(&self.w, "frozen matmul", |w| {
            let threads = rayon::current_num_threads();
            let par = if threads > 1 {
                gemm::Parallelism::Rayon(threads)
            } else {
                gemm::Parallelism::None
            };
            // SAFETY: every pointer covers the matrix its strides describe: x is n×inp
            // row-major, w is out×inp row-major (read as its transpose), dst is n×out.
            unsafe {
                gemm::gemm(
                    n,
                    out,
                    inp,
                    dst.as_mut_ptr(),
                    1,
                    out as isize,
                    false,
                    x.as_ptr(),
                    1,
                    inp as isize,
                    w.as_ptr(),
                    inp as isize,
                    1,
                    0.0f32,
                    1.0f32,
                    false,
                    false,
                    false,
                    par,
                );
            }
            Ok(())
        })?;
        Ok((CpuStorage::F32(dst), Shape::from((n, out))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.matmul(&self.w)?))
    }
}

/// `x [n, in] · wᵀ` for `w [out, in]`. When `w` is a constant (not a variable, not computed
/// from one) its gradient is never computed; a trainable `w` takes candle's matmul and gets
/// its gradient as usual.
pub fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if x.track_op() && !w.track_op() && x.device().is_cpu() {
        x.contiguous()?
            .apply_op1_arc(std::sync::Arc::new(Box::new(FrozenMatmulT {
                w: w.clone(),
            })))
    } else {
        x.matmul(&w.t()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    #[test]
    fn values_and_input_gradient_equal_the_plain_matmul() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (5, 3), &dev)?;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (4, 3), &dev)?)?;
        let up = Tensor::randn(0f32, 1.0, (4, 5), &dev)?;
        let a = matmul_t(x.as_tensor(), &w)?;
        let b = x.as_tensor().matmul(&w.t()?)?;
        let d = (&a - &b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 1e-6);
        let ga = (a * &up)?.sum_all()?.backward()?;
        let gb = (b * &up)?.sum_all()?.backward()?;
        let (x1, x2) = (
            ga.get(x.as_tensor()).unwrap(),
            gb.get(x.as_tensor()).unwrap(),
        );
        assert!((x1 - x2)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-5);
        assert!(
            ga.get(&w).is_none(),
            "no gradient is computed for the frozen weight"
        );
        // a trainable weight still gets its gradient
        let wv = Var::from_tensor(&w)?;
        let g = matmul_t(x.as_tensor(), wv.as_tensor())?
            .sum_all()?
            .backward()?;
        assert!(g.get(wv.as_tensor()).is_some() && g.get(x.as_tensor()).is_some());
        Ok(())
    }
}

/// Inverted dropout as one op: `x ⊙ m` with `m ∈ {0, 1/(1−p)}` drawn from ChaCha8 stream
/// `stream` of `seed` (value `i` from word `i` of the stream, generated in parallel chunks, so
/// the mask does not depend on the thread count); the backward is `g ⊙ m`. candle's `x * m`
/// would also compute a gradient for the constant mask.
pub fn dropout_stream(x: &Tensor, p: f64, seed: u64, stream: u64) -> Result<Tensor> {
    if p <= 0.0 {
        return Ok(x.clone());
    }
    apply_mask(x, dropout_mask(x.elem_count(), p, seed, stream))
}

/// The mask of [`dropout_stream`]: `n` values in `{0, 1/(1−p)}`, value `i` from word `i` of
/// ChaCha8 stream `stream` of `seed`, generated in parallel chunks (the same mask whatever the
/// thread count). All ones when `p ≤ 0`.
pub fn dropout_mask(n: usize, p: f64, seed: u64, stream: u64) -> Vec<f32> {
    use rand::{RngCore, SeedableRng};
    use rayon::prelude::*;
    if p <= 0.0 {
        return vec![1.0; n];
    }
    const CHUNK: usize = 1 << 16;
    let thresh = (p * u32::MAX as f64) as u32;
    let keep = (1.0 / (1.0 - p)) as f32;
    let mut mask = vec![0f32; n];
    mask.par_chunks_mut(CHUNK).enumerate().for_each(|(c, out)| {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(stream);
        rng.set_word_pos((c * CHUNK) as u128);
        for o in out {
            *o = if rng.next_u32() < thresh { 0.0 } else { keep };
        }
    });
    mask
}

/// `x ⊙ mask` as one op whose backward is `g ⊙ mask` (no gradient for the constant mask).
pub fn apply_mask(x: &Tensor, mask: Vec<f32>) -> Result<Tensor> {
    if mask.len() != x.elem_count() {
        candle_core::bail!(
            "mask of {} values for {} elements",
            mask.len(),
            x.elem_count()
        );
    }
    if !x.track_op() {
        return x * Tensor::from_vec(mask, x.shape(), x.device())?;
    }
    x.contiguous()?
        .apply_op1_arc(std::sync::Arc::new(Box::new(MaskMul {
            mask: std::sync::Arc::new(mask),
        })))
}

struct MaskMul {
    mask: std::sync::Arc<Vec<f32>>,
}

impl CustomOp1 for MaskMul {
    fn name(&self) -> &'static str {
        "dropout-mask"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(v) = s else {
            candle_core::bail!("dropout: f32 input expected")
        };
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("dropout: contiguous input expected")
        };
        let out: Vec<f32> = v[a..b]
            .iter()
            .zip(self.mask.iter())
            .map(|(x, m)| x * m)
            .collect();
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let m = Tensor::from_slice(&self.mask, grad.shape(), grad.device())?;
        Ok(Some((grad * m)?))
    }
}

#[cfg(test)]
mod dropout_tests {
    use super::*;
    use candle_core::Var;

    #[test]
    fn stream_dropout_is_seeded_scaled_and_its_gradient_is_the_mask() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::ones((300, 1000), candle_core::DType::F32, &dev)?)?;
        let y = dropout_stream(x.as_tensor(), 0.1, 5, 9)?;
        let v = y.flatten_all()?.to_vec1::<f32>()?;
        let zeros = v.iter().filter(|&&a| a == 0.0).count();
        assert!((29_000..31_000).contains(&zeros), "{zeros}");
        assert_eq!(
            v,
            dropout_stream(x.as_tensor(), 0.1, 5, 9)?
                .flatten_all()?
                .to_vec1::<f32>()?
        );
        assert_ne!(
            v,
            dropout_stream(x.as_tensor(), 0.1, 5, 10)?
                .flatten_all()?
                .to_vec1::<f32>()?
        );
        let g = y.sum_all()?.backward()?;
        let g = g
            .get(x.as_tensor())
            .unwrap()
            .flatten_all()?
            .to_vec1::<f32>()?;
        assert_eq!(g, v, "d(sum(x⊙m))/dx = m");
        // the same mask from one thread
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let w = one.install(|| dropout_stream(x.as_tensor(), 0.1, 5, 9))?;
        assert_eq!(w.flatten_all()?.to_vec1::<f32>()?, v);
        Ok(())
    }
}
