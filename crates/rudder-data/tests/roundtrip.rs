//! Write/read round trips, property-tested.

use proptest::prelude::*;
use rudder_data::builder::DatasetBuilder;
use rudder_data::formats::{self, Format, Loaded, atomic, lightgcn, llara};
use rudder_data::sequences::{PromptSample, SeqDataset, SeqSample};
use rudder_data::split::{SplitMethod, split};
use rudder_data::{Dataset, Interactions, Table};
use std::collections::BTreeSet;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 48,
        ..ProptestConfig::default()
    }
}

/// Interactions in external ids, as a set of (user, item, rating, timestamp).
fn ext_set(d: &Dataset, x: &Interactions) -> BTreeSet<(String, String, Option<u32>, Option<i64>)> {
    x.iter()
        .map(|it| {
            (
                d.users.ext(it.user).to_string(),
                d.items.ext(it.item).to_string(),
                it.rating.map(|r| (r * 2.0) as u32),
                it.timestamp,
            )
        })
        .collect()
}

fn id_strategy() -> impl Strategy<Value = String> {
    // external ids with spaces and punctuation, like ML-1M's titles
    "[A-Za-z0-9][A-Za-z0-9 ()',.-]{0,12}[A-Za-z0-9)]".prop_map(|s| s)
}

prop_compose! {
    fn dataset()(
        rows in prop::collection::vec((id_strategy(), id_strategy(), 1u32..=10, 0i64..2_000_000_000), 1..80),
        with_meta in any::<bool>(),
    ) -> Dataset {
        let mut b = DatasetBuilder::new();
        let mut seen = BTreeSet::new();
        for (u, i, r, t) in &rows {
            if seen.insert((u.clone(), i.clone())) {
                b.add(u, i, Some(*r as f32 / 2.0), Some(*t));
            }
        }
        let mut d = b.finish("prop", None, None);
        if with_meta {
            let n = d.n_items();
            d.item_table = Table { title: Some((0..n).map(|i| format!("Title {i}: a, b")).collect()), ..Default::default() };
            d.item_table.set_field("genres", (0..n).map(|i| if i % 2 == 0 { "Drama|War".into() } else { String::new() }).collect());
        }
        d
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn atomic_roundtrip(d in dataset()) {
        let tmp = tempfile::tempdir().unwrap();
        atomic::write(&d, tmp.path(), "prop").unwrap();
        let back = atomic::read(tmp.path()).unwrap();
        prop_assert_eq!(ext_set(&d, &d.interactions), ext_set(&back, &back.interactions));
        for i in 0..d.n_items() as u32 {
            let j = back.items.get(d.items.ext(i)).unwrap();
            prop_assert_eq!(d.item_table.title(i), back.item_table.title(j));
            prop_assert_eq!(d.item_table.field("genres", i), back.item_table.field("genres", j));
        }
    }

    #[test]
    fn atomic_split_roundtrip(d in dataset(), seed in 0u64..100) {
        let d = split(&d, &SplitMethod::Ratio { ratios: [0.6, 0.2, 0.2] }, seed).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        atomic::write(&d, tmp.path(), "prop").unwrap();
        let back = atomic::read(tmp.path()).unwrap();
        let (s, b) = (d.split.as_ref().unwrap(), back.split.as_ref().unwrap());
        prop_assert_eq!(ext_set(&d, &s.train), ext_set(&back, &b.train));
        prop_assert_eq!(ext_set(&d, &s.valid), ext_set(&back, &b.valid));
        prop_assert_eq!(ext_set(&d, &s.test), ext_set(&back, &b.test));
    }

    #[test]
    fn lightgcn_roundtrip(d in dataset(), seed in 0u64..100) {
        let d = split(&d, &SplitMethod::Ratio { ratios: [0.8, 0.1, 0.1] }, seed).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        lightgcn::write_dir(&d, tmp.path()).unwrap();
        let back = lightgcn::read_dir(tmp.path()).unwrap();
        // dense ids, external ids and item order within each user survive exactly
        prop_assert_eq!(&d.users, &back.users);
        prop_assert_eq!(&d.items, &back.items);
        let (s, b) = (d.split.as_ref().unwrap(), back.split.as_ref().unwrap());
        for (x, y) in [(&s.train, &b.train), (&s.valid, &b.valid), (&s.test, &b.test)] {
            prop_assert_eq!(x.n_users(), y.n_users());
            for u in 0..x.n_users() as u32 {
                prop_assert_eq!(x.items(u), y.items(u));
            }
        }
        for i in 0..d.n_items() as u32 {
            prop_assert_eq!(d.item_table.title(i), back.item_table.title(i));
        }
    }

    #[test]
    fn llara_roundtrip(
        n_items in 3u32..50,
        rows in prop::collection::vec((prop::collection::vec(0u32..1000, 0..10), 0u32..1000, any::<bool>()), 1..30),
    ) {
        let pad = n_items;
        let samples: Vec<SeqSample> = rows.iter().map(|(h, next, rated)| {
            let mut seq: Vec<u32> = h.iter().map(|i| i % n_items).collect();
            let len_seq = seq.len().max(1);
            seq.resize(10, pad);
            SeqSample {
                seq_ratings: rated.then(|| (0..10).map(|k| (k % 5) as i64).collect()),
                seq,
                len_seq,
                next: next % n_items,
                next_rating: rated.then_some(4),
            }
        }).collect();
        let ds = SeqDataset {
            name: "p".into(),
            splits: vec![("train".into(), samples.clone()), ("test".into(), samples)],
            item_names: Some((0..n_items).map(|i| format!("Artist {i} :: x")).collect()),
        };
        let tmp = tempfile::tempdir().unwrap();
        llara::write_dir(&ds, tmp.path()).unwrap();
        let back = llara::read_dir(tmp.path()).unwrap();
        let mut want = ds.clone();
        want.name = back.name.clone();
        prop_assert_eq!(want, back);
    }

    #[test]
    fn sdpo_roundtrip(recs in prop::collection::vec(
        (prop::collection::vec("[a-zA-Z µé'&!]{1,12}", 1..10), prop::collection::vec("[a-zA-Z µé'&!:]{1,12}", 1..20)), 1..20)) {
        let samples: Vec<PromptSample> = recs.iter().map(|(h, c)| PromptSample {
            history: h.iter().map(|s| s.replace("::", ":")).filter(|s| !s.is_empty()).collect(),
            candidates: c.clone(),
            target: c[0].clone(),
        }).collect();
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("test.json");
        llara::write_prompts(&p, &samples).unwrap();
        prop_assert_eq!(llara::read_prompts(&p).unwrap(), samples);
    }
}

#[test]
fn convert_via_generic_api() {
    let w = rudder_data::synth::SynthWorld::generate(&rudder_data::synth::SynthConfig {
        n_users: 50,
        n_items: 80,
        ..Default::default()
    });
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    let l = tmp.path().join("l");
    formats::save(&Loaded::Interactions(w.dataset.clone()), Format::Atomic, &a).unwrap();
    let back = formats::load_interactions(&a, None).unwrap();
    formats::save(&Loaded::Interactions(back.clone()), Format::Lightgcn, &l).unwrap();
    let back2 = formats::load_interactions(&l, None).unwrap();
    assert_eq!(
        ext_set(&w.dataset, &w.dataset.interactions).len(),
        w.dataset.interactions.len()
    );
    let strip = |d: &Dataset, x: &Interactions| -> BTreeSet<(String, String)> {
        x.iter()
            .map(|it| {
                (
                    d.users.ext(it.user).to_string(),
                    d.items.ext(it.item).to_string(),
                )
            })
            .collect()
    };
    assert_eq!(
        strip(&w.dataset, &w.dataset.interactions),
        strip(&back2, &back2.interactions)
    );
    assert!(formats::save(&Loaded::Interactions(back), Format::Ml1m, &l).is_err());
}
