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

/// Encode every item's title with a sentence encoder folder.
pub fn encode_titles(
    ds: &Dataset,
    encoder_dir: &Path,
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
    let enc = rudder_lm::bert::TextEncoder::load(encoder_dir)
        .map_err(|e| CfError::Config(e.to_string()))?;
    let refs: Vec<&str> = titles.iter().map(String::as_str).collect();
    let n = refs.len();
    enc.embed(&refs, 64, &mut |d| progress(d, n))
        .map_err(|e| CfError::Config(e.to_string()))
}

/// One text through the same encoder (intent queries).
pub fn encode_text(encoder_dir: &Path, text: &str) -> Result<Tensor> {
    let enc = rudder_lm::bert::TextEncoder::load(encoder_dir)
        .map_err(|e| CfError::Config(e.to_string()))?;
    Ok(enc
        .embed(&[text], 1, &mut |_| {})
        .map_err(|e| CfError::Config(e.to_string()))?
        .squeeze(0)?)
}
