//! Adam with PyTorch semantics (bias correction, eps outside the square root, optional L2
//! weight decay added to the gradient) and AdamW (decoupled decay), over parameter groups.

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};

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
        AdamConfig { lr, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0, decoupled: false }
    }
    pub fn adamw(lr: f64, weight_decay: f64) -> Self {
        AdamConfig { weight_decay, decoupled: true, ..Self::adam(lr) }
    }
}

struct Group {
    cfg: AdamConfig,
    params: Vec<(Var, Tensor, Tensor)>, // param, m, v
}

/// Adam over one or more parameter groups, each with its own settings.
pub struct Adam {
    groups: Vec<Group>,
    step: u64,
}

impl Adam {
    pub fn new(params: Vec<Var>, cfg: AdamConfig) -> Result<Adam> {
        let mut a = Adam { groups: Vec::new(), step: 0 };
        a.add_group(params, cfg)?;
        Ok(a)
    }

    pub fn add_group(&mut self, params: Vec<Var>, cfg: AdamConfig) -> Result<()> {
        let params = params
            .into_iter()
            .map(|p| {
                let z = p.as_tensor().zeros_like()?;
                Ok((p, z.clone(), z))
            })
            .collect::<Result<Vec<_>>>()?;
        self.groups.push(Group { cfg, params });
        Ok(())
    }

    pub fn set_lr(&mut self, lr: f64) {
        for g in &mut self.groups {
            g.cfg.lr = lr;
        }
    }

    pub fn steps(&self) -> u64 {
        self.step
    }

    /// One update from the gradients in `grads`; parameters without a gradient are treated
    /// as having a zero gradient (their moments still decay, as in PyTorch with dense grads).
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        for g in &mut self.groups {
            let c = g.cfg;
            let bc1 = 1.0 - c.beta1.powi(t);
            let bc2 = 1.0 - c.beta2.powi(t);
            for (p, m, v) in &mut g.params {
                let theta = p.as_tensor();
                let mut grad = match grads.get(theta) {
                    Some(gr) => gr.clone(),
                    None => theta.zeros_like()?,
                };
                if c.weight_decay != 0.0 && !c.decoupled {
                    grad = (grad + theta.affine(c.weight_decay, 0.0)?)?;
                }
                *m = (m.affine(c.beta1, 0.0)? + grad.affine(1.0 - c.beta1, 0.0)?)?;
                *v = (v.affine(c.beta2, 0.0)? + grad.sqr()?.affine(1.0 - c.beta2, 0.0)?)?;
                let denom = v.affine(1.0 / bc2, 0.0)?.sqrt()?.affine(1.0, c.eps)?;
                let upd = m.affine(c.lr / bc1, 0.0)?.div(&denom)?;
                let base = if c.weight_decay != 0.0 && c.decoupled {
                    theta.affine(1.0 - c.lr * c.weight_decay, 0.0)?
                } else {
                    theta.clone()
                };
                p.set(&(base - upd)?)?;
            }
        }
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
        assert!((v[0] - 0.9).abs() < 1e-6 && (v[1] + 1.9).abs() < 1e-6, "{v:?}");
        // second step, hand-computed with bias correction
        let g = p.as_tensor().sqr()?.sum_all()?.backward()?;
        opt.step(&g)?;
        let (g1, g2) = (2.0f64, 1.8f64);
        let m = 0.9 * 0.1 * g1 + 0.1 * g2;
        let vv = 0.999 * 0.001 * g1 * g1 + 0.001 * g2 * g2;
        let want = 0.9 - 0.1 * (m / (1.0 - 0.81)) / ((vv / (1.0 - 0.999f64.powi(2))).sqrt() + 1e-8);
        let v = p.as_tensor().to_vec1::<f32>()?;
        assert!((v[0] as f64 - want).abs() < 1e-6, "{} vs {want}", v[0]);
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
