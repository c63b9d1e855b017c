//! Item language features for AlphaRec: from a file (safetensors written by `rudder embed`,
//! aligned through its id list, or `.npy` rows in the dataset's item order), or computed in
//! process from item titles with a BERT-family sentence encoder.

use std::path::Path;

use candle_core::{Device, Tensor};
use rudder_data::Dataset;

use crate::{CfError, Result};

/// `[n_items, d]` features whose row `i` is the dataset's dense item `i`.
pub fn load_features(path: &Path, ds: &Dataset) -> Result<Tensor> {
    let err = |m: String| CfError::Config(format!("{}: {m}", path.display()));
    let is_npy = path.extension().is_some_and(|e| e == "npy");
    let t = if is_npy {
        Tensor::read_npy(path).map_err(|e| err(format!("not a readable .npy file: {e}")))?
    } else {
        let m = candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| err(format!("not a readable safetensors file: {e}")))?;
        match m.get("embeddings") {
            Some(t) => t.clone(),
            None if m.len() == 1 => m.into_values().next().unwrap_or_else(|| unreachable!()),
            None => return Err(err("no tensor named \"embeddings\"".into())),
        }
    };
    let t = t.to_dtype(candle_core::DType::F32)?;
    let (rows, _) = t
        .dims2()
        .map_err(|_| err(format!("expected a 2-D matrix, got shape {:?}", t.dims())))?;
    let mut side = path.as_os_str().to_owned();
    side.push(".json");
    let side = std::path::PathBuf::from(side);
    if !is_npy && side.exists() {
        let text = std::fs::read_to_string(&side)
            .map_err(|e| CfError::Config(format!("{}: {e}", side.display())))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| CfError::Config(format!("{}: invalid JSON: {e}", side.display())))?;
        if let Some(ids) = v.get("ids").and_then(|i| i.as_array()) {
            let pos: std::collections::HashMap<String, usize> = ids
                .iter()
                .enumerate()
                .map(|(k, id)| {
                    (
                        id.as_str()
                            .map(String::from)
                            .unwrap_or_else(|| id.to_string()),
                        k,
                    )
                })
                .collect();
            let mut idx = Vec::with_capacity(ds.n_items());
            let mut missing = Vec::new();
            for i in 0..ds.n_items() as u32 {
                match pos.get(ds.items.ext(i)) {
                    Some(&r) if r < rows => idx.push(r as u32),
                    _ => missing.push(ds.items.ext(i).to_string()),
                }
            }
            if !missing.is_empty() {
                return Err(err(format!(
                    "{} of the dataset's {} items have no feature row (first: {})",
                    missing.len(),
                    ds.n_items(),
                    missing
                        .iter()
                        .take(5)
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
            return Ok(t.index_select(&Tensor::from_vec(idx, ds.n_items(), &Device::Cpu)?, 0)?);
        }
    }
    if rows != ds.n_items() {
        return Err(err(format!(
            "{rows} rows, but the dataset has {} items (rows must follow the item order)",
            ds.n_items()
        )));
    }
    Ok(t)
}

/// How a decoder LM's hidden states become one text vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    #[default]
    Mean,
    Last,
}

/// Encode every item's title: BERT-family sentence encoders (mean pooling + L2, as
/// sentence-transformers), or decoder LMs (`pooling` over the final-norm hidden states).
pub fn encode_titles(
    ds: &Dataset,
    encoder_dir: &Path,
    pooling: Pooling,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Tensor> {
    let mut titles = Vec::with_capacity(ds.n_items());
    let mut missing = Vec::new();
    for i in 0..ds.n_items() as u32 {
        match ds.item_table.title(i) {
            Some(t) => titles.push(t.to_string()),
            None => missing.push(ds.items.ext(i).to_string()),
        }
    }
    if !missing.is_empty() {
        return Err(CfError::Config(format!(
            "{} of {} items have no title to encode (first ids: {}); give precomputed features with --features",
            missing.len(),
            ds.n_items(),
            missing
                .iter()
                .take(5)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let refs: Vec<&str> = titles.iter().map(String::as_str).collect();
    let n = refs.len();
    if is_decoder(encoder_dir) {
        return decoder_embed(encoder_dir, &refs, pooling, &mut |d| progress(d, n));
    }
    let enc = rudder_lm::bert::TextEncoder::load(encoder_dir)
        .map_err(|e| CfError::Config(e.to_string()))?;
    enc.embed(&refs, 64, &mut |d| progress(d, n))
        .map_err(|e| CfError::Config(e.to_string()))
}

/// Whether a model path is a decoder LM (GGUF, or a folder whose config names llama / qwen2)
/// rather than a BERT-family sentence encoder.
pub fn is_decoder(path: &Path) -> bool {
    if path.extension().is_some_and(|e| e == "gguf") {
        return true;
    }
    if path.is_dir() {
        if let Ok(t) = std::fs::read_to_string(path.join("config.json")) {
            return t.contains("\"llama\"") || t.contains("\"qwen2\"");
        }
        return std::fs::read_dir(path)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .any(|e| e.path().extension().is_some_and(|x| x == "gguf"))
            })
            .unwrap_or(false);
    }
    false
}

/// Text embeddings from a decoder LM: the final-norm hidden state averaged over the text's
/// tokens (`Pooling::Mean`) or at its last token (`Pooling::Last`).
pub fn decoder_embed(
    model: &Path,
    texts: &[&str],
    pooling: Pooling,
    progress: &mut dyn FnMut(usize),
) -> Result<Tensor> {
    use rudder_lm::hooks::{Capture, Phase, Positions, Site};
    let err = |e: rudder_lm::LmError| CfError::Config(e.to_string());
    let lm = rudder_lm::loader::load(model, &Default::default()).map_err(err)?;
    let d = lm.decoder.cfg.hidden_size;
    let mut out = vec![0f32; texts.len() * d];
    for (bi, chunk) in texts.chunks(16).enumerate() {
        let ids: Vec<Vec<u32>> = chunk
            .iter()
            .map(|t| lm.tok.encode(t, true))
            .collect::<rudder_lm::Result<_>>()
            .map_err(err)?;
        if let Some(k) = ids.iter().position(|v| v.is_empty()) {
            return Err(CfError::Config(format!(
                "text {} is empty after tokenization",
                bi * 16 + k
            )));
        }
        let (t, pads) = rudder_lm::generate::left_pad(&ids, lm.tok.pad).map_err(err)?;
        let mut cache = lm.decoder.new_cache(pads);
        let pos = if pooling == Pooling::Last {
            Positions::LastPrompt
        } else {
            Positions::All
        };
        let mut cap = Capture::new(vec![Site::FinalNorm], pos);
        lm.decoder
            .forward(&t, &mut cache, Phase::Prefill, &mut cap)
            .map_err(err)?;
        let m = cap.get(Site::FinalNorm).map_err(err)?.to_vec2::<f32>()?;
        let mut counts = vec![0usize; chunk.len()];
        for (row, id) in m.iter().zip(cap.rows()) {
            let o = &mut out[(bi * 16 + id.prompt) * d..(bi * 16 + id.prompt + 1) * d];
            o.iter_mut().zip(row).for_each(|(a, b)| *a += b);
            counts[id.prompt] += 1;
        }
        for (k, &c) in counts.iter().enumerate() {
            out[(bi * 16 + k) * d..(bi * 16 + k + 1) * d]
                .iter_mut()
                .for_each(|a| *a /= c.max(1) as f32);
        }
        progress((bi * 16 + chunk.len()).min(texts.len()));
    }
    Ok(Tensor::from_vec(out, (texts.len(), d), &Device::Cpu)?)
}

/// One text through the same encoder (intent queries).
pub fn encode_text(encoder_dir: &Path, text: &str, pooling: Pooling) -> Result<Tensor> {
    if is_decoder(encoder_dir) {
        return Ok(decoder_embed(encoder_dir, &[text], pooling, &mut |_| {})?.squeeze(0)?);
    }
    let enc = rudder_lm::bert::TextEncoder::load(encoder_dir)
        .map_err(|e| CfError::Config(e.to_string()))?;
    Ok(enc
        .embed(&[text], 1, &mut |_| {})
        .map_err(|e| CfError::Config(e.to_string()))?
        .squeeze(0)?)
}
