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
