//! Turn a `--data` argument into data: a path in any supported format, the name of a fetched
//! asset (`ml-1m`), or `synth` (the embedded synthetic world, optionally `synth:SEED`).

use crate::assets::{Manifest, Store};
use crate::error::{DataError, Result};
use crate::formats::{self, Format, Loaded};
use crate::synth::{SynthConfig, SynthWorld};
use std::path::{Path, PathBuf};

/// Where data comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum DataRef {
    Path(PathBuf),
    Asset { name: String, dir: PathBuf },
    Synth(SynthConfig),
}

/// Resolve an argument. Existing paths win over asset names.
pub fn resolve(arg: &str, store: &Store) -> Result<DataRef> {
    let p = Path::new(arg);
    if p.exists() {
        return Ok(DataRef::Path(p.to_path_buf()));
    }
    if arg == "synth" || arg.starts_with("synth:") {
        let mut cfg = SynthConfig::default();
        if let Some(seed) = arg.strip_prefix("synth:") {
            cfg.seed = seed.parse().map_err(|_| {
                DataError::Config(format!(
                    "`{arg}`: expected synth or synth:SEED with an integer seed"
                ))
            })?;
        }
        return Ok(DataRef::Synth(cfg));
    }
    let manifest = Manifest::builtin();
    if manifest.get(arg).is_some() {
        return Ok(DataRef::Asset {
            name: arg.to_string(),
            dir: store.require(arg)?,
        });
    }
    Err(DataError::Config(format!(
        "`{arg}` is neither an existing file or folder nor a known dataset (assets: {}; or `synth`)",
        manifest.names().join(", ")
    )))
}

/// Load whatever `arg` names.
pub fn load(arg: &str, format: Option<Format>, store: &Store) -> Result<Loaded> {
    match resolve(arg, store)? {
        DataRef::Path(p) => formats::load(&p, format),
        DataRef::Asset { name, dir } => {
            let mut d = formats::load(&dir, format)?;
            if let Loaded::Interactions(ds) = &mut d {
                ds.name = name;
            }
            Ok(d)
        }
        DataRef::Synth(cfg) => Ok(Loaded::Interactions(SynthWorld::generate(&cfg).dataset)),
    }
}
