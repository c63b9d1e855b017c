//! Caser as in the LLaRA/DROS code (llmrec-seeds.md §3.2): the history's embedding matrix
//! `E [L, d]` (padding rows zeroed) read by horizontal filters of heights {2, 3, 4} (16 each,
//! spanning the full width d, ReLU, max-pooled over time) and one vertical filter (a weighted
//! sum over the L positions, ReLU), concatenated (3·16 + d = 112 features), dropout, and a
//! full-catalogue output layer. Filters: Xavier-normal weights, bias 0.1. Convolutions over a
//! full-width kernel are window matmuls here, which is the same arithmetic.

use candle_core::{Device, Tensor, Var};

use crate::seqrec::{DropRng, SeqConfig, SeqModel, filled, linear, pad_mask, var};
use crate::Result;
use rudder_nn::init;
use rudder_nn::ops::dropout;

pub struct Caser {
    pub n_items: usize,
    cfg: SeqConfig,
    emb: Var,
    p: Vec<(String, Var)>,
}

impl Caser {
    pub fn new(n_items: usize, cfg: &SeqConfig) -> Result<Caser> {
        let (d, l, f, s, dev) = (cfg.hidden, cfg.window, cfg.caser_filters, cfg.seed, &Device::Cpu);
        let emb = var(init::normal(n_items + 1, d, 0.01, s, 1, dev)?)?;
        let mut p = Vec::new();
        for &h in &cfg.caser_heights {
            if h == 0 || h > l {
                return Err(crate::LlmrecError::Config(format!(
                    "Caser filter height {h} must be in 1..={l} (the window)"
                )));
            }
            let std = (2.0 / (h * d + f * h * d) as f64).sqrt();
            p.push((format!("conv_h{h}.weight"), var(init::normal(f, h * d, std, s, 40 + h as u64, dev)?)?));
            p.push((format!("conv_h{h}.bias"), filled(&[f], 0.1)?));
        }
        let std = (2.0 / (2 * l) as f64).sqrt();
        p.push(("conv_v.weight".into(), var(init::normal(1, l, std, s, 50, dev)?)?));
        p.push(("conv_v.bias".into(), filled(&[1], 0.1)?));
        let feat = f * cfg.caser_heights.len() + d;
        let (w, b) = init::linear_uniform(n_items, feat, s, 20, dev)?;
        p.push(("out.weight".into(), var(w)?));
        p.push(("out.bias".into(), var(b)?));
        Ok(Caser {
            n_items,
            cfg: cfg.clone(),
            emb,
            p,
        })
    }

    fn get(&self, name: &str) -> &Var {
        &self.p.iter().find(|(n, _)| n == name).expect("parameter").1
    }
}

impl SeqModel for Caser {
    fn encode(&self, seq: &Tensor, _lens: &[usize], rng: DropRng) -> Result<Tensor> {
        let (b, l) = seq.dims2()?;
        let d = self.cfg.hidden;
        let e = self
            .emb
            .as_tensor()
            .index_select(&seq.flatten_all()?, 0)?
            .reshape((b, l, d))?
            .broadcast_mul(&pad_mask(seq, self.n_items as u32)?)?;
        let mut feats = Vec::new();
        for &h in &self.cfg.caser_heights {
            let windows: Vec<Tensor> = (0..=l - h)
                .map(|t| e.narrow(1, t, h).and_then(|w| w.reshape((b, h * d))))
                .collect::<candle_core::Result<_>>()?;
            let win = Tensor::stack(&windows, 1)?; // [B, L-h+1, h·d]
            let c = linear(&win, self.get(&format!("conv_h{h}.weight")), self.get(&format!("conv_h{h}.bias")))?
                .relu()?;
            feats.push(c.max(1)?); // [B, F]
        }
        // vertical: Σ_t w_t E[t, :] + b
        let w = self.get("conv_v.weight").as_tensor(); // [1, L]
        let v = w
            .broadcast_matmul(&e)? // [B, 1, d]
            .squeeze(1)?
            .broadcast_add(self.get("conv_v.bias").as_tensor())?
            .relu()?;
        feats.push(v);
        let z = Tensor::cat(&feats, 1)?;
        Ok(match rng {
            Some(r) => dropout(&z, self.cfg.dropout, r)?,
            None => z,
        })
    }

    fn head(&self) -> (&Var, &Var) {
        (self.get("out.weight"), self.get("out.bias"))
    }

    fn params(&self) -> Vec<(String, Var)> {
        let mut v = vec![("item_emb".to_string(), self.emb.clone())];
        v.extend(self.p.iter().cloned());
        v
    }

    fn item_embeddings(&self) -> &Var {
        &self.emb
    }
}
