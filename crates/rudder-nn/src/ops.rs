//! Differentiable building blocks. candle's fused `softmax_last_dim`, `rms_norm`, `layer_norm`
//! and `rope` record no gradient; training paths use these composite versions instead.

use candle_core::{D, Result, Tensor};

/// `softplus(x) = ln(1 + eˣ)`, computed stably as `relu(x) + ln(1 + e^{-|x|})`.
pub fn softplus(x: &Tensor) -> Result<Tensor> {
    let tail = x.abs()?.neg()?.exp()?.affine(1.0, 1.0)?.log()?;
    x.relu()? + tail
}

/// `log σ(x) = -softplus(-x)`.
pub fn log_sigmoid(x: &Tensor) -> Result<Tensor> {
    softplus(&x.neg()?)?.neg()
}

/// Log-softmax over the last dimension (max-shifted, differentiable).
pub fn log_softmax(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    let z = x.broadcast_sub(&m)?;
    let lse = z.exp()?.sum_keepdim(D::Minus1)?.log()?;
    z.broadcast_sub(&lse)
}

/// Softmax over the last dimension (differentiable).
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    log_softmax(x)?.exp()
}

/// Rows scaled to unit L2 norm (`eps` guards zero rows), differentiable.
pub fn l2_normalize(x: &Tensor, eps: f64) -> Result<Tensor> {
    let n = x
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .clamp(eps, f64::INFINITY)?;
    x.broadcast_div(&n)
}

/// Layer normalisation over the last dimension with scale `w` and shift `b` (differentiable).
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let mu = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mu)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    xc.broadcast_div(&(var + eps)?.sqrt()?)?
        .broadcast_mul(w)?
        .broadcast_add(b)
}

/// Inverted dropout: zero each value with probability `p` and scale the rest by `1/(1-p)`;
/// the mask comes from `rng` (a seeded stream), so runs repeat exactly.
pub fn dropout(x: &Tensor, p: f64, rng: &mut impl rand::RngCore) -> Result<Tensor> {
    if p <= 0.0 {
        return Ok(x.clone());
    }
    let thresh = (p * u32::MAX as f64) as u32;
    let keep = (1.0 / (1.0 - p)) as f32;
    let m: Vec<f32> = (0..x.elem_count())
        .map(|_| if rng.next_u32() < thresh { 0.0 } else { keep })
        .collect();
    crate::frozen::apply_mask(x, m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn values_and_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let xs = [-30.0f32, -2.0, 0.0, 1.5, 40.0];
        let x = Var::from_slice(&xs, 5, &dev)?;
        let sp = softplus(x.as_tensor())?.to_vec1::<f32>()?;
        let ls = log_sigmoid(x.as_tensor())?.to_vec1::<f32>()?;
        for (k, &v) in xs.iter().enumerate() {
            let want = (1.0f64 + (v as f64).exp()).ln();
            assert!(
                (sp[k] as f64 - want).abs() < 1e-5 * (1.0 + want),
                "softplus({v})"
            );
            let want_ls = -(1.0f64 + (-(v as f64)).exp()).ln();
            assert!(
                (ls[k] as f64 - want_ls).abs() < 1e-5 * (1.0 + want_ls.abs()),
                "logsigmoid({v})"
            );
        }
        // d/dx log σ(x) = 1 - σ(x)
        let g = log_sigmoid(x.as_tensor())?.sum_all()?.backward()?;
        let g = g.get(x.as_tensor()).unwrap().to_vec1::<f32>()?;
        for (k, &v) in xs.iter().enumerate() {
            let s = 1.0 / (1.0 + (-(v as f64)).exp());
            assert!(
                (g[k] as f64 - (1.0 - s)).abs() < 1e-5,
                "grad at {v}: {}",
                g[k]
            );
        }
        Ok(())
    }

    #[test]
    fn layer_norm_and_dropout() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_slice(&[1.0f32, 2.0, 3.0, 4.0, -1.0, 0.0, 1.0, 6.0], (2, 4), &dev)?;
        let w = Tensor::from_slice(&[1.0f32, 2.0, 1.0, 1.0], 4, &dev)?;
        let b = Tensor::from_slice(&[0.0f32, 0.0, 0.5, 0.0], 4, &dev)?;
        let y = layer_norm(x.as_tensor(), &w, &b, 1e-5)?.to_vec2::<f32>()?;
        // row 0: mean 2.5, var 1.25
        let s = (1.25f32 + 1e-5).sqrt();
        assert!((y[0][0] - (-1.5 / s)).abs() < 1e-5 && (y[0][1] - 2.0 * (-0.5 / s)).abs() < 1e-5);
        assert!((y[0][2] - (0.5 / s + 0.5)).abs() < 1e-5);
        let g = layer_norm(x.as_tensor(), &w, &b, 1e-5)?
            .narrow(1, 3, 1)?
            .sum_all()?
            .backward()?;
        assert!(g.get(x.as_tensor()).is_some());
        use rand::SeedableRng;
        let big = Tensor::ones(10_000, candle_core::DType::F32, &dev)?;
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let d = dropout(&big, 0.1, &mut r)?.to_vec1::<f32>()?;
        let zeros = d.iter().filter(|&&v| v == 0.0).count();
        assert!((900..1100).contains(&zeros), "{zeros}");
        assert!(d.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.9).abs() < 1e-6));
        let mut r2 = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        assert_eq!(d, dropout(&big, 0.1, &mut r2)?.to_vec1::<f32>()?);
        Ok(())
    }

    #[test]
    fn softmax_rows_and_gradient_flow() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_slice(&[1.0f32, 2.0, 3.0, 1000.0, 1000.0, 0.0], (2, 3), &dev)?;
        let p = softmax(x.as_tensor())?.to_vec2::<f32>()?;
        let e: f32 = (1.0f32.exp() + 2.0f32.exp() + 3.0f32.exp()).ln();
        assert!((p[0][2] - (3.0 - e).exp()).abs() < 1e-6);
        assert!((p[1][0] - 0.5).abs() < 1e-6 && p[1][2] < 1e-30);
        // gradient of p[0][0] reaches the input (fused candle softmax would give none)
        let g = softmax(x.as_tensor())?
            .narrow(1, 0, 1)?
            .sum_all()?
            .backward()?;
        let g = g.get(x.as_tensor()).unwrap().to_vec2::<f32>()?;
        assert!(g[0][0] > 0.0 && g[0][1] < 0.0);
        let n = l2_normalize(
            &Tensor::from_slice(&[3.0f32, 4.0, 0.0, 0.0], (2, 2), &dev)?,
            1e-12,
        )?
        .to_vec2::<f32>()?;
        assert_eq!(n, vec![vec![0.6, 0.8], vec![0.0, 0.0]]);
        Ok(())
    }
}
