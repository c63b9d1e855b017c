//! Next-item examples for the language-model recommenders: a history, 20 candidates and the
//! target, as item ids with their titles (llmrec-seeds.md §1.2).
//!
//! Two sources: LLaRA sequence rows (`train.jsonl`: 10 ids right-padded with the pad id),
//! turned into candidate sets with S-DPO's rule (rows with fewer than 3 history items dropped;
//! 19 negatives drawn from items neither in the history nor the target, seeded by the target
//! id, the target added and the list shuffled, so the set is fixed per (history, target)); and
//! S-DPO prompt JSON (`historyList`/`itemList`/`trueSelection` titles) mapped back to ids
//! through the item names.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use rand::Rng;
use rand::seq::SliceRandom;
use rudder_data::sequences::{PromptSample, SeqSample};

use crate::{LlmrecError, Result};

/// Item titles by id and the reverse map.
#[derive(Clone, Debug)]
pub struct Catalog {
    pub names: Vec<String>,
    index: HashMap<String, u32>,
}

impl Catalog {
    /// Duplicate titles map to their first id.
    pub fn new(names: Vec<String>) -> Catalog {
        let mut index = HashMap::with_capacity(names.len());
        for (i, n) in names.iter().enumerate() {
            index.entry(n.clone()).or_insert(i as u32);
        }
        Catalog { names, index }
    }
    pub fn n_items(&self) -> usize {
        self.names.len()
    }
    pub fn id(&self, title: &str) -> Option<u32> {
        self.index.get(title).copied()
    }
    pub fn title(&self, id: u32) -> &str {
        &self.names[id as usize]
    }
}

/// One next-item question.
#[derive(Clone, Debug, PartialEq)]
pub struct RecExample {
    /// Chronological history (oldest first, at most the window).
    pub history: Vec<u32>,
    /// The candidate list in prompt order, target included.
    pub candidates: Vec<u32>,
    pub target: u32,
}

impl RecExample {
    pub fn target_pos(&self) -> usize {
        self.candidates
            .iter()
            .position(|&c| c == self.target)
            .unwrap_or(0)
    }
    /// The negatives in candidate order.
    pub fn negatives(&self) -> Vec<u32> {
        self.candidates
            .iter()
            .copied()
            .filter(|&c| c != self.target)
            .collect()
    }
}

/// S-DPO's candidate rule: `n - 1` distinct negatives outside `history ∪ {target}` plus the
/// target, shuffled; determined by `(seed, target)` and the history.
pub fn candidates_for(
    history: &[u32],
    target: u32,
    n_items: usize,
    n: usize,
    seed: u64,
) -> Result<Vec<u32>> {
    let excluded: HashSet<u32> = history.iter().copied().chain([target]).collect();
    if n_items < excluded.len() + n.saturating_sub(1) {
        return Err(LlmrecError::Input(format!(
            "{n} candidates need {} items outside the history, the catalogue has {n_items}",
            n - 1
        )));
    }
    let mut rng = rudder_data::rng::stream(seed, &[0xCA5D, target as u64]);
    let mut chosen = Vec::with_capacity(n);
    let mut seen = HashSet::new();
    while chosen.len() + 1 < n {
        let i = rng.random_range(0..n_items as u32);
        if !excluded.contains(&i) && seen.insert(i) {
            chosen.push(i);
        }
    }
    chosen.push(target);
    chosen.shuffle(&mut rudder_data::rng::stream(
        seed,
        &[0xCA5E, target as u64],
    ));
    Ok(chosen)
}

/// Examples from LLaRA sequence rows. Ids at or beyond `n_items` (other than the pad id
/// `n_items` itself) are refused with the row number; rows with fewer than `min_history` real
/// items are dropped (the reference drops `len_seq < 3`).
pub fn from_sequences(
    rows: &[SeqSample],
    n_items: usize,
    min_history: usize,
    n_candidates: usize,
    seed: u64,
    source: &Path,
) -> Result<Vec<RecExample>> {
    let pad = n_items as u32;
    let mut out = Vec::new();
    for (r, s) in rows.iter().enumerate() {
        let history = s.history(Some(pad));
        if let Some(&bad) = history.iter().chain([&s.next]).find(|&&i| i >= pad) {
            return Err(LlmrecError::file(
                source,
                format!(
                    "line {}: item id {bad} is not in the catalogue of {n_items} items",
                    r + 1
                ),
            ));
        }
        if history.len() < min_history.max(1) {
            continue;
        }
        let candidates = candidates_for(&history, s.next, n_items, n_candidates, seed)?;
        out.push(RecExample {
            history,
            candidates,
            target: s.next,
        });
    }
    Ok(out)
}

/// What to do with an S-DPO record whose titles are not in the catalogue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unknown {
    Refuse,
    Skip,
}

/// Examples from S-DPO prompt records. Returns the examples and the number of records
/// skipped (with [`Unknown::Skip`]) together with the first unknown title.
pub fn from_prompts(
    recs: &[PromptSample],
    catalog: &Catalog,
    unknown: Unknown,
    source: &Path,
) -> Result<(Vec<RecExample>, usize, Option<String>)> {
    let mut out = Vec::with_capacity(recs.len());
    let mut skipped = 0;
    let mut first = None;
    'rec: for (r, p) in recs.iter().enumerate() {
        let at = |m: String| LlmrecError::file(source, format!("record {r}: {m}"));
        if p.history.is_empty() {
            return Err(at("empty historyList".into()));
        }
        if !p.candidates.contains(&p.target) {
            return Err(at(format!(
                "trueSelection {:?} is not in itemList",
                p.target
            )));
        }
        let mut ids = Vec::new();
        for t in p.history.iter().chain(&p.candidates) {
            match catalog.id(t) {
                Some(i) => ids.push(i),
                None if unknown == Unknown::Skip => {
                    skipped += 1;
                    first.get_or_insert_with(|| t.clone());
                    continue 'rec;
                }
                None => return Err(at(format!("title {t:?} is not in the item names"))),
            }
        }
        let candidates = ids.split_off(p.history.len());
        out.push(RecExample {
            history: ids,
            candidates,
            target: catalog.id(&p.target).unwrap_or(0),
        });
    }
    Ok((out, skipped, first))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidate_sets_follow_the_reference_rule() {
        let h = [1, 2, 3];
        let c = candidates_for(&h, 9, 50, 20, 4).unwrap();
        assert_eq!(c.len(), 20);
        assert!(c.contains(&9));
        assert!(c.iter().all(|x| !h.contains(x) && *x < 50));
        assert_eq!(c.iter().collect::<HashSet<_>>().len(), 20);
        assert_eq!(c, candidates_for(&h, 9, 50, 20, 4).unwrap());
        assert_ne!(c, candidates_for(&h, 9, 50, 20, 5).unwrap());
        assert!(candidates_for(&h, 9, 10, 20, 4).is_err());
    }

    #[test]
    fn sequences_and_prompts_become_examples_with_clear_errors() {
        let row = |seq: Vec<u32>, len, next| SeqSample {
            seq,
            seq_ratings: None,
            len_seq: len,
            next,
            next_rating: None,
        };
        let rows = vec![row(vec![0, 1, 30, 30], 2, 2), row(vec![0, 1, 2, 30], 3, 4)];
        let ex = from_sequences(&rows, 30, 3, 20, 1, Path::new("train.jsonl")).unwrap();
        assert_eq!(ex.len(), 1);
        assert_eq!(ex[0].history, vec![0, 1, 2]);
        assert_eq!(ex[0].candidates[ex[0].target_pos()], 4);
        let bad = vec![row(vec![0, 31, 30, 30], 2, 2)];
        let e = from_sequences(&bad, 30, 1, 20, 1, Path::new("train.jsonl"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("train.jsonl") && e.contains("line 1") && e.contains("31"),
            "{e}"
        );

        let cat = Catalog::new(vec!["a".into(), "b".into(), "c".into(), "d".into()]);
        let p = |h: &[&str], c: &[&str], t: &str| PromptSample {
            history: h.iter().map(|s| s.to_string()).collect(),
            candidates: c.iter().map(|s| s.to_string()).collect(),
            target: t.into(),
        };
        let recs = vec![p(&["a"], &["b", "c"], "c"), p(&["zz"], &["b", "c"], "b")];
        let src = Path::new("test.json");
        let e = from_prompts(&recs, &cat, Unknown::Refuse, src)
            .unwrap_err()
            .to_string();
        assert!(e.contains("record 1") && e.contains("\"zz\""), "{e}");
        let (ex, skipped, first) = from_prompts(&recs, &cat, Unknown::Skip, src).unwrap();
        assert_eq!((ex.len(), skipped, first.as_deref()), (1, 1, Some("zz")));
        assert_eq!(
            ex[0],
            RecExample {
                history: vec![0],
                candidates: vec![1, 2],
                target: 2
            }
        );
        let e = from_prompts(&[p(&[], &["b"], "b")], &cat, Unknown::Skip, src).unwrap_err();
        assert!(e.to_string().contains("empty historyList"));
        let e = from_prompts(&[p(&["a"], &["b"], "d")], &cat, Unknown::Skip, src).unwrap_err();
        assert!(e.to_string().contains("not in itemList"));
    }
}
