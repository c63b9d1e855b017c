//! SASRec as the LLaRA/iLoRA code uses it (llmrec-seeds.md §3.1), which differs from Kang &
//! McAuley's: one block, one head, queries from `LN(x)` but keys/values from the
//! un-normalised `x`, scores scaled by `1/√d` (the hidden size), a residual from the
//! normalised queries, a position-wise FFN with its own residual LayerNorm, a final LayerNorm,
//! and a full-catalogue output layer with bias. Keys at padding are masked (the
//! `−2³²+1` additive mask of the reference is `−∞` here: identical after softmax).

use candle_core::{Device, Tensor};

use crate::Result;
use crate::seqrec::{
    DropRng, ParamSet, SeqConfig, SeqModel, filled, gather_last, pad_mask, var, zeros,
};
use rudder_nn::init;
use rudder_nn::ops::{dropout, layer_norm, softmax};

pub struct SasRec {
    pub n_items: usize,
    cfg: SeqConfig,
    p: ParamSet,
}

const LN_EPS: f64 = 1e-8;

impl SasRec {
    pub fn new(n_items: usize, cfg: &SeqConfig) -> Result<SasRec> {
        let d = cfg.hidden;
        let mut p = ParamSet::new(n_items, d, cfg.seed)?;
        p.add(
            "pos_emb",
            var(init::normal(
                cfg.window,
                d,
                0.01,
                cfg.seed,
                2,
                &Device::Cpu,
            )?)?,
        );
        for (k, name) in ["wq", "wk", "wv", "ff1", "ff2"].iter().enumerate() {
            p.add_linear(name, d, d, 10 + k as u64)?;
        }
        for name in ["ln1", "ln2", "ln_ff", "ln3"] {
            p.add(format!("{name}.weight"), filled(&[d], 1.0)?);
            p.add(format!("{name}.bias"), zeros(&[d])?);
        }
        p.add_linear("out", n_items, d, 20)?;
        Ok(SasRec {
            n_items,
            cfg: cfg.clone(),
            p,
        })
    }

    fn ln(&self, x: &Tensor, name: &str) -> Result<Tensor> {
        Ok(layer_norm(
            x,
            self.p.get(&format!("{name}.weight")).as_tensor(),
            self.p.get(&format!("{name}.bias")).as_tensor(),
            LN_EPS,
        )?)
    }
}

fn drop(x: &Tensor, p: f64, rng: &mut DropRng) -> Result<Tensor> {
    Ok(match rng {
        Some(r) => dropout(x, p, *r)?,
        None => x.clone(),
    })
}

impl SeqModel for SasRec {
    fn encode(&self, seq: &Tensor, lens: &[usize], mut rng: DropRng) -> Result<Tensor> {
        let (b, l) = seq.dims2()?;
        let d = self.cfg.hidden;
        let pd = self.cfg.dropout;
        let mask = pad_mask(seq, self.n_items as u32)?; // [B, L, 1]
        let e = self
            .p
            .embed(seq)?
            .broadcast_add(&self.p.get("pos_emb").as_tensor().unsqueeze(0)?)?;
        let x = drop(&e, pd, &mut rng)?.broadcast_mul(&mask)?;
        let qin = self.ln(&x, "ln1")?;
        let q = self.p.linear(&qin, "wq")?;
        let k = self.p.linear(&x, "wk")?;
        let v = self.p.linear(&x, "wv")?;
        let scores = (q.matmul(&k.t()?)? / (d as f64).sqrt())?; // [B, L, L]
        // causal mask and key-padding mask
        let keys = mask.flatten_all()?.to_vec1::<f32>()?;
        let mut add = vec![0f32; b * l * l];
        for r in 0..b {
            for i in 0..l {
                for j in 0..l {
                    if j > i || keys[r * l + j] == 0.0 {
                        add[(r * l + i) * l + j] = f32::NEG_INFINITY;
                    }
                }
            }
        }
        // a query whose keys are all masked (a padding row at position 0) attends to itself
        for r in 0..b {
            for i in 0..l {
                let row = &mut add[(r * l + i) * l..(r * l + i + 1) * l];
                if row.iter().all(|v| v.is_infinite()) {
                    row[i] = 0.0;
                }
            }
        }
        let scores = scores.broadcast_add(&Tensor::from_vec(add, (b, l, l), &Device::Cpu)?)?;
        let att = drop(&softmax(&scores)?, pd, &mut rng)?;
        let a = (att.matmul(&v)? + &qin)?;
        let z = self.ln(&a, "ln2")?;
        let f = self.p.linear(&self.p.linear(&z, "ff1")?.relu()?, "ff2")?;
        let f = drop(&f, pd, &mut rng)?;
        let f = self.ln(&(f + &z)?, "ln_ff")?;
        let h = self.ln(&f.broadcast_mul(&mask)?, "ln3")?;
        gather_last(&h, lens)
    }

    fn param_set(&self) -> &ParamSet {
        &self.p
    }
}
