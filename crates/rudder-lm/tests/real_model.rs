//! The engine on the real assets the test script fetches (`RUDDER_HOME`, default `~/.cache/rudder`):
//! SmolLM2-135M-Instruct Q4_1 GGUF and all-MiniLM-L6-v2. Absent assets skip with a message
//! unless `RUDDER_REQUIRE_ASSETS=1` (CI). Reference numbers: peer-baselines.md §4 and §6.

use std::path::PathBuf;

use candle_core::{Device, IndexOp, Tensor};
use rudder_lm::hooks::{NoHook, Phase};
use rudder_lm::loader::{LanguageModel, LoadOptions, load};

fn asset(name: &str) -> Option<PathBuf> {
    rudder_data::assets::for_tests(name)
}

fn last_logits(lm: &LanguageModel, ids: &[u32]) -> Vec<f32> {
    let t = Tensor::from_slice(ids, (1, ids.len()), &Device::Cpu).unwrap();
    let mut cache = lm.decoder.new_cache(vec![0]);
    let h = lm
        .decoder
        .forward(&t, &mut cache, Phase::Prefill, &mut NoHook)
        .unwrap();
    let h = h.i((.., ids.len() - 1.., ..)).unwrap();
    lm.decoder
        .logits(&h)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn top(v: &[f32], k: usize) -> Vec<(usize, f32)> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[b].total_cmp(&v[a]));
    idx[..k].iter().map(|&i| (i, v[i])).collect()
}

#[test]
fn smollm2_gguf_tokenizes_and_predicts_paris() {
    let Some(dir) = asset("smollm2-135m-instruct") else {
        return;
    };
    let q = load(&dir, &LoadOptions::default()).unwrap();
    let ids = q.tok.encode("The capital of France is", true).unwrap();
    assert_eq!(ids, vec![504, 3575, 282, 4649, 314]);
    // Quantized path vs llama.cpp's top-3 (logit tolerance 0.5 between quantized engines).
    let lq = last_logits(&q, &ids);
    let tq = top(&lq, 3);
    assert_eq!(
        tq.iter().map(|t| t.0).collect::<Vec<_>>(),
        vec![7042, 260, 4528],
        "{tq:?}"
    );
    assert!((tq[0].1 - 17.3441).abs() < 0.5, "{tq:?}");
    // Dequantized path vs Hugging Face f32 (same GGUF): top-5 ids and logits to 1e-2.
    let f = load(&dir, &LoadOptions { dequantize: true }).unwrap();
    let lf = last_logits(&f, &ids);
    let tf = top(&lf, 5);
    let want = [
        (7042, 17.3713),
        (260, 14.8886),
        (4528, 13.245),
        (2250, 13.0095),
        (1315, 12.9515),
    ];
    for (g, w) in tf.iter().zip(want) {
        assert_eq!(g.0, w.0, "{tf:?}");
        assert!((g.1 - w.1).abs() < 1e-2, "{tf:?}");
    }
}
