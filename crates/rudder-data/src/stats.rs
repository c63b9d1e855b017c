//! Dataset statistics, printable as a table and serialisable as JSON.

use crate::dataset::Dataset;
use crate::formats::Loaded;
use crate::interactions::Interactions;
use crate::sequences::{PromptDataset, SeqDataset};
use std::fmt::Write;

#[derive(Debug, Clone, serde::Serialize)]
pub struct Summary {
    pub count: usize,
    pub min: f64,
    pub median: f64,
    pub mean: f64,
    pub max: f64,
}

impl Summary {
    pub fn of(mut v: Vec<f64>) -> Summary {
        if v.is_empty() {
            return Summary {
                count: 0,
                min: 0.0,
                median: 0.0,
                mean: 0.0,
                max: 0.0,
            };
        }
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Summary {
            count: n,
            min: v[0],
            median,
            mean: v.iter().sum::<f64>() / n as f64,
            max: v[n - 1],
        }
    }
}

/// Gini coefficient of non-negative counts (0 = equal, →1 = concentrated).
pub fn gini(counts: &[usize]) -> f64 {
    let mut v: Vec<f64> = counts.iter().map(|&c| c as f64).collect();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len() as f64;
    let s: f64 = v.iter().sum();
    if n == 0.0 || s == 0.0 {
        return 0.0;
    }
    let w: f64 = v
        .iter()
        .enumerate()
        .map(|(i, x)| (i as f64 + 1.0) * x)
        .sum();
    (2.0 * w) / (n * s) - (n + 1.0) / n
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct PartStats {
    pub name: String,
    pub interactions: usize,
    pub users: usize,
    pub items: usize,
}

fn part(name: &str, x: &Interactions) -> PartStats {
    PartStats {
        name: name.into(),
        interactions: x.len(),
        users: x.active_users().len(),
        items: x.item_degrees().iter().filter(|&&d| d > 0).count(),
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct InteractionStats {
    pub name: String,
    pub users: usize,
    pub items: usize,
    pub interactions: usize,
    pub users_with_interactions: usize,
    pub items_with_interactions: usize,
    pub density: f64,
    pub duplicate_pairs: usize,
    pub per_user: Summary,
    pub per_item: Summary,
    pub item_gini: f64,
    pub ratings: Option<Summary>,
    pub time_range: Option<(i64, i64)>,
    pub items_with_title: usize,
    pub item_fields: Vec<String>,
    pub user_fields: Vec<String>,
    pub splits: Vec<PartStats>,
}

pub fn interaction_stats(ds: &Dataset) -> InteractionStats {
    let x = &ds.interactions;
    let ud = x.user_degrees();
    let id = x.item_degrees();
    InteractionStats {
        name: ds.name.clone(),
        users: ds.n_users(),
        items: ds.n_items(),
        interactions: x.len(),
        users_with_interactions: ud.iter().filter(|&&d| d > 0).count(),
        items_with_interactions: id.iter().filter(|&&d| d > 0).count(),
        density: x.len() as f64 / (ds.n_users().max(1) * ds.n_items().max(1)) as f64,
        duplicate_pairs: x.duplicate_pairs(),
        per_user: Summary::of(ud.iter().map(|&d| d as f64).collect()),
        per_item: Summary::of(id.iter().map(|&d| d as f64).collect()),
        item_gini: gini(&id),
        ratings: x
            .all_ratings()
            .map(|r| Summary::of(r.iter().map(|&v| v as f64).collect())),
        time_range: x
            .all_timestamps()
            .and_then(|t| Some((*t.iter().min()?, *t.iter().max()?))),
        items_with_title: (0..ds.n_items() as u32)
            .filter(|&i| ds.item_table.title(i).is_some())
            .count(),
        item_fields: ds.item_table.fields.keys().cloned().collect(),
        user_fields: ds.user_table.fields.keys().cloned().collect(),
        splits: ds
            .split
            .as_ref()
            .map(|s| s.parts().into_iter().map(|(n, x)| part(n, x)).collect())
            .unwrap_or_default(),
    }
}

fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (k, c) in s.chars().enumerate() {
        if k > 0 && (s.len() - k).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn date(ts: i64) -> String {
    // civil date from unix seconds (proleptic Gregorian), no dependency needed
    let days = ts.div_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    format!("{:04}-{:02}-{:02}", if m <= 2 { y + 1 } else { y }, m, d)
}

impl std::fmt::Display for InteractionStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut s = String::new();
        writeln!(s, "dataset        {}", self.name)?;
        writeln!(s, "users          {}", thousands(self.users))?;
        writeln!(s, "items          {}", thousands(self.items))?;
        writeln!(s, "interactions   {}", thousands(self.interactions))?;
        writeln!(s, "density        {:.4}%", self.density * 100.0)?;
        if self.users_with_interactions != self.users || self.items_with_interactions != self.items
        {
            writeln!(
                s,
                "active         {} users, {} items with ≥1 interaction",
                thousands(self.users_with_interactions),
                thousands(self.items_with_interactions)
            )?;
        }
        let p = &self.per_user;
        writeln!(
            s,
            "per user       min {} · median {} · mean {:.1} · max {}",
            p.min, p.median, p.mean, p.max
        )?;
        let p = &self.per_item;
        writeln!(
            s,
            "per item       min {} · median {} · mean {:.1} · max {} · Gini {:.3}",
            p.min, p.median, p.mean, p.max, self.item_gini
        )?;
        if let Some(r) = &self.ratings {
            writeln!(
                s,
                "ratings        min {} · median {} · mean {:.3} · max {}",
                r.min, r.median, r.mean, r.max
            )?;
        }
        if let Some((a, b)) = self.time_range {
            writeln!(s, "time           {} … {}", date(a), date(b))?;
        }
        if self.duplicate_pairs > 0 {
            writeln!(
                s,
                "duplicates     {} repeated (user, item) pairs",
                thousands(self.duplicate_pairs)
            )?;
        }
        if self.items_with_title > 0 || !self.item_fields.is_empty() {
            writeln!(
                s,
                "item metadata  {} titles; fields: {}",
                thousands(self.items_with_title),
                self.item_fields.join(", ")
            )?;
        }
        if !self.user_fields.is_empty() {
            writeln!(s, "user metadata  {}", self.user_fields.join(", "))?;
        }
        if !self.splits.is_empty() {
            writeln!(
                s,
                "\n{:<14} {:>13} {:>8} {:>8}",
                "split", "interactions", "users", "items"
            )?;
            for p in &self.splits {
                writeln!(
                    s,
                    "{:<14} {:>13} {:>8} {:>8}",
                    p.name,
                    thousands(p.interactions),
                    thousands(p.users),
                    thousands(p.items)
                )?;
            }
        }
        f.write_str(s.trim_end())
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct SeqStats {
    pub name: String,
    pub items: Option<usize>,
    pub splits: Vec<(String, usize, Summary)>,
}

pub fn seq_stats(ds: &SeqDataset) -> SeqStats {
    SeqStats {
        name: ds.name.clone(),
        items: ds.item_names.as_ref().map(|v| v.len()),
        splits: ds
            .splits
            .iter()
            .map(|(n, v)| {
                (
                    n.clone(),
                    v.len(),
                    Summary::of(
                        v.iter()
                            .map(|s| s.history(ds.pad_id()).len() as f64)
                            .collect(),
                    ),
                )
            })
            .collect(),
    }
}

impl std::fmt::Display for SeqStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "dataset        {} (LLaRA sequences)", self.name)?;
        if let Some(n) = self.items {
            writeln!(f, "items          {} (pad id {n})", thousands(n))?;
        }
        writeln!(f, "\n{:<8} {:>9}  history length", "split", "samples")?;
        for (n, c, s) in &self.splits {
            writeln!(
                f,
                "{:<8} {:>9}  min {} · median {} · mean {:.2} · max {}",
                n,
                thousands(*c),
                s.min,
                s.median,
                s.mean,
                s.max
            )?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct PromptStats {
    pub name: String,
    pub splits: Vec<(String, usize, Summary, Summary)>,
    pub distinct_titles: usize,
}

pub fn prompt_stats(ds: &PromptDataset) -> PromptStats {
    let mut titles = std::collections::HashSet::new();
    for (_, v) in &ds.splits {
        for r in v {
            titles.extend(r.history.iter().map(String::as_str));
            titles.extend(r.candidates.iter().map(String::as_str));
        }
    }
    PromptStats {
        name: ds.name.clone(),
        distinct_titles: titles.len(),
        splits: ds
            .splits
            .iter()
            .map(|(n, v)| {
                (
                    n.clone(),
                    v.len(),
                    Summary::of(v.iter().map(|r| r.history.len() as f64).collect()),
                    Summary::of(v.iter().map(|r| r.candidates.len() as f64).collect()),
                )
            })
            .collect(),
    }
}

impl std::fmt::Display for PromptStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "dataset        {} (S-DPO prompts)", self.name)?;
        writeln!(
            f,
            "titles         {} distinct",
            thousands(self.distinct_titles)
        )?;
        writeln!(
            f,
            "\n{:<8} {:>9}  history length · candidates",
            "split", "records"
        )?;
        for (n, c, h, k) in &self.splits {
            writeln!(
                f,
                "{:<8} {:>9}  {}–{} (mean {:.2}) · {}–{}",
                n,
                thousands(*c),
                h.min,
                h.max,
                h.mean,
                k.min,
                k.max
            )?;
        }
        Ok(())
    }
}

/// Statistics of whatever was loaded, as text and JSON.
pub fn describe(data: &Loaded) -> (String, serde_json::Value) {
    match data {
        Loaded::Interactions(d) => {
            let s = interaction_stats(d);
            (s.to_string(), serde_json::to_value(&s).unwrap())
        }
        Loaded::Sequences(d) => {
            let s = seq_stats(d);
            (s.to_string(), serde_json::to_value(&s).unwrap())
        }
        Loaded::Prompts(d) => {
            let s = prompt_stats(d);
            (s.to_string(), serde_json::to_value(&s).unwrap())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn gini_and_dates() {
        assert!((gini(&[1, 1, 1, 1]) - 0.0).abs() < 1e-12);
        assert!((gini(&[0, 0, 0, 4]) - 0.75).abs() < 1e-12);
        assert_eq!(date(0), "1970-01-01");
        assert_eq!(date(978_300_760), "2000-12-31");
        assert_eq!(thousands(1_000_209), "1,000,209");
    }
}
