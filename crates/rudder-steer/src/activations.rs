//! Activation sets: the activations of a prompt set at chosen sites and positions, in one
//! safetensors file (one `[N, d]` f32 tensor per site, named by the site, e.g.
//! `blocks.12.hook_resid_pre`) with a JSON index next to it (`<file>.json`: sites, positions,
//! row ids, labels, the model, the chat template hash, the rendering, hashes of the prompts).
//!
//! Capture streams: every batch is written to its own shard in `<file>.parts/` (atomically)
//! and a shard that exists is never recomputed, so an interrupted capture resumes where it
//! stopped; the shards are merged when all are done. The parts folder carries a manifest of
//! what is being captured, and a resume with different settings is refused.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use rudder_lm::generate::{left_pad, length_batches};
use rudder_lm::hooks::{Capture, Hook, Interventions, NoHook, Phase, Positions, RowId, Site};
use rudder_lm::loader::LanguageModel;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::{Result, SteerError};

/// What to capture.
/// Padded tokens per forward pass when prompts are batched by length.
pub const BATCH_TOKENS: usize = 4096;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CaptureConfig {
    pub sites: Vec<Site>,
    pub positions: Positions,
    /// Prompts per forward pass (left-padded).
    pub batch: usize,
    /// Batches per shard file.
    pub shard_batches: usize,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        CaptureConfig {
            sites: Vec::new(),
            positions: Positions::LastPrompt,
            batch: 16,
            shard_batches: 8,
        }
    }
}

/// A captured set, loaded.
pub struct ActivationSet {
    pub path: PathBuf,
    pub sites: Vec<Site>,
    pub hidden: usize,
    pub rows: Vec<RowId>,
    pub labels: Option<Vec<String>>,
    pub meta: Value,
    data: BTreeMap<Site, Vec<f32>>,
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The JSON index next to a file: `<file>.json`.
pub fn index_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".json");
    PathBuf::from(p)
}

fn parts_dir(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".parts");
    PathBuf::from(p)
}

pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    rudder_data::io::write_bytes_atomic(path, bytes).map_err(|e| SteerError::file(path, e))
}

/// Capture the activations of `prompts` (token ids) and write them to `out`. `labels`, if
/// given, go into the index. `progress(done, total)` is called after every batch. Returns the
/// loaded set.
#[allow(clippy::too_many_arguments)]
pub fn capture(
    lm: &LanguageModel,
    prompts: &[Vec<u32>],
    labels: Option<&[String]>,
    cfg: &CaptureConfig,
    interventions: Option<&Interventions>,
    out: &Path,
    meta: Value,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<ActivationSet> {
    if prompts.is_empty() {
        return Err(SteerError::Invalid("no prompts to capture".into()));
    }
    if cfg.sites.is_empty() {
        return Err(SteerError::Invalid("no sites to capture".into()));
    }
    let c = &lm.decoder.cfg;
    for s in &cfg.sites {
        s.check(c.num_layers)?;
    }
    if let Some(iv) = interventions {
        iv.validate(c.num_layers, c.hidden_size)?;
    }
    let ctx = c.max_position_embeddings;
    if let Some((i, p)) = prompts.iter().enumerate().find(|(_, p)| p.len() > ctx) {
        return Err(SteerError::Invalid(format!(
            "prompt {i} is {} tokens, longer than the context window of {ctx}",
            p.len()
        )));
    }
    let ids_hash = {
        let mut h = Sha256::new();
        for p in prompts {
            for t in p {
                h.update(t.to_le_bytes());
            }
            h.update(b"|");
        }
        h.finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    let manifest = json!({
        "sites": cfg.sites, "positions": cfg.positions, "batch": cfg.batch.max(1),
        "shard_batches": cfg.shard_batches.max(1), "prompt_ids_sha256": ids_hash,
        "prompts": prompts.len(), "model": lm.info,
        "interventions": interventions.map(|i| &i.interventions),
    });
    let parts = parts_dir(out);
    std::fs::create_dir_all(&parts).map_err(|e| SteerError::file(&parts, e))?;
    let mpath = parts.join("manifest.json");
    if mpath.exists() {
        let old: Value = std::fs::read(&mpath)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(Value::Null);
        if old != manifest {
            return Err(SteerError::file(
                &parts,
                "an interrupted capture with other settings (prompts, sites, positions, model or batch) is here; delete the folder to start over",
            ));
        }
    } else {
        write_atomic(&mpath, manifest.to_string().as_bytes())?;
    }
    let per_shard = cfg.batch.max(1) * cfg.shard_batches.max(1);
    let shards = prompts.len().div_ceil(per_shard);
    let mut hook_iv = interventions.cloned();
    for s in 0..shards {
        let lo = s * per_shard;
        let hi = (lo + per_shard).min(prompts.len());
        let spath = parts.join(format!("part-{s:06}.safetensors"));
        if spath.exists() {
            progress(hi, prompts.len());
            continue;
        }
        let mut cap = Capture::new(cfg.sites.clone(), cfg.positions);
        // batches of similar length (one long prompt must not pad a whole batch), rows put
        // back in prompt order before the shard is written
        let lens: Vec<usize> = prompts[lo..hi].iter().map(|p| p.len()).collect();
        let mut done = lo;
        for group in length_batches(&lens, cfg.batch.max(1), BATCH_TOKENS) {
            let ids: Vec<usize> = group.iter().map(|&k| lo + k).collect();
            let batch: Vec<Vec<u32>> = ids.iter().map(|&i| prompts[i].clone()).collect();
            let (t, pads) = left_pad(&batch, lm.tok.pad)?;
            let mut cache = lm.decoder.new_cache(pads);
            done += ids.len();
            cap.set_prompt_ids(ids);
            match &mut hook_iv {
                Some(iv) => {
                    let mut h = rudder_lm::hooks::Chain(&mut *iv, &mut cap);
                    lm.decoder
                        .forward(&t, &mut cache, Phase::Prefill, &mut h as &mut dyn Hook)?;
                }
                None => {
                    let mut h = rudder_lm::hooks::Chain(NoHook, &mut cap);
                    lm.decoder
                        .forward(&t, &mut cache, Phase::Prefill, &mut h as &mut dyn Hook)?;
                }
            }
            progress(done, prompts.len());
        }
        cap.sort_rows();
        cap.save(&spath, json!({"shard": s}))?;
    }
    // merge
    let mut data: BTreeMap<Site, Vec<f32>> = BTreeMap::new();
    let mut rows: Vec<RowId> = Vec::new();
    let mut hidden = 0;
    for s in 0..shards {
        let spath = parts.join(format!("part-{s:06}.safetensors"));
        let idx: Value = std::fs::read(index_path(&spath))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| SteerError::file(&spath, "shard index missing or unreadable"))?;
        let r: Vec<RowId> = serde_json::from_value(idx["rows"].clone())
            .map_err(|e| SteerError::file(&spath, format!("shard index: {e}")))?;
        rows.extend(r);
        let t = candle_core::safetensors::load(&spath, &Device::Cpu)
            .map_err(|e| SteerError::file(&spath, e))?;
        for site in &cfg.sites {
            let m = t
                .get(&site.to_string())
                .ok_or_else(|| SteerError::file(&spath, format!("no tensor {site}")))?;
            hidden = m.dim(1)?;
            data.entry(*site)
                .or_default()
                .extend(m.flatten_all()?.to_vec1::<f32>()?);
        }
    }
    let template_meta = meta;
    let set = ActivationSet {
        path: out.to_path_buf(),
        sites: cfg.sites.clone(),
        hidden,
        rows,
        labels: labels.map(|l| l.to_vec()),
        meta: json!({
            "capture": manifest,
            "meta": template_meta,
        }),
        data,
    };
    set.save(out)?;
    std::fs::remove_dir_all(&parts).map_err(|e| SteerError::file(&parts, e))?;
    Ok(set)
}

impl ActivationSet {
    /// Write the set (safetensors + JSON index), atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut tensors = Vec::new();
        for s in &self.sites {
            let v = &self.data[s];
            tensors.push((
                s.to_string(),
                Tensor::from_slice(v, (v.len() / self.hidden.max(1), self.hidden), &Device::Cpu)?,
            ));
        }
        rudder_nn::checkpoint::save(&tensors, path).map_err(|e| SteerError::file(path, e))?;
        let index = json!({
            "format": "rudder-activations-v1",
            "sites": self.sites.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            "hidden_size": self.hidden,
            "rows": self.rows,
            "labels": self.labels,
            "meta": self.meta,
        });
        write_atomic(
            &index_path(path),
            serde_json::to_string_pretty(&index)
                .unwrap_or_default()
                .as_bytes(),
        )
    }

    /// Read a set written by [`capture`] (or by `rudder lm capture`).
    pub fn load(path: &Path) -> Result<Self> {
        let ip = index_path(path);
        let idx: Value =
            serde_json::from_slice(&std::fs::read(&ip).map_err(|e| SteerError::file(&ip, e))?)
                .map_err(|e| SteerError::file(&ip, format!("invalid JSON: {e}")))?;
        let sites: Vec<Site> = serde_json::from_value(idx["sites"].clone())
            .map_err(|e| SteerError::file(&ip, format!("field sites: {e}")))?;
        let rows: Vec<RowId> = serde_json::from_value(idx["rows"].clone())
            .map_err(|e| SteerError::file(&ip, format!("field rows: {e}")))?;
        let labels: Option<Vec<String>> = serde_json::from_value(idx["labels"].clone())
            .map_err(|e| SteerError::file(&ip, format!("field labels: {e}")))?;
        let t = candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| SteerError::file(path, e))?;
        let mut data = BTreeMap::new();
        let mut hidden = 0;
        for s in &sites {
            let m = t.get(&s.to_string()).ok_or_else(|| {
                SteerError::file(path, format!("no tensor {s} (the index lists it)"))
            })?;
            let (n, d) = m.dims2()?;
            if n != rows.len() {
                return Err(SteerError::file(
                    path,
                    format!("tensor {s} has {n} rows, the index {}", rows.len()),
                ));
            }
            hidden = d;
            data.insert(*s, m.flatten_all()?.to_vec1::<f32>()?);
        }
        if let Some(l) = &labels
            && l.len() != rows.len()
        {
            return Err(SteerError::file(
                &ip,
                format!("{} labels for {} rows", l.len(), rows.len()),
            ));
        }
        Ok(ActivationSet {
            path: path.to_path_buf(),
            sites,
            hidden,
            rows,
            labels,
            meta: idx["meta"].clone(),
            data,
        })
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The row-major `[N, d]` matrix at `site`.
    pub fn get(&self, site: Site) -> Result<&[f32]> {
        self.data.get(&site).map(|v| v.as_slice()).ok_or_else(|| {
            SteerError::Invalid(format!(
                "{}: nothing captured at {site} (sites: {})",
                self.path.display(),
                self.sites
                    .iter()
                    .map(|s| s.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })
    }

    /// The same rows as an f64 faer matrix.
    pub fn matrix(&self, site: Site, rows: Option<&[usize]>) -> Result<faer::Mat<f64>> {
        let d = self.hidden;
        let v = self.get(site)?;
        Ok(match rows {
            None => faer::Mat::from_fn(self.len(), d, |i, j| v[i * d + j] as f64),
            Some(r) => faer::Mat::from_fn(r.len(), d, |i, j| v[r[i] * d + j] as f64),
        })
    }
}
