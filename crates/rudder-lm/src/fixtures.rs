//! Tiny random-weight models written to disk, for tests (ours and downstream crates'): the same
//! weights as a Hugging Face folder (config.json, model.safetensors, tokenizer.json,
//! tokenizer_config.json) and as a GGUF file (with llama.cpp's Q/K row permutation for Llama),
//! so that both loaders can be checked against each other.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;

use crate::config::Arch;
use crate::tokenizer::Tok;
use crate::weights::gguf_name;
use crate::{LmError, Result};

pub const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

#[derive(Clone, Copy, Debug)]
pub struct TinySpec {
    pub arch: Arch,
    pub tied: bool,
    pub seed: u64,
    pub layers: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub context: usize,
}

impl TinySpec {
    pub fn new(arch: Arch) -> Self {
        TinySpec {
            arch,
            tied: true,
            seed: 7,
            layers: 2,
            hidden: 64,
            intermediate: 128,
            heads: 4,
            kv_heads: 2,
            context: 96,
        }
    }
    fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }
}

/// Byte-level BPE vocabulary: the 256 byte symbols, a few merges, and three special tokens.
fn vocab() -> (Vec<String>, Vec<String>, Vec<i32>) {
    let mut alphabet: Vec<char> = ByteLevel::alphabet().into_iter().collect();
    alphabet.sort();
    let mut tokens: Vec<String> = alphabet.iter().map(|c| c.to_string()).collect();
    let merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n", "Ġ s"];
    for m in merges {
        tokens.push(m.replace(' ', ""));
    }
    let mut types = vec![1; tokens.len()];
    for s in ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] {
        tokens.push(s.to_string());
        types.push(3);
    }
    (
        tokens,
        merges.iter().map(|s| s.to_string()).collect(),
        types,
    )
}

fn gguf_tokenizer_metadata() -> Vec<(String, gguf_file::Value)> {
    use gguf_file::Value as V;
    let (tokens, merges, types) = vocab();
    let n = tokens.len() as u32;
    vec![
        ("tokenizer.ggml.model".into(), V::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), V::String("default".into())),
        (
            "tokenizer.ggml.tokens".into(),
            V::Array(tokens.into_iter().map(V::String).collect()),
        ),
        (
            "tokenizer.ggml.merges".into(),
            V::Array(merges.into_iter().map(V::String).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            V::Array(types.into_iter().map(V::I32).collect()),
        ),
        ("tokenizer.ggml.bos_token_id".into(), V::U32(n - 3)),
        ("tokenizer.ggml.eos_token_id".into(), V::U32(n - 1)),
        ("tokenizer.ggml.padding_token_id".into(), V::U32(n - 3)),
        ("tokenizer.ggml.add_bos_token".into(), V::Bool(false)),
        ("tokenizer.chat_template".into(), V::String(CHATML.into())),
    ]
}

pub fn vocab_size() -> usize {
    vocab().0.len()
}

/// The model's tensors under Hugging Face names, drawn from `spec.seed`.
pub fn tensors(spec: &TinySpec) -> Result<Vec<(String, Tensor)>> {
    let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
    let mut normal = |shape: &[usize], std: f32| -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| {
                let (u1, u2): (f32, f32) = (rng.random::<f32>().max(1e-7), rng.random());
                std * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
            })
            .collect();
        Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
    };
    let (d, f, hd) = (spec.hidden, spec.intermediate, spec.head_dim());
    let (qd, kvd) = (spec.heads * hd, spec.kv_heads * hd);
    let v = vocab_size();
    let mut out = vec![(
        "model.embed_tokens.weight".to_string(),
        normal(&[v, d], 0.5)?,
    )];
    for l in 0..spec.layers {
        let p = format!("model.layers.{l}");
        out.push((
            format!("{p}.input_layernorm.weight"),
            (normal(&[d], 0.1)? + 1.0)?,
        ));
        out.push((
            format!("{p}.post_attention_layernorm.weight"),
            (normal(&[d], 0.1)? + 1.0)?,
        ));
        for (name, o, i) in [
            ("q_proj", qd, d),
            ("k_proj", kvd, d),
            ("v_proj", kvd, d),
            ("o_proj", d, qd),
        ] {
            out.push((
                format!("{p}.self_attn.{name}.weight"),
                normal(&[o, i], 0.15)?,
            ));
            if spec.arch == Arch::Qwen2 && name != "o_proj" {
                out.push((format!("{p}.self_attn.{name}.bias"), normal(&[o], 0.1)?));
            }
        }
        for (name, o, i) in [("gate_proj", f, d), ("up_proj", f, d), ("down_proj", d, f)] {
            out.push((format!("{p}.mlp.{name}.weight"), normal(&[o, i], 0.15)?));
        }
    }
    out.push(("model.norm.weight".into(), (normal(&[d], 0.1)? + 1.0)?));
    if !spec.tied {
        out.push(("lm_head.weight".into(), normal(&[v, d], 0.2)?));
    }
    Ok(out)
}

/// Write a Hugging Face model folder.
pub fn write_hf_dir(dir: &Path, spec: &TinySpec) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let t = tensors(spec)?;
    let map: HashMap<String, Tensor> = t.into_iter().collect();
    candle_core::safetensors::save(&map, dir.join("model.safetensors"))?;
    let v = vocab_size();
    let cfg = serde_json::json!({
        "architectures": [if spec.arch == Arch::Llama { "LlamaForCausalLM" } else { "Qwen2ForCausalLM" }],
        "model_type": spec.arch.name(),
        "vocab_size": v,
        "hidden_size": spec.hidden,
        "intermediate_size": spec.intermediate,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": spec.context,
        "tie_word_embeddings": spec.tied,
        "eos_token_id": v - 1,
        "bos_token_id": v - 3,
    });
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&cfg).unwrap_or_default(),
    )?;
    let md: HashMap<String, gguf_file::Value> = gguf_tokenizer_metadata().into_iter().collect();
    let tok = Tok::from_gguf(&md, dir)?;
    tok.inner
        .save(dir.join("tokenizer.json"), false)
        .map_err(|e| LmError::Tokenizer(e.to_string()))?;
    let tc = serde_json::json!({
        "bos_token": "<|endoftext|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "chat_template": CHATML,
    });
    std::fs::write(
        dir.join("tokenizer_config.json"),
        serde_json::to_string_pretty(&tc).unwrap_or_default(),
    )?;
    Ok(())
}

/// llama.cpp's conversion reorders each head's Q/K rows from rotate-half to interleaved pairs.
fn permute_rows(t: &Tensor, heads: usize) -> Result<Tensor> {
    let (o, i) = t.dims2()?;
    let hd = o / heads;
    Ok(t.reshape((heads, 2, hd / 2, i))?
        .transpose(1, 2)?
        .reshape((o, i))?
        .contiguous()?)
}

/// Write the same model as one GGUF file; matrices in `dtype`, norms and biases in F32.
pub fn write_gguf(path: &Path, spec: &TinySpec, dtype: GgmlDType) -> Result<()> {
    use gguf_file::Value as V;
    let arch = spec.arch.name();
    let mut md: Vec<(String, V)> = vec![
        ("general.architecture".into(), V::String(arch.into())),
        (format!("{arch}.block_count"), V::U32(spec.layers as u32)),
        (
            format!("{arch}.embedding_length"),
            V::U32(spec.hidden as u32),
        ),
        (
            format!("{arch}.feed_forward_length"),
            V::U32(spec.intermediate as u32),
        ),
        (
            format!("{arch}.attention.head_count"),
            V::U32(spec.heads as u32),
        ),
        (
            format!("{arch}.attention.head_count_kv"),
            V::U32(spec.kv_heads as u32),
        ),
        (
            format!("{arch}.attention.layer_norm_rms_epsilon"),
            V::F32(1e-5),
        ),
        (format!("{arch}.rope.freq_base"), V::F32(10000.0)),
        (
            format!("{arch}.context_length"),
            V::U32(spec.context as u32),
        ),
    ];
    md.extend(gguf_tokenizer_metadata());
    let mut qt: Vec<(String, QTensor)> = Vec::new();
    for (name, t) in tensors(spec)? {
        let g =
            gguf_name(&name).ok_or_else(|| LmError::Config(format!("no GGUF name for {name}")))?;
        let t = if spec.arch == Arch::Llama && name.ends_with("q_proj.weight") {
            permute_rows(&t, spec.heads)?
        } else if spec.arch == Arch::Llama && name.ends_with("k_proj.weight") {
            permute_rows(&t, spec.kv_heads)?
        } else {
            t
        };
        let q = if t.rank() == 2 {
            QTensor::quantize(&t, dtype)?
        } else {
            QTensor::quantize(&t, GgmlDType::F32)?
        };
        qt.push((g, q));
    }
    let tmp = path.with_extension("gguf.partial");
    let mut f = std::fs::File::create(&tmp)?;
    let md_ref: Vec<(&str, &V)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_ref: Vec<(&str, &QTensor)> = qt.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut f, &md_ref, &t_ref)?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    Ok(())
}
