//! Examples as token ids for a language model: the rendered prompt, each candidate's response
//! (`" " + title` and EOS) and, for the preference objectives, the k negatives drawn once per
//! example from the 19 in-prompt negatives (as S-DPO's data map does; seeded per example).
//!
//! Truncation policy: a prompt longer than `max_prompt_tokens` keeps its last tokens (the
//! reference collator's `keep_end`), after the BOS token when the model adds one; the
//! response is never cut. Prompts that still do not fit the model's context are refused.

use rand::seq::index::sample;
use rudder_lm::tokenizer::Tok;

use crate::data::{Catalog, RecExample};
use crate::prompts::{Templates, response};
use crate::{LlmrecError, Result};

#[derive(Clone, Debug, PartialEq)]
pub struct LmExample {
    pub prompt: Vec<u32>,
    /// Response tokens of every candidate, in candidate order.
    pub responses: Vec<Vec<u32>>,
    pub target: usize,
    /// Indices (into `responses`) of the negatives used by DPO / S-DPO.
    pub negatives: Vec<usize>,
    pub prompt_text: String,
    /// Candidate titles in order (for generation-based validity and hits).
    pub titles: Vec<String>,
    pub truncated: bool,
    /// LLaRA's hybrid form (`crate::hybrid::attach_hybrid`), when the method uses one.
    pub hybrid: Option<crate::hybrid::Hybrid>,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Tokenize {
    pub seed: u64,
    pub negatives: usize,
    pub max_prompt_tokens: usize,
}

impl Default for Tokenize {
    fn default() -> Self {
        Tokenize {
            seed: 1958,
            negatives: 3,
            max_prompt_tokens: 512,
        }
    }
}

pub fn tokenize(
    ex: &[RecExample],
    catalog: &Catalog,
    templates: &Templates,
    tok: &Tok,
    ctx: usize,
    opt: &Tokenize,
) -> Result<Vec<LmExample>> {
    let eos = *tok
        .eos
        .first()
        .ok_or_else(|| LlmrecError::Config("the tokenizer has no EOS token".into()))?;
    let mut out = Vec::with_capacity(ex.len());
    for (i, e) in ex.iter().enumerate() {
        let hist: Vec<&str> = e.history.iter().map(|&h| catalog.title(h)).collect();
        let titles: Vec<String> = e
            .candidates
            .iter()
            .map(|&c| catalog.title(c).to_string())
            .collect();
        let cands: Vec<&str> = titles.iter().map(String::as_str).collect();
        let text = templates.render(templates.pick(opt.seed, i), &hist, &cands);
        let mut prompt = tok.encode(&text, true)?;
        let mut truncated = false;
        if prompt.len() > opt.max_prompt_tokens.max(2) {
            let keep_bos = tok.bos.is_some() && prompt.first() == tok.bos.as_ref();
            let tail = prompt.split_off(prompt.len() - (opt.max_prompt_tokens - keep_bos as usize));
            prompt = if keep_bos {
                [vec![prompt[0]], tail].concat()
            } else {
                tail
            };
            truncated = true;
        }
        let mut responses = Vec::with_capacity(titles.len());
        for t in &titles {
            let mut r = tok.encode(&response(t), false)?;
            r.push(eos);
            responses.push(r);
        }
        let longest = responses.iter().map(Vec::len).max().unwrap_or(0);
        if prompt.len() + longest > ctx {
            return Err(LlmrecError::Input(format!(
                "example {i}: prompt of {} tokens and a {longest}-token answer exceed the model's context of {ctx}; lower --max-prompt-tokens",
                prompt.len()
            )));
        }
        let target = e.target_pos();
        let pool: Vec<usize> = (0..titles.len()).filter(|&j| j != target).collect();
        let k = opt.negatives.min(pool.len());
        let mut rng = rudder_data::rng::stream(opt.seed, &[0xD90, i as u64]);
        let mut negatives: Vec<usize> = sample(&mut rng, pool.len(), k)
            .into_iter()
            .map(|j| pool[j])
            .collect();
        negatives.sort_unstable();
        out.push(LmExample {
            prompt,
            responses,
            target,
            negatives,
            prompt_text: text,
            titles,
            truncated,
            hybrid: None,
        });
    }
    Ok(out)
}
