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

impl SeqScore {
    /// From per-token log-probabilities (summed in f64).
    pub fn new(token_logprobs: Vec<f32>) -> Self {
        SeqScore {
            sum_logprob: token_logprobs.iter().map(|&x| x as f64).sum(),
            token_logprobs,
        }
    }
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

/// Prompt columns read per forward pass by [`branch_logprobs`].
const PROMPT_CHUNK: usize = 512;
/// Branch rows run at once by [`branch_logprobs`].
const BRANCH_GROUP: usize = 8;

/// Per-token log-probabilities of several continuations of each prompt, computing each prompt
/// once: the prompts run as one left-padded batch, their caches are shared by every branch,
/// and the branches (right-padded) run as one more batch. Returns the flat tensor
/// `[Σ_i Σ_j len(branches[i][j])]` in (prompt, branch, token) order; the values equal
/// [`continuation_logprobs`] of each `(prompt, branch)` pair, and with a differentiable
/// decoder the gradients of all branches meet in the shared prompt activations.
pub fn branch_logprobs(
    dec: &Decoder,
    prompts: &[Vec<u32>],
    branches: &[Vec<Vec<u32>>],
    pad_id: u32,
    hook: &mut dyn Hook,
) -> Result<Tensor> {
    if prompts.len() != branches.len() {
        return Err(LmError::Config(format!(
            "{} prompts but {} branch lists",
            prompts.len(),
            branches.len()
        )));
    }
    for (i, (p, bs)) in prompts.iter().zip(branches).enumerate() {
        if p.is_empty() || bs.is_empty() || bs.iter().any(|b| b.is_empty()) {
            return Err(LmError::Config(format!(
                "prompt {i}: prompt, branch list and every branch must be non-empty"
            )));
        }
    }
    let (ids, pads) = left_pad(prompts, pad_id)?;
    let (b, tp) = ids.dims2()?;
    let mut cache = dec.new_cache(pads);
    // The prompts are read in chunks: one pass over a long prompt would materialise its whole
    // attention matrix (heads × tp × tp; 0.7 GB per layer at 4k tokens).
    cache.prompt_cols = tp;
    let mut hp = None;
    let mut start = 0;
    while start < tp {
        let n = PROMPT_CHUNK.min(tp - start);
        hp = Some(dec.forward(&ids.narrow(1, start, n)?, &mut cache, Phase::Prefill, hook)?);
        start += n;
    }
    let hp = hp.expect("a non-empty prompt");
    let tp = hp.dim(1)?;
    let d = hp.dim(D::Minus1)?;
    let mut rows = Vec::new();
    for (i, bs) in branches.iter().enumerate() {
        rows.extend(std::iter::repeat_n(i as u32, bs.len()));
    }
    let nb = rows.len();
    let lmax = branches
        .iter()
        .flatten()
        .map(|x| x.len())
        .max()
        .unwrap_or(1);
    // The last token of a branch is only a target; the inputs are tokens 0..len-1.
    let width = (lmax - 1).max(1);
    let mut flat = Vec::with_capacity(nb * width);
    for x in branches.iter().flatten() {
        let inp = &x[..x.len() - 1];
        flat.extend_from_slice(inp);
        flat.extend(std::iter::repeat_n(pad_id, width - inp.len()));
    }
    let hb = if lmax > 1 {
        // Branches run in groups: each row of a group holds its own copy of the prompt's cache
        // (about 200 MB per row for a 4k-token prompt of a 135M model).
        let mut outs = Vec::new();
        for g in (0..nb).step_by(BRANCH_GROUP) {
            let n = BRANCH_GROUP.min(nb - g);
            let mut bc = cache.expand_rows(&rows[g..g + n])?;
            let bid = Tensor::from_vec(
                flat[g * width..(g + n) * width].to_vec(),
                (n, width),
                &Device::Cpu,
            )?;
            outs.push(
                dec.forward(&bid, &mut bc, Phase::Prefill, hook)?
                    .reshape((n * width, d))?,
            );
        }
        Some(Tensor::cat(&outs, 0)?)
    } else {
        None
    };
    // Token 0 of every branch is predicted by its prompt's last column; token k ≥ 1 by the
    // branch's column k-1.
    let last = hp.narrow(1, tp - 1, 1)?.reshape((b, d))?;
    let mut parts = Vec::new();
    let mut targets = Vec::new();
    let mut r = 0usize;
    for (i, bs) in branches.iter().enumerate() {
        for x in bs {
            parts.push(last.narrow(0, i, 1)?);
            if let Some(hb) = &hb
                && x.len() > 1
            {
                parts.push(hb.narrow(0, r * width, x.len() - 1)?);
            }
            targets.extend_from_slice(x);
            r += 1;
        }
    }
    let sel = Tensor::cat(&parts, 0)?;
    let n = targets.len();
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
            out.push(SeqScore::new(lp[o..o + c.len()].to_vec()));
            o += c.len();
        }
    }
    Ok(out)
}

/// [`score`], computing each distinct prompt once: pairs that share their prompt run as
/// branches of one prefix cache ([`branch_logprobs`]), the rest in batches of `batch`. Values
/// equal [`score`]'s. Used when choices are read from log-probabilities (several answers to
/// one question); a hook sees the prompt and the branches as two passes, so callers with
/// position-selected interventions use [`score`].
pub fn score_shared(
    dec: &Decoder,
    pairs: &[(Vec<u32>, Vec<u32>)],
    pad_id: u32,
    batch: usize,
    hook: &mut dyn Hook,
) -> Result<Vec<SeqScore>> {
    let mut groups: Vec<(&[u32], Vec<usize>)> = Vec::new();
    let mut at: std::collections::HashMap<&[u32], usize> = std::collections::HashMap::new();
    for (k, (p, c)) in pairs.iter().enumerate() {
        if p.is_empty() || c.is_empty() {
            // let `score` report it
            return score(dec, pairs, pad_id, batch, hook);
        }
        let g = *at.entry(p.as_slice()).or_insert_with(|| {
            groups.push((p.as_slice(), Vec::new()));
            groups.len() - 1
        });
        groups[g].1.push(k);
    }
    let mut out: Vec<Option<SeqScore>> = vec![None; pairs.len()];
    let mut singles = Vec::new();
    for (prompt, idx) in &groups {
        if idx.len() < 2 {
            singles.extend(idx.iter().copied());
            continue;
        }
        let branches: Vec<Vec<u32>> = idx.iter().map(|&k| pairs[k].1.clone()).collect();
        let lp = branch_logprobs(dec, &[prompt.to_vec()], &[branches], pad_id, hook)?
            .to_vec1::<f32>()?;
        let mut o = 0;
        for &k in idx {
            let n = pairs[k].1.len();
            out[k] = Some(SeqScore::new(lp[o..o + n].to_vec()));
            o += n;
        }
    }
    if !singles.is_empty() {
        let sp: Vec<(Vec<u32>, Vec<u32>)> = singles.iter().map(|&k| pairs[k].clone()).collect();
        for (k, s) in singles
            .into_iter()
            .zip(score(dec, &sp, pad_id, batch, hook)?)
        {
            out[k] = Some(s);
        }
    }
    Ok(out
        .into_iter()
        .map(|s| s.expect("every pair scored"))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Arch;
    use crate::fixtures::{TinySpec, write_hf_dir};
    use crate::hooks::NoHook;
    use crate::loader::{LoadOptions, load};

    #[test]
    fn score_shared_equals_score_in_input_order() {
        let d = tempfile::tempdir().unwrap();
        write_hf_dir(d.path(), &TinySpec::new(Arch::Llama)).unwrap();
        let lm = load(d.path(), &LoadOptions::default()).unwrap();
        let p1 = vec![5u32, 9, 14, 22, 31];
        let p2 = vec![40u32, 41];
        // interleaved groups and a single
        let pairs = vec![
            (p1.clone(), vec![7u32, 8, 9]),
            (p2.clone(), vec![11u32]),
            (p1.clone(), vec![60u32]),
            (vec![3u32, 3, 3], vec![2u32, 2]),
            (p1.clone(), vec![3u32, 4]),
            (p2.clone(), vec![12u32, 13, 14, 15]),
        ];
        let a = score(&lm.decoder, &pairs, 0, 8, &mut NoHook).unwrap();
        let b = score_shared(&lm.decoder, &pairs, 0, 8, &mut NoHook).unwrap();
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x.token_logprobs.len(), y.token_logprobs.len());
            assert!(
                (x.sum_logprob - y.sum_logprob).abs() < 1e-4 * (1.0 + x.sum_logprob.abs()),
                "{} vs {}",
                x.sum_logprob,
                y.sum_logprob
            );
        }
        assert!(score_shared(&lm.decoder, &[(vec![], vec![1])], 0, 8, &mut NoHook).is_err());
    }

    #[test]
    fn shared_prefix_branches_equal_separate_pairs_values_and_gradients() {
        let d = tempfile::tempdir().unwrap();
        write_hf_dir(d.path(), &TinySpec::new(Arch::Llama)).unwrap();
        let mut lm = load(d.path(), &LoadOptions::default()).unwrap();
        let ad = lm
            .decoder
            .attach_lora(
                &crate::lora::LoraConfig {
                    dropout: 0.0,
                    ..Default::default()
                },
                1,
            )
            .unwrap();
        for (_, v) in &ad.params {
            v.set(&(v.as_tensor().ones_like().unwrap() * 0.05).unwrap())
                .unwrap();
        }
        ad.set_training(true); // dropout is 0: only gradients are switched on
        let prompts = vec![vec![5u32, 9, 14, 22, 31], vec![40u32, 41]];
        let branches = vec![
            vec![vec![7u32, 8, 9], vec![60u32], vec![3u32, 4]],
            vec![vec![11u32, 12, 13, 14], vec![2u32]],
        ];
        let mut pairs = Vec::new();
        for (p, bs) in prompts.iter().zip(&branches) {
            for b in bs {
                pairs.push((p.clone(), b.clone()));
            }
        }
        for differentiable in [false, true] {
            lm.decoder.differentiable = differentiable;
            let a = branch_logprobs(&lm.decoder, &prompts, &branches, 0, &mut NoHook).unwrap();
            let b = continuation_logprobs(&lm.decoder, &pairs, 0, &mut NoHook).unwrap();
            let (va, vb) = (a.to_vec1::<f32>().unwrap(), b.to_vec1::<f32>().unwrap());
            assert_eq!(va.len(), 11);
            for (x, y) in va.iter().zip(&vb) {
                assert!((x - y).abs() < 5e-5 * (1.0 + y.abs()), "{va:?} vs {vb:?}");
            }
            if differentiable {
                let ga = a.sum_all().unwrap().backward().unwrap();
                let gb = b.sum_all().unwrap().backward().unwrap();
                for (n, v) in &ad.params {
                    let x = ga.get(v.as_tensor()).unwrap();
                    let y = gb.get(v.as_tensor()).unwrap();
                    let diff = rudder_nn::grad::max_abs(&(x - y).unwrap());
                    let m = rudder_nn::grad::max_abs(y);
                    assert!(diff <= 1e-3 * m.max(1e-3), "{n}: {diff} vs {m}");
                }
            }
        }
    }

    #[test]
    fn long_prompts_read_in_chunks_score_as_one_pass() {
        let d = tempfile::tempdir().unwrap();
        let mut spec = TinySpec::new(Arch::Llama);
        spec.context = 4096;
        write_hf_dir(d.path(), &spec).unwrap();
        let lm = load(d.path(), &LoadOptions::default()).unwrap();
        // two prompts of different lengths (left padding), both longer than one chunk
        let p1: Vec<u32> = (0..1300u32).map(|i| 3 + (i * 7) % 90).collect();
        let p2: Vec<u32> = (0..700u32).map(|i| 5 + (i * 11) % 80).collect();
        let branches = vec![vec![vec![7u32, 8, 9], vec![60u32]], vec![vec![2u32, 4]]];
        let pairs = vec![
            (p1.clone(), vec![7u32, 8, 9]),
            (p1.clone(), vec![60u32]),
            (p2.clone(), vec![2u32, 4]),
        ];
        let a = branch_logprobs(&lm.decoder, &[p1, p2], &branches, 0, &mut NoHook)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let b = continuation_logprobs(&lm.decoder, &pairs, 0, &mut NoHook)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(a.len(), 6);
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-4 * (1.0 + y.abs()), "{a:?} vs {b:?}");
        }
    }
}
