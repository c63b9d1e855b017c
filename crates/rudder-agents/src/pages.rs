//! The recommender in the loop: a ranking per agent, from which pages are sliced.
//!
//! As the reference: one full ranking per user, computed once, with the user's **train and
//! test** items masked so that valid-split items can appear and serve as the page's ground
//! truth; page i (1-based) is `ranking[(i-1)k .. ik]`. Unlike the reference, every tie is broken
//! by a seeded key (the reference's numpy quicksort order differs across platforms).

use serde::{Deserialize, Serialize};

use rudder_data::eval::Scorer;
use rudder_data::{IdMap, Interactions};

use crate::{AgentError, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Baseline {
    /// The reference's `Pop`: 40 random items among the 600 most popular (train counts),
    /// per user, then everything else in seeded random order.
    PopSample,
    /// Items by train popularity, ties seeded.
    Pop,
    /// A seeded random order per user.
    Random,
}

impl std::str::FromStr for Baseline {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "pop" => Ok(Baseline::PopSample),
            "pop-plain" => Ok(Baseline::Pop),
            "random" => Ok(Baseline::Random),
            _ => Err(format!(
                "unknown recommender `{s}` (expected a CF run folder, pop, pop-plain or random)"
            )),
        }
    }
}

/// The reference's popularity rule sizes (2·Ks and 30·Ks with Ks = 20).
pub const POP_SAMPLE: usize = 40;
pub const POP_TOP: usize = 600;

fn tie_key(seed: u64, user: u32, item: u32) -> u64 {
    rudder_data::rng::hash_keys(seed, &[0x7469_6573, user as u64, item as u64])
}

/// The `depth` best unmasked items of one score row: score descending, then the seeded key,
/// then the item id.
pub fn rank_row(scores: &[f32], masked: &[bool], seed: u64, user: u32, depth: usize) -> Vec<u32> {
    let mut idx: Vec<(f32, u64, u32)> = (0..scores.len() as u32)
        .filter(|&i| !masked[i as usize])
        .map(|i| {
            let s = scores[i as usize];
            (
                if s.is_nan() { f32::NEG_INFINITY } else { s },
                tie_key(seed, user, i),
                i,
            )
        })
        .collect();
    let cmp = |a: &(f32, u64, u32), b: &(f32, u64, u32)| {
        b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2))
    };
    let depth = depth.min(idx.len());
    if depth == 0 {
        return Vec::new();
    }
    if depth < idx.len() {
        idx.select_nth_unstable_by(depth - 1, cmp);
        idx.truncate(depth);
    }
    idx.sort_by(cmp);
    idx.into_iter().map(|x| x.2).collect()
}

/// Items masked for a user: train and test (valid stays, as the page ground truth).
pub fn masked_for(
    user: u32,
    n_items: usize,
    train: &Interactions,
    test: &Interactions,
) -> Vec<bool> {
    let mut m = vec![false; n_items];
    for part in [train, test] {
        if (user as usize) < part.n_users() {
            for &i in part.items(user) {
                m[i as usize] = true;
            }
        }
    }
    m
}

/// Where rankings come from.
pub enum Source<'a> {
    Scores(&'a dyn Scorer),
    Baseline(Baseline),
}

/// Rankings (the first `depth` items) for `users`.
pub fn rankings(
    source: &Source,
    users: &[u32],
    n_items: usize,
    train: &Interactions,
    test: &Interactions,
    seed: u64,
    depth: usize,
) -> Vec<Vec<u32>> {
    // popularity, and its top 600, only for the baselines that use them
    let pop_scores: Vec<f32> = match source {
        Source::Baseline(Baseline::Pop | Baseline::PopSample) => {
            let counts = train.item_degrees();
            (0..n_items)
                .map(|i| counts.get(i).copied().unwrap_or(0) as f32)
                .collect()
        }
        _ => Vec::new(),
    };
    let top600: Vec<u32> = match source {
        Source::Baseline(Baseline::PopSample) => {
            rank_row(&pop_scores, &vec![false; n_items], seed, u32::MAX, POP_TOP)
        }
        _ => Vec::new(),
    };
    let mut row = vec![0f32; n_items];
    users
        .iter()
        .map(|&u| {
            let masked = masked_for(u, n_items, train, test);
            match source {
                Source::Scores(s) => s.score_users(&[u], n_items, &mut row),
                Source::Baseline(Baseline::Pop) => row.copy_from_slice(&pop_scores),
                Source::Baseline(Baseline::Random) => row.iter_mut().for_each(|x| *x = 0.0),
                Source::Baseline(Baseline::PopSample) => {
                    row.iter_mut().for_each(|x| *x = 0.0);
                    let mut pick = top600.clone();
                    // a seeded partial Fisher–Yates: the first POP_SAMPLE are the sample
                    let mut rng = rudder_data::rng::stream(seed, &[0x0070_6f70, u as u64]);
                    for k in 0..POP_SAMPLE.min(pick.len()) {
                        let j = rand::Rng::random_range(&mut rng, k..pick.len());
                        pick.swap(k, j);
                        row[pick[k] as usize] = 1.0;
                    }
                }
            }
            rank_row(&row, &masked, seed, u, depth)
        })
        .collect()
}

/// A recommender run must rank exactly the simulation's items (same count, same ids in the
/// same order).
pub fn check_same_items(sim: &IdMap, run: &IdMap, run_name: &str) -> Result<()> {
    if sim.len() != run.len() {
        return Err(AgentError::Input(format!(
            "recommender {run_name} ranks {} items but the simulation data has {}: the run was trained on another item set",
            run.len(),
            sim.len()
        )));
    }
    for i in 0..sim.len() as u32 {
        if sim.ext(i) != run.ext(i) {
            return Err(AgentError::Input(format!(
                "recommender {run_name}: item {} is `{}` in the run but `{}` in the simulation data: the run was trained on another item set",
                i,
                run.ext(i),
                sim.ext(i)
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranking_masks_and_breaks_ties_by_seed() {
        let scores = [1.0, 3.0, 3.0, 3.0, 2.0, f32::NAN];
        let masked = [false, false, false, false, true, false];
        let a = rank_row(&scores, &masked, 7, 0, 10);
        assert_eq!(a.len(), 5);
        assert!(!a.contains(&4));
        let mut top: Vec<u32> = a[..3].to_vec();
        top.sort();
        assert_eq!(top, vec![1, 2, 3]);
        assert_eq!(&a[3..], &[0, 5], "NaN ranks last");
        assert_eq!(a, rank_row(&scores, &masked, 7, 0, 10), "repeatable");
        let orders: std::collections::BTreeSet<Vec<u32>> = (0..20)
            .map(|s| rank_row(&scores, &masked, s, 0, 3))
            .collect();
        assert!(orders.len() > 1, "the seed moves ties");
        assert_eq!(
            rank_row(&scores, &masked, 7, 0, 2),
            a[..2].to_vec(),
            "partial = prefix"
        );
    }

    #[test]
    fn baselines_follow_their_rules() {
        let n_items = 700;
        // item i has (i % 7) + 1 train interactions spread over users 1..
        let mut lists = vec![Vec::new(); 10];
        for i in 0..n_items as u32 {
            for u in 1..=((i % 7) + 1) {
                lists[u as usize].push(i);
            }
        }
        lists[0] = vec![6, 13];
        let train = Interactions::from_lists(n_items, &lists);
        let test = Interactions::from_lists(n_items, &[vec![20], vec![], vec![]]);
        let r = rankings(
            &Source::Baseline(Baseline::Pop),
            &[0],
            n_items,
            &train,
            &test,
            1,
            5,
        );
        assert_eq!(r[0].len(), 5);
        for &i in &r[0] {
            assert_eq!(i % 7, 6, "most popular first");
            assert!(![6, 13, 20].contains(&i), "train and test masked");
        }
        let r = rankings(
            &Source::Baseline(Baseline::PopSample),
            &[8, 9],
            n_items,
            &train,
            &test,
            1,
            40,
        );
        let counts = train.item_degrees();
        for row in &r {
            // users 8 and 9 have seen nothing: their 40 come from the 600 most popular (count
            // ≥ 2: the 100 items with count 1 are outside)
            assert!(row.iter().all(|&i| counts[i as usize] >= 2));
        }
        assert_ne!(r[0], r[1], "drawn per user");
        let a = rankings(
            &Source::Baseline(Baseline::Random),
            &[0, 1],
            n_items,
            &train,
            &test,
            3,
            10,
        );
        assert_ne!(a[0], a[1]);
        assert_eq!(
            a,
            rankings(
                &Source::Baseline(Baseline::Random),
                &[0, 1],
                n_items,
                &train,
                &test,
                3,
                10
            )
        );
    }

    #[test]
    fn item_sets_must_agree() {
        let map = |v: &[&str]| {
            let mut m = IdMap::new();
            for x in v {
                m.insert(x);
            }
            m
        };
        let (a, b) = (map(&["0", "1", "2"]), map(&["0", "2", "1"]));
        assert!(check_same_items(&a, &a, "r").is_ok());
        let e = check_same_items(&a, &b, "r").unwrap_err().to_string();
        assert!(e.contains("item 1 is `2` in the run"), "{e}");
    }
}
