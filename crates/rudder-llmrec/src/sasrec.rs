//! SASRec as the LLaRA/iLoRA code uses it (llmrec-seeds.md §3.1), which differs from Kang &
//! McAuley's: one block, one head, queries from `LN(x)` but keys/values from the
//! un-normalised `x`, scores scaled by `1/√d` (the hidden size), a residual from the
//! normalised queries, a position-wise FFN with its own residual LayerNorm, a final LayerNorm,
//! and a full-catalogue output layer with bias. Keys at padding are masked (the
//! `−2³²+1` additive mask of the reference is `−∞` here: identical after softmax).

use candle_core::{Device, Tensor, Var};

use crate::seqrec::{DropRng, SeqConfig, SeqModel, filled, gather_last, linear, pad_mask, var, zeros};
use crate::Result;
use rudder_nn::init;
use rudder_nn::ops::{dropout, layer_norm, softmax};

pub struct SasRec {
    pub n_items: usize,
    cfg: SeqConfig,
    emb: Var,
    pos: Var,
    p: Vec<(String, Var)>,
}

const LN_EPS: f64 = 1e-8;

impl SasRec {
    pub fn new(n_items: usize, cfg: &SeqConfig) -> Result<SasRec> {
        let (d, l, s, dev) = (cfg.hidden, cfg.window, cfg.seed, &Device::Cpu);
        let emb = var(init::normal(n_items + 1, d, 0.01, s, 1, dev)?)?;
        let pos = var(init::normal(l, d, 0.01, s, 2, dev)?)?;
        let mut p: Vec<(String, Var)> = Vec::new();
        for (k, name) in ["wq", "wk", "wv", "ff1", "ff2"].iter().enumerate() {
            let (w, b) = init::linear_uniform(d, d, s, 10 + k as u64, dev)?;
            p.push((format!("{name}.weight"), var(w)?));
            p.push((format!("{name}.bias"), var(b)?));
        }
        for name in ["ln1", "ln2", "ln_ff", "ln3"] {
            p.push((format!("{name}.weight"), filled(&[d], 1.0)?));
            p.push((format!("{name}.bias"), zeros(&[d])?));
        }
        let (w, b) = init::linear_uniform(n_items, d, s, 20, dev)?;
        p.push(("out.weight".into(), var(w)?));
        p.push(("out.bias".into(), var(b)?));
        Ok(SasRec {
            n_items,
            cfg: cfg.clone(),
            emb,
            pos,
            p,
        })
    }

    fn get(&self, name: &str) -> &Var {
        &self.p.iter().find(|(n, _)| n == name).expect("parameter").1
    }

    fn ln(&self, x: &Tensor, name: &str) -> Result<Tensor> {
        Ok(layer_norm(
            x,
            self.get(&format!("{name}.weight")).as_tensor(),
            self.get(&format!("{name}.bias")).as_tensor(),
            LN_EPS,
        )?)
    }

    fn lin(&self, x: &Tensor, name: &str) -> Result<Tensor> {
        linear(
            x,
            self.get(&format!("{name}.weight")),
            self.get(&format!("{name}.bias")),
        )
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
            .emb
            .as_tensor()
            .index_select(&seq.flatten_all()?, 0)?
            .reshape((b, l, d))?
            .broadcast_add(&self.pos.as_tensor().unsqueeze(0)?)?;
        let x = drop(&e, pd, &mut rng)?.broadcast_mul(&mask)?;
        let qin = self.ln(&x, "ln1")?;
        let q = self.lin(&qin, "wq")?;
        let k = self.lin(&x, "wk")?;
        let v = self.lin(&x, "wv")?;
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
        let f = self.lin(&self.lin(&z, "ff1")?.relu()?, "ff2")?;
        let f = drop(&f, pd, &mut rng)?;
        let f = self.ln(&(f + &z)?, "ln_ff")?;
        let h = self.ln(&f.broadcast_mul(&mask)?, "ln3")?;
        gather_last(&h, lens)
    }

    fn head(&self) -> (&Var, &Var) {
        (self.get("out.weight"), self.get("out.bias"))
    }

    fn params(&self) -> Vec<(String, Var)> {
        let mut v = vec![
            ("item_emb".to_string(), self.emb.clone()),
            ("pos_emb".to_string(), self.pos.clone()),
        ];
        v.extend(self.p.iter().cloned());
        v
    }

    fn item_embeddings(&self) -> &Var {
        &self.emb
    }
}
