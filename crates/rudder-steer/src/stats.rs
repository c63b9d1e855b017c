//! Metrics and data splits for probes and detectors: MSE, R², Pearson, Spearman (average ranks
//! for ties), AUROC (Mann–Whitney, ties counted half), ROC points, seeded train/test split and
//! k folds.

use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

pub fn mean(x: &[f64]) -> f64 {
    if x.is_empty() {
        return f64::NAN;
    }
    x.iter().sum::<f64>() / x.len() as f64
}

pub fn mse(y: &[f64], p: &[f64]) -> f64 {
    y.iter().zip(p).map(|(a, b)| (a - b).powi(2)).sum::<f64>() / y.len().max(1) as f64
}

/// Coefficient of determination, `1 − SS_res / SS_tot` (as scikit-learn: 0 predictions of a
/// constant target give 1 if exact, else 0).
pub fn r2(y: &[f64], p: &[f64]) -> f64 {
    let m = mean(y);
    let ss_tot: f64 = y.iter().map(|v| (v - m).powi(2)).sum();
    let ss_res: f64 = y.iter().zip(p).map(|(a, b)| (a - b).powi(2)).sum();
    if ss_tot == 0.0 {
        return if ss_res == 0.0 { 1.0 } else { 0.0 };
    }
    1.0 - ss_res / ss_tot
}

pub fn pearson(x: &[f64], y: &[f64]) -> f64 {
    let (mx, my) = (mean(x), mean(y));
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in x.iter().zip(y) {
        sxy += (a - mx) * (b - my);
        sxx += (a - mx).powi(2);
        syy += (b - my).powi(2);
    }
    if sxx == 0.0 || syy == 0.0 {
        return f64::NAN;
    }
    sxy / (sxx * syy).sqrt()
}

/// Ranks starting at 1, ties sharing their average rank.
pub fn ranks(x: &[f64]) -> Vec<f64> {
    let mut idx: Vec<usize> = (0..x.len()).collect();
    idx.sort_by(|&a, &b| x[a].total_cmp(&x[b]));
    let mut r = vec![0.0; x.len()];
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && x[idx[j + 1]] == x[idx[i]] {
            j += 1;
        }
        let avg = (i + j) as f64 / 2.0 + 1.0;
        for &k in &idx[i..=j] {
            r[k] = avg;
        }
        i = j + 1;
    }
    r
}

/// Spearman's ρ: Pearson's r of the average ranks (scipy.stats.spearmanr).
pub fn spearman(x: &[f64], y: &[f64]) -> f64 {
    pearson(&ranks(x), &ranks(y))
}

/// Area under the ROC curve of `scores` for `positive` labels (Mann–Whitney U; a tie counts
/// half).
pub fn auroc(scores: &[f64], positive: &[bool]) -> f64 {
    let r = ranks(scores);
    let np = positive.iter().filter(|&&p| p).count() as f64;
    let nn = positive.len() as f64 - np;
    if np == 0.0 || nn == 0.0 {
        return f64::NAN;
    }
    let sum_pos: f64 = r
        .iter()
        .zip(positive)
        .filter(|(_, p)| **p)
        .map(|(r, _)| r)
        .sum();
    (sum_pos - np * (np + 1.0) / 2.0) / (np * nn)
}

/// ROC curve points `(false positive rate, true positive rate)` over every threshold, from
/// (0, 0) to (1, 1).
pub fn roc(scores: &[f64], positive: &[bool]) -> Vec<(f64, f64)> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let np = positive.iter().filter(|&&p| p).count().max(1) as f64;
    let nn = (positive.len() - positive.iter().filter(|&&p| p).count()).max(1) as f64;
    let mut pts = vec![(0.0, 0.0)];
    let (mut tp, mut fp) = (0.0, 0.0);
    let mut i = 0;
    while i < idx.len() {
        let s = scores[idx[i]];
        while i < idx.len() && scores[idx[i]] == s {
            if positive[idx[i]] {
                tp += 1.0;
            } else {
                fp += 1.0;
            }
            i += 1;
        }
        pts.push((fp / nn, tp / np));
    }
    pts
}

/// The `q`-quantile (0..=1) by linear interpolation between order statistics (numpy default).
pub fn quantile(x: &[f64], q: f64) -> f64 {
    if x.is_empty() {
        return f64::NAN;
    }
    let mut v = x.to_vec();
    v.sort_by(f64::total_cmp);
    let pos = q.clamp(0.0, 1.0) * (v.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    v[lo] + (v[hi] - v[lo]) * (pos - lo as f64)
}

/// Train and test row indices.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Split {
    pub train: Vec<usize>,
    pub test: Vec<usize>,
}

/// A seeded shuffle of `0..n` cut into train and `test_fraction` test (at least one of each
/// when n ≥ 2). Both lists are sorted.
pub fn train_test_split(n: usize, test_fraction: f64, seed: u64) -> Split {
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut rudder_data::rng::stream(seed, &[0x5_9117]));
    let mut k = (n as f64 * test_fraction).ceil() as usize;
    if n >= 2 {
        k = k.clamp(1, n - 1);
    } else {
        k = 0;
    }
    let mut test = idx[..k].to_vec();
    let mut train = idx[k..].to_vec();
    test.sort_unstable();
    train.sort_unstable();
    Split { train, test }
}

/// `k` folds of a seeded shuffle of `0..n` (sizes differ by at most one).
pub fn k_folds(n: usize, k: usize, seed: u64) -> Vec<Split> {
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut rudder_data::rng::stream(seed, &[0xF01D]));
    let k = k.clamp(2, n.max(2));
    (0..k)
        .map(|f| {
            let lo = f * n / k;
            let hi = (f + 1) * n / k;
            let mut test = idx[lo..hi].to_vec();
            let mut train: Vec<usize> = idx[..lo].iter().chain(&idx[hi..]).copied().collect();
            test.sort_unstable();
            train.sort_unstable();
            Split { train, test }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_computed_metrics() {
        let y = [1.0, 2.0, 3.0, 4.0];
        let p = [1.5, 2.0, 2.5, 4.5];
        assert!((mse(&y, &p) - 0.1875).abs() < 1e-12);
        assert!((r2(&y, &p) - (1.0 - 0.75 / 5.0)).abs() < 1e-12);
        assert!((pearson(&y, &[2.0, 4.0, 6.0, 8.0]) - 1.0).abs() < 1e-12);
        // ties share the average rank; scipy.stats.spearmanr([1,2,2,3],[1,3,2,4]) = 0.9486832980505138
        assert_eq!(ranks(&[10.0, 20.0, 20.0, 30.0]), vec![1.0, 2.5, 2.5, 4.0]);
        let s = spearman(&[1.0, 2.0, 2.0, 3.0], &[1.0, 3.0, 2.0, 4.0]);
        assert!((s - 0.9486832980505138).abs() < 1e-12, "{s}");
        assert!(pearson(&[1.0, 1.0], &[1.0, 2.0]).is_nan());
    }

    #[test]
    fn auroc_roc_and_quantiles() {
        let s = [0.9, 0.8, 0.7, 0.6, 0.5];
        let p = [true, true, false, true, false];
        // pairs (pos > neg): 0.9>0.7,0.5; 0.8>0.7,0.5; 0.6>0.5 → 5 of 6
        assert!((auroc(&s, &p) - 5.0 / 6.0).abs() < 1e-12);
        assert!((auroc(&[1.0, 1.0], &[true, false]) - 0.5).abs() < 1e-12);
        let r = roc(&s, &p);
        assert_eq!(r.first(), Some(&(0.0, 0.0)));
        assert_eq!(r.last(), Some(&(1.0, 1.0)));
        assert!((quantile(&[1.0, 2.0, 3.0, 4.0, 5.0], 0.95) - 4.8).abs() < 1e-12);
    }

    #[test]
    fn splits_are_seeded_disjoint_and_complete() {
        let a = train_test_split(100, 0.1, 42);
        assert_eq!(a, train_test_split(100, 0.1, 42));
        assert_ne!(a, train_test_split(100, 0.1, 43));
        assert_eq!(a.test.len(), 10);
        let mut all: Vec<usize> = a.train.iter().chain(&a.test).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..100).collect::<Vec<_>>());
        let folds = k_folds(23, 5, 1);
        assert_eq!(folds.len(), 5);
        let mut seen: Vec<usize> = folds.iter().flat_map(|f| f.test.clone()).collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..23).collect::<Vec<_>>());
        assert!(folds.iter().all(|f| f.train.len() + f.test.len() == 23));
    }
}
