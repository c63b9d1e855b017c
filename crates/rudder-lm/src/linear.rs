//! Linear layers over dense f32 or quantized GGUF weights.

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{D, Device, Module, Tensor};

use crate::Result;
use crate::quant::{QFormat, QMatrix};

/// A `[out, in]` weight matrix.
pub enum Weight {
    Dense(Tensor),
    /// Q4_0 / Q4_1 / Q8_0, run by our own integer kernels.
    Quant(QMatrix),
    /// Any other GGUF type (K-quants, F16…), run by candle's quantized matmul.
    Candle(QMatMul, (usize, usize)),
}

impl Weight {
    pub fn from_qtensor(q: QTensor) -> Result<Self> {
        let (out, inp) = q.shape().dims2()?;
        match QFormat::from_ggml(q.dtype()) {
            Some(f) => Ok(Weight::Quant(
                QMatrix::new(f, out, inp, q.data()?.into_owned())
                    .map_err(crate::LmError::Config)?,
            )),
            None => Ok(Weight::Candle(QMatMul::from_qtensor(q)?, (out, inp))),
        }
    }

    pub fn dims(&self) -> (usize, usize) {
        match self {
            Weight::Dense(t) => t.dims2().unwrap_or((0, 0)),
            Weight::Quant(q) => (q.rows, q.cols),
            Weight::Candle(_, d) => *d,
        }
    }

    pub fn is_quantized(&self) -> bool {
        !matches!(self, Weight::Dense(_))
    }

    /// The f32 `[out, in]` matrix (dequantized if needed).
    pub fn to_dense(&self) -> Result<Tensor> {
        Ok(match self {
            Weight::Dense(t) => t.clone(),
            Weight::Quant(q) => Tensor::from_vec(q.dequantize(), (q.rows, q.cols), &Device::Cpu)?,
            Weight::Candle(m, _) => match m {
                QMatMul::QTensor(q) => q.dequantize(&Device::Cpu)?,
                QMatMul::Tensor(t) => t.clone(),
                QMatMul::TensorF16(t) => t.to_dtype(candle_core::DType::F32)?,
            },
        })
    }
}

pub struct Linear {
    pub weight: Weight,
    pub bias: Option<Tensor>,
    /// A LoRA adapter added to the output (`crate::lora`).
    pub lora: Option<crate::lora::LoraSlot>,
}

impl Linear {
    pub fn new(weight: Weight, bias: Option<Tensor>) -> Self {
        Linear {
            weight,
            bias,
            lora: None,
        }
    }

    /// `x [.., in] → [.., out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let inp = *dims.last().unwrap_or(&0);
        let n = x.elem_count() / inp.max(1);
        let (out_dim, _) = self.weight.dims();
        let mut out_shape = dims.clone();
        *out_shape.last_mut().unwrap() = out_dim;
        let y = match &self.weight {
            Weight::Dense(w) => {
                let x2 = x.reshape((n, inp))?;
                rudder_nn::frozen::matmul_t(&x2, w)?.reshape(out_shape)?
            }
            Weight::Quant(q) => {
                let x2 = x.reshape((n, inp))?.contiguous()?;
                let y =
                    rudder_nn::cpu::with_f32(&x2, "quantized matmul", |xs| Ok(q.matmul(xs, n)))?;
                Tensor::from_vec(y, out_shape, x.device())?
            }
            Weight::Candle(m, _) => m.forward(&x.contiguous()?)?,
        };
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        self.add_lora(x, y)
    }

    /// `y + LoRA(x)` when an adapter is attached.
    fn add_lora(&self, x: &Tensor, y: Tensor) -> Result<Tensor> {
        let Some(slot) = &self.lora else {
            return Ok(y);
        };
        let inp = *x.dims().last().unwrap_or(&0);
        let n = x.elem_count() / inp.max(1);
        let d = slot.delta(&x.reshape((n, inp))?)?;
        let d = d.reshape(y.shape())?;
        Ok((y + d)?)
    }
}

/// Apply several linears to the same input. Quantized weights share one activation
/// quantization and one parallel pass (Q/K/V, gate/up); anything else runs one by one.
pub fn forward_many(ls: &[&Linear], x: &Tensor) -> Result<Vec<Tensor>> {
    let qs: Vec<&crate::quant::QMatrix> = ls
        .iter()
        .filter_map(|l| match &l.weight {
            Weight::Quant(q) => Some(q),
            _ => None,
        })
        .collect();
    if qs.len() != ls.len() || ls.len() < 2 {
        return ls.iter().map(|l| l.forward(x)).collect();
    }
    let dims = x.dims().to_vec();
    let inp = *dims.last().unwrap_or(&0);
    let n = x.elem_count() / inp.max(1);
    let x2 = x.reshape((n, inp))?.contiguous()?;
    let ys = rudder_nn::cpu::with_f32(&x2, "quantized matmul", |xs| {
        Ok(crate::quant::matmul_many(&qs, xs, n))
    })?;
    let mut out = Vec::with_capacity(ls.len());
    for ((y, q), l) in ys.into_iter().zip(&qs).zip(ls) {
        let mut shape = dims.clone();
        *shape.last_mut().unwrap() = q.rows;
        let t = Tensor::from_vec(y, shape, x.device())?;
        let t = match &l.bias {
            Some(b) => t.broadcast_add(b)?,
            None => t,
        };
        out.push(l.add_lora(x, t)?);
    }
    Ok(out)
}

/// Root-mean-square norm with a learned scale. `differentiable` selects the slow op path that
/// records gradients (candle's fused `rms_norm` has no backward).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64, differentiable: bool) -> Result<Tensor> {
    if differentiable {
        let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
        let y = x.broadcast_div(&(ms + eps)?.sqrt()?)?;
        Ok(y.broadcast_mul(w)?)
    } else {
        Ok(candle_nn::ops::rms_norm(&x.contiguous()?, w, eps as f32)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};

    #[test]
    fn every_gguf_type_runs_and_matches_its_dequantized_weights() {
        let w = Tensor::randn(0f32, 0.5, (24, 256), &Device::Cpu).unwrap();
        let x = Tensor::randn(0f32, 1.0, (3, 256), &Device::Cpu).unwrap();
        for dt in [
            GgmlDType::F32,
            GgmlDType::F16,
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q8_0,
            GgmlDType::Q4K,
            GgmlDType::Q5K,
            GgmlDType::Q6K,
        ] {
            let q = QTensor::quantize(&w, dt).unwrap();
            let lin = Linear::new(Weight::from_qtensor(q).unwrap(), None);
            let dense = Linear::new(Weight::Dense(lin.weight.to_dense().unwrap()), None);
            let (a, b) = (lin.forward(&x).unwrap(), dense.forward(&x).unwrap());
            let num = (&a - &b)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                .sqrt();
            let den = b
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                .sqrt();
            assert!(num / den < 0.02, "{dt:?}: relative error {}", num / den);
            assert_eq!(lin.weight.dims(), (24, 256));
        }
    }
}
