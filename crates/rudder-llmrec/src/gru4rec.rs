//! GRU4Rec as in the LLaRA/DROS code (llmrec-seeds.md §3.2): item embeddings (N(0, 0.01)), one
//! GRU layer d → d over the history, the hidden state after the last real item, and a
//! full-catalogue output layer. PyTorch's GRU equations and initialisation
//! (U(±1/√d) for every weight and bias):
//! `r = σ(W_ir x + b_ir + W_hr h + b_hr)`, `z = σ(W_iz x + b_iz + W_hz h + b_hz)`,
//! `n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn))`, `h' = (1 − z) ⊙ n + z ⊙ h`.

use candle_core::{D, Device, Tensor};

use crate::Result;
use crate::seqrec::{DropRng, ParamSet, SeqConfig, SeqModel, gather_last};

pub struct Gru4Rec {
    cfg: SeqConfig,
    p: ParamSet,
}

impl Gru4Rec {
    pub fn new(n_items: usize, cfg: &SeqConfig) -> Result<Gru4Rec> {
        let d = cfg.hidden;
        let mut p = ParamSet::new(n_items, d, cfg.seed)?;
        p.add_linear("gru.ih", 3 * d, d, 30)?;
        p.add_linear("gru.hh", 3 * d, d, 31)?;
        p.add_linear("out", n_items, d, 20)?;
        Ok(Gru4Rec {
            cfg: cfg.clone(),
            p,
        })
    }
}

/// σ(x) = 1 / (1 + e^{−x}), differentiable.
fn sigmoid(x: &Tensor) -> Result<Tensor> {
    Ok((x.neg()?.exp()? + 1.0)?.recip()?)
}

impl SeqModel for Gru4Rec {
    fn encode(&self, seq: &Tensor, lens: &[usize], _rng: DropRng) -> Result<Tensor> {
        let (b, l) = seq.dims2()?;
        let d = self.cfg.hidden;
        let gi = self.p.linear(&self.p.embed(seq)?, "gru.ih")?; // [B, L, 3d]
        let mut h = Tensor::zeros((b, d), candle_core::DType::F32, &Device::Cpu)?;
        let mut outs = Vec::with_capacity(l);
        let part = |t: &Tensor, k: usize| t.narrow(D::Minus1, k * d, d);
        for t in 0..l {
            let git = gi.narrow(1, t, 1)?.squeeze(1)?;
            let gh = self.p.linear(&h, "gru.hh")?;
            let r = sigmoid(&(part(&git, 0)? + part(&gh, 0)?)?)?;
            let z = sigmoid(&(part(&git, 1)? + part(&gh, 1)?)?)?;
            let n = (part(&git, 2)? + (r * part(&gh, 2)?)?)?.tanh()?;
            h = ((z.affine(-1.0, 1.0)? * n)? + (z * &h)?)?;
            outs.push(h.clone());
        }
        gather_last(&Tensor::stack(&outs, 1)?, lens)
    }
    fn param_set(&self) -> &ParamSet {
        &self.p
    }
}
