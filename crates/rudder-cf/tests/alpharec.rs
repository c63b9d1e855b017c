//! AlphaRec on the synthetic world, with item "language" features made from the hidden genres
//! (one-hot genres plus noise): gradients, learning, zero-shot transfer to another world, and
//! intent queries that move a user's list toward the asked genre.

use candle_core::{Device, Tensor};
use rudder_cf::alpharec::{AlphaRec, shift_toward_intent};
use rudder_cf::loss::{BatchEmb, BatchIdx};
use rudder_cf::model::{self, ModelInputs};
use rudder_cf::scorer::EmbeddingScorer;
use rudder_cf::trainer::{Silent, evaluate_tests, train_with};
use rudder_cf::{CfConfig, LossConfig, ModelKind};
use rudder_data::eval::{EvalConfig, Evaluator, RandomScorer, Scorer};
use rudder_data::sampler::{Sampler, SamplerConfig};
use rudder_data::split::{SplitMethod, split};
use rudder_data::synth::{SynthConfig, SynthWorld};
use rudder_data::{Dataset, rng};
use rudder_nn::grad::assert_all_receive_gradient;

const D_LM: usize = 24;

fn world(seed: u64) -> (SynthWorld, Dataset) {
    let w = SynthWorld::generate(&SynthConfig {
        n_users: 300,
        n_items: 400,
        mean_interactions: 30.0,
        seed,
        ..Default::default()
    });
    let ds = split(
        &w.dataset,
        &SplitMethod::Ratio {
            ratios: [0.8, 0.1, 0.1],
        },
        3,
    )
    .unwrap();
    (w, ds)
}

/// Genre one-hots (first 18 dims) plus Gaussian noise: a stand-in for title embeddings.
fn features(w: &SynthWorld, ds: &Dataset) -> Tensor {
    use rand_distr::{Distribution, Normal};
    let mut r = rng::stream(w.config.seed, &[77]);
    let nd = Normal::new(0.0, 0.1).unwrap();
    let mut v = Vec::new();
    for i in 0..ds.n_items() as u32 {
        let orig: usize = ds.items.ext(i).parse().unwrap();
        let mut row: Vec<f32> = (0..D_LM).map(|_| nd.sample(&mut r) as f32).collect();
        for &g in &w.item_genres[orig] {
            row[g as usize] += 1.0;
        }
        v.extend(row);
    }
    Tensor::from_vec(v, (ds.n_items(), D_LM), &Device::Cpu).unwrap()
}

fn cfg() -> CfConfig {
    let mut c = CfConfig::new(
        ModelKind::Alpharec,
        LossConfig::Infonce {
            tau: 0.15,
            n_neg: 32,
            reg: 0.0,
        },
    );
    c.dim = 32;
    c.lr = 5e-3;
    c.batch_size = 512;
    c.epochs = 30;
    c.eval_every = 5;
    c.ks = vec![20];
    c
}

#[test]
fn every_projector_weight_receives_a_gradient() {
    let (w, ds) = world(1);
    let s = ds.split.as_ref().unwrap();
    let inputs = ModelInputs {
        item_features: Some(features(&w, &ds)),
    };
    let m = model::build(&cfg(), &s.train, &inputs, &Device::Cpu).unwrap();
    assert_eq!(m.params().len(), 4);
    let smp = Sampler::new(
        &s.train,
        SamplerConfig {
            batch_size: 128,
            n_neg: 8,
            drop_last: true,
            seed: 1,
            ..Default::default()
        },
    )
    .unwrap();
    let b = smp.iter_epoch(0).next().unwrap();
    let idx = BatchIdx::new(&b, &Device::Cpu).unwrap();
    let (u, i) = m.forward().unwrap();
    let (pos, neg) = BatchEmb::gather(&u, &i, &idx, true)
        .unwrap()
        .scores()
        .unwrap();
    let l = rudder_cf::loss::infonce(&pos, &neg, 0.15).unwrap();
    assert_all_receive_gradient(&l.backward().unwrap(), &m.params());
    // BPR is refused: AlphaRec is a cosine model.
    let mut bad = cfg();
    bad.loss = LossConfig::Bpr { reg: 0.0 };
    assert!(bad.validate().is_err());
}

fn recall(sc: &dyn Scorer, ds: &Dataset) -> f64 {
    let s = ds.split.as_ref().unwrap();
    Evaluator::new(&s.test)
        .mask(&s.train)
        .mask(&s.valid)
        .run(
            sc,
            &EvalConfig {
                ks: vec![20],
                ..Default::default()
            },
        )
        .unwrap()
        .get("recall", 20)
}

#[test]
fn learns_transfers_zero_shot_and_follows_intents() {
    let (w1, ds1) = world(1);
    let f1 = features(&w1, &ds1);
    let s1 = ds1.split.as_ref().unwrap();
    let inputs = ModelInputs {
        item_features: Some(f1.clone()),
    };
    let rep = train_with(&cfg(), s1, &inputs, &mut Silent).unwrap();
    let random = recall(&RandomScorer { seed: 1 }, &ds1);
    let trained = rep.tests[0].1.get("recall", 20);
    assert!(
        trained > 3.0 * random,
        "AlphaRec {trained:.4} vs random {random:.4}"
    );

    // Zero-shot: the projector alone, on a world with other users and items.
    let (w2, ds2) = world(2);
    let f2 = features(&w2, &ds2);
    let s2 = ds2.split.as_ref().unwrap();
    let tensors: std::collections::HashMap<String, Tensor> = rep.params.iter().cloned().collect();
    let inputs2 = ModelInputs {
        item_features: Some(f2.clone()),
    };
    let m2 = model::restore(&cfg(), &s2.train, &inputs2, &tensors, &Device::Cpu).unwrap();
    let (u2, i2) = m2.forward().unwrap();
    let zs = evaluate_tests(&EmbeddingScorer::new(&u2, &i2, true).unwrap(), s2, &[20]).unwrap()[0]
        .1
        .get("recall", 20);
    let random2 = recall(&RandomScorer { seed: 1 }, &ds2);
    assert!(
        zs > 3.0 * random2,
        "zero-shot {zs:.4} vs random {random2:.4}"
    );

    // Intent: ask each user for a genre they rarely watch; their top-10 moves toward it.
    let m1 = model::restore(&cfg(), &s1.train, &inputs, &tensors, &Device::Cpu).unwrap();
    let alpha_model = m1
        .as_any()
        .and_then(|a| a.downcast_ref::<AlphaRec>())
        .unwrap();
    let (u, i) = m1.forward().unwrap();
    let items_n = rudder_nn::ops::l2_normalize(&i, 1e-12).unwrap();
    let genre_share = |uvec: &Tensor, g: u8| -> f64 {
        let s = items_n
            .matmul(&uvec.unsqueeze(1).unwrap())
            .unwrap()
            .squeeze(1)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let mut idx: Vec<usize> = (0..s.len()).collect();
        idx.sort_by(|&a, &b| s[b].total_cmp(&s[a]));
        idx[..10]
            .iter()
            .filter(|&&k| {
                w1.item_genres[ds1.items.ext(k as u32).parse::<usize>().unwrap()].contains(&g)
            })
            .count() as f64
            / 10.0
    };
    let (mut before, mut after) = (0.0, 0.0);
    for user in 0..40u32 {
        let orig: usize = ds1.users.ext(user).parse().unwrap();
        let taste = &w1.taste[orig];
        let g = (0..taste.len())
            .min_by(|&a, &b| taste[a].total_cmp(&taste[b]))
            .unwrap() as u8;
        let mut q = vec![0f32; D_LM];
        q[g as usize] = 1.0;
        let q = Tensor::from_vec(q, D_LM, &Device::Cpu).unwrap();
        let uv = u.get(user as usize).unwrap();
        before += genre_share(&uv, g);
        after += genre_share(&shift_toward_intent(alpha_model, &uv, &q, 0.5).unwrap(), g);
    }
    assert!(
        after > before + 4.0,
        "share of the asked genre in top-10 (sum over 40 users): {before} → {after}"
    );
}

#[test]
fn decoder_lm_titles_become_features() {
    use rudder_cf::features::{Pooling, encode_titles, is_decoder};
    use rudder_lm::fixtures::{TinySpec, write_gguf};
    let dir = tempfile::tempdir().unwrap();
    let g = dir.path().join("tiny.gguf");
    write_gguf(
        &g,
        &TinySpec::new(rudder_lm::config::Arch::Llama),
        candle_core::quantized::GgmlDType::Q8_0,
    )
    .unwrap();
    assert!(is_decoder(&g));
    let (_, ds) = world(1);
    let mean = encode_titles(&ds, &g, Pooling::Mean, &mut |_, _| {}).unwrap();
    let last = encode_titles(&ds, &g, Pooling::Last, &mut |_, _| {}).unwrap();
    assert_eq!(mean.dims(), &[ds.n_items(), 64]);
    let diff = (&mean - &last)
        .unwrap()
        .abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff > 0.0);
    // The same title gives the same vector whatever its batch neighbours (left padding).
    let one = rudder_cf::features::encode_text(&g, ds.item_table.title(5).unwrap(), Pooling::Mean)
        .unwrap();
    let d = (one - mean.get(5).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(d < 1e-3, "{d}");
}
