//! The training sampler of the CF reference repositories (cf-seeds.md [S2]):
//! an epoch has `n_obs` = number of train interactions draws, shuffled; draw `idx` picks user
//! `train_users[idx mod n_users]` (so users, not interactions, are uniform), a positive uniformly
//! from the user's train items, and `n_neg` negatives uniformly over all items **with
//! replacement**, rejecting only the user's own train items. Batches of `batch_size`, the last
//! partial batch dropped unless `drop_last = false`.
//!
//! Reproducible across threads: the epoch permutation comes from the stream `(seed, epoch)` and
//! each batch draws from its own stream `(seed, epoch, batch)`.

use crate::error::{DataError, Result};
use crate::interactions::Interactions;
use crate::rng::stream;
use rand::Rng as _;
use rand::seq::SliceRandom;
use rayon::prelude::*;

/// Which draws make an epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SampleMode {
    /// The CF reference repositories ([S2]): draw `idx` takes user `idx mod n_users` and a
    /// uniformly random positive of that user (users are uniform).
    #[default]
    User,
    /// RecBole: every train interaction is the positive of exactly one draw per epoch
    /// (interactions are uniform).
    Interaction,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SamplerConfig {
    pub batch_size: usize,
    /// Negatives per positive: 1 for BPR, N for sampled InfoNCE.
    pub n_neg: usize,
    pub drop_last: bool,
    pub seed: u64,
    #[serde(default)]
    pub mode: SampleMode,
    /// Reproduce the reference repositories' negatives (faithful mode): they draw negatives
    /// with reckit's C++ generator, seeded with 2020 when the library loads and copied
    /// unchanged into every epoch's freshly forked DataLoader workers (the main process never
    /// advances it), so the same negative stream comes back every epoch (98% of the draws of
    /// one epoch recur in order in the next, measured on AdvInfoNCE's Coat run) whatever the
    /// seed. With this set, negatives come from a stream keyed by the batch index alone (fixed
    /// seed 2020): the same every epoch and every adversarial pass; users and positives still
    /// follow the seed and the epoch.
    #[serde(default)]
    pub repeat_negatives: bool,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig {
            batch_size: 2048,
            n_neg: 1,
            drop_last: true,
            seed: 101,
            mode: SampleMode::User,
            repeat_negatives: false,
        }
    }
}

/// One mini-batch: `users[b]`, `pos[b]` and `neg[b * n_neg .. (b + 1) * n_neg]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub users: Vec<u32>,
    pub pos: Vec<u32>,
    pub neg: Vec<u32>,
    pub n_neg: usize,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.users.len()
    }
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }
    pub fn negs(&self, b: usize) -> &[u32] {
        &self.neg[b * self.n_neg..(b + 1) * self.n_neg]
    }
}

pub struct Sampler {
    cfg: SamplerConfig,
    n_items: u32,
    n_obs: usize,
    users: Vec<u32>,
    train: Interactions,
    /// sorted, de-duplicated train items per user, for rejection
    sets: Vec<Vec<u32>>,
    /// user of every train interaction (CSR order), for interaction-uniform epochs
    row_of: Vec<u32>,
}

impl Sampler {
    pub fn new(train: &Interactions, cfg: SamplerConfig) -> Result<Sampler> {
        if cfg.batch_size == 0 {
            return Err(DataError::Config("batch size must be positive".into()));
        }
        let users = train.active_users();
        if users.is_empty() {
            return Err(DataError::Config(
                "the train split has no interactions to sample".into(),
            ));
        }
        let sets = train.sorted_sets();
        if cfg.n_neg > 0
            && let Some(&u) = users
                .iter()
                .find(|&&u| sets[u as usize].len() >= train.n_items())
        {
            return Err(DataError::Config(format!(
                "user {u} has interacted with every item: no negative can be sampled"
            )));
        }
        let mut row_of = Vec::with_capacity(train.len());
        for u in 0..train.n_users() as u32 {
            row_of.extend(std::iter::repeat_n(u, train.degree(u)));
        }
        Ok(Sampler {
            row_of,
            n_items: train.n_items() as u32,
            n_obs: train.len(),
            users,
            train: train.clone(),
            sets,
            cfg,
        })
    }

    pub fn config(&self) -> &SamplerConfig {
        &self.cfg
    }

    /// Draws per epoch (= train interactions).
    pub fn n_obs(&self) -> usize {
        self.n_obs
    }

    pub fn n_batches(&self) -> usize {
        if self.cfg.drop_last {
            self.n_obs / self.cfg.batch_size
        } else {
            self.n_obs.div_ceil(self.cfg.batch_size)
        }
    }

    /// The shuffled draw order of an epoch.
    pub fn permutation(&self, epoch: u64) -> Vec<u32> {
        let mut perm: Vec<u32> = (0..self.n_obs as u32).collect();
        perm.shuffle(&mut stream(self.cfg.seed, &[0xE90C, epoch]));
        perm
    }

    /// Batch `b` of an epoch given the epoch's permutation.
    pub fn batch(&self, perm: &[u32], epoch: u64, b: usize) -> Batch {
        let bs = self.cfg.batch_size;
        let idx = &perm[b * bs..((b + 1) * bs).min(perm.len())];
        let mut rng = stream(self.cfg.seed, &[0xBA7C, epoch, b as u64]);
        let mut fixed = self
            .cfg
            .repeat_negatives
            .then(|| stream(2020, &[0x4E67, b as u64]));
        let n_neg = self.cfg.n_neg;
        let mut users = Vec::with_capacity(idx.len());
        let mut pos = Vec::with_capacity(idx.len());
        let mut neg = Vec::with_capacity(idx.len() * n_neg);
        for &k in idx {
            let (u, p) = match self.cfg.mode {
                SampleMode::User => {
                    let u = self.users[k as usize % self.users.len()];
                    let items = self.train.items(u);
                    (u, items[rng.random_range(0..items.len())])
                }
                SampleMode::Interaction => {
                    (self.row_of[k as usize], self.train.indices()[k as usize])
                }
            };
            users.push(u);
            pos.push(p);
            let set = &self.sets[u as usize];
            let mut got = 0;
            while got < n_neg {
                let j = match fixed.as_mut() {
                    Some(f) => f.random_range(0..self.n_items),
                    None => rng.random_range(0..self.n_items),
                };
                if set.binary_search(&j).is_err() {
                    neg.push(j);
                    got += 1;
                }
            }
        }
        Batch {
            users,
            pos,
            neg,
            n_neg,
        }
    }

    /// The batches of an epoch one at a time (the same batches as [`Sampler::epoch`], without
    /// holding all of them in memory: with many negatives an epoch's batches are hundreds of MB).
    pub fn iter_epoch(&self, epoch: u64) -> impl Iterator<Item = Batch> + '_ {
        // generated in parallel a few batches at a time, so memory stays bounded
        const WINDOW: usize = 64;
        let perm = self.permutation(epoch);
        let n = self.n_batches();
        (0..n.div_ceil(WINDOW)).flat_map(move |w| {
            let lo = w * WINDOW;
            let hi = (lo + WINDOW).min(n);
            (lo..hi)
                .into_par_iter()
                .map(|b| self.batch(&perm, epoch, b))
                .collect::<Vec<_>>()
        })
    }

    /// All batches of an epoch, generated in parallel.
    pub fn epoch(&self, epoch: u64) -> Vec<Batch> {
        let perm = self.permutation(epoch);
        (0..self.n_batches())
            .into_par_iter()
            .map(|b| self.batch(&perm, epoch, b))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn train() -> Interactions {
        let lists: Vec<Vec<u32>> = (0..30u32)
            .map(|u| (0..(1 + u % 5)).map(|k| (u * 7 + k * 3) % 50).collect())
            .collect();
        Interactions::from_lists(50, &lists)
    }

    #[test]
    fn same_batches_for_any_thread_count() {
        let t = train();
        let s = Sampler::new(
            &t,
            SamplerConfig {
                batch_size: 8,
                n_neg: 4,
                drop_last: true,
                seed: 3,
                ..Default::default()
            },
        )
        .unwrap();
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap()
            .install(|| s.epoch(2));
        let four = rayon::ThreadPoolBuilder::new()
            .num_threads(4)
            .build()
            .unwrap()
            .install(|| s.epoch(2));
        assert_eq!(one, four);
        assert_eq!(s.iter_epoch(2).collect::<Vec<_>>(), one);
        assert_ne!(s.epoch(2), s.epoch(3));
    }

    /// Faithful mode: the negative stream repeats every epoch and ignores the seed, while users
    /// and positives still move with both (the reference's reckit generator in fresh workers).
    #[test]
    fn repeated_negatives_come_back_every_epoch() {
        // every user has the same train items, so rejection consumes the stream identically
        let lists: Vec<Vec<u32>> = (0..30).map(|_| vec![1, 4, 9]).collect();
        let t = Interactions::from_lists(40, &lists);
        let cfg = |seed, repeat| SamplerConfig {
            batch_size: 16,
            n_neg: 5,
            seed,
            repeat_negatives: repeat,
            ..Default::default()
        };
        let a = Sampler::new(&t, cfg(1, true)).unwrap();
        let b = Sampler::new(&t, cfg(2, true)).unwrap();
        let (e0, e1) = (a.epoch(0), a.epoch(1));
        assert_eq!(e0[0].neg, e1[0].neg);
        assert_eq!(e0[0].neg, b.epoch(7)[0].neg);
        assert_ne!(e0[0].users, e1[0].users);
        assert!(e0[0].neg.iter().all(|j| ![1, 4, 9].contains(j)));
        let c = Sampler::new(&t, cfg(1, false)).unwrap();
        assert_ne!(c.epoch(0)[0].neg, c.epoch(1)[0].neg);
    }

    #[test]
    fn draws_follow_the_reference_rules() {
        let t = train();
        let sets = t.sorted_sets();
        let s = Sampler::new(
            &t,
            SamplerConfig {
                batch_size: 7,
                n_neg: 3,
                drop_last: false,
                seed: 1,
                ..Default::default()
            },
        )
        .unwrap();
        let batches = s.epoch(0);
        assert_eq!(batches.iter().map(|b| b.len()).sum::<usize>(), t.len());
        let mut per_user = vec![0usize; 30];
        for b in &batches {
            for k in 0..b.len() {
                let u = b.users[k] as usize;
                per_user[u] += 1;
                assert!(
                    sets[u].binary_search(&b.pos[k]).is_ok(),
                    "positive from the user's train items"
                );
                for &j in b.negs(k) {
                    assert!(
                        sets[u].binary_search(&j).is_err(),
                        "negative never a train item"
                    );
                }
            }
        }
        // user-uniform: each user drawn floor or ceil of n_obs / n_users times
        let (lo, hi) = (t.len() / 30, t.len().div_ceil(30));
        assert!(per_user.iter().all(|&c| c == lo || c == hi), "{per_user:?}");
        // drop_last drops the partial batch
        let s2 = Sampler::new(
            &t,
            SamplerConfig {
                batch_size: 7,
                n_neg: 1,
                drop_last: true,
                seed: 1,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(s2.epoch(0).len(), t.len() / 7);
    }

    #[test]
    fn negatives_are_uniform_over_non_train_items() {
        // one user with items 0..10 of 20: negatives uniform over 10..20
        let t = Interactions::from_lists(20, &[(0..10).collect()]);
        let s = Sampler::new(
            &t,
            SamplerConfig {
                batch_size: 10,
                n_neg: 1000,
                drop_last: true,
                seed: 9,
                ..Default::default()
            },
        )
        .unwrap();
        let mut counts = vec![0usize; 20];
        for b in s.epoch(0) {
            for &j in &b.neg {
                counts[j as usize] += 1;
            }
        }
        let total: usize = counts.iter().sum();
        assert_eq!(total, 10_000);
        assert!(counts[..10].iter().all(|&c| c == 0));
        for &c in &counts[10..] {
            assert!((800..1200).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn interaction_mode_visits_every_interaction_once() {
        let t = train();
        let s = Sampler::new(
            &t,
            SamplerConfig {
                batch_size: 7,
                n_neg: 2,
                drop_last: false,
                seed: 4,
                mode: SampleMode::Interaction,
                repeat_negatives: false,
            },
        )
        .unwrap();
        let mut seen: Vec<(u32, u32)> = s
            .epoch(0)
            .iter()
            .flat_map(|b| {
                b.users
                    .iter()
                    .copied()
                    .zip(b.pos.iter().copied())
                    .collect::<Vec<_>>()
            })
            .collect();
        let mut all: Vec<(u32, u32)> = t.iter().map(|x| (x.user, x.item)).collect();
        seen.sort_unstable();
        all.sort_unstable();
        assert_eq!(seen, all);
    }

    #[test]
    fn user_with_every_item_is_an_error() {
        let t = Interactions::from_lists(3, &[vec![0, 1, 2]]);
        assert!(Sampler::new(&t, SamplerConfig::default()).is_err());
    }
}
