//! Run folders: every train/eval command writes its resolved config (TOML), metrics (JSON
//! lines), a human summary (Markdown) and, where they exist, plots and checkpoints.

use anyhow::{Context, Result};
use rudder_data::io::write_bytes_atomic;
use std::path::{Path, PathBuf};

pub struct RunDir {
    pub path: PathBuf,
}

impl RunDir {
    pub fn create(path: &Path) -> Result<RunDir> {
        std::fs::create_dir_all(path)
            .with_context(|| format!("creating run folder {}", path.display()))?;
        Ok(RunDir {
            path: path.to_path_buf(),
        })
    }

    /// `config.toml`; absent (`None`/null) settings are left out (TOML has no null).
    pub fn write_config<T: serde::Serialize>(&self, cfg: &T) -> Result<()> {
        fn strip(v: &mut serde_json::Value) {
            match v {
                serde_json::Value::Object(m) => {
                    m.retain(|_, x| !x.is_null());
                    m.values_mut().for_each(strip);
                }
                serde_json::Value::Array(a) => a.iter_mut().for_each(strip),
                _ => {}
            }
        }
        let mut v = serde_json::to_value(cfg).context("serialising the run config")?;
        strip(&mut v);
        let text = toml::to_string_pretty(&v).context("serialising the run config")?;
        write_bytes_atomic(&self.path.join("config.toml"), text.as_bytes())?;
        Ok(())
    }

    pub fn write_metrics(&self, lines: &[serde_json::Value]) -> Result<()> {
        let mut s = String::new();
        for l in lines {
            s.push_str(&l.to_string());
            s.push('\n');
        }
        write_bytes_atomic(&self.path.join("metrics.jsonl"), s.as_bytes())?;
        Ok(())
    }

    pub fn write_summary(&self, md: &str) -> Result<()> {
        write_bytes_atomic(&self.path.join("summary.md"), md.as_bytes())?;
        Ok(())
    }
}
