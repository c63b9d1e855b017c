//! Sequence scoring: log-probabilities of a continuation given a prompt, summed and per token,
//! batched. This is exactly what the DPO-family losses need; with a differentiable decoder the
//! returned tensor carries gradients.

use candle_core::{D, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::decoder::Decoder;
use crate::generate::left_pad;
use crate::hooks::{Hook, Phase};
use crate::{LmError, Result};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SeqScore {
    pub sum_logprob: f64,
    pub token_logprobs: Vec<f32>,
}

/// Per-token log-probabilities of each continuation, as one flat tensor `[Σ len(cont)]` in row
/// order (differentiable when the decoder is).
pub fn continuation_logprobs(
    dec: &Decoder,
    pairs: &[(Vec<u32>, Vec<u32>)],
    pad_id: u32,
    hook: &mut dyn Hook,
) -> Result<Tensor> {
    let seqs: Vec<Vec<u32>> = pairs
        .iter()
        .enumerate()
        .map(|(i, (p, c))| {
            if p.is_empty() || c.is_empty() {
                Err(LmError::Config(format!(
                    "pair {i}: prompt and continuation must both be non-empty"
                )))
            } else {
                Ok([p.as_slice(), c.as_slice()].concat())
            }
        })
        .collect::<Result<_>>()?;
    let (ids, pads) = left_pad(&seqs, pad_id)?;
    let (b, t) = ids.dims2()?;
    let mut cache = dec.new_cache(pads);
    let h = dec.forward(&ids, &mut cache, Phase::Prefill, hook)?;
    let d = h.dim(D::Minus1)?;
    // Column j predicts token j+1: continuation tokens occupy the last len(c) columns.
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    for (r, (_, c)) in pairs.iter().enumerate() {
        for (k, &tok) in c.iter().enumerate() {
            rows.push((r * t + t - c.len() - 1 + k) as u32);
            targets.push(tok);
        }
    }
    let n = rows.len();
    let sel = h
        .reshape((b * t, d))?
        .index_select(&Tensor::from_vec(rows, n, &Device::Cpu)?, 0)?;
    let logp = rudder_nn::ops::log_softmax(&dec.logits(&sel)?)?;
    let tgt = Tensor::from_vec(targets, (n, 1), &Device::Cpu)?;
    Ok(logp.gather(&tgt, 1)?.squeeze(1)?)
}

/// Score `(prompt, continuation)` id pairs in batches of `batch`.
pub fn score(
    dec: &Decoder,
    pairs: &[(Vec<u32>, Vec<u32>)],
    pad_id: u32,
    batch: usize,
    hook: &mut dyn Hook,
) -> Result<Vec<SeqScore>> {
    let mut out = Vec::with_capacity(pairs.len());
    for chunk in pairs.chunks(batch.max(1)) {
        let lp = continuation_logprobs(dec, chunk, pad_id, hook)?.to_vec1::<f32>()?;
        let mut o = 0;
        for (_, c) in chunk {
            let v = lp[o..o + c.len()].to_vec();
            o += c.len();
            out.push(SeqScore {
                sum_logprob: v.iter().map(|&x| x as f64).sum(),
                token_logprobs: v,
            });
        }
    }
    Ok(out)
}
