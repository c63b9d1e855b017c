//! External ↔ dense id maps. Dense ids are `u32` in first-seen order; external ids are kept as
//! strings so that results can be written back in the user's own ids.

use std::collections::HashMap;

/// Largest id count (`max id + 1`) that readers of index-valued files (ids used directly as
/// array positions, as in LightGCN lines or `movie_detail.csv`) accept as-is for `distinct`
/// distinct ids: small gaps (items that only appear in a test file, users without lines) are
/// normal, but a single id of 2,000,000,000 must not make a reader allocate per id. Beyond
/// this bound ids are remapped or refused before anything of that size is allocated.
pub fn dense_limit(distinct: usize) -> usize {
    distinct
        .saturating_mul(4)
        .max(distinct.saturating_add(100_000))
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdMap {
    ext: Vec<String>,
    dense: HashMap<String, u32>,
}

impl IdMap {
    pub fn new() -> Self {
        Self::default()
    }

    /// Identity map `0..n` (dense id i has external id "i").
    pub fn identity(n: usize) -> Self {
        let mut m = Self::default();
        for i in 0..n {
            m.insert(&i.to_string());
        }
        m
    }

    /// Dense id of `ext`, inserting it when new.
    pub fn insert(&mut self, ext: &str) -> u32 {
        if let Some(&d) = self.dense.get(ext) {
            return d;
        }
        let d = self.ext.len() as u32;
        self.ext.push(ext.to_string());
        self.dense.insert(ext.to_string(), d);
        d
    }

    /// Insert a new id; `None` if it was already present.
    pub fn insert_new(&mut self, ext: &str) -> Option<u32> {
        if self.dense.contains_key(ext) {
            None
        } else {
            Some(self.insert(ext))
        }
    }

    pub fn get(&self, ext: &str) -> Option<u32> {
        self.dense.get(ext).copied()
    }

    pub fn ext(&self, dense: u32) -> &str {
        &self.ext[dense as usize]
    }

    pub fn len(&self) -> usize {
        self.ext.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ext.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (u32, &str)> {
        self.ext
            .iter()
            .enumerate()
            .map(|(i, s)| (i as u32, s.as_str()))
    }

    /// True when external id i is the decimal string of i for every i.
    pub fn is_identity(&self) -> bool {
        self.ext
            .iter()
            .enumerate()
            .all(|(i, s)| *s == i.to_string())
    }

    /// Dense ids for sparse numeric ids: the sorted distinct values become `0..n`, each keeping
    /// its number as external id. Returns the map and a lookup from value to dense id.
    pub fn from_sorted_numbers(values: &[u32]) -> (IdMap, HashMap<u32, u32>) {
        let mut v = values.to_vec();
        v.sort_unstable();
        v.dedup();
        let mut m = IdMap::new();
        let mut lookup = HashMap::with_capacity(v.len());
        for x in v {
            lookup.insert(x, m.insert(&x.to_string()));
        }
        (m, lookup)
    }

    /// Keep only the dense ids for which `keep[id]`, renumbering them in order.
    /// Returns the new map and, for every old id, its new id.
    pub fn compact(&self, keep: &[bool]) -> (IdMap, Vec<Option<u32>>) {
        let mut m = IdMap::new();
        let remap = self
            .ext
            .iter()
            .zip(keep)
            .map(|(e, &k)| if k { Some(m.insert(e)) } else { None })
            .collect();
        (m, remap)
    }
}
