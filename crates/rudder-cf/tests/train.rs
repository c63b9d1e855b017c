//! Behaviour of the CF engine: gradients reach every parameter, training learns, AdvInfoNCE's
//! adversary moves away from uniform, runs are reproducible and write their run folder.

use candle_core::Device;
use rudder_cf::config::AdvConfig;
use rudder_cf::loss::{BatchEmb, BatchIdx, Hardness};
use rudder_cf::model;
use rudder_cf::trainer::{Silent, adversarial_epoch, train, write_run};
use rudder_cf::{CfConfig, LossConfig, ModelKind};
use rudder_data::Split;
use rudder_data::eval::{EvalConfig, Evaluator, Popularity};
use rudder_data::sampler::{Sampler, SamplerConfig};
use rudder_data::split::{SplitMethod, split};
use rudder_data::synth::{SynthConfig, SynthWorld};
use rudder_nn::grad::assert_all_receive_gradient;

fn world() -> Split {
    let w = SynthWorld::generate(&SynthConfig {
        n_users: 300,
        n_items: 400,
        mean_interactions: 30.0,
        ..Default::default()
    });
    split(
        &w.dataset,
        &SplitMethod::Ratio {
            ratios: [0.8, 0.1, 0.1],
        },
        3,
    )
    .unwrap()
    .split
    .unwrap()
}

#[test]
fn every_parameter_receives_a_gradient() {
    let s = world();
    let dev = Device::Cpu;
    for kind in [ModelKind::Mf, ModelKind::Lightgcn] {
        let cfg = CfConfig::new(
            kind,
            LossConfig::Advinfonce(AdvConfig {
                n_neg: 8,
                ..Default::default()
            }),
        );
        let m = model::build(&cfg, &s.train, &Default::default(), &dev).unwrap();
        let h = Hardness::new(
            s.train.n_users(),
            s.train.n_items(),
            &AdvConfig::default(),
            1,
            &dev,
        )
        .unwrap();
        let b = &Sampler::new(
            &s.train,
            SamplerConfig {
                batch_size: 256,
                n_neg: 8,
                drop_last: true,
                seed: 1,
                ..Default::default()
            },
        )
        .unwrap()
        .epoch(0)[0];
        let idx = BatchIdx::new(b, &dev).unwrap();
        let (u, i) = m.forward().unwrap();
        let (pos, neg) = BatchEmb::gather(&u, &i, &idx, true)
            .unwrap()
            .scores()
            .unwrap();
        let l =
            rudder_cf::loss::advinfonce(&pos, &neg, &h.logits(&idx).unwrap(), 0.5, 64.0).unwrap();
        let grads = l.backward().unwrap();
        let mut params = m.params();
        params.extend(h.params());
        assert_all_receive_gradient(&grads, &params);
    }
}

#[test]
fn adversarial_schedule_matches_the_reference() {
    // interval 5: epochs 2, 7, 12, … until eta_epochs passes are done
    let mut done = 0;
    let mut at = Vec::new();
    for e in 0..40 {
        if adversarial_epoch(e, 5, done, 7, 0) {
            at.push(e);
            done += 1;
        }
    }
    assert_eq!(at, vec![2, 7, 12, 17, 22, 27, 32]);
    assert!(
        adversarial_epoch(12, 15, 0, 20, 0)
            && adversarial_epoch(27, 15, 1, 20, 0)
            && !adversarial_epoch(13, 15, 1, 20, 0)
    );
}

#[test]
fn lightgcn_learns_and_is_reproducible() {
    let s = world();
    let mut cfg = CfConfig::new(ModelKind::Lightgcn, LossConfig::Bpr { reg: 1e-5 });
    cfg.epochs = 30;
    cfg.batch_size = 512;
    cfg.lr = 5e-3;
    cfg.eval_every = 5;
    let a = train(&cfg, &s, &mut Silent).unwrap();
    let b = train(&cfg, &s, &mut Silent).unwrap();
    assert_eq!(
        a.history.iter().map(|r| r.loss).collect::<Vec<_>>(),
        b.history.iter().map(|r| r.loss).collect::<Vec<_>>()
    );
    assert!(
        a.history.last().unwrap().loss < 0.5 * a.history[0].loss,
        "loss falls"
    );
    let pop = Evaluator::new(&s.valid)
        .mask(&s.train)
        .run(&Popularity::new(&s.train), &EvalConfig::default())
        .unwrap();
    let best = a.best_valid.as_ref().unwrap();
    assert!(
        best.get("recall", 20) > pop.get("recall", 20),
        "LightGCN {} vs popularity {}",
        best.get("recall", 20),
        pop.get("recall", 20)
    );
    let dir = tempfile::tempdir().unwrap();
    write_run(dir.path(), "synth", None, &a).unwrap();
    for f in [
        "config.toml",
        "metrics.jsonl",
        "summary.md",
        "best.safetensors",
    ] {
        assert!(dir.path().join(f).exists(), "{f}");
    }
    let ck =
        rudder_nn::checkpoint::load(&dir.path().join("best.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(ck["user_emb"].dims(), &[300, 64]);
}

#[test]
fn advinfonce_runs_its_adversary() {
    let s = world();
    let adv = AdvConfig {
        n_neg: 16,
        tau: 0.2,
        adv_interval: 2,
        eta_epochs: 3,
        adv_lr: 5e-2,
        ..Default::default()
    };
    let mut cfg = CfConfig::new(ModelKind::Mf, LossConfig::Advinfonce(adv));
    cfg.epochs = 8;
    cfg.batch_size = 512;
    cfg.eval_every = 4;
    let r = train(&cfg, &s, &mut Silent).unwrap();
    let kls: Vec<f64> = r
        .history
        .iter()
        .filter_map(|h| h.adv_stats.get("adv_kl").copied())
        .collect();
    assert_eq!(kls.len(), 3, "three adversarial passes");
    assert!(kls.iter().all(|&k| k > 0.0));
    assert_eq!(r.tests[0].0, "test");
    assert!(r.tests[0].1.get("recall", 20) > 0.0);
}
