//! Open a model from a Hugging Face folder or a single `.gguf` file.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::chat::ChatTemplate;
use crate::config::DecoderConfig;
use crate::decoder::Decoder;
use crate::tokenizer::Tok;
use crate::weights::Weights;
use crate::{LmError, Result, llama, qwen2};

#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// Convert quantized GGUF weights to f32 (training, exact parity with f32 peers).
    pub dequantize: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct ModelInfo {
    pub path: PathBuf,
    pub format: &'static str,
    pub arch: &'static str,
    pub quantized: bool,
    pub layers: usize,
    pub hidden_size: usize,
    pub vocab_size: usize,
    pub context: usize,
    pub chat_template_hash: Option<String>,
}

/// A decoder with its tokenizer and chat template.
pub struct LanguageModel {
    pub decoder: Decoder,
    pub tok: Tok,
    pub chat: Option<ChatTemplate>,
    pub info: ModelInfo,
}

fn find_gguf(dir: &Path) -> Option<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "gguf"))
        .collect();
    v.sort();
    v.into_iter().next()
}

/// The decoder configuration of a Hugging Face model folder (`config.json`).
pub fn hf_config(dir: &Path) -> Result<DecoderConfig> {
    let p = dir.join("config.json");
    let text = std::fs::read_to_string(&p).map_err(|e| LmError::file(&p, e))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| LmError::file(&p, format!("invalid JSON: {e}")))?;
    let kind = v
        .get("model_type")
        .and_then(|m| m.as_str())
        .map(String::from)
        .or_else(|| {
            v.get("architectures")
                .and_then(|a| a.get(0))
                .and_then(|a| a.as_str())
                .map(|s| s.to_lowercase())
        })
        .unwrap_or_default();
    let bad = |e: serde_json::Error| LmError::file(&p, format!("invalid config: {e}"));
    if kind == "llama" || kind.starts_with("llamafor") {
        serde_json::from_value::<llama::LlamaConfig>(v)
            .map_err(bad)?
            .into_decoder()
    } else if kind == "qwen2" || kind.starts_with("qwen2for") {
        serde_json::from_value::<qwen2::Qwen2Config>(v)
            .map_err(bad)?
            .into_decoder()
    } else {
        Err(LmError::file(
            &p,
            format!("field model_type: unknown architecture {kind:?} (supported: llama, qwen2)"),
        ))
    }
}

/// Load a model: a folder with `config.json` + safetensors + `tokenizer.json`, a folder that
/// holds a `.gguf` file, or a `.gguf` file.
pub fn load(path: &Path, opts: &LoadOptions) -> Result<LanguageModel> {
    if !path.exists() {
        return Err(LmError::file(path, "no such file or directory"));
    }
    let gguf = if path.is_dir() {
        if path.join("config.json").exists() {
            None
        } else {
            find_gguf(path)
        }
    } else {
        Some(path.to_path_buf())
    };
    let (decoder, tok, format) = match gguf {
        Some(g) => {
            let mut w = Weights::open_gguf(&g)?;
            let Weights::Gguf { content, .. } = &w else {
                unreachable!()
            };
            let md = &content.metadata;
            let arch = md
                .get("general.architecture")
                .and_then(|v| v.to_string().ok())
                .cloned()
                .unwrap_or_default();
            let embd = content
                .tensor_infos
                .get("token_embd.weight")
                .ok_or_else(|| LmError::file(&g, "tensor token_embd.weight is missing"))?;
            let vocab = embd.shape.dims()[0];
            let tied = !content.tensor_infos.contains_key("output.weight");
            let cfg = match arch.as_str() {
                "llama" => llama::gguf_config(md, vocab, tied),
                "qwen2" => qwen2::gguf_config(md, vocab, tied),
                other => Err(LmError::Config(format!(
                    "unknown architecture {other:?} (supported: llama, qwen2)"
                ))),
            }
            .map_err(|e| LmError::file(&g, e))?;
            let tok = Tok::from_gguf(md, &g)?;
            let dec = Decoder::load(cfg, &mut w, opts.dequantize)?;
            (dec, tok, "gguf")
        }
        None => {
            if !path.join("config.json").exists() {
                return Err(LmError::file(
                    path,
                    "not a model: no config.json and no .gguf file",
                ));
            }
            let cfg = hf_config(path)?;
            let tok = Tok::from_dir(path)?;
            let mut w = Weights::open_safetensors_dir(path)?;
            let dec = Decoder::load(cfg, &mut w, true)?;
            (dec, tok, "safetensors")
        }
    };
    let chat = match &tok.chat_template {
        Some(src) => Some(ChatTemplate::new(src, &tok.bos_text, &tok.eos_text)?),
        None => None,
    };
    let c = &decoder.cfg;
    let info = ModelInfo {
        path: path.to_path_buf(),
        format,
        arch: c.arch.name(),
        quantized: decoder
            .layers
            .first()
            .is_some_and(|l| l.q.weight.is_quantized()),
        layers: c.num_layers,
        hidden_size: c.hidden_size,
        vocab_size: c.vocab_size,
        context: c.max_position_embeddings,
        chat_template_hash: chat.as_ref().map(|t| t.hash()),
    };
    Ok(LanguageModel {
        decoder,
        tok,
        chat,
        info,
    })
}
