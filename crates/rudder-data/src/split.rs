//! Splitting interactions into train/valid/test, all deterministic given the seed.

use crate::dataset::{Dataset, Split};
use crate::error::{DataError, Result};
use crate::interactions::{Interaction, Interactions};
use crate::rng::stream;
use rand::seq::SliceRandom;

/// How to split.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "method", rename_all = "kebab-case")]
pub enum SplitMethod {
    /// Per user: shuffle the user's interactions, then cut by ratio (RecBole's `RO` counts:
    /// valid/test get ⌊r·n⌋, at least one each while train keeps one, train the rest).
    Ratio { ratios: [f64; 3] },
    /// Per user by time: last interaction → test, second-to-last → valid (users need ≥ 3
    /// interactions for a valid item and ≥ 2 for a test item).
    LeaveOneOut,
    /// Global time cut: the earliest `r0` of all interactions → train, next `r1` → valid, the
    /// rest → test.
    Temporal { ratios: [f64; 3] },
}

impl SplitMethod {
    pub fn parse(s: &str, ratios: [f64; 3]) -> Option<SplitMethod> {
        match s {
            "ratio" | "random" => Some(SplitMethod::Ratio { ratios }),
            "loo" | "leave-one-out" => Some(SplitMethod::LeaveOneOut),
            "temporal" | "time" => Some(SplitMethod::Temporal { ratios }),
            _ => None,
        }
    }
}

fn check_ratios(r: &[f64; 3]) -> Result<()> {
    let s: f64 = r.iter().sum();
    if r.iter().any(|&x| !(0.0..=1.0).contains(&x)) || (s - 1.0).abs() > 1e-6 {
        return Err(DataError::Config(format!(
            "split ratios {r:?} must be in [0,1] and sum to 1"
        )));
    }
    Ok(())
}

/// Counts for a user with `n` interactions under RecBole's ratio rule.
pub fn ratio_counts(n: usize, r: &[f64; 3]) -> [usize; 3] {
    let mut c = [0usize; 3];
    for k in 1..3 {
        c[k] = (r[k] * n as f64) as usize;
    }
    c[0] = n - c[1] - c[2];
    for k in (1..3).rev() {
        if c[k] == 0 && c[0] > 1 && r[k] > 0.0 {
            c[k] += 1;
            c[0] -= 1;
        }
    }
    c
}

/// Order of a user's interactions by time (stable: ties keep the given order).
pub(crate) fn time_order(x: &Interactions, u: u32) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..x.degree(u)).collect();
    if let Some(t) = x.timestamps(u) {
        idx.sort_by_key(|&k| t[k]);
    }
    idx
}

/// Split `ds.interactions` with `method`; the result carries the split.
pub fn split(ds: &Dataset, method: &SplitMethod, seed: u64) -> Result<Dataset> {
    let x = &ds.interactions;
    if x.is_empty() {
        return Err(DataError::Config(format!(
            "{}: no interactions left to split",
            ds.name
        )));
    }
    let mut parts: [Vec<Interaction>; 3] = Default::default();
    match method {
        SplitMethod::Ratio { ratios } => {
            check_ratios(ratios)?;
            for u in 0..x.n_users() as u32 {
                let all: Vec<Interaction> = x.iter_user(u).collect();
                let mut idx = time_order(x, u);
                let mut rng = stream(seed, &[0x5017, u as u64]);
                idx.shuffle(&mut rng);
                let c = ratio_counts(all.len(), ratios);
                // keep each part in time order
                let mut p = 0;
                for (k, &ck) in c.iter().enumerate() {
                    let mut chunk: Vec<usize> = idx[p..p + ck].to_vec();
                    chunk.sort_unstable();
                    parts[k].extend(chunk.into_iter().map(|j| all[j]));
                    p += ck;
                }
            }
        }
        SplitMethod::LeaveOneOut => {
            if !x.has_timestamps() {
                return Err(DataError::Config(format!(
                    "dataset `{}` has no timestamps; leave-one-out by time needs them (use --method ratio)",
                    ds.name
                )));
            }
            for u in 0..x.n_users() as u32 {
                let all: Vec<Interaction> = x.iter_user(u).collect();
                let idx = time_order(x, u);
                let n = idx.len();
                for (pos, &j) in idx.iter().enumerate() {
                    let part = if n >= 2 && pos == n - 1 {
                        2
                    } else if n >= 3 && pos == n - 2 {
                        1
                    } else {
                        0
                    };
                    parts[part].push(all[j]);
                }
            }
        }
        SplitMethod::Temporal { ratios } => {
            check_ratios(ratios)?;
            let Some(ts) = x.all_timestamps() else {
                return Err(DataError::Config(format!(
                    "dataset `{}` has no timestamps; a temporal split needs them",
                    ds.name
                )));
            };
            let mut order: Vec<usize> = (0..x.len()).collect();
            order.sort_by_key(|&p| ts[p]);
            let n = order.len();
            let n_train = (ratios[0] * n as f64).round() as usize;
            let n_valid = ((ratios[0] + ratios[1]) * n as f64).round() as usize - n_train;
            let mut which = vec![0u8; n];
            for (rank, &p) in order.iter().enumerate() {
                which[p] = if rank < n_train {
                    0
                } else if rank < n_train + n_valid {
                    1
                } else {
                    2
                };
            }
            for (p, it) in x.iter().enumerate() {
                parts[which[p] as usize].push(it);
            }
        }
    }
    let (nu, ni) = (x.n_users(), x.n_items());
    let mk = |l: &Vec<Interaction>| Interactions::from_interactions(nu, ni, l);
    let mut out = ds.clone();
    out.split = Some(Split {
        train: mk(&parts[0]),
        valid: mk(&parts[1]),
        test: mk(&parts[2]),
        extra_tests: Vec::new(),
    });
    Ok(out)
}

/// Carve a popularity-shifted out-of-distribution test set out of `ds` before splitting the
/// rest: `fraction` of all interactions, drawn without replacement with probability ∝
/// `pop_i^(−gamma)` (pop = the item's interaction count), so the OOD test over-represents
/// unpopular items the way the debiasing papers' shifted tests do. The rest is split with
/// `method`; the OOD set becomes the extra test set `test_ood`. At most half of any item's
/// interactions go to the OOD set, so every item keeps training signal.
pub fn split_with_ood(
    ds: &Dataset,
    method: &SplitMethod,
    fraction: f64,
    gamma: f64,
    seed: u64,
) -> Result<Dataset> {
    if !(0.0..1.0).contains(&fraction) {
        return Err(DataError::Config(format!(
            "OOD fraction {fraction} must be in [0, 1)"
        )));
    }
    let x = &ds.interactions;
    if x.is_empty() {
        return Err(DataError::Config(format!(
            "{}: no interactions left to split",
            ds.name
        )));
    }
    let pop = x.item_degrees();
    let n_ood = (fraction * x.len() as f64).round() as usize;
    let mut keys: Vec<(f64, usize)> = x
        .iter()
        .enumerate()
        .map(|(p, it)| {
            // Gumbel-top-k = weighted sampling without replacement, log w = −γ ln pop
            let u = crate::rng::unit(seed, &[0x00D, p as u64]).max(1e-300);
            (
                -gamma * (pop[it.item as usize] as f64).ln() - (-u.ln()).ln(),
                p,
            )
        })
        .collect();
    // take the highest keys, but never more than half of an item's interactions, so every
    // item keeps training signal
    keys.sort_unstable_by(|a, b| b.0.partial_cmp(&a.0).unwrap());
    let mut taken = vec![0usize; pop.len()];
    let mut in_ood = vec![false; x.len()];
    let items = x.indices();
    let mut n = 0;
    for &(_, p) in &keys {
        if n == n_ood {
            break;
        }
        let i = items[p] as usize;
        if 2 * (taken[i] + 1) <= pop[i] {
            taken[i] += 1;
            in_ood[p] = true;
            n += 1;
        }
    }
    let all: Vec<Interaction> = x.iter().collect();
    let (nu, ni) = (x.n_users(), x.n_items());
    let rest: Vec<Interaction> = all
        .iter()
        .zip(&in_ood)
        .filter(|(_, o)| !**o)
        .map(|(i, _)| *i)
        .collect();
    let ood: Vec<Interaction> = all
        .iter()
        .zip(&in_ood)
        .filter(|(_, o)| **o)
        .map(|(i, _)| *i)
        .collect();
    let mut base = ds.clone();
    base.interactions = Interactions::from_interactions(nu, ni, &rest);
    let mut out = split(&base, method, seed)?;
    out.interactions = ds.interactions.clone();
    if let Some(s) = out.split.as_mut() {
        s.extra_tests.push((
            "test_ood".into(),
            Interactions::from_interactions(nu, ni, &ood),
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builder::DatasetBuilder;

    fn toy() -> Dataset {
        let mut b = DatasetBuilder::new();
        for u in 0..20 {
            for i in 0..(3 + u % 7) {
                b.add(
                    &format!("u{u}"),
                    &format!("i{i}"),
                    Some(4.0),
                    Some((100 * u + 10 * i) as i64),
                );
            }
        }
        b.finish("toy", None, None)
    }

    #[test]
    fn ratio_counts_follow_recbole() {
        assert_eq!(ratio_counts(10, &[0.8, 0.1, 0.1]), [8, 1, 1]);
        assert_eq!(ratio_counts(3, &[0.8, 0.1, 0.1]), [1, 1, 1]);
        assert_eq!(ratio_counts(1, &[0.8, 0.1, 0.1]), [1, 0, 0]);
        assert_eq!(ratio_counts(25, &[0.8, 0.1, 0.1]), [21, 2, 2]);
    }

    #[test]
    fn ratio_split_partitions_and_is_seeded() {
        let ds = toy();
        let a = split(
            &ds,
            &SplitMethod::Ratio {
                ratios: [0.8, 0.1, 0.1],
            },
            7,
        )
        .unwrap();
        let b = split(
            &ds,
            &SplitMethod::Ratio {
                ratios: [0.8, 0.1, 0.1],
            },
            7,
        )
        .unwrap();
        let c = split(
            &ds,
            &SplitMethod::Ratio {
                ratios: [0.8, 0.1, 0.1],
            },
            8,
        )
        .unwrap();
        let (sa, sb, sc) = (a.split.unwrap(), b.split.unwrap(), c.split.unwrap());
        assert_eq!(sa, sb);
        assert_ne!(sa.train, sc.train);
        assert_eq!(
            sa.train.len() + sa.valid.len() + sa.test.len(),
            ds.interactions.len()
        );
        let mut all = sa.all().sorted_sets();
        all.iter_mut().for_each(|v| v.sort());
        assert_eq!(all, ds.interactions.sorted_sets());
    }

    #[test]
    fn leave_one_out_takes_latest() {
        let ds = toy();
        let s = split(&ds, &SplitMethod::LeaveOneOut, 0)
            .unwrap()
            .split
            .unwrap();
        for u in 0..ds.n_users() as u32 {
            let t = ds.interactions.timestamps(u).unwrap();
            let max = *t.iter().max().unwrap();
            assert_eq!(s.test.timestamps(u).unwrap(), &[max]);
            assert_eq!(s.valid.degree(u), 1);
            assert!(
                s.train.timestamps(u).unwrap().iter().all(|&x| x < *s
                    .valid
                    .timestamps(u)
                    .unwrap()
                    .first()
                    .unwrap())
            );
        }
    }

    #[test]
    fn ood_test_favours_unpopular_items() {
        let w = crate::synth::SynthWorld::generate(&crate::synth::SynthConfig {
            n_users: 200,
            n_items: 300,
            ..Default::default()
        });
        let ds = split_with_ood(
            &w.dataset,
            &SplitMethod::Ratio {
                ratios: [0.8, 0.1, 0.1],
            },
            0.1,
            1.0,
            3,
        )
        .unwrap();
        let s = ds.split.as_ref().unwrap();
        let (name, ood) = &s.extra_tests[0];
        assert_eq!(name, "test_ood");
        let total = s.train.len() + s.valid.len() + s.test.len() + ood.len();
        assert_eq!(total, ds.interactions.len());
        assert_eq!(ood.len(), (0.1 * total as f64).round() as usize);
        let ood_deg = ood.item_degrees();
        let pop = ds.interactions.item_degrees();
        assert!(
            ood_deg.iter().zip(&pop).all(|(&o, &p)| 2 * o <= p),
            "at most half of an item goes to OOD"
        );
        let mean_pop = |x: &Interactions| {
            x.iter().map(|i| pop[i.item as usize] as f64).sum::<f64>() / x.len() as f64
        };
        assert!(
            mean_pop(ood) < 0.75 * mean_pop(&s.test),
            "ood {} vs id {}",
            mean_pop(ood),
            mean_pop(&s.test)
        );
        let strong = split_with_ood(
            &w.dataset,
            &SplitMethod::Ratio {
                ratios: [0.8, 0.1, 0.1],
            },
            0.1,
            2.0,
            3,
        )
        .unwrap();
        let strong_ood = &strong.split.as_ref().unwrap().extra_tests[0].1;
        assert!(
            mean_pop(strong_ood) < mean_pop(ood),
            "a larger gamma shifts further"
        );
    }

    #[test]
    fn temporal_cut_is_global() {
        let ds = toy();
        let s = split(
            &ds,
            &SplitMethod::Temporal {
                ratios: [0.7, 0.15, 0.15],
            },
            0,
        )
        .unwrap()
        .split
        .unwrap();
        let max_train = s
            .train
            .all_timestamps()
            .unwrap()
            .iter()
            .max()
            .copied()
            .unwrap();
        let min_test = s
            .test
            .all_timestamps()
            .unwrap()
            .iter()
            .min()
            .copied()
            .unwrap();
        assert!(max_train <= min_test);
        assert_eq!(
            s.train.len() + s.valid.len() + s.test.len(),
            ds.interactions.len()
        );
    }
}
