//! The bodies of rudder's fuzz targets: every parser of an outside file, fed arbitrary bytes.
//!
//! Each target takes the fuzzer's bytes, writes them where the parser reads (a file in a
//! scratch folder, or several files split at a `0xFF` byte), runs the real entry point a user's
//! command runs, and ignores the result: a target may return an error, never panic, hang or
//! allocate from an unchecked size. `fuzz/` (cargo-fuzz, nightly, libFuzzer) calls these
//! functions under coverage guidance (`bench/fuzz.sh`); the tests replay every crash found so
//! far and run a short seeded mutation smoke run on stable.

use std::path::{Path, PathBuf};

/// A target: its name and its body.
pub type Target = (&'static str, fn(&[u8]));

/// Every target, by name (the cargo-fuzz binaries carry the same names).
pub const TARGETS: &[Target] = &[
    ("gguf", gguf),
    ("safetensors", safetensors),
    ("captures", captures),
    ("steer_files", steer_files),
    ("control_vector", control_vector),
    ("tokenizer", tokenizer),
    ("chat_template", chat_template),
    ("model_config", model_config),
    ("datasets", datasets),
    ("run_config", run_config),
    ("interventions", interventions),
];

/// A scratch folder for this thread, emptied before every input.
fn scratch() -> PathBuf {
    thread_local! {
        static DIR: PathBuf = {
            let base = if Path::new("/dev/shm").is_dir() {
                PathBuf::from("/dev/shm")
            } else {
                std::env::temp_dir()
            };
            let id = format!("{:?}", std::thread::current().id())
                .chars()
                .filter(char::is_ascii_alphanumeric)
                .collect::<String>();
            base.join(format!("rudder-fuzz-{}-{id}", std::process::id()))
        };
    }
    let dir = DIR.with(|d| d.clone());
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch folder");
    dir
}

/// Split at the first `0xFF` byte (never valid UTF-8, so text parsers see clean halves).
fn halves(data: &[u8]) -> (&[u8], &[u8]) {
    match data.iter().position(|&b| b == 0xFF) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[]),
    }
}

fn put(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).expect("scratch write");
    p
}

/// A GGUF model file through the loader (metadata, tokenizer, chat template, config, tensors).
pub fn gguf(data: &[u8]) {
    let d = scratch();
    let p = put(&d, "m.gguf", data);
    if let Ok(lm) = rudder_lm::loader::load(&p, &Default::default()) {
        let _ = lm.tok.encode("Hello <|im_start|> wörld", true);
        if let Some(t) = &lm.chat {
            let _ = t.render(&[rudder_lm::chat::Message::new("user", "Hi")], true);
        }
    }
}

/// A safetensors weights file: candle's reader and a Hugging Face model folder around it.
pub fn safetensors(data: &[u8]) {
    let _ = candle_core::safetensors::load_buffer(data, &candle_core::Device::Cpu);
    let d = scratch();
    put(&d, "model.safetensors", data);
    put(
        &d,
        "config.json",
        br#"{"model_type":"llama","hidden_size":8,"intermediate_size":16,"num_hidden_layers":1,
"num_attention_heads":2,"num_key_value_heads":1,"vocab_size":16,"rms_norm_eps":1e-5,
"max_position_embeddings":64,"rope_theta":10000.0,"tie_word_embeddings":true}"#,
    );
    put(
        &d,
        "tokenizer.json",
        br#"{"model":{"type":"BPE","vocab":{"a":0,"b":1},"merges":[]}}"#,
    );
    let _ = rudder_lm::loader::load(&d, &Default::default());
}

/// An activation capture (safetensors + JSON index), as `rudder steer` reads it.
pub fn captures(data: &[u8]) {
    let (st, index) = halves(data);
    let d = scratch();
    let p = put(&d, "acts.safetensors", st);
    put(&d, "acts.safetensors.json", index);
    let _ = rudder_steer::activations::ActivationSet::load(&p);
}

/// Steering files: AlphaSteer (safetensors + JSON) and steering vectors.
pub fn steer_files(data: &[u8]) {
    let (st, index) = halves(data);
    let d = scratch();
    let p = put(&d, "s.safetensors", st);
    put(&d, "s.safetensors.json", index);
    let _ = rudder_steer::alphasteer::SteerFile::load(&p);
    let _ = rudder_steer::direction::SteeringVectors::load(&p);
}

/// A llama.cpp control-vector GGUF.
pub fn control_vector(data: &[u8]) {
    let d = scratch();
    let p = put(&d, "v.gguf", data);
    let _ = rudder_steer::cvec::ControlVector::load(&p);
}

/// `tokenizer.json` (+ `tokenizer_config.json` after a `0xFF`), then a round trip.
pub fn tokenizer(data: &[u8]) {
    let (tj, cfg) = halves(data);
    let d = scratch();
    put(&d, "tokenizer.json", tj);
    if !cfg.is_empty() {
        put(&d, "tokenizer_config.json", cfg);
    }
    if let Ok(t) = rudder_lm::tokenizer::Tok::from_dir(&d) {
        if let Ok(ids) = t.encode("Hello <|im_start|> wörld 123", true) {
            let _ = t.decode(&ids, false);
        }
        let _ = t.token_bytes();
    }
}

/// A Jinja chat template, parsed and rendered on a short conversation.
pub fn chat_template(data: &[u8]) {
    let Ok(src) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(t) = rudder_lm::chat::ChatTemplate::new(src, "<s>", "</s>") {
        let msgs = [
            rudder_lm::chat::Message::new("system", "Be brief."),
            rudder_lm::chat::Message::new("user", "Hi"),
            rudder_lm::chat::Message::new("assistant", "Hello."),
            rudder_lm::chat::Message::new("user", "Bye"),
        ];
        let _ = t.render(&msgs, true);
    }
}

/// A Hugging Face `config.json` (Llama / Qwen2).
pub fn model_config(data: &[u8]) {
    let d = scratch();
    put(&d, "config.json", data);
    if let Ok(c) = rudder_lm::loader::hf_config(&d) {
        let _ = c.validate();
    }
}

/// Every dataset reader: the first byte picks the format, the rest is split at a `0xFF` byte
/// into that format's two main files.
pub fn datasets(data: &[u8]) {
    use rudder_data::formats::{self, Format};
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let (a, b) = halves(rest);
    let d = scratch();
    let format = match sel % 8 {
        0 => {
            put(&d, "train.txt", a);
            put(&d, "test.txt", b);
            Format::Lightgcn
        }
        1 => {
            put(&d, "d.inter", a);
            put(&d, "d.item", b);
            Format::Atomic
        }
        2 => {
            put(&d, "u.data", a);
            put(&d, "u.item", b);
            Format::Ml100k
        }
        3 => {
            put(&d, "ratings.dat", a);
            put(&d, "movies.dat", b);
            Format::Ml1m
        }
        4 => {
            put(&d, "train.jsonl", a);
            put(&d, "id2name.txt", b);
            Format::Llara
        }
        5 => {
            put(&d, "train.json", a);
            put(&d, "test.json", b);
            Format::Sdpo
        }
        6 => {
            put(&d, "train.txt", b"0 0 1\n1 1 2\n");
            put(&d, "movie_detail.csv", a);
            put(&d, "user_statistic.csv", b);
            Format::Lightgcn
        }
        _ => {
            put(&d, "train.txt", b"0 0 1\n1 1 2\n");
            put(&d, "personas.csv", a);
            put(&d, "user_list.txt", b);
            Format::Lightgcn
        }
    };
    if let Ok(formats::Loaded::Interactions(ds)) = formats::load(&d, Some(format)) {
        let _ = rudder_data::stats::describe(&formats::Loaded::Interactions(ds));
    }
}

/// A CF run configuration (TOML), deserialised and validated.
pub fn run_config(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(c) = toml::from_str::<rudder_cf::CfConfig>(s) {
        let _ = c.validate();
    }
    let _ = toml::from_str::<rudder_data::synth::SynthConfig>(s);
}

/// An intervention list (JSON), read and validated against a small model shape.
pub fn interventions(data: &[u8]) {
    let d = scratch();
    let p = put(&d, "iv.json", data);
    if let Ok(iv) = rudder_lm::hooks::Interventions::from_json_file(&p) {
        let _ = iv.validate(4, 8);
    }
}

/// Seeded byte mutations of `seed` (flips, inserts, deletes, splices of numbers that parsers
/// size things by), for the stable smoke run; libFuzzer does this with coverage guidance.
pub fn mutate(seed: &[u8], rng: &mut impl rand::Rng) -> Vec<u8> {
    let mut v = seed.to_vec();
    let n = rng.random_range(1..=8);
    for _ in 0..n {
        match rng.random_range(0..6) {
            0 if !v.is_empty() => {
                let i = rng.random_range(0..v.len());
                v[i] ^= 1 << rng.random_range(0..8);
            }
            1 => {
                let i = rng.random_range(0..=v.len());
                v.insert(i, rng.random());
            }
            2 if !v.is_empty() => {
                let i = rng.random_range(0..v.len());
                v.remove(i);
            }
            3 if v.len() >= 8 => {
                // an extreme little-endian integer where a length or count may be
                let i = rng.random_range(0..v.len() - 7);
                let x: u64 =
                    [u64::MAX, 1 << 40, 1 << 31, 0, u32::MAX as u64][rng.random_range(0..5)];
                v[i..i + 8].copy_from_slice(&x.to_le_bytes());
            }
            4 if !v.is_empty() => {
                let i = rng.random_range(0..v.len());
                let j = rng.random_range(i..v.len().min(i + 64) + 1).min(v.len());
                let chunk = v[i..j].to_vec();
                let k = rng.random_range(0..=v.len());
                v.splice(k..k, chunk);
            }
            _ => {
                // a large decimal number where text parsers read one
                let i = rng.random_range(0..=v.len());
                let s = ["2000000000", "99999999999999999999", "-1", "1e308", "NaN"]
                    [rng.random_range(0..5)];
                v.splice(i..i, s.bytes());
            }
        }
    }
    v
}

/// The first `n` lines of a file (seeds stay small, so the fuzzer runs fast).
fn head(path: &Path, n: usize) -> Option<Vec<u8>> {
    let text = std::fs::read(path).ok()?;
    let mut out = Vec::new();
    for line in text.split_inclusive(|&b| b == b'\n').take(n) {
        out.extend_from_slice(line);
    }
    Some(out)
}

fn join(a: &[u8], b: &[u8]) -> Vec<u8> {
    let mut v = a.to_vec();
    v.push(0xFF);
    v.extend_from_slice(b);
    v
}

/// Seed inputs per target: files the tests' tiny models write, and the heads of real files
/// where they exist (`shared`: ../shared/data; `assets`: the fetched asset folder). Nothing
/// of either is stored in the repository; the seeds are rebuilt on every run.
pub fn seeds(shared: Option<&Path>, assets: Option<&Path>) -> Vec<(&'static str, Vec<u8>)> {
    use rudder_lm::config::Arch;
    use rudder_lm::fixtures::{TinySpec, write_gguf, write_hf_dir};
    let mut out: Vec<(&'static str, Vec<u8>)> = Vec::new();
    let tmp = std::env::temp_dir().join(format!("rudder-fuzz-seeds-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).expect("seed folder");
    let read = |p: &Path| std::fs::read(p).ok();

    // tiny models: GGUF (f32 and Q8_0, Llama and Qwen2) and Hugging Face folders
    for (arch, dt) in [
        (Arch::Llama, candle_core::quantized::GgmlDType::F32),
        (Arch::Llama, candle_core::quantized::GgmlDType::Q8_0),
        (Arch::Qwen2, candle_core::quantized::GgmlDType::F32),
    ] {
        let mut spec = TinySpec::new(arch);
        spec.layers = 1;
        let p = tmp.join("m.gguf");
        if write_gguf(&p, &spec, dt).is_ok() {
            out.extend(read(&p).map(|b| ("gguf", b)));
        }
    }
    for arch in [Arch::Llama, Arch::Qwen2] {
        let mut spec = TinySpec::new(arch);
        spec.layers = 1;
        let d = tmp.join(format!("hf-{}", arch.name()));
        if write_hf_dir(&d, &spec).is_ok() {
            out.extend(read(&d.join("model.safetensors")).map(|b| ("safetensors", b)));
            out.extend(read(&d.join("config.json")).map(|b| ("model_config", b)));
            if let (Some(t), Some(c)) = (
                read(&d.join("tokenizer.json")),
                read(&d.join("tokenizer_config.json")),
            ) {
                out.push(("tokenizer", join(&t, &c)));
            }
            // an activation capture and steering files from the tiny model
            if let Ok(lm) = rudder_lm::loader::load(&d, &Default::default()) {
                let prompts: Vec<Vec<u32>> = ["ab", "ba b"]
                    .iter()
                    .filter_map(|s| lm.tok.encode(s, false).ok())
                    .collect();
                let cfg = rudder_steer::activations::CaptureConfig {
                    sites: vec![rudder_lm::hooks::Site::ResidPost(0)],
                    ..Default::default()
                };
                let cp = tmp.join("acts.safetensors");
                let labels = ["x".to_string(), "y".to_string()];
                if rudder_steer::activations::capture(
                    &lm,
                    &prompts,
                    Some(&labels),
                    &cfg,
                    None,
                    &cp,
                    serde_json::json!({}),
                    &mut |_, _| {},
                )
                .is_ok()
                {
                    let idx = rudder_steer::activations::index_path(&cp);
                    if let (Some(a), Some(b)) = (read(&cp), read(&idx)) {
                        out.push(("captures", join(&a, &b)));
                    }
                }
            }
        }
    }
    // vectors as wide as the tiny fixture model's hidden size
    let d = TinySpec::new(Arch::Llama).hidden;
    let v: Vec<f32> = (0..d).map(|i| i as f32 / d as f32 - 0.5).collect();
    let sv = rudder_steer::direction::SteeringVectors {
        vectors: vec![(rudder_lm::hooks::Site::ResidPre(1), v.clone())],
        meta: serde_json::json!({"groups": ["a", "b"]}),
    };
    let sp = tmp.join("v.safetensors");
    if sv.save(&sp).is_ok()
        && let (Some(a), Some(b)) = (read(&sp), read(&rudder_steer::activations::index_path(&sp)))
    {
        out.push(("steer_files", join(&a, &b)));
    }
    let sf = rudder_steer::alphasteer::SteerFile {
        layers: vec![rudder_steer::alphasteer::LayerSteer {
            layer: 1,
            k: 2,
            p: Some(0.6),
            gate: v.clone(),
            vector: v.clone(),
        }],
        meta: serde_json::json!({}),
    };
    let ap = tmp.join("a.safetensors");
    if sf.save(&ap).is_ok()
        && let (Some(a), Some(b)) = (read(&ap), read(&rudder_steer::activations::index_path(&ap)))
    {
        out.push(("steer_files", join(&a, &b)));
    }
    let (cv, _) = rudder_steer::cvec::ControlVector::from_sites(
        "llama",
        &[
            (rudder_lm::hooks::Site::ResidPost(1), v.clone()),
            (rudder_lm::hooks::Site::ResidPost(2), v.clone()),
        ],
    );
    let cp = tmp.join("c.gguf");
    if cv.save(&cp).is_ok() {
        out.extend(read(&cp).map(|b| ("control_vector", b)));
    }
    for iv in [
        serde_json::json!([{"site": "blocks.1.hook_resid_pre", "kind": "add_vector", "vector": v, "alpha": 4.0}]),
        serde_json::json!({"interventions": [{"site": "blocks.0.hook_resid_post", "kind": "project_out", "direction": v, "positions": "all"}]}),
        serde_json::json!([{"site": "blocks.2.hook_resid_pre", "kind": "gated_add", "gate": v, "vector": v, "alpha": 1.0}]),
    ] {
        out.push(("interventions", iv.to_string().into_bytes()));
    }
    out.push((
        "chat_template",
        rudder_lm::fixtures::CHATML.as_bytes().to_vec(),
    ));
    for (name, _) in rudder_cf::presets::PRESETS {
        if let Some(c) = rudder_cf::presets::preset(name)
            && let Ok(t) = toml::to_string(&c)
        {
            out.push(("run_config", t.into_bytes()));
        }
    }
    if let Ok(t) = toml::to_string(&rudder_data::synth::SynthConfig::default()) {
        out.push(("run_config", t.into_bytes()));
    }
    out.push((
        "datasets",
        b"\x000 1 2 3\n1 2 4\n2 0\n\xff0 5\n1 6\n".to_vec(),
    ));
    out.push((
        "datasets",
        b"\x02196\t242\t3\t881250949\n186\t302\t3\t891717742\n\xff1|Toy Story (1995)|01-Jan-1995||http://x|0|0|0|1|1|1|0|0|0|0|0|0|0|0|0|0|0|0|0\n".to_vec(),
    ));
    out.push((
        "datasets",
        b"\x031::1193::5::978300760\n1::661::3::978302109\n\xff1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n661::James and the Giant Peach (1996)::Animation|Children's|Musical\n".to_vec(),
    ));

    // real files, when present
    if let Some(a) = assets {
        let ml = a.join("ml-100k");
        if let (Some(i), Some(m)) = (
            head(&ml.join("ml-100k.inter"), 40),
            head(&ml.join("ml-100k.item"), 20),
        ) {
            out.push(("datasets", [&[1u8][..], &join(&i, &m)].concat()));
        }
        let mini = a.join("all-minilm-l6-v2");
        if let (Some(t), Some(c)) = (
            read(&mini.join("tokenizer.json")),
            read(&mini.join("tokenizer_config.json")),
        ) {
            out.push(("tokenizer", join(&t, &c)));
        }
        // the real chat template, read from the GGUF's metadata
        if let Some(g) = std::fs::read_dir(a.join("smollm2-135m-instruct"))
            .ok()
            .and_then(|rd| {
                rd.filter_map(|e| e.ok().map(|e| e.path()))
                    .find(|p| p.extension().is_some_and(|x| x == "gguf"))
            })
            && let Ok(mut f) = std::fs::File::open(&g)
            && let Ok(c) = candle_core::quantized::gguf_file::Content::read(&mut f)
            && let Some(Ok(t)) = c
                .metadata
                .get("tokenizer.chat_template")
                .map(|v| v.to_string())
        {
            out.push(("chat_template", t.clone().into_bytes()));
        }
    }
    if let Some(s) = shared {
        let coat = s.join("cf/coat");
        if let (Some(a), Some(b)) = (
            head(&coat.join("train.txt"), 30),
            head(&coat.join("test.txt"), 30),
        ) {
            out.push(("datasets", [&[0u8][..], &join(&a, &b)].concat()));
        }
        let lf = s.join("llara/lastfm");
        if let (Some(a), Some(b)) = (
            head(&lf.join("train.jsonl"), 3),
            head(&lf.join("id2name.txt"), 40),
        ) {
            out.push(("datasets", [&[4u8][..], &join(&a, &b)].concat()));
        }
        // two records of the S-DPO prompt JSON
        if let Some(v) = read(&s.join("llara/sdpo-lastfm/val.json"))
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            && let Some(arr) = v.as_array()
        {
            let two = serde_json::Value::Array(arr.iter().take(2).cloned().collect());
            let t = two.to_string().into_bytes();
            out.push(("datasets", [&[5u8][..], &join(&t, &t)].concat()));
        }
        let a4 = s.join("agent4rec-ml1m");
        if let (Some(m), Some(u)) = (
            head(&a4.join("movie_detail.csv"), 3),
            head(&a4.join("user_statistic.csv"), 3),
        ) {
            out.push(("datasets", [&[6u8][..], &join(&m, &u)].concat()));
        }
        if let Some(p) = head(&a4.join("personas.csv"), 3) {
            out.push((
                "datasets",
                [&[7u8][..], &join(&p, b"org_id remap_id\n10 0\n20 1\n")].concat(),
            ));
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
    out
}
