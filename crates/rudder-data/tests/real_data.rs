//! Integration tests on real data: the shared data folder (`RUDDER_SHARED_DATA`, default
//! `../shared/data` next to the repository) and fetched assets (`RUDDER_HOME`). When they are
//! absent the tests say so and pass, unless `RUDDER_REQUIRE_ASSETS=1` (set by CI), where
//! absence is a failure.

use rudder_data::assets::Store;
use rudder_data::formats::{self, Loaded, lightgcn};
use rudder_data::resolve;
use std::collections::BTreeSet;
use std::path::PathBuf;

fn shared() -> Option<PathBuf> {
    let p = std::env::var_os("RUDDER_SHARED_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data"));
    present(
        p.join("README.md").exists(),
        &format!("shared data at {}", p.display()),
    )
    .then_some(p)
}

fn asset(name: &str) -> Option<PathBuf> {
    let store = Store::from_env();
    let ok = store.marker(name).is_some();
    present(
        ok,
        &format!(
            "asset {name} in {} (run `rudder assets fetch {name}`)",
            store.root.display()
        ),
    )
    .then(|| store.asset_dir(name))
}

fn present(ok: bool, what: &str) -> bool {
    if !ok {
        if std::env::var("RUDDER_REQUIRE_ASSETS").is_ok_and(|v| v == "1") {
            panic!("required test data is absent: {what}");
        }
        eprintln!("skipped: {what} is absent");
    }
    ok
}

#[test]
fn ml1m_from_the_wheel_has_the_published_counts() {
    let Some(_) = asset("ml-1m") else { return };
    let Loaded::Interactions(d) = resolve::load("ml-1m", None, &Store::from_env()).unwrap() else {
        panic!()
    };
    assert_eq!(
        (d.n_users(), d.n_items(), d.interactions.len()),
        (6040, 3706, 1_000_209)
    );
    assert_eq!(d.users.ext(0), "1m_1");
    let toy = d.items.get("Toy Story (1995)").unwrap();
    assert_eq!(d.item_table.title(toy), Some("Toy Story"));
    assert!(d.interactions.has_ratings() && d.interactions.has_timestamps());
}

#[test]
fn ml100k_to_lightgcn_and_back_preserves_every_interaction() {
    let Some(dir) = asset("ml-100k") else { return };
    let d = formats::load_interactions(&dir, None).unwrap();
    assert_eq!(
        (d.n_users(), d.n_items(), d.interactions.len()),
        (943, 1682, 100_000)
    );
    let tmp = tempfile::tempdir().unwrap();
    lightgcn::write_dir(&d, tmp.path()).unwrap();
    let back = lightgcn::read_dir(tmp.path()).unwrap();
    let pairs = |d: &rudder_data::Dataset| -> Vec<(String, String)> {
        let mut v: Vec<_> = d
            .interactions
            .iter()
            .map(|it| {
                (
                    d.users.ext(it.user).to_string(),
                    d.items.ext(it.item).to_string(),
                )
            })
            .collect();
        v.sort();
        v
    };
    assert_eq!(pairs(&d), pairs(&back));
    assert_eq!(
        back.item_table.title(back.items.get("50").unwrap()),
        Some("Star Wars")
    );
}

#[test]
fn agent4rec_subset() {
    let Some(s) = shared() else { return };
    let d = formats::load_interactions(&s.join("agent4rec-ml1m"), None).unwrap();
    assert_eq!((d.n_users(), d.n_items()), (1000, 3292));
    assert_eq!(d.item_table.title(0), Some("Toy Story (1995)"));
    assert!(
        d.user_table
            .field("persona_taste", 0)
            .is_some_and(|t| t.contains("animated"))
    );
    assert_eq!(d.user_table.field("activity", 1), Some("2"));
    let s = d.split.as_ref().unwrap();
    assert_eq!(s.train.active_users().len(), 1000);
}

#[test]
fn coat_matches_the_reference_counts() {
    let Some(s) = shared() else { return };
    let d = formats::load_interactions(&s.join("cf/coat"), None).unwrap();
    let sp = d.split.as_ref().unwrap();
    assert_eq!(
        (sp.train.len(), sp.valid.len(), sp.test.len()),
        (1363, 553, 860)
    );
    assert_eq!(sp.test.active_users().len(), 237);
    assert_eq!(d.n_users(), 290);
    assert_eq!(d.n_items(), 295);
}

#[test]
fn llara_and_sdpo_files() {
    let Some(s) = shared() else { return };
    let Loaded::Sequences(lf) = formats::load(&s.join("llara/lastfm"), None).unwrap() else {
        panic!()
    };
    assert_eq!(lf.pad_id(), Some(4606));
    let test = &lf.splits.iter().find(|(n, _)| n == "test").unwrap().1;
    assert!(
        test.iter()
            .all(|x| x.next < 4606 && x.history(lf.pad_id()).len() <= 10)
    );
    let Loaded::Sequences(ml) = formats::load(&s.join("llara/movielens"), None).unwrap() else {
        panic!()
    };
    assert_eq!(ml.pad_id(), Some(1682));
    // titles as LLaRA's loader shows them: "Toy Story (1995)", "Usual Suspects, The (1995)"
    let names = ml.item_names.as_ref().unwrap();
    assert_eq!(
        (names[0].as_str(), names[11].as_str()),
        ("Toy Story", "The Usual Suspects")
    );
    assert!(ml.splits[0].1[0].seq_ratings.is_some());
    let Loaded::Prompts(p) = formats::load(&s.join("llara/sdpo-lastfm"), None).unwrap() else {
        panic!()
    };
    let sizes: BTreeSet<(String, usize)> =
        p.splits.iter().map(|(n, v)| (n.clone(), v.len())).collect();
    assert_eq!(
        sizes,
        [("test".to_string(), 2495), ("val".to_string(), 2767)]
            .into_iter()
            .collect()
    );
    assert!(
        p.splits[0]
            .1
            .iter()
            .all(|r| r.candidates.len() == 20 && (3..=10).contains(&r.history.len()))
    );
}
