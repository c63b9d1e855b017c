//! Readers and writers for every supported on-disk format, and format detection.

pub mod agent4rec;
pub mod atomic;
pub mod lightgcn;
pub mod llara;
pub mod llara_build;
pub mod movielens;

use crate::dataset::Dataset;
use crate::error::{DataError, Result};
use crate::sequences::{PromptDataset, SeqDataset};
use std::path::Path;

/// On-disk formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    /// `train.txt`/`valid.txt`/`test*.txt` adjacency lines (+ Agent4Rec side files).
    Lightgcn,
    /// RecBole `.inter`/`.item`/`.user`.
    Atomic,
    /// Raw MovieLens-100K (`u.data`, `u.item`, `u.user`).
    Ml100k,
    /// Raw MovieLens-1M (`ratings.dat`, `movies.dat`, `users.dat`).
    Ml1m,
    /// LLaRA sequence JSONL (`train/val/test.jsonl` + `id2name.txt`).
    Llara,
    /// S-DPO prompt JSON (`train/val/test.json`).
    Sdpo,
}

impl Format {
    pub const ALL: [Format; 6] = [
        Format::Lightgcn,
        Format::Atomic,
        Format::Ml100k,
        Format::Ml1m,
        Format::Llara,
        Format::Sdpo,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Format::Lightgcn => "lightgcn",
            Format::Atomic => "atomic",
            Format::Ml100k => "ml-100k",
            Format::Ml1m => "ml-1m",
            Format::Llara => "llara",
            Format::Sdpo => "sdpo",
        }
    }

    pub fn parse(s: &str) -> Option<Format> {
        Format::ALL
            .into_iter()
            .find(|f| f.name() == s || (s == "recbole" && *f == Format::Atomic))
    }

    /// Whether writing this format is supported.
    pub fn writable(self) -> bool {
        !matches!(self, Format::Ml100k | Format::Ml1m)
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Guess the format of a file or folder from the names it holds.
pub fn detect(path: &Path) -> Result<Format> {
    if !path.exists() {
        return Err(DataError::invalid(path, "no such file or folder"));
    }
    if path.is_file() {
        return match path.extension().and_then(|e| e.to_str()) {
            Some("inter") => Ok(Format::Atomic),
            Some("json") => Ok(Format::Sdpo),
            _ => Err(DataError::invalid(
                path,
                "cannot tell the format of this file; point at its folder or name --format",
            )),
        };
    }
    let has = |n: &str| path.join(n).exists();
    let any_ext = |ext: &str| -> bool {
        std::fs::read_dir(path)
            .map(|rd| {
                rd.flatten()
                    .any(|e| e.path().extension().is_some_and(|x| x == ext))
            })
            .unwrap_or(false)
    };
    if has("train.txt") {
        Ok(Format::Lightgcn)
    } else if any_ext("inter") {
        Ok(Format::Atomic)
    } else if has("u.data") {
        Ok(Format::Ml100k)
    } else if has("ratings.dat") {
        Ok(Format::Ml1m)
    } else if any_ext("jsonl") {
        Ok(Format::Llara)
    } else if has("train.json") || has("val.json") || has("test.json") {
        Ok(Format::Sdpo)
    } else {
        Err(DataError::invalid(
            path,
            "cannot tell the format: expected train.txt (lightgcn), *.inter (atomic), u.data (ml-100k), \
             ratings.dat (ml-1m), *.jsonl (llara) or train/val/test.json (sdpo)",
        ))
    }
}

/// Whatever a path holds.
#[derive(Debug, Clone)]
pub enum Loaded {
    Interactions(Dataset),
    Sequences(SeqDataset),
    Prompts(PromptDataset),
}

/// Read a path in the given (or detected) format.
pub fn load(path: &Path, format: Option<Format>) -> Result<Loaded> {
    let f = match format {
        Some(f) => f,
        None => detect(path)?,
    };
    Ok(match f {
        Format::Lightgcn => Loaded::Interactions(lightgcn::read_dir(path)?),
        Format::Atomic => Loaded::Interactions(atomic::read(path)?),
        Format::Ml100k => Loaded::Interactions(movielens::read_100k(path)?),
        Format::Ml1m => Loaded::Interactions(movielens::read_1m(path)?),
        Format::Llara => Loaded::Sequences(llara::read_dir(path)?),
        Format::Sdpo => Loaded::Prompts(llara::read_prompt_dir(path)?),
    })
}

/// Read a path that must hold interactions.
pub fn load_interactions(path: &Path, format: Option<Format>) -> Result<Dataset> {
    match load(path, format)? {
        Loaded::Interactions(d) => Ok(d),
        _ => Err(DataError::invalid(
            path,
            "holds sequences or prompts, not user–item interactions",
        )),
    }
}

/// Write a loaded value in `format` into `out` (a folder).
pub fn save(data: &Loaded, format: Format, out: &Path) -> Result<()> {
    match (data, format) {
        (Loaded::Interactions(d), Format::Lightgcn) => lightgcn::write_dir(d, out),
        (Loaded::Interactions(d), Format::Atomic) => {
            let name = if d.name.is_empty() {
                "dataset"
            } else {
                d.name.as_str()
            };
            atomic::write(d, out, name)
        }
        (Loaded::Sequences(s), Format::Llara) => llara::write_dir(s, out),
        (Loaded::Prompts(p), Format::Sdpo) => llara::write_prompt_dir(p, out),
        (_, f) if !f.writable() => Err(DataError::Config(format!(
            "writing the raw `{f}` format is not supported; use atomic or lightgcn"
        ))),
        (Loaded::Interactions(_), f) => Err(DataError::Config(format!(
            "interactions cannot be written as `{f}`; use atomic or lightgcn"
        ))),
        (Loaded::Sequences(_), f) => Err(DataError::Config(format!(
            "sequence samples can only be written as llara, not `{f}`"
        ))),
        (Loaded::Prompts(_), f) => Err(DataError::Config(format!(
            "prompt records can only be written as sdpo, not `{f}`"
        ))),
    }
}
