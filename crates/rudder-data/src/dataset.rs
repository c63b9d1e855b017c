//! The in-memory dataset: id maps, item and user tables, all interactions and, when the data
//! comes already split (or after `split`), a [`Split`].

use crate::ids::IdMap;
use crate::interactions::Interactions;
use std::collections::BTreeMap;

/// Text/metadata columns attached to items or users, aligned with dense ids. Missing values are
/// empty strings. `title` is kept apart because every method that reads text wants it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Table {
    pub title: Option<Vec<String>>,
    pub fields: BTreeMap<String, Vec<String>>,
}

impl Table {
    pub fn is_empty(&self) -> bool {
        self.title.is_none() && self.fields.is_empty()
    }

    /// Title of row `i` when known and non-empty.
    pub fn title(&self, i: u32) -> Option<&str> {
        self.title
            .as_ref()
            .and_then(|t| t.get(i as usize))
            .map(|s| s.as_str())
            .filter(|s| !s.is_empty())
    }

    pub fn field(&self, name: &str, i: u32) -> Option<&str> {
        self.fields
            .get(name)
            .and_then(|c| c.get(i as usize))
            .map(|s| s.as_str())
    }

    /// Add or replace a column (length must match the id space).
    pub fn set_field(&mut self, name: &str, values: Vec<String>) {
        self.fields.insert(name.to_string(), values);
    }

    /// Rows re-indexed (`remap[old] = Some(new)`), `n` rows in the result.
    pub fn remap(&self, remap: &[Option<u32>], n: usize) -> Table {
        let col = |c: &Vec<String>| {
            let mut out = vec![String::new(); n];
            for (old, new) in remap.iter().enumerate() {
                if let (Some(new), Some(v)) = (new, c.get(old)) {
                    out[*new as usize] = v.clone();
                }
            }
            out
        };
        Table {
            title: self.title.as_ref().map(col),
            fields: self
                .fields
                .iter()
                .map(|(k, v)| (k.clone(), col(v)))
                .collect(),
        }
    }

    /// Extend every column to `n` rows with empty values.
    pub fn resize(&mut self, n: usize) {
        if let Some(t) = &mut self.title {
            t.resize(n, String::new());
        }
        for c in self.fields.values_mut() {
            c.resize(n, String::new());
        }
    }
}

/// Train/validation/test interactions over one id space, plus extra named test sets
/// (`test_ood`, `test_ood_1`, … in the reference data).
#[derive(Debug, Clone, PartialEq)]
pub struct Split {
    pub train: Interactions,
    pub valid: Interactions,
    pub test: Interactions,
    pub extra_tests: Vec<(String, Interactions)>,
}

impl Split {
    /// Every named part in a fixed order: train, valid, test, extras.
    pub fn parts(&self) -> Vec<(&str, &Interactions)> {
        let mut v = vec![
            ("train", &self.train),
            ("valid", &self.valid),
            ("test", &self.test),
        ];
        for (n, x) in &self.extra_tests {
            v.push((n.as_str(), x));
        }
        v
    }

    pub fn part(&self, name: &str) -> Option<&Interactions> {
        self.parts()
            .into_iter()
            .find(|(n, _)| *n == name)
            .map(|(_, x)| x)
    }

    /// Union of every part (the whole dataset).
    pub fn all(&self) -> Interactions {
        let parts: Vec<&Interactions> = self.parts().into_iter().map(|(_, x)| x).collect();
        Interactions::union(&parts)
    }
}

/// A recommendation dataset.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub name: String,
    pub users: IdMap,
    pub items: IdMap,
    pub user_table: Table,
    pub item_table: Table,
    /// Every interaction known (for split data: the union of the parts).
    pub interactions: Interactions,
    pub split: Option<Split>,
}

impl Dataset {
    pub fn n_users(&self) -> usize {
        self.users.len()
    }
    pub fn n_items(&self) -> usize {
        self.items.len()
    }

    /// Keep only users and items that have at least one interaction, renumbering densely.
    /// Splits are remapped too.
    pub fn compact(&self) -> Dataset {
        let ud = self.interactions.user_degrees();
        let id = self.interactions.item_degrees();
        let keep_u: Vec<bool> = ud.iter().map(|&d| d > 0).collect();
        let keep_i: Vec<bool> = id.iter().map(|&d| d > 0).collect();
        if keep_u.iter().all(|&k| k) && keep_i.iter().all(|&k| k) {
            return self.clone();
        }
        let (users, ur) = self.users.compact(&keep_u);
        let (items, ir) = self.items.compact(&keep_i);
        let (nu, ni) = (users.len(), items.len());
        let rm = |x: &Interactions| x.remap(&ur, &ir, nu, ni);
        Dataset {
            name: self.name.clone(),
            user_table: self.user_table.remap(&ur, nu),
            item_table: self.item_table.remap(&ir, ni),
            interactions: rm(&self.interactions),
            split: self.split.as_ref().map(|s| Split {
                train: rm(&s.train),
                valid: rm(&s.valid),
                test: rm(&s.test),
                extra_tests: s
                    .extra_tests
                    .iter()
                    .map(|(n, x)| (n.clone(), rm(x)))
                    .collect(),
            }),
            users,
            items,
        }
    }

    /// Replace the interactions (e.g. after filtering) and compact ids. Any split is dropped.
    pub fn with_interactions(&self, interactions: Interactions) -> Dataset {
        let d = Dataset {
            interactions,
            split: None,
            ..self.clone()
        };
        d.compact()
    }

    /// Human label for item `i`: its title when known, else its external id.
    pub fn item_label(&self, i: u32) -> String {
        match self.item_table.title(i) {
            Some(t) => t.to_string(),
            None => self.items.ext(i).to_string(),
        }
    }
}
