//! Adam with PyTorch semantics (bias correction, eps outside the square root, optional L2
//! weight decay added to the gradient) and AdamW (decoupled decay), over parameter groups.

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};
use rayon::prelude::*;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// AdamW: decay the weights directly instead of adding `wd·θ` to the gradient.
    pub decoupled: bool,
}

impl AdamConfig {
    pub fn adam(lr: f64) -> Self {
        AdamConfig {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            decoupled: false,
        }
    }
    pub fn adamw(lr: f64, weight_decay: f64) -> Self {
        AdamConfig {
            weight_decay,
            decoupled: true,
            ..Self::adam(lr)
        }
    }
}

struct Slot {
    var: Var,
    /// first and second moments, kept as plain vectors and updated in place
    m: Vec<f32>,
    v: Vec<f32>,
}

struct Group {
    cfg: AdamConfig,
    /// This group's learning rate is `mult ×` the rate given to [`Adam::set_lr`].
    mult: f64,
    params: Vec<Slot>,
}

/// Adam over one or more parameter groups, each with its own settings. The update is one fused
/// pass over each parameter (no intermediate tensors).
pub struct Adam {
    groups: Vec<Group>,
    step: u64,
}

impl Adam {
    pub fn new(params: Vec<Var>, cfg: AdamConfig) -> Result<Adam> {
        let mut a = Adam {
            groups: Vec::new(),
            step: 0,
        };
        a.add_group(params, cfg)?;
        Ok(a)
    }

    pub fn add_group(&mut self, params: Vec<Var>, cfg: AdamConfig) -> Result<()> {
        self.add_scaled_group(params, cfg, 1.0)
    }

    /// A group whose learning rate follows [`Adam::set_lr`] times `mult` (iLoRA's router runs
    /// at 0.3× the schedule).
    pub fn add_scaled_group(&mut self, params: Vec<Var>, cfg: AdamConfig, mult: f64) -> Result<()> {
        let params = params
            .into_iter()
            .map(|var| {
                let n = var.as_tensor().elem_count();
                Slot {
                    var,
                    m: vec![0.0; n],
                    v: vec![0.0; n],
                }
            })
            .collect();
        self.groups.push(Group { cfg, mult, params });
        Ok(())
    }

    pub fn set_lr(&mut self, lr: f64) {
        for g in &mut self.groups {
            g.cfg.lr = lr * g.mult;
        }
    }

    pub fn steps(&self) -> u64 {
        self.step
    }

    /// The optimizer's state for a checkpoint: the step count and, per parameter (in group
    /// and insertion order), its first and second moments as `{prefix}.{group}.{slot}.m|v`.
    pub fn state(&self, prefix: &str) -> Result<(u64, Vec<(String, Tensor)>)> {
        let mut out = Vec::new();
        for (gi, g) in self.groups.iter().enumerate() {
            for (si, s) in g.params.iter().enumerate() {
                let n = s.m.len();
                let dev = &candle_core::Device::Cpu;
                out.push((
                    format!("{prefix}.{gi}.{si}.m"),
                    Tensor::from_slice(&s.m, n, dev)?,
                ));
                out.push((
                    format!("{prefix}.{gi}.{si}.v"),
                    Tensor::from_slice(&s.v, n, dev)?,
                ));
            }
        }
        Ok((self.step, out))
    }

    /// Restore what [`Adam::state`] saved (the parameters themselves are restored by the
    /// caller). Every moment must be present with the parameter's size.
    pub fn load_state(
        &mut self,
        prefix: &str,
        steps: u64,
        tensors: &std::collections::HashMap<String, Tensor>,
    ) -> Result<()> {
        for (gi, g) in self.groups.iter_mut().enumerate() {
            for (si, s) in g.params.iter_mut().enumerate() {
                for (k, dst) in [("m", &mut s.m), ("v", &mut s.v)] {
                    let name = format!("{prefix}.{gi}.{si}.{k}");
                    let t = tensors.get(&name).ok_or_else(|| {
                        candle_core::Error::Msg(format!(
                            "checkpoint lacks optimizer state `{name}`"
                        ))
                    })?;
                    let v = t.flatten_all()?.to_vec1::<f32>()?;
                    if v.len() != dst.len() {
                        return Err(candle_core::Error::Msg(format!(
                            "optimizer state `{name}` has {} values, the parameter {}",
                            v.len(),
                            dst.len()
                        )));
                    }
                    *dst = v;
                }
            }
        }
        self.step = steps;
        Ok(())
    }

    /// One update from the gradients in `grads`; parameters without a gradient are treated
    /// as having a zero gradient (their moments still decay, as in PyTorch with dense grads).
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step_with(|t| grads.get(t).cloned())
    }

    /// One update with gradients supplied by `grad_of(parameter)` (for models that compute
    /// some gradients by hand); `None` counts as a zero gradient, as in [`Adam::step`].
    pub fn step_with(&mut self, grad_of: impl Fn(&Tensor) -> Option<Tensor>) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        for g in &mut self.groups {
            let c = g.cfg;
            let bc1 = 1.0 - c.beta1.powi(t);
            let bc2 = 1.0 - c.beta2.powi(t);
            let (b1, b2) = (c.beta1 as f32, c.beta2 as f32);
            let step_size = (c.lr / bc1) as f32;
            let inv_bc2 = (1.0 / bc2) as f32;
            let eps = c.eps as f32;
            let wd = c.weight_decay as f32;
            let decay = (1.0 - c.lr * c.weight_decay) as f32;
            let h = Hyper {
                b1,
                b2,
                step_size,
                inv_bc2,
                eps,
                l2: if wd != 0.0 && !c.decoupled { wd } else { 0.0 },
                dw: if wd != 0.0 && c.decoupled { decay } else { 1.0 },
            };
            for slot in &mut g.params {
                let theta_t = slot.var.as_tensor();
                let grad = match grad_of(theta_t) {
                    Some(gr) if gr.dtype() == candle_core::DType::F32 => gr.clone(),
                    Some(gr) => gr.to_dtype(candle_core::DType::F32)?,
                    None => theta_t.zeros_like()?.to_dtype(candle_core::DType::F32)?,
                };
                if theta_t.dtype() == candle_core::DType::F32 && theta_t.device().is_cpu() {
                    // update θ, m, v in place: no copies of the table
                    let op = AdamKernel {
                        h,
                        mv: std::sync::Mutex::new((&mut slot.m, &mut slot.v)),
                    };
                    theta_t.inplace_op2(&grad.contiguous()?, &op)?;
                } else {
                    let mut theta = theta_t
                        .flatten_all()?
                        .to_dtype(candle_core::DType::F32)?
                        .to_vec1::<f32>()?;
                    let gv = grad.flatten_all()?.to_vec1::<f32>()?;
                    h.update(&mut theta, &mut slot.m, &mut slot.v, &gv);
                    let new = Tensor::from_vec(theta, theta_t.dims(), theta_t.device())?
                        .to_dtype(theta_t.dtype())?;
                    slot.var.set(&new)?;
                }
            }
        }
        Ok(())
    }
}

#[derive(Clone, Copy)]
struct Hyper {
    b1: f32,
    b2: f32,
    step_size: f32,
    inv_bc2: f32,
    eps: f32,
    /// L2 added to the gradient (Adam's weight decay)
    l2: f32,
    /// multiplicative decay of the weights (AdamW)
    dw: f32,
}

impl Hyper {
    fn update(&self, theta: &mut [f32], m: &mut [f32], v: &mut [f32], grad: &[f32]) {
        const CHUNK: usize = 1 << 14;
        let h = *self;
        theta
            .par_chunks_mut(CHUNK)
            .zip(m.par_chunks_mut(CHUNK))
            .zip(v.par_chunks_mut(CHUNK))
            .zip(grad.par_chunks(CHUNK))
            .for_each(|(((th, m), v), g)| h.chunk(th, m, v, g));
    }

    fn chunk(&self, th: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32]) {
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                // SAFETY: the CPU supports AVX2 and FMA (checked just above).
                unsafe { chunk_avx2(self, th, m, v, g) };
                return;
            }
        }
        chunk_body(self, th, m, v, g)
    }
}

#[inline(always)]
fn chunk_body(h: &Hyper, th: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32]) {
    let n = th.len().min(m.len()).min(v.len()).min(g.len());
    let (th, m, v, g) = (&mut th[..n], &mut m[..n], &mut v[..n], &g[..n]);
    for k in 0..n {
        let gk = g[k] + h.l2 * th[k];
        m[k] = h.b1 * m[k] + (1.0 - h.b1) * gk;
        v[k] = h.b2 * v[k] + (1.0 - h.b2) * gk * gk;
        th[k] = th[k] * h.dw - h.step_size * m[k] / ((v[k] * h.inv_bc2).sqrt() + h.eps);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn chunk_avx2(h: &Hyper, th: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32]) {
    chunk_body(h, th, m, v, g)
}

type Moments<'a> = (&'a mut Vec<f32>, &'a mut Vec<f32>);

struct AdamKernel<'a> {
    h: Hyper,
    mv: std::sync::Mutex<Moments<'a>>,
}

impl candle_core::InplaceOp2 for AdamKernel<'_> {
    fn name(&self) -> &'static str {
        "adam-step"
    }

    fn cpu_fwd(
        &self,
        s1: &mut candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
    ) -> Result<()> {
        let theta = crate::cpu::f32_slice_mut(s1, l1, "adam")?;
        let grad = crate::cpu::f32_slice(s2, l2, "adam")?;
        let mut mv = self.mv.lock().expect("adam moments");
        let (m, v) = &mut *mv;
        self.h.update(theta, m, v, grad);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn first_steps_match_pytorch() -> Result<()> {
        // torch: p=[1.,-2.], loss=sum(p^2) → grad 2p; Adam(lr=0.1) after 1 step: p - 0.1*sign(g)
        let dev = Device::Cpu;
        let p = Var::from_slice(&[1.0f32, -2.0], 2, &dev)?;
        let mut opt = Adam::new(vec![p.clone()], AdamConfig::adam(0.1))?;
        let g = p.as_tensor().sqr()?.sum_all()?.backward()?;
        opt.step(&g)?;
        let v = p.as_tensor().to_vec1::<f32>()?;
        assert!(
            (v[0] - 0.9).abs() < 1e-6 && (v[1] + 1.9).abs() < 1e-6,
            "{v:?}"
        );
        // second step, hand-computed with bias correction
        let g = p.as_tensor().sqr()?.sum_all()?.backward()?;
        opt.step(&g)?;
        let (g1, g2) = (2.0f64, 1.8f64);
        let m = 0.9 * 0.1 * g1 + 0.1 * g2;
        let vv = 0.999 * 0.001 * g1 * g1 + 0.001 * g2 * g2;
        let want = 0.9 - 0.1 * (m / (1.0 - 0.81)) / ((vv / (1.0 - 0.999f64.powi(2))).sqrt() + 1e-8);
        let v = p.as_tensor().to_vec1::<f32>()?;
        assert!((v[0] as f64 - want).abs() < 1e-5, "{} vs {want}", v[0]);
        Ok(())
    }

    #[test]
    fn adamw_decays_weights_without_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let p = Var::from_slice(&[1.0f32], 1, &dev)?;
        let q = Var::from_slice(&[1.0f32], 1, &dev)?;
        let mut opt = Adam::new(vec![p.clone()], AdamConfig::adamw(0.1, 0.5))?;
        opt.add_group(vec![q.clone()], AdamConfig::adam(0.1))?;
        let g = (p.as_tensor() * 0.0)?.sum_all()?.backward()?;
        opt.step(&g)?;
        assert!((p.as_tensor().to_vec1::<f32>()?[0] - 0.95).abs() < 1e-6);
        assert_eq!(q.as_tensor().to_vec1::<f32>()?[0], 1.0);
        Ok(())
    }
}

/// Learning rate at optimizer step `step` (0-based) of `total`: linear warmup from `start` to
/// `peak` over `warmup` steps, then cosine decay from `peak` to `floor` at `total`. With
/// `start = floor = 0` this is Hugging Face's `get_cosine_schedule_with_warmup`; iLoRA's
/// schedule uses `start = floor = peak/100`.
pub fn warmup_cosine(step: u64, total: u64, warmup: u64, peak: f64, start: f64, floor: f64) -> f64 {
    if step < warmup {
        return start + (peak - start) * step as f64 / warmup.max(1) as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let p = ((step - warmup) as f64 / span).min(1.0);
    floor + (peak - floor) * 0.5 * (1.0 + (std::f64::consts::PI * p).cos())
}

/// Scale `grads` so that their global L2 norm is at most `max_norm` (PyTorch
/// `clip_grad_norm_`); returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let mut sq = 0f64;
    for g in grads.iter() {
        sq += g
            .sqr()?
            .sum_all()?
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()?;
    }
    let norm = sq.sqrt();
    if max_norm > 0.0 && norm > max_norm {
        let c = max_norm / (norm + 1e-6);
        for g in grads.iter_mut() {
            *g = (&*g * c)?;
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod schedule_tests {
    use super::*;

    #[test]
    fn warmup_then_cosine_and_clipping() {
        assert_eq!(warmup_cosine(0, 100, 10, 1.0, 0.0, 0.0), 0.0);
        assert!((warmup_cosine(5, 100, 10, 1.0, 0.0, 0.0) - 0.5).abs() < 1e-12);
        assert!((warmup_cosine(10, 100, 10, 1.0, 0.0, 0.0) - 1.0).abs() < 1e-12);
        assert!((warmup_cosine(55, 100, 10, 1.0, 0.0, 0.0) - 0.5).abs() < 1e-12);
        assert!(warmup_cosine(100, 100, 10, 1.0, 0.0, 0.01) - 0.01 < 1e-12);
        let dev = candle_core::Device::Cpu;
        let mut g = vec![
            Tensor::from_slice(&[3.0f32], 1, &dev).unwrap(),
            Tensor::from_slice(&[4.0f32], 1, &dev).unwrap(),
        ];
        let n = clip_grad_norm(&mut g, 1.0).unwrap();
        assert!((n - 5.0).abs() < 1e-9);
        let a = g[0].to_vec1::<f32>().unwrap()[0];
        assert!((a - 0.6).abs() < 1e-5, "{a}");
        let n2 = clip_grad_norm(&mut g, 10.0).unwrap();
        assert!((n2 - 1.0).abs() < 1e-4);
    }
}
