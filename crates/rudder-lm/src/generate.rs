//! Batched generation with a KV cache: greedy, temperature, top-k, top-p, repetition penalty,
//! per-row seeded sampling, EOS and stop strings, and a streaming callback.

use candle_core::{Device, IndexOp, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::hooks::{Hook, Phase};
use crate::loader::LanguageModel;
use crate::{LmError, Result};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GenConfig {
    pub max_new_tokens: usize,
    /// 0 means greedy decoding.
    pub temperature: f32,
    /// Keep the k most likely tokens (0 = off).
    pub top_k: usize,
    /// Nucleus sampling mass (1 = off).
    pub top_p: f32,
    /// Hugging Face-style penalty on tokens already in the prompt or output (1 = off).
    pub repetition_penalty: f32,
    pub seed: u64,
    /// Generation stops when the text contains one of these; the text is cut before it.
    pub stop: Vec<String>,
    /// Keep going past EOS (benchmarks).
    pub ignore_eos: bool,
}

impl Default for GenConfig {
    fn default() -> Self {
        GenConfig {
            max_new_tokens: 128,
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: 0,
            stop: Vec::new(),
            ignore_eos: false,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Finish {
    Eos,
    Stop,
    Length,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Generation {
    pub prompt_tokens: usize,
    /// Generated ids (EOS excluded).
    pub tokens: Vec<u32>,
    pub text: String,
    pub finish: Finish,
}

/// Pick the next token from one row of logits.
pub fn sample(logits: &mut [f32], history: &[u32], cfg: &GenConfig, rng: &mut ChaCha8Rng) -> u32 {
    if cfg.repetition_penalty != 1.0 {
        let mut seen = history.to_vec();
        seen.sort_unstable();
        seen.dedup();
        for &t in &seen {
            if let Some(l) = logits.get_mut(t as usize) {
                *l = if *l > 0.0 {
                    *l / cfg.repetition_penalty
                } else {
                    *l * cfg.repetition_penalty
                };
            }
        }
    }
    let argmax = || {
        let mut best = 0;
        for (i, &v) in logits.iter().enumerate() {
            if v > logits[best] {
                best = i;
            }
        }
        best as u32
    };
    if cfg.temperature <= 0.0 {
        return argmax();
    }
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    idx.sort_unstable_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
    if cfg.top_k > 0 {
        idx.truncate(cfg.top_k);
    }
    let m = logits[idx[0] as usize];
    let mut p: Vec<f64> = idx
        .iter()
        .map(|&i| (((logits[i as usize] - m) / cfg.temperature) as f64).exp())
        .collect();
    let z: f64 = p.iter().sum();
    p.iter_mut().for_each(|v| *v /= z);
    if cfg.top_p < 1.0 {
        let mut acc = 0.0;
        let mut keep = p.len();
        for (k, v) in p.iter().enumerate() {
            acc += v;
            if acc >= cfg.top_p as f64 {
                keep = k + 1;
                break;
            }
        }
        p.truncate(keep);
        idx.truncate(keep);
    }
    let total: f64 = p.iter().sum();
    let mut u = rng.random::<f64>() * total;
    for (k, v) in p.iter().enumerate() {
        if u < *v {
            return idx[k];
        }
        u -= v;
    }
    idx[p.len() - 1]
}

/// Left-pad `prompts` into one `[b, T]` id tensor; returns it with the pad counts.
pub fn left_pad(prompts: &[Vec<u32>], pad_id: u32) -> Result<(Tensor, Vec<usize>)> {
    let t = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(prompts.len() * t);
    let mut pads = Vec::with_capacity(prompts.len());
    for p in prompts {
        pads.push(t - p.len());
        ids.extend(std::iter::repeat_n(pad_id, t - p.len()));
        ids.extend_from_slice(p);
    }
    Ok((
        Tensor::from_vec(ids, (prompts.len(), t), &Device::Cpu)?,
        pads,
    ))
}

/// Length of the longest tail of `text` that is a proper prefix of a stop string (text that
/// must not be streamed yet, since the next token may complete the stop string).
fn stop_prefix_tail(text: &str, stops: &[String]) -> usize {
    stops
        .iter()
        .flat_map(|s| {
            (1..s.len())
                .rev()
                .filter(|&k| s.is_char_boundary(k) && text.ends_with(&s[..k]))
                .take(1)
        })
        .max()
        .unwrap_or(0)
}

/// Generate continuations of a batch of tokenized prompts. `on_text(row, piece)` receives
/// each row's new text as it is produced. Prompts must fit the context window; the number of
/// new tokens is capped so that prompt + output fits it.
pub fn generate(
    lm: &LanguageModel,
    prompts: &[Vec<u32>],
    cfg: &GenConfig,
    hook: &mut dyn Hook,
    on_text: &mut dyn FnMut(usize, &str),
) -> Result<Vec<Generation>> {
    let b = prompts.len();
    if b == 0 {
        return Ok(Vec::new());
    }
    if let Some(i) = prompts.iter().position(|p| p.is_empty()) {
        return Err(LmError::Config(format!("prompt {i} is empty")));
    }
    let ctx = lm.decoder.cfg.max_position_embeddings;
    let t = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
    if t >= ctx {
        return Err(LmError::TooLong {
            len: t,
            ctx,
            detail: "no room left to generate".into(),
        });
    }
    let max_new = cfg.max_new_tokens.min(ctx - t);
    let (ids, pads) = left_pad(prompts, lm.tok.pad)?;
    let mut cache = lm.decoder.new_cache(pads);
    let h = lm.decoder.forward(&ids, &mut cache, Phase::Prefill, hook)?;
    let mut logits = lm
        .decoder
        .logits(&h.i((.., t - 1..t, ..))?)?
        .squeeze(1)?
        .to_vec2::<f32>()?;
    let mut rngs: Vec<ChaCha8Rng> = (0..b)
        .map(|r| {
            ChaCha8Rng::seed_from_u64(
                cfg.seed
                    .wrapping_mul(0x9E3779B97F4A7C15)
                    .wrapping_add(r as u64),
            )
        })
        .collect();
    let mut out: Vec<Generation> = prompts
        .iter()
        .map(|p| Generation {
            prompt_tokens: p.len(),
            tokens: Vec::new(),
            text: String::new(),
            finish: Finish::Length,
        })
        .collect();
    let mut done = vec![false; b];
    let mut history: Vec<Vec<u32>> = prompts.to_vec();
    let mut streams: Vec<_> = (0..b).map(|_| lm.tok.text_stream()).collect();
    let max_stop = cfg.stop.iter().map(|s| s.len()).max().unwrap_or(0);
    let mut sent = vec![0usize; b];
    for step in 0..max_new {
        let mut next = vec![lm.tok.pad; b];
        for r in 0..b {
            if done[r] {
                continue;
            }
            let tok = sample(&mut logits[r], &history[r], cfg, &mut rngs[r]);
            next[r] = tok;
            if lm.tok.is_eos(tok) && !cfg.ignore_eos {
                done[r] = true;
                out[r].finish = Finish::Eos;
                continue;
            }
            history[r].push(tok);
            out[r].tokens.push(tok);
            let Some(piece) = streams[r].step(tok)? else {
                continue;
            };
            let old_len = out[r].text.len();
            out[r].text.push_str(&piece);
            // a stop string can only end inside the new piece: search from just before it
            let mut from = old_len.saturating_sub(max_stop.saturating_sub(1));
            while !out[r].text.is_char_boundary(from) {
                from -= 1;
            }
            let cut = cfg
                .stop
                .iter()
                .filter_map(|s| out[r].text[from..].find(s.as_str()).map(|i| from + i))
                .min();
            if let Some(cut) = cut {
                out[r].text.truncate(cut);
                done[r] = true;
                out[r].finish = Finish::Stop;
            }
            // hold back a tail that may still grow into a stop string
            let upto = if done[r] {
                out[r].text.len()
            } else {
                out[r].text.len() - stop_prefix_tail(&out[r].text, &cfg.stop)
            };
            if upto > sent[r] {
                on_text(r, &out[r].text[sent[r]..upto]);
                sent[r] = upto;
            }
        }
        if done.iter().all(|&d| d) || step + 1 == max_new {
            break;
        }
        let ids = Tensor::from_vec(next, (b, 1), &Device::Cpu)?;
        let h = lm.decoder.forward(&ids, &mut cache, Phase::Decode, hook)?;
        logits = lm.decoder.logits(&h)?.squeeze(1)?.to_vec2::<f32>()?;
    }
    for r in 0..b {
        if out[r].finish != Finish::Stop {
            // the full decode also flushes a trailing incomplete character
            let full = lm.tok.decode(&out[r].tokens, true)?;
            if full.starts_with(&out[r].text[..sent[r]]) {
                out[r].text = full;
            }
        }
        if out[r].text.len() > sent[r] {
            on_text(r, &out[r].text[sent[r]..]);
        }
    }
    Ok(out)
}
