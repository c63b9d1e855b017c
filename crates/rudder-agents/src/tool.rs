//! The AgentRecBench environment an agent queries during one task: the reference's three calls
//! (`get_user`, `get_item`, `get_reviews` by user / item / review id) and the paper's richer
//! `query` (sorted by date, relevance or popularity; structured or text form), with the task's
//! visibility enforced here rather than trusted to the agent: reviews at or after the cut-off
//! are never returned (undated ones neither, when there is a cut-off), nor the task user's
//! reviews of the held-out items or, in the evolving-interest scenarios, before the window.
//!
//! Records keep their release fields except the store's internal `_time`; aggregate fields of
//! the release (a Yelp business's `stars`/`review_count`, a user's `average_stars`) are computed
//! by the data's publisher over all time and are passed through unchanged, as the reference does.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::Value;

use crate::Result;
use crate::store::{ReviewRef, Store};
use crate::tasks::Visibility;

/// Which review list `get_reviews` returns (the reference's priority: review id, item, user).
#[derive(Clone, Debug, PartialEq)]
pub enum ReviewsOf<'a> {
    Review(&'a str),
    Item(&'a str),
    User(&'a str),
}

/// The order of a query's results.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sort {
    /// Newest first.
    Date,
    /// Most word overlap with the query text first (then newest).
    Relevance,
    /// Reviews: most helpful votes first; items: most visible reviews first.
    Popularity,
}

/// How a query's results are given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Form {
    Structured,
    Text,
}

/// The environment of one task.
pub struct Tool<'s> {
    store: &'s Store,
    user: String,
    vis: Visibility,
    exclude: HashSet<String>,
    /// Calls made (for the time-share report).
    pub calls: AtomicU64,
}

fn strip(mut v: Value) -> Value {
    if let Some(o) = v.as_object_mut() {
        o.remove("_time");
    }
    v
}

/// Helpful votes of a review under any source's field name.
fn votes(r: &Value) -> f64 {
    ["useful", "helpful_vote", "n_votes"]
        .iter()
        .filter_map(|k| r.get(*k).and_then(Value::as_f64))
        .sum()
}

fn words(s: &str) -> HashSet<String> {
    s.split(|c: char| !c.is_alphanumeric())
        .filter(|w| w.len() > 2)
        .map(str::to_lowercase)
        .collect()
}

/// `key: value; …` of a record's scalar and short list fields (the text form).
pub fn as_text(v: &Value) -> String {
    match v {
        Value::Object(o) => o
            .iter()
            .filter(|(k, _)| !k.starts_with('_'))
            .filter_map(|(k, v)| {
                let s = match v {
                    Value::Null => return None,
                    Value::String(s) if s.is_empty() => return None,
                    Value::String(s) => s.clone(),
                    Value::Array(a) if a.is_empty() => return None,
                    Value::Array(a) => a
                        .iter()
                        .map(|x| x.as_str().map_or_else(|| x.to_string(), str::to_string))
                        .collect::<Vec<_>>()
                        .join(", "),
                    other => other.to_string(),
                };
                Some(format!("{k}: {s}"))
            })
            .collect::<Vec<_>>()
            .join("; "),
        other => other.to_string(),
    }
}

impl<'s> Tool<'s> {
    pub fn new(store: &'s Store, user: &str, vis: Visibility) -> Tool<'s> {
        let exclude = vis.exclude_items.iter().cloned().collect();
        Tool {
            store,
            user: user.to_string(),
            vis,
            exclude,
            calls: AtomicU64::new(0),
        }
    }

    fn tick(&self) {
        self.calls.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether a review (by `user` of `item` at `time`) is visible in this task.
    pub fn visible(&self, user: &str, item: &str, time: Option<i64>) -> bool {
        if let Some(b) = self.vis.before
            && time.is_none_or(|t| t >= b)
        {
            return false;
        }
        if user == self.user {
            if self.exclude.contains(item) {
                return false;
            }
            if let Some(s) = self.vis.history_since
                && time.is_none_or(|t| t < s)
            {
                return false;
            }
        }
        true
    }

    pub fn get_user(&self, id: &str) -> Result<Option<Value>> {
        self.tick();
        Ok(self.store.user(id)?.map(strip))
    }

    pub fn get_item(&self, id: &str) -> Result<Option<Value>> {
        self.tick();
        if id.is_empty() {
            return Ok(None);
        }
        Ok(self.store.item(id)?.map(strip))
    }

    /// The visible reviews (time order, oldest first, as the store's index).
    pub fn get_reviews(&self, of: ReviewsOf<'_>) -> Result<Vec<Value>> {
        self.tick();
        let refs: Vec<(String, String, ReviewRef)> = match of {
            ReviewsOf::Review(id) => {
                let Some(r) = self.store.review(id)? else {
                    return Ok(Vec::new());
                };
                let u = r["user_id"].as_str().unwrap_or_default();
                let i = r["item_id"].as_str().unwrap_or_default();
                return Ok(if self.visible(u, i, r["_time"].as_i64()) {
                    vec![strip(r)]
                } else {
                    Vec::new()
                });
            }
            ReviewsOf::Item(item) => self
                .store
                .item_reviews(item, self.vis.before)?
                .into_iter()
                .map(|r| (r.other.clone(), item.to_string(), r))
                .collect(),
            ReviewsOf::User(user) => self
                .store
                .user_reviews(user, self.vis.before)?
                .into_iter()
                .map(|r| (user.to_string(), r.other.clone(), r))
                .collect(),
        };
        let mut out = Vec::new();
        for (u, i, r) in refs {
            if self.visible(&u, &i, r.time)
                && let Some(rec) = self.store.review(&r.review_id)?
            {
                out.push(strip(rec));
            }
        }
        Ok(out)
    }

    /// The visible (item, stars, time) of a user, oldest first, without reading the review
    /// records (what the CF recommenders and compact prompts need).
    pub fn history(&self, user: &str) -> Result<Vec<ReviewRef>> {
        self.tick();
        Ok(self
            .store
            .user_reviews(user, self.vis.before)?
            .into_iter()
            .filter(|r| self.visible(user, &r.other, r.time))
            .collect())
    }

    /// Visible reviews of an item (count only).
    pub fn item_popularity(&self, item: &str) -> Result<usize> {
        self.tick();
        Ok(self
            .store
            .item_reviews(item, self.vis.before)?
            .into_iter()
            .filter(|r| self.visible(&r.other, item, r.time))
            .count())
    }

    /// The paper's query over reviews of a user or an item: sorted, at most `limit`, in
    /// structured (JSON records) or text (`key: value; …` lines) form. `text` is the relevance
    /// query.
    pub fn query_reviews(
        &self,
        of: ReviewsOf<'_>,
        sort: Sort,
        form: Form,
        text: &str,
        limit: usize,
    ) -> Result<Value> {
        let mut rs = self.get_reviews(of)?;
        match sort {
            Sort::Date => rs.reverse(),
            Sort::Popularity => {
                rs.reverse();
                rs.sort_by(|a, b| votes(b).total_cmp(&votes(a)));
            }
            Sort::Relevance => {
                let q = words(text);
                rs.reverse();
                let key = |r: &Value| {
                    let w = words(&as_text(r));
                    q.intersection(&w).count()
                };
                rs.sort_by_key(|r| std::cmp::Reverse(key(r)));
            }
        }
        rs.truncate(limit);
        Ok(match form {
            Form::Structured => Value::Array(rs),
            Form::Text => Value::String(rs.iter().map(as_text).collect::<Vec<_>>().join("\n")),
        })
    }

    /// The paper's query over items: the given ids sorted (popularity = visible reviews).
    pub fn query_items(&self, ids: &[String], sort: Sort, form: Form, text: &str) -> Result<Value> {
        let mut recs: Vec<(Value, usize)> = Vec::new();
        for id in ids {
            if let Some(r) = self.get_item(id)? {
                let p = self.item_popularity(id)?;
                recs.push((r, p));
            }
        }
        match sort {
            Sort::Popularity | Sort::Date => recs.sort_by_key(|x| std::cmp::Reverse(x.1)),
            Sort::Relevance => {
                let q = words(text);
                recs.sort_by_key(|(r, _)| {
                    std::cmp::Reverse(q.intersection(&words(&as_text(r))).count())
                });
            }
        }
        let v: Vec<Value> = recs.into_iter().map(|x| x.0).collect();
        Ok(match form {
            Form::Structured => Value::Array(v),
            Form::Text => Value::String(v.iter().map(as_text).collect::<Vec<_>>().join("\n")),
        })
    }
}
