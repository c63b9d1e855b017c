//! Evaluation of a language-model recommender (llmrec-seeds.md §1.6, §2.5, §4.3).
//!
//! - Generation: greedy decoding (S-DPO: 20 new tokens) and two rules for reading the answer.
//!   S-DPO's: a case-sensitive substring match of every candidate title against the output;
//!   *valid* iff exactly one matches, a *hit* iff valid and the target matches;
//!   `HR@1 = hits / N`, `ValidRatio = valid / N`. LLaRA/iLoRA's: the first line of the output,
//!   lower-cased; valid iff exactly one candidate is mentioned, correct iff that candidate is
//!   the target; its `test_hr` is `correct / valid` (reported beside, never instead).
//! - Likelihood ranking: every candidate's answer (`" " + title` and EOS) scored by its
//!   sequence log-probability given the prompt, the prompt computed once per example and
//!   shared by its 20 branches; ranked by the one evaluator (HR@k, NDCG@k; every answer is
//!   valid).

use rudder_data::eval::EvalReport;
use rudder_lm::generate::{GenConfig, generate};
use rudder_lm::loader::LanguageModel;
use serde::{Deserialize, Serialize};

use crate::Result;
use crate::data::RecExample;
use crate::lmdata::LmExample;
use crate::lmtrain::{Conditioned, LmObserver, answer_logps, with_prepared};
use crate::seqtrain::candidate_report;

/// Sequence log-probability of every candidate answer of every example. A conditioned model
/// reads its hybrid prompts and scores one question at a time (its gate is per question).
pub fn candidate_logps(
    lm: &LanguageModel,
    exs: &[LmExample],
    batch: usize,
    cond: Conditioned,
    obs: &mut dyn LmObserver,
) -> Result<Vec<Vec<f32>>> {
    let mut out = Vec::with_capacity(exs.len());
    let batch = if cond.is_some() { 1 } else { batch.max(1) };
    for chunk in exs.chunks(batch) {
        let refs: Vec<&LmExample> = chunk.iter().collect();
        let br: Vec<Vec<Vec<u32>>> = chunk.iter().map(|e| e.responses.clone()).collect();
        let (rows, _) = with_prepared(cond, &refs, true, false, |p| {
            answer_logps(&lm.decoder, &p.prompts, &br, lm.tok.pad, p.hook.as_mut())
        })?;
        out.extend(rows);
        obs.progress("likelihood ranking", out.len(), exs.len());
    }
    Ok(out)
}

/// Rank each example's candidates by `scores[e][j]` through the one evaluator.
pub fn likelihood_report(
    scores: &[Vec<f32>],
    ex: &[RecExample],
    n_items: usize,
    ks: &[usize],
) -> Result<EvalReport> {
    let mut dense = vec![f32::NEG_INFINITY; ex.len() * n_items];
    for (r, (e, s)) in ex.iter().zip(scores).enumerate() {
        for (&c, &v) in e.candidates.iter().zip(s) {
            dense[r * n_items + c as usize] = v;
        }
    }
    candidate_report(&dense, ex, n_items, ks)
}

/// S-DPO's reading: (valid, hit).
pub fn judge_sdpo(text: &str, titles: &[String], target: usize) -> (bool, bool) {
    let n = titles.iter().filter(|t| text.contains(t.as_str())).count();
    let valid = n == 1;
    (valid, valid && text.contains(titles[target].as_str()))
}

/// LLaRA/iLoRA's reading (first line, lower case): (valid, correct).
pub fn judge_llara(text: &str, titles: &[String], target: usize) -> (bool, bool) {
    let line = text
        .trim()
        .split('\n')
        .next()
        .unwrap_or("")
        .trim()
        .to_lowercase();
    let hits: Vec<usize> = titles
        .iter()
        .enumerate()
        .filter(|(_, t)| line.contains(&t.trim().to_lowercase()))
        .map(|(j, _)| j)
        .collect();
    let valid = hits.len() == 1;
    (valid, valid && hits[0] == target)
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GenRow {
    pub index: usize,
    pub output: String,
    pub target: String,
    pub valid: bool,
    pub hit: bool,
    pub llara_valid: bool,
    pub llara_hit: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GenSummary {
    pub n: usize,
    /// S-DPO: hits / N.
    pub hr1: f64,
    pub valid_ratio: f64,
    /// LLaRA/iLoRA `test_hr`: correct / valid (first line, lower case).
    pub llara_hr1_given_valid: f64,
    pub llara_valid_ratio: f64,
    /// LLaRA/iLoRA `metric`: correct / N.
    pub llara_hr1: f64,
}

pub fn summarize(rows: &[GenRow]) -> GenSummary {
    let n = rows.len().max(1) as f64;
    let c = |f: &dyn Fn(&GenRow) -> bool| rows.iter().filter(|r| f(r)).count() as f64;
    let lv = c(&|r| r.llara_valid);
    GenSummary {
        n: rows.len(),
        hr1: c(&|r| r.hit) / n,
        valid_ratio: c(&|r| r.valid) / n,
        llara_hr1_given_valid: if lv > 0.0 {
            c(&|r| r.llara_hit) / lv
        } else {
            0.0
        },
        llara_valid_ratio: lv / n,
        llara_hr1: c(&|r| r.llara_hit) / n,
    }
}

/// Greedy answers to every example's prompt, read by both rules.
pub fn generate_answers(
    lm: &LanguageModel,
    exs: &[LmExample],
    max_new_tokens: usize,
    batch: usize,
    cond: Conditioned,
    obs: &mut dyn LmObserver,
) -> Result<Vec<GenRow>> {
    let cfg = GenConfig {
        max_new_tokens,
        ..GenConfig::default()
    };
    let mut rows = Vec::with_capacity(exs.len());
    for chunk in exs.chunks(batch.max(1)) {
        let refs: Vec<&LmExample> = chunk.iter().collect();
        let gens = with_prepared(cond, &refs, true, false, |p| {
            Ok(generate(
                lm,
                &p.prompts,
                &cfg,
                p.hook.as_mut(),
                &mut |_, _| {},
            )?)
        })?;
        for (e, g) in chunk.iter().zip(gens) {
            let text = g.text.trim().to_string();
            let (valid, hit) = judge_sdpo(&text, &e.titles, e.target);
            let (llara_valid, llara_hit) = judge_llara(&text, &e.titles, e.target);
            rows.push(GenRow {
                index: rows.len(),
                output: text,
                target: e.titles[e.target].clone(),
                valid,
                hit,
                llara_valid,
                llara_hit,
            });
        }
        obs.progress("generation", rows.len(), exs.len());
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn both_reading_rules_as_the_references_code_them() {
        let c = t(&["Coma", "Coma Cluster", "Muse", "Blur"]);
        // a title inside another makes the answer invalid under both rules
        assert_eq!(judge_sdpo("Coma Cluster", &c, 1), (false, false));
        assert_eq!(judge_sdpo(" Muse", &c, 2), (true, true));
        assert_eq!(judge_sdpo("Muse", &c, 3), (true, false));
        assert_eq!(judge_sdpo("muse", &c, 2), (false, false)); // case-sensitive
        assert_eq!(judge_llara("muse", &c, 2), (true, true)); // lower-cased
        assert_eq!(judge_llara("Blur\nMuse", &c, 3), (true, true)); // first line only
        assert_eq!(judge_sdpo("Blur\nMuse", &c, 3), (false, false));
        let rows = vec![
            GenRow {
                index: 0,
                output: String::new(),
                target: String::new(),
                valid: true,
                hit: true,
                llara_valid: true,
                llara_hit: true,
            },
            GenRow {
                index: 1,
                output: String::new(),
                target: String::new(),
                valid: true,
                hit: false,
                llara_valid: false,
                llara_hit: false,
            },
            GenRow {
                index: 2,
                output: String::new(),
                target: String::new(),
                valid: false,
                hit: false,
                llara_valid: false,
                llara_hit: false,
            },
            GenRow {
                index: 3,
                output: String::new(),
                target: String::new(),
                valid: true,
                hit: true,
                llara_valid: true,
                llara_hit: false,
            },
        ];
        let s = summarize(&rows);
        assert_eq!((s.hr1, s.valid_ratio), (0.5, 0.75));
        assert_eq!(
            (s.llara_hr1_given_valid, s.llara_valid_ratio, s.llara_hr1),
            (0.5, 0.5, 0.25)
        );
    }
}
