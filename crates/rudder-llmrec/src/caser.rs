//! Caser as in the LLaRA/DROS code (llmrec-seeds.md §3.2): the history's embedding matrix
//! `E [L, d]` (padding rows zeroed) read by horizontal filters of heights {2, 3, 4} (16 each,
//! spanning the full width d, ReLU, max-pooled over time) and one vertical filter (a weighted
//! sum over the L positions, ReLU), concatenated (3·16 + d = 112 features), dropout, and a
//! full-catalogue output layer. Filters: Xavier-normal weights, bias 0.1. Convolutions over a
//! full-width kernel are window matmuls here, which is the same arithmetic.

use candle_core::{Device, Tensor};

use crate::Result;
use crate::seqrec::{DropRng, ParamSet, SeqConfig, SeqModel, filled, pad_mask, var};
use rudder_nn::init;
use rudder_nn::ops::dropout;

pub struct Caser {
    pub n_items: usize,
    cfg: SeqConfig,
    p: ParamSet,
}

impl Caser {
    pub fn new(n_items: usize, cfg: &SeqConfig) -> Result<Caser> {
        let (d, l, f, s, dev) = (
            cfg.hidden,
            cfg.window,
            cfg.caser_filters,
            cfg.seed,
            &Device::Cpu,
        );
        let mut p = ParamSet::new(n_items, d, s)?;
        for &h in &cfg.caser_heights {
            if h == 0 || h > l {
                return Err(crate::LlmrecError::Config(format!(
                    "Caser filter height {h} must be in 1..={l} (the window)"
                )));
            }
            let std = (2.0 / (h * d + f * h * d) as f64).sqrt();
            p.add(
                format!("conv_h{h}.weight"),
                var(init::normal(f, h * d, std, s, 40 + h as u64, dev)?)?,
            );
            p.add(format!("conv_h{h}.bias"), filled(&[f], 0.1)?);
        }
        let std = (2.0 / (2 * l) as f64).sqrt();
        p.add("conv_v.weight", var(init::normal(1, l, std, s, 50, dev)?)?);
        p.add("conv_v.bias", filled(&[1], 0.1)?);
        p.add_linear("out", n_items, f * cfg.caser_heights.len() + d, 20)?;
        Ok(Caser {
            n_items,
            cfg: cfg.clone(),
            p,
        })
    }
}

impl SeqModel for Caser {
    fn encode(&self, seq: &Tensor, _lens: &[usize], rng: DropRng) -> Result<Tensor> {
        let (b, l) = seq.dims2()?;
        let d = self.cfg.hidden;
        let e = self
            .p
            .embed(seq)?
            .broadcast_mul(&pad_mask(seq, self.n_items as u32)?)?;
        let mut feats = Vec::new();
        for &h in &self.cfg.caser_heights {
            let windows: Vec<Tensor> = (0..=l - h)
                .map(|t| e.narrow(1, t, h).and_then(|w| w.reshape((b, h * d))))
                .collect::<candle_core::Result<_>>()?;
            let win = Tensor::stack(&windows, 1)?; // [B, L-h+1, h·d]
            let c = self.p.linear(&win, &format!("conv_h{h}"))?.relu()?;
            feats.push(c.max(1)?); // [B, F]
        }
        // vertical: Σ_t w_t E[t, :] + b
        let v = self
            .p
            .get("conv_v.weight")
            .as_tensor()
            .broadcast_matmul(&e)? // [B, 1, d]
            .squeeze(1)?
            .broadcast_add(self.p.get("conv_v.bias").as_tensor())?
            .relu()?;
        feats.push(v);
        let z = Tensor::cat(&feats, 1)?;
        Ok(match rng {
            Some(r) => dropout(&z, self.cfg.dropout, r)?,
            None => z,
        })
    }
    fn param_set(&self) -> &ParamSet {
        &self.p
    }
}
