//! The agent's memory stream.
//!
//! As the reference: plain-text memories (factual page summaries, exit decisions, satisfaction
//! reflections), retrieval of the top 5 by embedding similarity (the reference's re-scoring has
//! recency fixed to 1 and no importance term, so its net effect is exactly this), ties in
//! insertion order; each memory adds 1 to an importance sum and when the sum exceeds 3 (the 4th
//! memory) a satisfaction reflection is due, which is stored without re-triggering, and the sum
//! restarts. Pages add two memories each, so reflections follow pages 2, 4, 6, …
//!
//! Unlike the reference: embeddings come from an in-process encoder (MiniLM by default, no paid
//! API), and time is a logical clock (the memory's index), so runs are deterministic.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::Result;

/// Turns texts into vectors (rows L2-normalised by the implementation or not: retrieval uses L2
/// distance as the reference's flat index does).
pub trait Embedder: Send + Sync {
    fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>>;
    fn describe(&self) -> String;
}

/// A sentence encoder from rudder-lm (MiniLM: `all-minilm-l6-v2`), mean-pooled and normalised
/// as sentence-transformers does.
pub struct EncoderEmbedder {
    enc: rudder_lm::bert::TextEncoder,
    name: String,
}

impl EncoderEmbedder {
    pub fn load(dir: &std::path::Path, name: &str) -> Result<Self> {
        Ok(EncoderEmbedder {
            enc: rudder_lm::bert::TextEncoder::load(dir)?,
            name: name.to_string(),
        })
    }
}

impl Embedder for EncoderEmbedder {
    fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        let t = self.enc.embed(texts, 16, &mut |_| {})?;
        Ok(t.to_vec2::<f32>()?)
    }
    fn describe(&self) -> String {
        format!("sentence encoder {}", self.name)
    }
}

/// Hashed bag of words (lower-cased alphanumeric words and word bigrams into `dim` signed
/// buckets, L2-normalised): no model, instant; for quick runs and tests.
pub struct HashEmbedder {
    pub dim: usize,
}

impl Embedder for HashEmbedder {
    fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        Ok(texts.iter().map(|t| hash_embed(t, self.dim)).collect())
    }
    fn describe(&self) -> String {
        format!("hashed bag of words ({} buckets)", self.dim)
    }
}

fn hash_embed(text: &str, dim: usize) -> Vec<f32> {
    let words: Vec<String> = text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect();
    let mut v = vec![0f32; dim.max(1)];
    let mut add = |s: &str| {
        let h =
            rudder_data::rng::hash_keys(0x6d65_6d6f, &s.bytes().map(u64::from).collect::<Vec<_>>());
        let sign = if h >> 63 == 0 { 1.0 } else { -1.0 };
        v[(h % dim.max(1) as u64) as usize] += sign;
    };
    for w in &words {
        add(w);
    }
    for p in words.windows(2) {
        add(&format!("{} {}", p[0], p[1]));
    }
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if n > 0.0 {
        v.iter_mut().for_each(|x| *x /= n);
    }
    v
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemoryKind {
    /// What was shown, watched and rated on a page.
    Factual,
    /// The exit/next decision.
    Decision,
    /// The satisfaction reflection.
    Reflection,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Record {
    pub text: String,
    pub kind: MemoryKind,
    /// Logical time: the memory's index in the stream.
    pub t: usize,
    #[serde(skip)]
    pub emb: Vec<f32>,
}

/// One agent's memory stream.
pub struct Memory {
    embedder: Arc<dyn Embedder>,
    records: Vec<Record>,
    /// Query embeddings: the memory is searched with a few fixed questions, encoded once.
    queries: std::collections::HashMap<String, Vec<f32>>,
    importance: u32,
    pub threshold: u32,
    pub k: usize,
}

impl Memory {
    pub fn new(embedder: Arc<dyn Embedder>) -> Self {
        Memory {
            embedder,
            records: Vec::new(),
            queries: std::collections::HashMap::new(),
            importance: 0,
            threshold: 3,
            k: 5,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    pub fn records(&self) -> &[Record] {
        &self.records
    }

    fn push(&mut self, text: &str, kind: MemoryKind) -> Result<()> {
        let emb = self.embedder.embed(&[text])?.pop().unwrap_or_default();
        let t = self.records.len();
        self.records.push(Record {
            text: text.to_string(),
            kind,
            t,
            emb,
        });
        Ok(())
    }

    /// Store a memory; `true` when a satisfaction reflection is now due (the caller runs it and
    /// stores it with [`Memory::add_reflection`]).
    pub fn add(&mut self, text: &str, kind: MemoryKind) -> Result<bool> {
        self.push(text, kind)?;
        self.importance += 1;
        if self.importance > self.threshold {
            self.importance = 0;
            return Ok(true);
        }
        Ok(false)
    }

    /// Store a reflection (does not count towards the next one).
    pub fn add_reflection(&mut self, text: &str) -> Result<()> {
        self.push(text, MemoryKind::Reflection)
    }

    /// The `k` memories closest to `query` (L2 distance), ties in insertion order.
    pub fn retrieve(&mut self, query: &str) -> Result<Vec<String>> {
        if self.records.is_empty() {
            return Ok(Vec::new());
        }
        if !self.queries.contains_key(query) {
            let e = self.embedder.embed(&[query])?.pop().unwrap_or_default();
            self.queries.insert(query.to_string(), e);
        }
        let q = &self.queries[query];
        let mut d: Vec<(f32, usize)> = self
            .records
            .iter()
            .map(|r| {
                let s: f32 = r.emb.iter().zip(q).map(|(a, b)| (a - b) * (a - b)).sum();
                (s, r.t)
            })
            .collect();
        d.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        Ok(d.iter()
            .take(self.k)
            .map(|&(_, t)| self.records[t].text.clone())
            .collect())
    }

    /// Every memory in order (the interview reads all of them).
    pub fn all(&self) -> Vec<String> {
        self.records.iter().map(|r| r.text.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> Memory {
        Memory::new(Arc::new(HashEmbedder { dim: 4096 }))
    }

    #[test]
    fn reflection_is_due_on_the_fourth_memory_and_not_retriggered() {
        let mut m = mem();
        let due: Vec<bool> = (0..8)
            .map(|i| m.add(&format!("memory {i}"), MemoryKind::Factual).unwrap())
            .collect();
        assert_eq!(
            due,
            vec![false, false, false, true, false, false, false, true]
        );
        m.add_reflection("satisfied because").unwrap();
        assert!(!m.add("x", MemoryKind::Decision).unwrap());
        assert_eq!(m.records().len(), 10);
        assert_eq!(m.records()[8].kind, MemoryKind::Reflection);
        assert_eq!(m.records()[8].t, 8, "logical clock");
    }

    #[test]
    fn retrieval_is_top_k_by_similarity_with_ties_in_order() {
        let mut m = mem();
        for t in [
            "I watched Heat and Toy Story on page 1",
            "Turn to page 2 of the recommendation.",
            "the weather is nice",
            "Turn to page 3 of the recommendation.",
        ] {
            m.add(t, MemoryKind::Factual).unwrap();
        }
        m.k = 2;
        let r = m
            .retrieve("which movies have you watched on page 1")
            .unwrap();
        assert_eq!(r[0], "I watched Heat and Toy Story on page 1");
        // equal distances keep insertion order
        m.add("the same words", MemoryKind::Decision).unwrap();
        m.add("the same words", MemoryKind::Reflection).unwrap();
        let r = m.retrieve("the same words").unwrap();
        assert_eq!(r, vec!["the same words".to_string(); 2]);
        let best = |m: &Memory| {
            let q = m
                .embedder
                .embed(&["the same words"])
                .unwrap()
                .pop()
                .unwrap();
            m.records()
                .iter()
                .filter(|r| r.emb == q)
                .map(|r| r.t)
                .collect::<Vec<_>>()
        };
        assert_eq!(best(&m), vec![4, 5]);
        assert!(mem().retrieve("x").unwrap().is_empty());
    }
}
