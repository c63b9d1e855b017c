//! Assemble a [`Dataset`] from interactions in external ids plus optional metadata rows.

use crate::dataset::{Dataset, Table};
use crate::error::{DataError, Result};
use crate::ids::IdMap;
use crate::interactions::{Interaction, Interactions};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// Metadata rows keyed by external id, as read from an item or user file.
#[derive(Debug, Clone, Default)]
pub struct MetaRows {
    pub ids: Vec<String>,
    pub title: Option<Vec<String>>,
    pub fields: BTreeMap<String, Vec<String>>,
}

impl MetaRows {
    /// Join onto a dense id space: rows whose id is not in `map` are dropped.
    /// Returns the table and the number of rows dropped.
    pub fn join(&self, map: &IdMap) -> (Table, usize) {
        let n = map.len();
        let mut pos: Vec<Option<usize>> = vec![None; n];
        let mut dropped = 0;
        for (row, id) in self.ids.iter().enumerate() {
            match map.get(id) {
                Some(d) => pos[d as usize] = Some(row),
                None => dropped += 1,
            }
        }
        let col = |c: &Vec<String>| -> Vec<String> {
            pos.iter()
                .map(|p| p.map(|r| c[r].clone()).unwrap_or_default())
                .collect()
        };
        (
            Table {
                title: self.title.as_ref().map(col),
                fields: self
                    .fields
                    .iter()
                    .map(|(k, v)| (k.clone(), col(v)))
                    .collect(),
            },
            dropped,
        )
    }

    /// Check that ids are unique; `line_of(row)` gives the line number for the error.
    pub fn check_unique(&self, path: &Path, line_of: impl Fn(usize) -> usize) -> Result<()> {
        let mut seen: HashMap<&str, usize> = HashMap::with_capacity(self.ids.len());
        for (row, id) in self.ids.iter().enumerate() {
            if let Some(first) = seen.insert(id.as_str(), row) {
                return Err(DataError::parse(
                    path,
                    line_of(row),
                    format!(
                        "duplicate id `{id}` (first seen on line {})",
                        line_of(first)
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Collects interactions in external ids; dense ids follow first appearance.
#[derive(Debug, Default)]
pub struct DatasetBuilder {
    pub users: IdMap,
    pub items: IdMap,
    list: Vec<Interaction>,
}

impl DatasetBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add(&mut self, user: &str, item: &str, rating: Option<f32>, timestamp: Option<i64>) {
        let u = self.users.insert(user);
        let i = self.items.insert(item);
        self.list.push(Interaction {
            user: u,
            item: i,
            rating,
            timestamp,
        });
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub fn finish(self, name: &str, items: Option<&MetaRows>, users: Option<&MetaRows>) -> Dataset {
        let interactions =
            Interactions::from_interactions(self.users.len(), self.items.len(), &self.list);
        let (item_table, di) = items.map(|m| m.join(&self.items)).unwrap_or_default();
        let (user_table, du) = users.map(|m| m.join(&self.users)).unwrap_or_default();
        if di > 0 || du > 0 {
            tracing::debug!("{name}: {di} item and {du} user metadata rows have no interactions");
        }
        Dataset {
            name: name.to_string(),
            users: self.users,
            items: self.items,
            user_table,
            item_table,
            interactions,
            split: None,
        }
    }
}
