//! The gradient-coverage check: after one backward pass, every trainable parameter must have
//! received a non-zero gradient (a fused candle op upstream silently cuts gradients).

use candle_core::backprop::GradStore;
use candle_core::{Result, Var};

/// Names of the parameters whose gradient is missing or all zero.
pub fn missing_gradients(grads: &GradStore, params: &[(String, Var)]) -> Result<Vec<String>> {
    let mut missing = Vec::new();
    for (name, v) in params {
        match grads.get(v.as_tensor()) {
            None => missing.push(name.clone()),
            Some(g) => {
                let m = g
                    .abs()?
                    .max_all()?
                    .to_dtype(candle_core::DType::F32)?
                    .to_scalar::<f32>()?;
                if !(m > 0.0) {
                    missing.push(name.clone());
                }
            }
        }
    }
    Ok(missing)
}

/// `max |t|` over all elements, as f32 (for tests comparing tensors).
pub fn max_abs(t: &candle_core::Tensor) -> f32 {
    t.abs()
        .and_then(|a| a.max_all())
        .and_then(|m| m.to_dtype(candle_core::DType::F32))
        .and_then(|m| m.to_scalar::<f32>())
        .expect("max |t|")
}

/// Panics (for tests) naming every parameter without a gradient.
pub fn assert_all_receive_gradient(grads: &GradStore, params: &[(String, Var)]) {
    let missing = missing_gradients(grads, params).expect("gradient check");
    assert!(
        missing.is_empty(),
        "parameters without a non-zero gradient: {missing:?}"
    );
}
