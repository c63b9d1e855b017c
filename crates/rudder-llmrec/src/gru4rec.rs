//! GRU4Rec as in the LLaRA/DROS code (llmrec-seeds.md §3.2): item embeddings (N(0, 0.01)), one
//! GRU layer d → d over the history, the hidden state after the last real item, and a
//! full-catalogue output layer. PyTorch's GRU equations and initialisation
//! (U(±1/√d) for every weight and bias):
//! `r = σ(W_ir x + b_ir + W_hr h + b_hr)`, `z = σ(W_iz x + b_iz + W_hz h + b_hz)`,
//! `n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn))`, `h' = (1 − z) ⊙ n + z ⊙ h`.

use candle_core::{D, Device, Tensor, Var};

use crate::seqrec::{DropRng, SeqConfig, SeqModel, gather_last, linear, var};
use crate::Result;
use rudder_nn::init;

pub struct Gru4Rec {
    pub n_items: usize,
    cfg: SeqConfig,
    emb: Var,
    p: Vec<(String, Var)>,
}

impl Gru4Rec {
    pub fn new(n_items: usize, cfg: &SeqConfig) -> Result<Gru4Rec> {
        let (d, s, dev) = (cfg.hidden, cfg.seed, &Device::Cpu);
        let emb = var(init::normal(n_items + 1, d, 0.01, s, 1, dev)?)?;
        let mut p = Vec::new();
        for (k, name) in ["ih", "hh"].iter().enumerate() {
            let (w, b) = init::linear_uniform(3 * d, d, s, 30 + k as u64, dev)?;
            p.push((format!("gru.{name}.weight"), var(w)?));
            p.push((format!("gru.{name}.bias"), var(b)?));
        }
        let (w, b) = init::linear_uniform(n_items, d, s, 20, dev)?;
        p.push(("out.weight".into(), var(w)?));
        p.push(("out.bias".into(), var(b)?));
        Ok(Gru4Rec {
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

impl SeqModel for Gru4Rec {
    fn encode(&self, seq: &Tensor, lens: &[usize], _rng: DropRng) -> Result<Tensor> {
        let (b, l) = seq.dims2()?;
        let d = self.cfg.hidden;
        let x = self
            .emb
            .as_tensor()
            .index_select(&seq.flatten_all()?, 0)?
            .reshape((b, l, d))?;
        let gi = linear(&x, self.get("gru.ih.weight"), self.get("gru.ih.bias"))?; // [B, L, 3d]
        let mut h = Tensor::zeros((b, d), candle_core::DType::F32, &Device::Cpu)?;
        let mut outs = Vec::with_capacity(l);
        for t in 0..l {
            let git = gi.narrow(1, t, 1)?.squeeze(1)?;
            let gh = linear(&h, self.get("gru.hh.weight"), self.get("gru.hh.bias"))?;
            let (ir, iz, inn) = (git.narrow(D::Minus1, 0, d)?, git.narrow(D::Minus1, d, d)?, git.narrow(D::Minus1, 2 * d, d)?);
            let (hr, hz, hn) = (gh.narrow(D::Minus1, 0, d)?, gh.narrow(D::Minus1, d, d)?, gh.narrow(D::Minus1, 2 * d, d)?);
            let r = candle_nn_sigmoid(&(ir + hr)?)?;
            let z = candle_nn_sigmoid(&(iz + hz)?)?;
            let n = (inn + (r * hn)?)?.tanh()?;
            h = ((z.affine(-1.0, 1.0)? * n)? + (z * &h)?)?;
            outs.push(h.clone());
        }
        let hs = Tensor::stack(&outs, 1)?; // [B, L, d]
        gather_last(&hs, lens)
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

/// σ(x) = 1 / (1 + e^{−x}), differentiable.
fn candle_nn_sigmoid(x: &Tensor) -> Result<Tensor> {
    Ok((x.neg()?.exp()? + 1.0)?.recip()?)
}
