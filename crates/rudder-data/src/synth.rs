//! A synthetic recommendation world with known ground truth: users with latent tastes over
//! genres, items with genres, readable titles, a quality and a popularity skew, and a choice
//! model that generates interactions, ratings and timestamps. Deterministic per seed (each
//! user and item draws from its own stream). It is rudder's embedded default dataset, the
//! fixture for tests that must know the truth, and the world for agent simulations.
//!
//! Choice model: user u picks items without replacement with probability ∝
//! `exp(pop_weight·ln pop_i + taste_weight·pref(u,i) + quality_weight·q_i)`, where
//! `pref(u,i)` is the mean of u's taste over i's genres, scaled by the number of genres
//! (1 = indifferent). Ratings: `round(3 + 1.5·(pref−1) + q + noise)` clipped to 1..5.

use crate::dataset::{Dataset, Table};
use crate::eval::Scorer;
use crate::ids::IdMap;
use crate::interactions::{Interaction, Interactions};
use crate::rng::stream;
use rand::Rng as _;
use rand_distr::{Distribution, Exp, Gamma, LogNormal, Normal};
use rayon::prelude::*;

/// The 18 MovieLens genres (ML-100K's list without "unknown").
pub const GENRES: &[&str] = crate::formats::movielens::ML100K_GENRES.split_at(1).1;

const ADJ: [&str; 40] = [
    "Silent",
    "Crimson",
    "Hidden",
    "Broken",
    "Golden",
    "Last",
    "Midnight",
    "Wild",
    "Frozen",
    "Lost",
    "Burning",
    "Secret",
    "Distant",
    "Electric",
    "Quiet",
    "Savage",
    "Gentle",
    "Iron",
    "Paper",
    "Velvet",
    "Hollow",
    "Bright",
    "Restless",
    "Northern",
    "Endless",
    "Little",
    "Dark",
    "Lucky",
    "Strange",
    "Rising",
    "Falling",
    "Painted",
    "Shattered",
    "Wandering",
    "Scarlet",
    "Invisible",
    "Sleeping",
    "Forgotten",
    "Brave",
    "Final",
];
const NOUN: [&str; 40] = [
    "Harbor",
    "Empire",
    "River",
    "Garden",
    "Frontier",
    "Witness",
    "Orchard",
    "Signal",
    "Kingdom",
    "Voyage",
    "Station",
    "Mirror",
    "Horizon",
    "Detective",
    "Summer",
    "Machine",
    "Island",
    "Letter",
    "Crown",
    "Storm",
    "Canyon",
    "Circus",
    "Ghost",
    "Promise",
    "Engine",
    "Valley",
    "Lantern",
    "Highway",
    "Melody",
    "Shadow",
    "Compass",
    "Fortress",
    "Carnival",
    "Orbit",
    "Winter",
    "Bridge",
    "Stranger",
    "Tide",
    "Prophecy",
    "Heist",
];

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct SynthConfig {
    pub n_users: usize,
    pub n_items: usize,
    /// Number of genres used (at most 18).
    pub n_genres: usize,
    /// Mean interactions per user (log-normal activity).
    pub mean_interactions: f64,
    /// Dirichlet concentration of user tastes (smaller = more focused users).
    pub taste_concentration: f64,
    /// Zipf exponent of item popularity.
    pub pop_exponent: f64,
    pub pop_weight: f64,
    pub taste_weight: f64,
    pub quality_weight: f64,
    pub seed: u64,
}

impl Default for SynthConfig {
    fn default() -> Self {
        SynthConfig {
            n_users: 1000,
            n_items: 1500,
            n_genres: 18,
            mean_interactions: 40.0,
            taste_concentration: 0.3,
            pop_exponent: 1.0,
            pop_weight: 1.0,
            taste_weight: 1.2,
            quality_weight: 0.5,
            seed: 42,
        }
    }
}

/// The generated world: the dataset plus the hidden truth behind it.
#[derive(Debug, Clone)]
pub struct SynthWorld {
    pub config: SynthConfig,
    pub dataset: Dataset,
    pub genres: Vec<String>,
    /// `taste[u][g]`, a probability vector over genres.
    pub taste: Vec<Vec<f32>>,
    pub item_genres: Vec<Vec<u8>>,
    pub quality: Vec<f32>,
    /// Relative popularity (Zipf weight, max 1).
    pub popularity: Vec<f32>,
}

impl SynthWorld {
    pub fn generate(cfg: &SynthConfig) -> SynthWorld {
        let ng = cfg.n_genres.clamp(1, GENRES.len());
        let seed = cfg.seed;
        // items
        let mut ranks: Vec<usize> = (0..cfg.n_items).collect();
        {
            use rand::seq::SliceRandom;
            ranks.shuffle(&mut stream(seed, &[0x1733]));
        }
        let genre_weights: Vec<f64> = (0..ng).map(|g| 1.0 / (1.0 + g as f64 * 0.15)).collect();
        let gsum: f64 = genre_weights.iter().sum();
        let mut item_genres = Vec::with_capacity(cfg.n_items);
        let mut quality = Vec::with_capacity(cfg.n_items);
        let mut titles = Vec::with_capacity(cfg.n_items);
        let mut years = Vec::with_capacity(cfg.n_items);
        let mut seen_titles = std::collections::HashSet::new();
        for i in 0..cfg.n_items {
            let mut r = stream(seed, &[0x17E5, i as u64]);
            let k = 1 + (r.random::<f64>() * 2.2) as usize;
            let mut gs: Vec<u8> = Vec::new();
            while gs.len() < k.min(ng) {
                let mut x = r.random::<f64>() * gsum;
                let mut g = 0;
                while g + 1 < ng && x >= genre_weights[g] {
                    x -= genre_weights[g];
                    g += 1;
                }
                if !gs.contains(&(g as u8)) {
                    gs.push(g as u8);
                }
            }
            gs.sort_unstable();
            item_genres.push(gs);
            quality.push(Normal::new(0.0, 0.6).unwrap().sample(&mut r) as f32);
            let year = 1950 + (r.random::<f64>().powf(0.5) * 70.0) as u32;
            let base = if r.random::<f64>() < 0.3 {
                format!(
                    "The {} of the {}",
                    NOUN[r.random_range(0..NOUN.len())],
                    NOUN[r.random_range(0..NOUN.len())]
                )
            } else {
                format!(
                    "{} {}",
                    ADJ[r.random_range(0..ADJ.len())],
                    NOUN[r.random_range(0..NOUN.len())]
                )
            };
            let mut title = format!("{base} ({year})");
            let mut n = 2;
            while !seen_titles.insert(title.clone()) {
                title = format!("{base} {} ({year})", roman(n));
                n += 1;
            }
            titles.push(title);
            years.push(year);
        }
        let popularity: Vec<f32> = ranks
            .iter()
            .map(|&rk| (1.0 / ((rk + 1) as f64).powf(cfg.pop_exponent)) as f32)
            .collect();

        // users (each from its own stream, in parallel)
        let users: Vec<(Vec<f32>, Vec<Interaction>)> = (0..cfg.n_users)
            .into_par_iter()
            .map(|u| {
                let mut r = stream(seed, &[0x05E7, u as u64]);
                let gamma = Gamma::new(cfg.taste_concentration.max(1e-3), 1.0).unwrap();
                let mut t: Vec<f64> = (0..ng).map(|_| gamma.sample(&mut r).max(1e-12)).collect();
                let s: f64 = t.iter().sum();
                t.iter_mut().for_each(|x| *x /= s);
                let taste: Vec<f32> = t.iter().map(|&x| x as f32).collect();
                let sigma = 0.7f64;
                let mu = cfg.mean_interactions.max(1.0).ln() - sigma * sigma / 2.0;
                let n = (LogNormal::new(mu, sigma).unwrap().sample(&mut r).round() as usize).clamp(
                    5.min(cfg.n_items),
                    (cfg.n_items / 3).max(5).min(cfg.n_items),
                );
                // Gumbel top-n = sampling without replacement ∝ exp(logit)
                let mut keys: Vec<(f64, u32)> = (0..cfg.n_items)
                    .map(|i| {
                        let l =
                            logit(cfg, &taste, &item_genres[i], quality[i], popularity[i]) as f64;
                        let g = -(-(r.random::<f64>().max(1e-300)).ln()).ln();
                        (l + g, i as u32)
                    })
                    .collect();
                keys.select_nth_unstable_by(n - 1, |a, b| b.0.partial_cmp(&a.0).unwrap());
                keys.truncate(n);
                // consumption order: random, at exponential gaps from a random start in 2020
                use rand::seq::SliceRandom;
                keys.shuffle(&mut r);
                let mut ts = 1_577_836_800i64 + (r.random::<f64>() * 365.0 * 86_400.0) as i64;
                let gap = Exp::new(1.0 / (2.0 * 86_400.0)).unwrap();
                let noise = Normal::new(0.0, 0.7).unwrap();
                let list = keys
                    .iter()
                    .map(|&(_, i)| {
                        ts += 60 + gap.sample(&mut r) as i64;
                        let p = pref(&taste, &item_genres[i as usize]) as f64;
                        let raw = 3.0
                            + 1.5 * (p - 1.0).clamp(-1.5, 3.0)
                            + quality[i as usize] as f64
                            + noise.sample(&mut r);
                        Interaction {
                            user: u as u32,
                            item: i,
                            rating: Some(raw.round().clamp(1.0, 5.0) as f32),
                            timestamp: Some(ts),
                        }
                    })
                    .collect();
                (taste, list)
            })
            .collect();
        let mut taste = Vec::with_capacity(cfg.n_users);
        let mut all = Vec::new();
        for (t, l) in users {
            taste.push(t);
            all.extend(l);
        }
        let interactions = Interactions::from_interactions(cfg.n_users, cfg.n_items, &all);
        let genres: Vec<String> = GENRES[..ng].iter().map(|s| s.to_string()).collect();
        let mut item_table = Table {
            title: Some(titles),
            ..Default::default()
        };
        item_table.set_field(
            "genres",
            item_genres
                .iter()
                .map(|gs| {
                    gs.iter()
                        .map(|&g| genres[g as usize].as_str())
                        .collect::<Vec<_>>()
                        .join("|")
                })
                .collect(),
        );
        item_table.set_field("year", years.iter().map(|y| y.to_string()).collect());
        let mut user_table = Table::default();
        user_table.set_field(
            "favourite_genres",
            taste
                .iter()
                .map(|t| {
                    let mut g: Vec<usize> = (0..ng).collect();
                    g.sort_by(|&a, &b| t[b].partial_cmp(&t[a]).unwrap());
                    g.iter()
                        .take(2)
                        .map(|&g| genres[g].as_str())
                        .collect::<Vec<_>>()
                        .join("|")
                })
                .collect(),
        );
        let dataset = Dataset {
            name: "synth".into(),
            users: IdMap::identity(cfg.n_users),
            items: IdMap::identity(cfg.n_items),
            user_table,
            item_table,
            interactions,
            split: None,
        };
        SynthWorld {
            config: cfg.clone(),
            dataset,
            genres,
            taste,
            item_genres,
            quality,
            popularity,
        }
    }

    /// The true choice logit of user u for item i.
    pub fn logit(&self, u: u32, i: u32) -> f32 {
        let i = i as usize;
        logit(
            &self.config,
            &self.taste[u as usize],
            &self.item_genres[i],
            self.quality[i],
            self.popularity[i],
        )
    }

    /// Taste match of user u with item i (1 = indifferent, larger = closer to u's taste).
    pub fn preference(&self, u: u32, i: u32) -> f32 {
        pref(&self.taste[u as usize], &self.item_genres[i as usize])
    }

    /// A scorer that knows the truth: ranks by the choice logit.
    pub fn oracle(&self) -> Oracle<'_> {
        Oracle { world: self }
    }
}

fn pref(taste: &[f32], genres: &[u8]) -> f32 {
    let s: f32 = genres.iter().map(|&g| taste[g as usize]).sum();
    s / genres.len().max(1) as f32 * taste.len() as f32
}

fn logit(cfg: &SynthConfig, taste: &[f32], genres: &[u8], q: f32, pop: f32) -> f32 {
    (cfg.pop_weight * (pop as f64).ln()
        + cfg.taste_weight * (1.0 + pref(taste, genres) as f64).ln() * 3.0
        + cfg.quality_weight * q as f64) as f32
}

fn roman(n: usize) -> &'static str {
    [
        "", "I", "II", "III", "IV", "V", "VI", "VII", "VIII", "IX", "X",
    ]
    .get(n)
    .copied()
    .unwrap_or("X+")
}

pub struct Oracle<'a> {
    world: &'a SynthWorld,
}

impl Scorer for Oracle<'_> {
    fn score_users(&self, users: &[u32], n_items: usize, out: &mut [f32]) {
        for (r, &u) in users.iter().enumerate() {
            for i in 0..n_items {
                out[r * n_items + i] = self.world.logit(u, i as u32);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::{EvalConfig, Evaluator, Popularity, RandomScorer};
    use crate::split::{SplitMethod, split};

    fn small() -> SynthConfig {
        SynthConfig {
            n_users: 300,
            n_items: 400,
            mean_interactions: 30.0,
            ..Default::default()
        }
    }

    #[test]
    fn deterministic_per_seed() {
        let a = SynthWorld::generate(&small());
        let b = SynthWorld::generate(&small());
        assert_eq!(a.dataset.interactions, b.dataset.interactions);
        assert_eq!(a.dataset.item_table, b.dataset.item_table);
        let c = SynthWorld::generate(&SynthConfig { seed: 7, ..small() });
        assert_ne!(a.dataset.interactions, c.dataset.interactions);
    }

    #[test]
    fn world_is_plausible() {
        let w = SynthWorld::generate(&small());
        let x = &w.dataset.interactions;
        assert_eq!(x.duplicate_pairs(), 0);
        assert!(x.user_degrees().iter().all(|&d| d >= 5));
        let r = x.all_ratings().unwrap();
        assert!(r.iter().all(|&v| (1.0..=5.0).contains(&v)));
        // popularity skew: the top 10% items hold far more than 10% of interactions
        let mut d = x.item_degrees();
        d.sort_unstable_by(|a, b| b.cmp(a));
        let top: usize = d[..d.len() / 10].iter().sum();
        assert!(
            top as f64 > 0.25 * x.len() as f64,
            "top decile share {}",
            top as f64 / x.len() as f64
        );
        // titles unique and readable
        let t = w.dataset.item_table.title.as_ref().unwrap();
        let set: std::collections::HashSet<_> = t.iter().collect();
        assert_eq!(set.len(), t.len());
        // liked items match taste better than disliked ones
        let (mut hi, mut lo, mut nh, mut nl) = (0.0, 0.0, 0, 0);
        for it in x.iter() {
            let p = w.preference(it.user, it.item) as f64;
            if it.rating.unwrap() >= 4.0 {
                hi += p;
                nh += 1
            } else if it.rating.unwrap() <= 2.0 {
                lo += p;
                nl += 1
            }
        }
        assert!(hi / nh as f64 > lo / nl as f64);
    }

    #[test]
    fn oracle_beats_popularity_beats_random() {
        let w = SynthWorld::generate(&small());
        let ds = split(
            &w.dataset,
            &SplitMethod::Ratio {
                ratios: [0.8, 0.1, 0.1],
            },
            1,
        )
        .unwrap();
        let s = ds.split.as_ref().unwrap();
        let ev = Evaluator::new(&s.test).mask(&s.train).mask(&s.valid);
        let cfg = EvalConfig {
            ks: vec![20],
            ..Default::default()
        };
        let o = ev.run(&w.oracle(), &cfg).unwrap().get("recall", 20);
        let p = ev
            .run(&Popularity::new(&s.train), &cfg)
            .unwrap()
            .get("recall", 20);
        let r = ev
            .run(&RandomScorer { seed: 1 }, &cfg)
            .unwrap()
            .get("recall", 20);
        assert!(o > p && p > r, "oracle {o} popularity {p} random {r}");
    }
}
