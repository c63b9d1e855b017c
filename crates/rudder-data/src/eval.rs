//! The ranking evaluator of the whole project (cf-seeds.md [S5]).
//!
//! Full ranking: every item is scored for a user, the items of the chosen *mask* splits are
//! removed except the user's own ground truth (`dump(u) \ T_u`), items of a global mask are
//! removed, and the top K are compared with the ground truth `T_u`. Candidate mode: only the
//! given candidate items of each user are scored and ranked. Ties are broken by the lower item
//! id, so results are deterministic. Users without ground truth are not evaluated.
//!
//! Metrics at K (1-based rank i, `hit_i = 1[r_i ∈ T_u]`, `H = Σ_{i≤K} hit_i`), averaged over
//! evaluated users with equal weight: Precision = H/K, Recall = H/|T_u|, HR = 1[H>0],
//! NDCG = Σ hit_i/log2(i+1) ÷ Σ_{i≤min(K,|T_u|)} 1/log2(i+1), MRR = 1/(first hit rank),
//! MAP = (Σ_{i≤K, hit_i} (hits up to i)/i) / H (0 when H = 0).

use crate::error::{DataError, Result};
use crate::interactions::Interactions;
use rayon::prelude::*;
use std::collections::BTreeMap;

/// Something that scores items for users (higher = more relevant).
pub trait Scorer: Sync {
    /// Scores of all `n_items` items for each user of `users`, row-major into `out`
    /// (`out.len() == users.len() * n_items`).
    fn score_users(&self, users: &[u32], n_items: usize, out: &mut [f32]);

    /// Scores of `items` for one user. The default computes the full row and gathers.
    fn score_items(&self, user: u32, items: &[u32], n_items: usize, out: &mut [f32]) {
        let mut row = vec![0f32; n_items];
        self.score_users(&[user], n_items, &mut row);
        for (o, &i) in out.iter_mut().zip(items) {
            *o = row[i as usize];
        }
    }
}

/// The metrics, in the reference's result order.
pub const METRICS: [&str; 6] = ["precision", "recall", "map", "ndcg", "mrr", "hit"];

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EvalConfig {
    /// Cut-offs, e.g. `[10, 20]`.
    pub ks: Vec<usize>,
    /// Users scored per call of the scorer.
    pub batch_size: usize,
    /// Keep the per-user results (top-K lists and metrics).
    pub per_user: bool,
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig {
            ks: vec![10, 20],
            batch_size: 256,
            per_user: false,
        }
    }
}

/// One evaluated user.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct UserResult {
    pub user: u32,
    pub n_truth: usize,
    /// Ranked top-max(K) items.
    pub top: Vec<u32>,
    /// `metrics[k][m]`: cut-off `ks[k]`, metric `METRICS[m]`.
    pub metrics: Vec<[f64; 6]>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EvalReport {
    pub ks: Vec<usize>,
    pub n_users: usize,
    /// `"recall@20" → mean`, for every metric and cut-off.
    pub means: BTreeMap<String, f64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub per_user: Vec<UserResult>,
}

impl EvalReport {
    pub fn get(&self, metric: &str, k: usize) -> f64 {
        self.means
            .get(&format!("{metric}@{k}"))
            .copied()
            .unwrap_or(f64::NAN)
    }

    /// Per-user results as JSON lines (external ids are the caller's business).
    pub fn per_user_jsonl(&self) -> String {
        let mut s = String::new();
        for u in &self.per_user {
            let mut m = serde_json::Map::new();
            m.insert("user".into(), u.user.into());
            m.insert("n_truth".into(), u.n_truth.into());
            m.insert("top".into(), u.top.clone().into());
            for (ki, k) in self.ks.iter().enumerate() {
                for (mi, name) in METRICS.iter().enumerate() {
                    m.insert(format!("{name}@{k}"), u.metrics[ki][mi].into());
                }
            }
            s.push_str(&serde_json::Value::Object(m).to_string());
            s.push('\n');
        }
        s
    }
}

/// Metrics of one ranked list against a truth set, for every cut-off.
pub fn rank_metrics(ranked: &[u32], truth_sorted: &[u32], ks: &[usize]) -> Vec<[f64; 6]> {
    let nt = truth_sorted.len();
    ks.iter()
        .map(|&k| {
            let mut h = 0usize;
            let mut dcg = 0.0;
            let mut first = 0usize;
            let mut ap = 0.0;
            for (pos, item) in ranked.iter().take(k).enumerate() {
                if truth_sorted.binary_search(item).is_ok() {
                    h += 1;
                    dcg += 1.0 / ((pos + 2) as f64).log2();
                    if first == 0 {
                        first = pos + 1;
                    }
                    ap += h as f64 / (pos + 1) as f64;
                }
            }
            let idcg: f64 = (0..k.min(nt)).map(|p| 1.0 / ((p + 2) as f64).log2()).sum();
            [
                h as f64 / k as f64,
                if nt > 0 { h as f64 / nt as f64 } else { 0.0 },
                if h > 0 { ap / h as f64 } else { 0.0 },
                if idcg > 0.0 { dcg / idcg } else { 0.0 },
                if first > 0 { 1.0 / first as f64 } else { 0.0 },
                if h > 0 { 1.0 } else { 0.0 },
            ]
        })
        .collect()
}

/// Order for ranking: higher score first, NaN last, ties by lower item id.
#[inline]
fn better(a: (f32, u32), b: (f32, u32)) -> std::cmp::Ordering {
    let (sa, sb) = (
        if a.0.is_nan() { f32::NEG_INFINITY } else { a.0 },
        if b.0.is_nan() { f32::NEG_INFINITY } else { b.0 },
    );
    sb.partial_cmp(&sa).unwrap().then(a.1.cmp(&b.1))
}

/// The top `k` of `(score, item)` pairs, ranked.
pub fn top_k(mut cand: Vec<(f32, u32)>, k: usize) -> Vec<u32> {
    let k = k.min(cand.len());
    if k == 0 {
        return Vec::new();
    }
    if k < cand.len() {
        cand.select_nth_unstable_by(k - 1, |a, b| better(*a, *b));
        cand.truncate(k);
    }
    cand.sort_unstable_by(|a, b| better(*a, *b));
    cand.into_iter().map(|c| c.1).collect()
}

/// The top `k` entries of a score row, skipping `skip[i]` and `-inf` scores, ranked (higher
/// score first, NaN last, ties by lower item id). One pass with a bounded insertion list: no
/// allocation proportional to the number of items.
pub fn top_k_row(row: &[f32], k: usize, skip: &[bool]) -> Vec<u32> {
    if k == 0 {
        return Vec::new();
    }
    // `best` holds up to k (score, item) pairs sorted best-first; NaN is treated as -inf but
    // still ranked after every finite score
    let key = |s: f32| if s.is_nan() { f32::NEG_INFINITY } else { s };
    let mut best: Vec<(f32, u32)> = Vec::with_capacity(k + 1);
    let mut nan_items: Vec<u32> = Vec::new();
    for (i, &s) in row.iter().enumerate() {
        if skip.get(i).copied().unwrap_or(false) || s == f32::NEG_INFINITY {
            continue;
        }
        if s.is_nan() {
            if nan_items.len() < k {
                nan_items.push(i as u32);
            }
            continue;
        }
        if best.len() == k && key(s) <= best[k - 1].0 {
            continue; // not better than the current k-th (ties: the earlier, lower id wins)
        }
        let pos = best.partition_point(|&(bs, _)| bs >= s);
        best.insert(pos, (s, i as u32));
        best.truncate(k);
    }
    let mut out: Vec<u32> = best.into_iter().map(|(_, i)| i).collect();
    for i in nan_items {
        if out.len() < k {
            out.push(i);
        }
    }
    out
}

/// Ground truth, masks and (optionally) candidate lists for one evaluation.
pub struct Evaluator<'a> {
    truth: &'a Interactions,
    masks: Vec<&'a Interactions>,
    global_mask: Vec<u32>,
    candidates: Option<&'a [Vec<u32>]>,
}

impl<'a> Evaluator<'a> {
    /// Evaluate against `truth` (e.g. the test split).
    pub fn new(truth: &'a Interactions) -> Self {
        Evaluator {
            truth,
            masks: Vec::new(),
            global_mask: Vec::new(),
            candidates: None,
        }
    }

    /// Remove the items of `split` from each user's ranking (except the user's truth).
    pub fn mask(mut self, split: &'a Interactions) -> Self {
        self.masks.push(split);
        self
    }

    /// Never rank these items (e.g. `not_candidate.txt`).
    pub fn global_mask(mut self, items: Vec<u32>) -> Self {
        self.global_mask = items;
        self
    }

    /// Candidate-list mode: rank only `candidates[u]` for user u (no other masking applies).
    pub fn candidates(mut self, candidates: &'a [Vec<u32>]) -> Self {
        self.candidates = Some(candidates);
        self
    }

    fn check(&self) -> Result<()> {
        for m in &self.masks {
            if m.n_items() != self.truth.n_items() {
                return Err(DataError::Config(format!(
                    "mask covers {} items but the truth covers {}",
                    m.n_items(),
                    self.truth.n_items()
                )));
            }
        }
        if let Some(c) = self.candidates {
            if c.len() < self.truth.n_users() {
                return Err(DataError::Config(format!(
                    "candidate lists for {} users but the truth has {} users",
                    c.len(),
                    self.truth.n_users()
                )));
            }
            if let Some(i) = c
                .iter()
                .flatten()
                .find(|&&i| i as usize >= self.truth.n_items())
            {
                return Err(DataError::Config(format!(
                    "candidate item {i} out of range ({} items)",
                    self.truth.n_items()
                )));
            }
        }
        Ok(())
    }

    /// Users that will be evaluated: non-empty truth (and non-empty candidates).
    pub fn users(&self) -> Vec<u32> {
        (0..self.truth.n_users() as u32)
            .filter(|&u| self.truth.degree(u) > 0)
            .filter(|&u| self.candidates.is_none_or(|c| !c[u as usize].is_empty()))
            .collect()
    }

    pub fn run(&self, scorer: &dyn Scorer, cfg: &EvalConfig) -> Result<EvalReport> {
        self.check()?;
        if cfg.ks.is_empty() || cfg.ks.contains(&0) {
            return Err(DataError::Config("cut-offs K must be positive".into()));
        }
        let n_items = self.truth.n_items();
        let kmax = *cfg.ks.iter().max().unwrap();
        let users = self.users();
        let bs = cfg.batch_size.max(1);
        let mut global = vec![false; n_items];
        for &i in &self.global_mask {
            if (i as usize) < n_items {
                global[i as usize] = true;
            }
        }
        let results: Vec<UserResult> = users
            .par_chunks(bs)
            .flat_map_iter(|chunk| {
                let mut out = Vec::with_capacity(chunk.len());
                match self.candidates {
                    Some(cands) => {
                        for &u in chunk {
                            let c = &cands[u as usize];
                            let mut s = vec![0f32; c.len()];
                            scorer.score_items(u, c, n_items, &mut s);
                            let pairs = s.into_iter().zip(c.iter().copied()).collect();
                            out.push(self.finish(u, top_k(pairs, kmax), &cfg.ks));
                        }
                    }
                    None => {
                        let mut buf = vec![0f32; chunk.len() * n_items];
                        scorer.score_users(chunk, n_items, &mut buf);
                        for (r, &u) in chunk.iter().enumerate() {
                            let row = &mut buf[r * n_items..(r + 1) * n_items];
                            let mut truth = self.truth.items(u).to_vec();
                            truth.sort_unstable();
                            for m in &self.masks {
                                if (u as usize) < m.n_users() {
                                    for &i in m.items(u) {
                                        if truth.binary_search(&i).is_err() {
                                            row[i as usize] = f32::NEG_INFINITY;
                                        }
                                    }
                                }
                            }
                            out.push(self.finish(u, top_k_row(row, kmax, &global), &cfg.ks));
                        }
                    }
                }
                out
            })
            .collect();
        let mut means = BTreeMap::new();
        let n = results.len().max(1) as f64;
        for (ki, k) in cfg.ks.iter().enumerate() {
            for (mi, name) in METRICS.iter().enumerate() {
                let s: f64 = results.iter().map(|r| r.metrics[ki][mi]).sum();
                means.insert(format!("{name}@{k}"), s / n);
            }
        }
        Ok(EvalReport {
            ks: cfg.ks.clone(),
            n_users: results.len(),
            means,
            per_user: if cfg.per_user { results } else { Vec::new() },
        })
    }

    fn finish(&self, u: u32, top: Vec<u32>, ks: &[usize]) -> UserResult {
        let mut truth = self.truth.items(u).to_vec();
        truth.sort_unstable();
        truth.dedup();
        let metrics = rank_metrics(&top, &truth, ks);
        UserResult {
            user: u,
            n_truth: truth.len(),
            top,
            metrics,
        }
    }
}

/// Most-popular baseline: score = number of train interactions of the item.
pub struct Popularity {
    counts: Vec<f32>,
}

impl Popularity {
    pub fn new(train: &Interactions) -> Self {
        Popularity {
            counts: train.item_degrees().into_iter().map(|c| c as f32).collect(),
        }
    }
}

impl Scorer for Popularity {
    fn score_users(&self, users: &[u32], n_items: usize, out: &mut [f32]) {
        for r in 0..users.len() {
            out[r * n_items..(r + 1) * n_items].copy_from_slice(&self.counts[..n_items]);
        }
    }
}

/// Random baseline: a fixed pseudo-random score per (seed, user, item).
pub struct RandomScorer {
    pub seed: u64,
}

impl Scorer for RandomScorer {
    fn score_users(&self, users: &[u32], n_items: usize, out: &mut [f32]) {
        for (r, &u) in users.iter().enumerate() {
            for i in 0..n_items {
                out[r * n_items + i] = crate::rng::unit(self.seed, &[u as u64, i as u64]) as f32;
            }
        }
    }
}

/// Scores from a dense `n_users × n_items` matrix (row-major). Handy for tests and for
/// models that precompute their scores.
pub struct DenseScores<'a> {
    pub scores: &'a [f32],
    pub n_items: usize,
}

impl Scorer for DenseScores<'_> {
    fn score_users(&self, users: &[u32], n_items: usize, out: &mut [f32]) {
        for (r, &u) in users.iter().enumerate() {
            let u = u as usize;
            out[r * n_items..(r + 1) * n_items]
                .copy_from_slice(&self.scores[u * self.n_items..u * self.n_items + n_items]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const L3: f64 = 0.6309297535714575; // 1/log2(3)
    const L5: f64 = 0.43067655807339306; // 1/log2(5)

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-9, "{a} != {b}");
    }

    fn scores() -> Vec<f32> {
        // user 0: descending in item id; user 1: all tied; user 2: NaN for item 0
        let mut s = vec![0.9, 0.8, 0.7, 0.6, 0.5, 0.4];
        s.extend([0.5; 6]);
        s.extend([f32::NAN, 0.1, 0.2, 0.3, 0.4, 0.5]);
        s
    }

    #[test]
    fn hand_computed_metrics() {
        let truth = Interactions::from_lists(6, &[vec![1, 3], vec![], vec![]]);
        let s = scores();
        let sc = DenseScores {
            scores: &s,
            n_items: 6,
        };
        let r = Evaluator::new(&truth)
            .run(
                &sc,
                &EvalConfig {
                    ks: vec![2, 4],
                    batch_size: 2,
                    per_user: true,
                },
            )
            .unwrap();
        assert_eq!(r.n_users, 1, "users without truth are not evaluated");
        close(r.get("precision", 2), 0.5);
        close(r.get("recall", 2), 0.5);
        close(r.get("hit", 2), 1.0);
        close(r.get("ndcg", 2), L3 / (1.0 + L3));
        close(r.get("mrr", 2), 0.5);
        close(r.get("map", 2), 0.5);
        close(r.get("precision", 4), 0.5);
        close(r.get("recall", 4), 1.0);
        close(r.get("ndcg", 4), (L3 + L5) / (1.0 + L3));
        close(r.get("map", 4), 0.5);
        assert_eq!(r.per_user[0].top, vec![0, 1, 2, 3]);
        let js = r.per_user_jsonl();
        assert!(js.contains("\"recall@4\":1.0"), "{js}");
    }

    #[test]
    fn recall_denominator_is_truth_size_and_ndcg_ideal_is_min_k() {
        let truth = Interactions::from_lists(6, &[vec![0, 1, 2]]);
        let s = scores();
        let sc = DenseScores {
            scores: &s[..6],
            n_items: 6,
        };
        let r = Evaluator::new(&truth)
            .run(
                &sc,
                &EvalConfig {
                    ks: vec![2],
                    ..Default::default()
                },
            )
            .unwrap();
        close(r.get("recall", 2), 2.0 / 3.0);
        close(r.get("precision", 2), 1.0);
        close(r.get("ndcg", 2), 1.0);
    }

    #[test]
    fn masking_removes_other_splits_but_not_truth() {
        let truth = Interactions::from_lists(6, &[vec![1, 3]]);
        let train = Interactions::from_lists(6, &[vec![0, 1]]); // 1 is also truth: stays rankable
        let s = scores();
        let sc = DenseScores {
            scores: &s[..6],
            n_items: 6,
        };
        let r = Evaluator::new(&truth)
            .mask(&train)
            .run(
                &sc,
                &EvalConfig {
                    ks: vec![2],
                    per_user: true,
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(r.per_user[0].top, vec![1, 2]);
        close(r.get("ndcg", 2), 1.0 / (1.0 + L3));
        close(r.get("mrr", 2), 1.0);
        // a global mask removes items for everyone
        let r = Evaluator::new(&truth)
            .global_mask(vec![0, 2])
            .run(
                &sc,
                &EvalConfig {
                    ks: vec![2],
                    per_user: true,
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(r.per_user[0].top, vec![1, 3]);
        close(r.get("recall", 2), 1.0);
    }

    #[test]
    fn ties_break_by_item_id_and_nan_ranks_last() {
        let truth = Interactions::from_lists(6, &[vec![], vec![4], vec![0]]);
        let s = scores();
        let sc = DenseScores {
            scores: &s,
            n_items: 6,
        };
        let r = Evaluator::new(&truth)
            .run(
                &sc,
                &EvalConfig {
                    ks: vec![6],
                    per_user: true,
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(r.per_user[0].top, vec![0, 1, 2, 3, 4, 5]); // user 1, all tied
        assert_eq!(r.per_user[1].top, vec![5, 4, 3, 2, 1, 0]); // user 2, NaN last
        close(r.per_user[1].metrics[0][4], 1.0 / 6.0);
    }

    #[test]
    fn streaming_top_k_equals_sorting() {
        let mut st = 7u64;
        for n in [1usize, 5, 50, 300] {
            for k in [1usize, 3, 20] {
                let row: Vec<f32> = (0..n)
                    .map(|_| {
                        st = crate::rng::mix64(st);
                        match st % 13 {
                            0 => f32::NAN,
                            1 => f32::NEG_INFINITY,
                            2 => 0.5, // ties
                            _ => (st >> 40) as f32 / 1e6,
                        }
                    })
                    .collect();
                let skip: Vec<bool> = (0..n).map(|i| i % 11 == 3).collect();
                let pairs: Vec<(f32, u32)> = row
                    .iter()
                    .enumerate()
                    .filter(|(i, s)| !skip[*i] && **s != f32::NEG_INFINITY)
                    .map(|(i, &s)| (s, i as u32))
                    .collect();
                assert_eq!(top_k_row(&row, k, &skip), top_k(pairs, k), "n={n} k={k}");
            }
        }
    }

    #[test]
    fn candidate_mode_ranks_only_candidates() {
        let truth = Interactions::from_lists(6, &[vec![3]]);
        let cands = vec![vec![5, 3, 4]];
        let s = scores();
        let sc = DenseScores {
            scores: &s[..6],
            n_items: 6,
        };
        let r = Evaluator::new(&truth)
            .candidates(&cands)
            .run(
                &sc,
                &EvalConfig {
                    ks: vec![1, 3],
                    per_user: true,
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(r.per_user[0].top, vec![3, 4, 5]);
        close(r.get("hit", 1), 1.0);
        let bad = vec![vec![9]];
        assert!(
            Evaluator::new(&truth)
                .candidates(&bad)
                .run(&sc, &EvalConfig::default())
                .is_err()
        );
    }

    #[test]
    fn batch_size_and_threads_do_not_change_results() {
        let n_users = 37;
        let n_items = 50;
        let lists: Vec<Vec<u32>> = (0..n_users)
            .map(|u| {
                (0..(u % 4))
                    .map(|k| ((u * 13 + k * 7) % n_items) as u32)
                    .collect()
            })
            .collect();
        let truth = Interactions::from_lists(n_items, &lists);
        let sc = RandomScorer { seed: 5 };
        let a = Evaluator::new(&truth)
            .run(
                &sc,
                &EvalConfig {
                    ks: vec![5, 10],
                    batch_size: 1,
                    per_user: true,
                },
            )
            .unwrap();
        let b = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap()
            .install(|| {
                Evaluator::new(&truth)
                    .run(
                        &sc,
                        &EvalConfig {
                            ks: vec![5, 10],
                            batch_size: 16,
                            per_user: true,
                        },
                    )
                    .unwrap()
            });
        assert_eq!(a, b);
        assert!(
            Evaluator::new(&truth)
                .run(
                    &sc,
                    &EvalConfig {
                        ks: vec![0],
                        ..Default::default()
                    }
                )
                .is_err()
        );
    }
}
