//! Behaviour of the engine on tiny random-weight Llama and Qwen2 models that the tests write
//! themselves (Hugging Face folder and GGUF with the same weights).

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::GgmlDType;
use candle_core::{Device, IndexOp, Tensor, Var};
use rudder_lm::config::Arch;
use rudder_lm::decoder::Decoder;
use rudder_lm::fixtures::{TinySpec, tensors, write_gguf, write_hf_dir};
use rudder_lm::generate::{GenConfig, generate};
use rudder_lm::hooks::{
    Capture, Chain, Edit, Hook, HookCtx, Intervention, Interventions, NoHook, Phase, Phases,
    Positions, Site,
};
use rudder_lm::loader::{LanguageModel, LoadOptions, load};
use rudder_lm::score::{continuation_logprobs, score};
use rudder_lm::weights::Weights;

fn models(dir: &Path, arch: Arch) -> (LanguageModel, LanguageModel) {
    let spec = TinySpec::new(arch);
    let hf = dir.join(format!("{}-hf", arch.name()));
    write_hf_dir(&hf, &spec).unwrap();
    let g = dir.join(format!("{}.gguf", arch.name()));
    write_gguf(&g, &spec, GgmlDType::F32).unwrap();
    (
        load(&hf, &LoadOptions::default()).unwrap(),
        load(&g, &LoadOptions::default()).unwrap(),
    )
}

fn hidden(lm: &LanguageModel, ids: &[Vec<u32>], hook: &mut dyn Hook) -> Tensor {
    let (t, pads) = rudder_lm::generate::left_pad(ids, lm.tok.pad).unwrap();
    let mut cache = lm.decoder.new_cache(pads);
    lm.decoder
        .forward(&t, &mut cache, Phase::Prefill, hook)
        .unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn safetensors_and_gguf_give_the_same_model() {
    let tmp = tempfile::tempdir().unwrap();
    for arch in [Arch::Llama, Arch::Qwen2] {
        let (hf, gg) = models(tmp.path(), arch);
        assert!(!hf.decoder.cfg.rope_interleaved);
        assert_eq!(gg.decoder.cfg.rope_interleaved, arch == Arch::Llama);
        let ids = hf.tok.encode("the sun is in the sky", false).unwrap();
        assert_eq!(ids, gg.tok.encode("the sun is in the sky", false).unwrap());
        let a = hidden(&hf, &[ids.clone()], &mut NoHook);
        let b = hidden(&gg, &[ids.clone()], &mut NoHook);
        assert!(max_diff(&a, &b) < 1e-4, "{arch:?}: {}", max_diff(&a, &b));
        // Quantized GGUF weights stay close to the f32 model.
        let q = tmp.path().join(format!("{}-q8.gguf", arch.name()));
        write_gguf(&q, &TinySpec::new(arch), GgmlDType::Q8_0).unwrap();
        let qm = load(&q, &LoadOptions::default()).unwrap();
        assert!(qm.info.quantized);
        let c = hidden(&qm, &[ids], &mut NoHook);
        let norm = |t: &Tensor| {
            t.sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .sqrt()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        let rel = norm(&(&a - &c).unwrap()) / norm(&a);
        assert!(rel < 0.05, "{arch:?}: Q8_0 relative difference {rel}");
    }
}

#[test]
fn kv_cache_generation_equals_full_recomputation() {
    let tmp = tempfile::tempdir().unwrap();
    for arch in [Arch::Llama, Arch::Qwen2] {
        let (lm, _) = models(tmp.path(), arch);
        let prompt = lm.tok.encode("in the sea there", false).unwrap();
        let cfg = GenConfig {
            max_new_tokens: 12,
            ignore_eos: true,
            ..Default::default()
        };
        let g = generate(&lm, &[prompt.clone()], &cfg, &mut NoHook, &mut |_, _| {}).unwrap();
        assert_eq!(g[0].tokens.len(), 12);
        // Re-run every prefix from scratch: the greedy next token must match.
        let mut seq = prompt.clone();
        for &tok in &g[0].tokens {
            let h = hidden(&lm, &[seq.clone()], &mut NoHook);
            let logits = lm
                .decoder
                .logits(&h.i((0, seq.len() - 1)).unwrap())
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let best = (0..logits.len())
                .max_by(|&a, &b| logits[a].total_cmp(&logits[b]))
                .unwrap() as u32;
            assert_eq!(best, tok, "{arch:?}");
            seq.push(tok);
        }
    }
}

#[test]
fn batched_equals_unbatched() {
    let tmp = tempfile::tempdir().unwrap();
    for arch in [Arch::Llama, Arch::Qwen2] {
        let (lm, _) = models(tmp.path(), arch);
        let p1 = lm.tok.encode("a short one", false).unwrap();
        let p2 = lm
            .tok
            .encode("and then a much longer prompt here", false)
            .unwrap();
        let cfg = GenConfig {
            max_new_tokens: 8,
            ignore_eos: true,
            ..Default::default()
        };
        let both = generate(
            &lm,
            &[p1.clone(), p2.clone()],
            &cfg,
            &mut NoHook,
            &mut |_, _| {},
        )
        .unwrap();
        let one = generate(&lm, &[p1.clone()], &cfg, &mut NoHook, &mut |_, _| {}).unwrap();
        let two = generate(&lm, &[p2.clone()], &cfg, &mut NoHook, &mut |_, _| {}).unwrap();
        assert_eq!(both[0].tokens, one[0].tokens, "{arch:?}");
        assert_eq!(both[1].tokens, two[0].tokens, "{arch:?}");
        // Last-prompt-token residuals of a left-padded batch equal the unbatched ones.
        let sites = Site::hf_hidden_states(2);
        let mut cb = Capture::new(sites.clone(), Positions::LastPrompt);
        hidden(&lm, &[p1.clone(), p2.clone()], &mut cb);
        let mut c1 = Capture::new(sites.clone(), Positions::LastPrompt);
        hidden(&lm, &[p1.clone()], &mut c1);
        for s in sites {
            let a = cb.get(s).unwrap().i(0).unwrap();
            let b = c1.get(s).unwrap().i(0).unwrap();
            assert!(max_diff(&a, &b) < 1e-4, "{arch:?} {s}");
        }
        assert_eq!(cb.rows()[1].position, p2.len() - 1);
    }
}

struct Recorder(Vec<(Site, Phase, Vec<usize>)>);
impl Hook for Recorder {
    fn at(&mut self, site: Site, ctx: &HookCtx, x: &mut Tensor) -> rudder_lm::Result<()> {
        self.0.push((site, ctx.phase, x.dims().to_vec()));
        Ok(())
    }
}

#[test]
fn hooks_see_every_site_with_the_right_shapes() {
    let tmp = tempfile::tempdir().unwrap();
    let (lm, _) = models(tmp.path(), Arch::Llama);
    let p = lm.tok.encode("hello there", false).unwrap();
    let mut rec = Recorder(Vec::new());
    let cfg = GenConfig {
        max_new_tokens: 3,
        ignore_eos: true,
        ..Default::default()
    };
    generate(
        &lm,
        &[p.clone(), p[..3].to_vec()],
        &cfg,
        &mut rec,
        &mut |_, _| {},
    )
    .unwrap();
    let per_pass = 5 * 2 + 1;
    assert_eq!(rec.0.len(), 3 * per_pass, "prefill + 2 decode steps");
    let order: Vec<Site> = rec.0[..per_pass].iter().map(|r| r.0).collect();
    assert_eq!(
        order[..5],
        [
            Site::ResidPre(0),
            Site::AttnOut(0),
            Site::ResidMid(0),
            Site::MlpOut(0),
            Site::ResidPost(0)
        ]
    );
    assert_eq!(order[per_pass - 1], Site::FinalNorm);
    assert!(
        rec.0[..per_pass]
            .iter()
            .all(|r| r.1 == Phase::Prefill && r.2 == vec![2, p.len(), 64])
    );
    assert!(
        rec.0[per_pass..]
            .iter()
            .all(|r| r.1 == Phase::Decode && r.2 == vec![2, 1, 64])
    );
}

#[test]
fn interventions_zero_is_identity_and_edits_act() {
    let tmp = tempfile::tempdir().unwrap();
    let (lm, _) = models(tmp.path(), Arch::Qwen2);
    let p = vec![lm.tok.encode("the cat sat", false).unwrap()];
    let base = hidden(&lm, &p, &mut NoHook);
    let add = |v: f32, positions| Intervention {
        site: Site::ResidPre(1),
        edit: Edit::AddVector {
            vector: vec![v; 64],
        },
        alpha: 3.0,
        positions,
        phases: Phases::Both,
    };
    let mut zero = Interventions::new(vec![add(0.0, Positions::All)]);
    assert_eq!(max_diff(&base, &hidden(&lm, &p, &mut zero)), 0.0);
    let mut some = Interventions::new(vec![add(0.5, Positions::All)]);
    assert!(max_diff(&base, &hidden(&lm, &p, &mut some)) > 1e-2);
    // Editing only the last prompt token leaves earlier positions untouched (causal model).
    let mut last = Interventions::new(vec![add(0.5, Positions::LastPrompt)]);
    let h = hidden(&lm, &p, &mut last);
    let t = p[0].len();
    assert!(
        max_diff(
            &base.narrow(1, 0, t - 1).unwrap(),
            &h.narrow(1, 0, t - 1).unwrap()
        ) < 1e-6
    );
    assert!(
        max_diff(
            &base.narrow(1, t - 1, 1).unwrap(),
            &h.narrow(1, t - 1, 1).unwrap()
        ) > 1e-2
    );
    // Projecting out a direction leaves nothing along it at that site.
    let dir: Vec<f32> = (0..64).map(|i| ((i * 37 % 11) as f32) - 5.0).collect();
    let proj = Intervention {
        site: Site::ResidPost(0),
        edit: Edit::ProjectOut {
            direction: dir.clone(),
        },
        alpha: 1.0,
        positions: Positions::All,
        phases: Phases::Both,
    };
    let mut chain = Chain(
        Interventions::new(vec![proj]),
        Capture::new(vec![Site::ResidPost(0)], Positions::All),
    );
    hidden(&lm, &p, &mut chain);
    let cap = chain.1.get(Site::ResidPost(0)).unwrap();
    let d = Tensor::from_vec(dir, (64, 1), &Device::Cpu).unwrap();
    let along = cap
        .matmul(&d)
        .unwrap()
        .abs()
        .unwrap()
        .max(0)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()[0];
    assert!(along < 1e-3, "{along}");
    // Matrix edits with a zero matrix are the identity too; lists round-trip through JSON.
    let m = Intervention {
        site: Site::ResidPre(0),
        edit: Edit::MatrixAdd {
            matrix: vec![0.0; 64 * 64],
        },
        alpha: 2.0,
        positions: Positions::Prompt,
        phases: Phases::Prefill,
    };
    let list = Interventions::new(vec![m, add(0.25, Positions::Generated)]);
    list.validate(2, 64).unwrap();
    let json = serde_json::to_string(&list).unwrap();
    let back: Interventions = serde_json::from_str(&json).unwrap();
    assert_eq!(back.interventions, list.interventions);
    let mut back = back;
    assert_eq!(
        max_diff(&base, &hidden(&lm, &p, &mut back)),
        0.0,
        "generated-only edits do not touch the prompt"
    );
    assert!(
        Interventions::new(vec![add(0.0, Positions::All)])
            .validate(1, 64)
            .is_err()
    );
}

#[test]
fn capture_saves_safetensors_with_an_index() {
    let tmp = tempfile::tempdir().unwrap();
    let (lm, _) = models(tmp.path(), Arch::Llama);
    let prompts: Vec<Vec<u32>> = ["one", "two words", "three whole words"]
        .iter()
        .map(|s| lm.tok.encode(s, false).unwrap())
        .collect();
    let mut cap = Capture::new(Site::hf_hidden_states(2), Positions::LastPrompt);
    hidden(&lm, &prompts, &mut cap);
    let out = tmp.path().join("acts.safetensors");
    cap.save(&out, serde_json::json!({"model": "tiny"}))
        .unwrap();
    let back = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
    assert_eq!(back["blocks.1.hook_resid_pre"].dims(), &[3, 64]);
    assert_eq!(back["ln_final.hook_normalized"].dims(), &[3, 64]);
    let idx: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join("acts.safetensors.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(idx["rows"].as_array().unwrap().len(), 3);
    assert_eq!(idx["rows"][2]["position"], prompts[2].len() - 1);
}

#[test]
fn scores_are_log_probabilities_and_batch_independent() {
    let tmp = tempfile::tempdir().unwrap();
    let (lm, _) = models(tmp.path(), Arch::Qwen2);
    let e = |s: &str| lm.tok.encode(s, false).unwrap();
    let pairs = vec![
        (e("the sea"), e(" is blue")),
        (e("a much longer prompt than that"), e(" then")),
    ];
    let batched = score(&lm.decoder, &pairs, lm.tok.pad, 2, &mut NoHook).unwrap();
    let single = score(&lm.decoder, &pairs, lm.tok.pad, 1, &mut NoHook).unwrap();
    for (a, b) in batched.iter().zip(&single) {
        assert!((a.sum_logprob - b.sum_logprob).abs() < 1e-3);
        assert!(a.token_logprobs.iter().all(|&x| x <= 0.0));
    }
    // By hand: log-softmax of the full-sequence logits at the predicting positions.
    let (p, c) = &pairs[0];
    let seq = [p.as_slice(), c.as_slice()].concat();
    let h = hidden(&lm, &[seq.clone()], &mut NoHook);
    let mut want = 0.0f64;
    for k in 0..c.len() {
        let l = lm
            .decoder
            .logits(&h.i((0, p.len() - 1 + k)).unwrap())
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let m = l.iter().cloned().fold(f32::MIN, f32::max);
        let lse = m + l.iter().map(|v| (v - m).exp()).sum::<f32>().ln();
        want += (l[c[k] as usize] - lse) as f64;
    }
    assert!(
        (batched[0].sum_logprob - want).abs() < 1e-3,
        "{} vs {want}",
        batched[0].sum_logprob
    );
}

#[test]
fn differentiable_decoder_gives_every_parameter_a_gradient() {
    for arch in [Arch::Llama, Arch::Qwen2] {
        let spec = TinySpec {
            tied: false,
            ..TinySpec::new(arch)
        };
        let vars: Vec<(String, Var)> = tensors(&spec)
            .unwrap()
            .into_iter()
            .map(|(n, t)| (n, Var::from_tensor(&t).unwrap()))
            .collect();
        let map: HashMap<String, Tensor> = vars
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect();
        let dir = tempfile::tempdir().unwrap();
        write_hf_dir(dir.path(), &spec).unwrap();
        let cfg = load(dir.path(), &LoadOptions::default())
            .unwrap()
            .decoder
            .cfg
            .clone();
        let mut dec = Decoder::load(cfg, &mut Weights::Memory(map), true).unwrap();
        dec.differentiable = true;
        let pairs = vec![
            (vec![5u32, 9, 40], vec![77u32, 3]),
            (vec![12u32], vec![8u32, 100, 7]),
        ];
        let lp = continuation_logprobs(&dec, &pairs, 0, &mut NoHook).unwrap();
        let grads = lp.sum_all().unwrap().backward().unwrap();
        let missing = rudder_nn::grad::missing_gradients(&grads, &vars).unwrap();
        assert!(missing.is_empty(), "{arch:?}: no gradient for {missing:?}");
        // The differentiable path computes the same numbers as the fused one.
        dec.differentiable = false;
        let fused = continuation_logprobs(&dec, &pairs, 0, &mut NoHook).unwrap();
        assert!(max_diff(&lp, &fused) < 1e-4);
    }
}

#[test]
fn sampling_is_seeded_and_top_k_one_is_greedy() {
    let tmp = tempfile::tempdir().unwrap();
    let (lm, _) = models(tmp.path(), Arch::Llama);
    let p = vec![lm.tok.encode("once upon", false).unwrap()];
    let run = |cfg: GenConfig| {
        generate(&lm, &p, &cfg, &mut NoHook, &mut |_, _| {}).unwrap()[0]
            .tokens
            .clone()
    };
    let hot = GenConfig {
        max_new_tokens: 10,
        temperature: 1.5,
        top_p: 0.95,
        seed: 3,
        ignore_eos: true,
        ..Default::default()
    };
    assert_eq!(run(hot.clone()), run(hot.clone()));
    assert_ne!(
        run(hot.clone()),
        run(GenConfig {
            seed: 4,
            ..hot.clone()
        })
    );
    let greedy = run(GenConfig {
        max_new_tokens: 10,
        ignore_eos: true,
        ..Default::default()
    });
    assert_eq!(
        run(GenConfig {
            top_k: 1,
            ..hot.clone()
        }),
        greedy
    );
    // Streaming pieces concatenate to the final text; stop strings cut it.
    let mut streamed = String::new();
    let g = generate(
        &lm,
        &p,
        &GenConfig {
            max_new_tokens: 10,
            ignore_eos: true,
            ..Default::default()
        },
        &mut NoHook,
        &mut |_, s| streamed.push_str(s),
    )
    .unwrap();
    assert_eq!(streamed, g[0].text);
    if let Some(ch) = g[0].text.chars().nth(3) {
        let cut = GenConfig {
            max_new_tokens: 10,
            ignore_eos: true,
            stop: vec![ch.to_string()],
            ..Default::default()
        };
        let s = generate(&lm, &p, &cut, &mut NoHook, &mut |_, _| {}).unwrap();
        assert!(!s[0].text.contains(ch));
        assert_eq!(s[0].finish, rudder_lm::generate::Finish::Stop);
    }
    // A stop string spanning several characters (and usually tokens): the stream never shows
    // a part of it, and what it shows is the final text.
    let chars: Vec<char> = g[0].text.chars().collect();
    if chars.len() >= 6 {
        let stop: String = chars[3..6].iter().collect();
        let cut = GenConfig {
            max_new_tokens: 10,
            ignore_eos: true,
            stop: vec![stop.clone(), "\u{1F600}never".into()],
            ..Default::default()
        };
        let mut streamed = String::new();
        let s = generate(&lm, &p, &cut, &mut NoHook, &mut |_, t| streamed.push_str(t)).unwrap();
        assert_eq!(s[0].finish, rudder_lm::generate::Finish::Stop);
        assert_eq!(streamed, s[0].text);
        let want = &g[0].text[..g[0].text.find(&stop).unwrap()];
        assert_eq!(s[0].text, want);
    }
}

#[test]
fn chat_template_and_special_tokens_from_gguf() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, gg) = models(tmp.path(), Arch::Llama);
    let chat = gg.chat.as_ref().expect("template from the GGUF metadata");
    let text = chat
        .render(&[rudder_lm::chat::Message::new("user", "hi")], true)
        .unwrap();
    assert_eq!(
        text,
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    );
    let ids = gg.tok.encode(&text, false).unwrap();
    let start = gg.tok.inner.token_to_id("<|im_start|>").unwrap();
    assert_eq!(
        ids.iter().filter(|&&i| i == start).count(),
        2,
        "special tokens are single ids"
    );
    assert!(
        gg.tok
            .is_eos(gg.tok.inner.token_to_id("<|im_end|>").unwrap())
    );
}

#[test]
fn bad_inputs_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = TinySpec::new(Arch::Llama);
    let g = tmp.path().join("m.gguf");
    write_gguf(&g, &spec, GgmlDType::Q8_0).unwrap();
    let bytes = std::fs::read(&g).unwrap();
    // Truncated GGUF.
    let cut = tmp.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() - 1000]).unwrap();
    let e = load(&cut, &LoadOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("cut.gguf") && e.contains("truncated"), "{e}");
    // Header garbage.
    let bad = tmp.path().join("bad.gguf");
    std::fs::write(&bad, b"GGUF this is not a model at all").unwrap();
    let e = load(&bad, &LoadOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("bad.gguf"), "{e}");
    let mut flipped = bytes.clone();
    flipped[..4].copy_from_slice(b"XXXX");
    std::fs::write(&bad, &flipped).unwrap();
    assert!(load(&bad, &LoadOptions::default()).is_err());
    // Corrupted safetensors, unknown architecture, missing tokenizer.
    let hf = tmp.path().join("hf");
    write_hf_dir(&hf, &spec).unwrap();
    let st = hf.join("model.safetensors");
    let good = std::fs::read(&st).unwrap();
    std::fs::write(&st, &good[..good.len() / 2]).unwrap();
    let e = load(&hf, &LoadOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("model.safetensors"), "{e}");
    std::fs::write(&st, &good).unwrap();
    let cfgp = hf.join("config.json");
    let cfg = std::fs::read_to_string(&cfgp).unwrap();
    std::fs::write(
        &cfgp,
        cfg.replace("\"llama\"", "\"mamba\"")
            .replace("LlamaForCausalLM", "MambaForCausalLM"),
    )
    .unwrap();
    let e = load(&hf, &LoadOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("config.json") && e.contains("mamba"), "{e}");
    std::fs::write(&cfgp, &cfg).unwrap();
    std::fs::remove_file(hf.join("tokenizer.json")).unwrap();
    let e = load(&hf, &LoadOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("tokenizer.json"), "{e}");
    // Prompt longer than the context window.
    let lm = load(&g, &LoadOptions::default()).unwrap();
    let long = vec![vec![5u32; spec.context + 1]];
    let e = generate(
        &lm,
        &long,
        &GenConfig::default(),
        &mut NoHook,
        &mut |_, _| {},
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("context window"), "{e}");
}

#[test]
fn sharded_safetensors_load_like_a_single_file() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = TinySpec::new(Arch::Llama);
    let one = tmp.path().join("one");
    write_hf_dir(&one, &spec).unwrap();
    let two = tmp.path().join("two");
    write_hf_dir(&two, &spec).unwrap();
    std::fs::remove_file(two.join("model.safetensors")).unwrap();
    let all = tensors(&spec).unwrap();
    let (a, b) = all.split_at(all.len() / 2);
    let mut map = serde_json::Map::new();
    for (part, name) in [
        (a, "model-00001-of-00002.safetensors"),
        (b, "model-00002-of-00002.safetensors"),
    ] {
        let m: HashMap<String, Tensor> = part.iter().cloned().collect();
        candle_core::safetensors::save(&m, two.join(name)).unwrap();
        for (k, _) in part {
            map.insert(k.clone(), serde_json::Value::String(name.into()));
        }
    }
    std::fs::write(
        two.join("model.safetensors.index.json"),
        serde_json::json!({"weight_map": map}).to_string(),
    )
    .unwrap();
    let (m1, m2) = (
        load(&one, &LoadOptions::default()).unwrap(),
        load(&two, &LoadOptions::default()).unwrap(),
    );
    let ids = vec![m1.tok.encode("in the sea", false).unwrap()];
    assert_eq!(
        max_diff(
            &hidden(&m1, &ids, &mut NoHook),
            &hidden(&m2, &ids, &mut NoHook)
        ),
        0.0
    );
    // f16 weights are converted to f32 on load.
    let three = tmp.path().join("three");
    write_hf_dir(&three, &spec).unwrap();
    let m: HashMap<String, Tensor> = all
        .iter()
        .map(|(k, t)| (k.clone(), t.to_dtype(candle_core::DType::F16).unwrap()))
        .collect();
    candle_core::safetensors::save(&m, three.join("model.safetensors")).unwrap();
    let m3 = load(&three, &LoadOptions::default()).unwrap();
    let rel = max_diff(
        &hidden(&m1, &ids, &mut NoHook),
        &hidden(&m3, &ids, &mut NoHook),
    );
    assert!(rel < 0.05, "{rel}");
}

#[test]
fn gated_edit_adds_the_last_tokens_gate_times_the_vector_during_prefill_only() {
    let tmp = tempfile::tempdir().unwrap();
    let (lm, _) = models(tmp.path(), Arch::Llama);
    let prompts: Vec<Vec<u32>> = ["one two", "three whole words here", "a"]
        .iter()
        .map(|s| lm.tok.encode(s, false).unwrap())
        .collect();
    let d = 64;
    let u: Vec<f32> = (0..d).map(|i| ((i * 13 % 7) as f32 - 3.0) * 0.05).collect();
    let v: Vec<f32> = (0..d).map(|i| ((i * 5 % 9) as f32 - 4.0) * 0.3).collect();
    let site = Site::ResidPre(1);
    let gated = Interventions::new(vec![Intervention {
        site,
        edit: Edit::GatedAdd {
            gate: u.clone(),
            vector: v.clone(),
        },
        alpha: 1.5,
        positions: Positions::Prompt,
        phases: Phases::Prefill,
    }]);
    gated.validate(2, d).unwrap();
    assert!(gated.needs_whole_prompt());
    // the unedited activations, then the edited ones (captured after the edit)
    let mut plain = Capture::new(vec![site], Positions::All);
    hidden(&lm, &prompts, &mut plain);
    let mut chain = Chain(gated.clone(), Capture::new(vec![site], Positions::All));
    hidden(&lm, &prompts, &mut chain);
    let (x, y) = (
        plain.get(site).unwrap().to_vec2::<f32>().unwrap(),
        chain.1.get(site).unwrap().to_vec2::<f32>().unwrap(),
    );
    let rows = plain.rows().to_vec();
    assert_eq!(rows, chain.1.rows().to_vec());
    for (i, r) in rows.iter().enumerate() {
        let last = rows
            .iter()
            .position(|q| q.prompt == r.prompt && q.position == prompts[r.prompt].len() - 1)
            .unwrap();
        let g: f32 = u.iter().zip(&x[last]).map(|(a, b)| a * b).sum();
        for k in 0..d {
            let want = x[i][k] + 1.5 * g * v[k];
            assert!(
                (y[i][k] - want).abs() < 1e-4,
                "row {i} dim {k}: {} vs {want}",
                y[i][k]
            );
        }
    }
    assert!(x != y, "the edit changed nothing");
    // a call without the last prompt token (a decode step) is left alone
    let mut g2 = gated.clone();
    g2.interventions[0].phases = Phases::Both;
    g2.interventions[0].positions = Positions::All;
    let t = Tensor::randn(0f32, 1.0, (2, 1, d), &Device::Cpu).unwrap();
    let mut t2 = t.clone();
    let pads = [0usize, 0];
    let ctx = HookCtx {
        phase: Phase::Decode,
        start: 5,
        pad: &pads,
        prompt_cols: 5,
    };
    g2.at(site, &ctx, &mut t2).unwrap();
    assert_eq!(max_diff(&t, &t2), 0.0);
    // serialisable like the others; a gate of the wrong width is refused by name
    let json = serde_json::to_string(&gated).unwrap();
    assert!(json.contains("\"kind\":\"gated_add\""));
    let mut bad: Interventions = serde_json::from_str(&json).unwrap();
    if let Edit::GatedAdd { gate, .. } = &mut bad.interventions[0].edit {
        gate.pop();
    }
    let e = bad.validate(2, d).unwrap_err().to_string();
    assert!(e.contains("gate of length 63"), "{e}");
}
