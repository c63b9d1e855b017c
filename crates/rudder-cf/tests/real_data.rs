//! The CF engine on real data (Coat from the shared data folder; `RUDDER_SHARED_DATA`, default
//! `../shared/data`). Absent data skips with a message unless `RUDDER_REQUIRE_ASSETS=1` (CI).

use rudder_cf::trainer::{Silent, train};
use rudder_cf::{CfConfig, LossConfig, ModelKind};
use rudder_data::eval::{EvalConfig, Evaluator, Popularity};
use rudder_data::formats;
use std::path::PathBuf;

fn coat() -> Option<PathBuf> {
    let base = std::env::var_os("RUDDER_SHARED_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data"));
    let p = base.join("cf/coat");
    if p.join("train.txt").exists() {
        return Some(p);
    }
    if std::env::var("RUDDER_REQUIRE_ASSETS").is_ok_and(|v| v == "1") {
        panic!("required test data is absent: {}", p.display());
    }
    eprintln!("skipped: {} is absent", p.display());
    None
}

#[test]
fn lightgcn_beats_mf_and_popularity_on_coat() {
    let Some(dir) = coat() else { return };
    let ds = formats::load_interactions(&dir, None).unwrap();
    let s = ds.split.as_ref().unwrap();
    let run = |model: ModelKind, layers: usize| {
        let mut c = CfConfig::new(model, LossConfig::Bpr { reg: 1e-5 });
        c.n_layers = layers;
        c.lr = 1e-3;
        c.batch_size = 1024;
        c.epochs = 2000;
        c.eval_every = 5;
        c.patience = 10;
        c.ks = vec![20];
        train(&c, s, &mut Silent)
            .unwrap()
            .best_valid
            .unwrap()
            .get("recall", 20)
    };
    let lgn = run(ModelKind::Lightgcn, 2);
    let mf = run(ModelKind::Mf, 0);
    let pop = Evaluator::new(&s.valid)
        .mask(&s.train)
        .run(
            &Popularity::new(&s.train),
            &EvalConfig {
                ks: vec![20],
                ..Default::default()
            },
        )
        .unwrap()
        .get("recall", 20);
    assert!(
        lgn > mf && lgn > pop,
        "valid Recall@20: LightGCN {lgn:.4}, MF {mf:.4}, most-popular {pop:.4}"
    );
}
