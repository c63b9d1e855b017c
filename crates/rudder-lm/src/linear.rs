//! Linear layers over dense f32 or quantized GGUF weights.

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};

use crate::Result;
use crate::dense::PackedMatrix;
use crate::quant::{QFormat, QMatrix};

/// A `[out, in]` weight matrix.
pub enum Weight {
    Dense(Tensor),
    /// Q4_0 / Q4_1 / Q8_0, run by our own integer kernels.
    Quant(QMatrix),
    /// Any other GGUF type (K-quants…), run by candle's quantized matmul.
    Candle(QMatMul, (usize, usize)),
    /// f32 weights packed for inference (`crate::dense`); models loaded for training keep
    /// `Dense`.
    Packed(PackedMatrix),
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

    /// Pack a dense `[out, in]` matrix for inference.
    pub fn packed(t: &Tensor) -> Result<Self> {
        let (out, inp) = t.dims2()?;
        let v = t
            .flatten_all()?
            .to_dtype(candle_core::DType::F32)?
            .to_vec1::<f32>()?;
        Ok(Weight::Packed(
            PackedMatrix::new(out, inp, &v).map_err(crate::LmError::Config)?,
        ))
    }

    pub fn dims(&self) -> (usize, usize) {
        match self {
            Weight::Dense(t) => t.dims2().unwrap_or((0, 0)),
            Weight::Packed(p) => (p.rows, p.cols),
            Weight::Quant(q) => (q.rows, q.cols),
            Weight::Candle(_, d) => *d,
        }
    }

    pub fn is_quantized(&self) -> bool {
        !matches!(self, Weight::Dense(_) | Weight::Packed(_))
    }

    /// The f32 `[out, in]` matrix (dequantized if needed).
    pub fn to_dense(&self) -> Result<Tensor> {
        Ok(match self {
            Weight::Dense(t) => t.clone(),
            Weight::Packed(p) => Tensor::from_vec(p.unpack(), (p.rows, p.cols), &Device::Cpu)?,
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
        if let (Weight::Dense(w), Some(slot)) = (&self.weight, &self.lora) {
            let x2 = x.reshape((n, inp))?;
            if let Some(y) = slot.fused_forward(&x2, w) {
                let y = y?.reshape(out_shape)?;
                return Ok(match &self.bias {
                    Some(b) => y.broadcast_add(b)?,
                    None => y,
                });
            }
        }
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
            // A gradient through packed weights (rare: a model loaded for inference, then run
            // differentiably) takes the plain product on the unpacked matrix.
            Weight::Packed(_) if x.track_op() => {
                let w = self.weight.to_dense()?;
                let x2 = x.reshape((n, inp))?;
                rudder_nn::frozen::matmul_t(&x2, &w)?.reshape(out_shape)?
            }
            Weight::Packed(p) => {
                let x2 = x.reshape((n, inp))?.contiguous()?;
                let y = rudder_nn::cpu::with_f32(&x2, "packed matmul", |xs| Ok(p.matmul(xs, n)))?;
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

/// Apply several linears to the same input. Quantized or packed weights share one pass over
/// the activations and one fork-join (Q/K/V, gate/up); anything else runs one by one.
pub fn forward_many(ls: &[&Linear], x: &Tensor) -> Result<Vec<Tensor>> {
    let Some(ys) = one_pass(ls, x)? else {
        return ls.iter().map(|l| l.forward(x)).collect();
    };
    let dims = x.dims().to_vec();
    let mut out = Vec::with_capacity(ls.len());
    for (y, l) in ys.into_iter().zip(ls) {
        let mut shape = dims.clone();
        *shape.last_mut().unwrap() = l.weight.dims().0;
        let t = Tensor::from_vec(y, shape, x.device())?;
        let t = match &l.bias {
            Some(b) => t.broadcast_add(b)?,
            None => t,
        };
        out.push(l.add_lora(x, t)?);
    }
    Ok(out)
}

/// [`forward_many`] as plain row-major vectors (`[tokens, outputs]` each), for inference code
/// that works on them directly: the one-pass products are returned as computed, without the
/// copy out of a tensor (biases added in place); LoRA adapters and other weights go through
/// [`forward_many`].
pub fn forward_many_vecs(ls: &[&Linear], x: &Tensor) -> Result<Vec<Vec<f32>>> {
    if ls.iter().all(|l| l.lora.is_none())
        && let Some(mut ys) = one_pass(ls, x)?
    {
        for (y, l) in ys.iter_mut().zip(ls) {
            if let Some(b) = &l.bias {
                rudder_nn::cpu::with_f32(b, "bias", |b| {
                    for row in y.chunks_exact_mut(b.len().max(1)) {
                        row.iter_mut().zip(b).for_each(|(v, bi)| *v += bi);
                    }
                    Ok(())
                })?;
            }
        }
        return Ok(ys);
    }
    forward_many(ls, x)?
        .iter()
        .map(|t| Ok(t.flatten_all()?.to_vec1::<f32>()?))
        .collect()
}

/// The products of quantized or packed weights in one pass over the activations (one kernel
/// call for all of them, as plain vectors), when every weight is quantized, or every one
/// packed and no gradient is recorded; `None` otherwise.
fn one_pass(ls: &[&Linear], x: &Tensor) -> Result<Option<Vec<Vec<f32>>>> {
    let (mut quant, mut packed): (Vec<&QMatrix>, Vec<&PackedMatrix>) = (Vec::new(), Vec::new());
    for l in ls {
        match &l.weight {
            Weight::Quant(q) => quant.push(q),
            Weight::Packed(p) => packed.push(p),
            _ => {}
        }
    }
    let one_pass =
        !ls.is_empty() && (quant.len() == ls.len() || (packed.len() == ls.len() && !x.track_op()));
    if !one_pass {
        return Ok(None);
    }
    let inp = *x.dims().last().unwrap_or(&0);
    let n = x.elem_count() / inp.max(1);
    let x2 = x.reshape((n, inp))?.contiguous()?;
    let ys = rudder_nn::cpu::with_f32(&x2, "matmul", |xs| {
        Ok(if quant.is_empty() {
            crate::dense::matmul_many(&packed, xs, n)
        } else {
            crate::quant::matmul_many(&quant, xs, n)
        })
    })?;
    Ok(Some(ys))
}

/// Root-mean-square norm with a learned scale. `differentiable` selects the op with a backward
/// (`rudder_nn::fused::rms_norm`; candle's fused `rms_norm` has none); inference runs
/// [`crate::rowwise::rms_norm`] on the decoding team.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64, differentiable: bool) -> Result<Tensor> {
    if differentiable {
        Ok(rudder_nn::fused::rms_norm(x, w, eps)?)
    } else {
        crate::rowwise::rms_norm(x, w, eps)
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

    #[test]
    fn packed_weights_equal_dense_ones_with_and_without_gradients() {
        let w = Tensor::randn(0f32, 0.5, (40, 24), &Device::Cpu).unwrap();
        let packed = Linear::new(Weight::packed(&w).unwrap(), None);
        let dense = Linear::new(Weight::Dense(w.clone()), None);
        assert!(matches!(packed.weight, Weight::Packed(_)));
        assert_eq!(packed.weight.dims(), (40, 24));
        let x = Tensor::randn(0f32, 1.0, (2, 5, 24), &Device::Cpu).unwrap();
        let diff = |a: &Tensor, b: &Tensor| {
            (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        let (a, b) = (packed.forward(&x).unwrap(), dense.forward(&x).unwrap());
        assert_eq!(a.dims(), &[2, 5, 40]);
        assert!(diff(&a, &b) < 1e-5);
        // forward_many takes one pass for all-packed weights
        let many = forward_many(&[&packed, &packed], &x).unwrap();
        assert!(diff(&many[1], &b) < 1e-5);
        // a differentiable input still gets its gradient through packed weights
        let v = candle_core::Var::from_tensor(&x).unwrap();
        let grad = |l: &Linear| {
            let loss = l
                .forward(v.as_tensor())
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap();
            loss.backward().unwrap().get(v.as_tensor()).unwrap().clone()
        };
        let (ga, gb) = (grad(&packed), grad(&dense));
        assert!(diff(&ga, &gb) < 1e-4);
        assert!(
            ga.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 0.0
        );
    }
}
