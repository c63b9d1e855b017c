//! AdvDrop on the synthetic world: gradients reach both views from the recommender loss and the
//! mask network from the ARM surrogate; the mask is centred per target node; training learns.

use candle_core::Device;
use rudder_cf::advdrop::{AdvDrop, AdvDropConfig};
use rudder_cf::loss::BatchIdx;
use rudder_cf::model::Backbone;
use rudder_cf::trainer::{Silent, train};
use rudder_cf::{CfConfig, LossConfig, ModelKind};
use rudder_data::eval::{EvalConfig, Evaluator, RandomScorer};
use rudder_data::sampler::{Sampler, SamplerConfig};
use rudder_data::split::{SplitMethod, split};
use rudder_data::synth::{SynthConfig, SynthWorld};
use rudder_nn::grad::assert_all_receive_gradient;

fn data() -> rudder_data::Split {
    let w = SynthWorld::generate(&SynthConfig {
        n_users: 200,
        n_items: 300,
        mean_interactions: 25.0,
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
fn gradients_reach_both_views_and_the_mask_network() {
    let s = data();
    let dev = Device::Cpu;
    let m = AdvDrop::new(
        &s.train,
        16,
        2,
        1e-5,
        &AdvDropConfig {
            adv_lr: 0.05,
            ..Default::default()
        },
        1,
        &dev,
    )
    .unwrap();
    let smp = Sampler::new(
        &s.train,
        SamplerConfig {
            batch_size: 128,
            n_neg: 1,
            ..Default::default()
        },
    )
    .unwrap();
    let idx = BatchIdx::new(&smp.iter_epoch(0).next().unwrap(), &dev).unwrap();
    let l = m.custom_loss(&idx, 0).unwrap().unwrap();
    assert!(l.to_scalar::<f32>().unwrap().is_finite());
    assert_eq!(m.params().len(), 4, "main + dual tables");
    assert_all_receive_gradient(&l.backward().unwrap(), &m.params());
    // Mask logits are centred per target node: the mean logit of each node's edges is 0.
    let x = candle_core::Tensor::randn(0f32, 1.0, (200 + 300, 16), &dev).unwrap();
    let p = m.mask_scores(&x).unwrap().to_vec1::<f32>().unwrap();
    let rows = rudder_nn::graph::norm_adj(&s.train);
    for r in [0usize, 5, 250] {
        let (a, b) = (rows.a.indptr[r], rows.a.indptr[r + 1]);
        if b > a {
            let mean: f32 =
                p[a..b].iter().map(|&q| (q / (1.0 - q)).ln()).sum::<f32>() / (b - a) as f32;
            assert!(mean.abs() < 1e-3, "row {r}: {mean}");
        }
    }
    // An ARM step moves every mask parameter.
    let before: Vec<Vec<f32>> = m
        .mask_params()
        .iter()
        .map(|(_, v)| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
        .collect();
    m.arm_step(0).unwrap();
    for ((n, v), b) in m.mask_params().iter().zip(before) {
        assert_ne!(
            v.as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            b,
            "{n} did not move"
        );
    }
    let rep = m.bias_report().unwrap();
    assert!(rep.spearman_main.abs() <= 1.0 && !rep.items.is_empty());
}

#[test]
fn trains_through_the_one_trainer() {
    let s = data();
    let mut c = CfConfig::new(ModelKind::Advdrop, LossConfig::Bpr { reg: 1e-5 });
    c.dim = 16;
    c.lr = 5e-3;
    c.batch_size = 256;
    c.epochs = 14;
    c.eval_every = 7;
    c.ks = vec![20];
    c.advdrop = AdvDropConfig {
        interval: 7,
        adv_epochs: 1,
        ..Default::default()
    };
    let r = train(&c, &s, &mut Silent).unwrap();
    assert!(
        r.history
            .iter()
            .any(|h| h.adv_seconds.is_some() && h.adv_stats.contains_key("adv_dual_keep")),
        "the adversarial phase ran"
    );
    for h in r.history.iter().filter(|h| h.adv_seconds.is_some()) {
        for k in ["adv_dual_keep", "adv_main_keep"] {
            let p = h.adv_stats[k];
            assert!(p > 0.0 && p < 1.0, "{k} = {p}");
        }
    }
    assert!(
        r.params.iter().any(|(n, _)| n == "mask_q_w"),
        "the mask network is checkpointed"
    );
    let random = Evaluator::new(&s.test)
        .mask(&s.train)
        .mask(&s.valid)
        .run(
            &RandomScorer { seed: 1 },
            &EvalConfig {
                ks: vec![20],
                ..Default::default()
            },
        )
        .unwrap()
        .get("recall", 20);
    let got = r.tests[0].1.get("recall", 20);
    assert!(got > 2.0 * random, "AdvDrop {got:.4} vs random {random:.4}");
    // BPR only.
    c.loss = LossConfig::Infonce {
        tau: 0.2,
        n_neg: 8,
        reg: 0.0,
    };
    assert!(c.validate().is_err());
}
