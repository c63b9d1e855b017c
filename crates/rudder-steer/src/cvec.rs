//! Steering vectors in llama.cpp's control-vector GGUF layout, so that a vector found with
//! rudder runs in llama.cpp / llama-server (`--control-vector FILE`,
//! `--control-vector-scaled FILE S`) and vectors made there (repeng, `cvector-generator`) run
//! in rudder.
//!
//! The layout: `general.architecture = "controlvector"`, `controlvector.model_hint` (string),
//! `controlvector.layer_count` (u32), and one f32 tensor `direction.{k}` of width d per layer.
//! llama.cpp adds `direction.{k}` to the **output of block k** (0-based), at every position of
//! prompt and generation, for k ≥ 1 — its buffer has no slot for block 0, and the embeddings
//! (`ResidPre(0)`) cannot be steered. In rudder's typed sites, `direction.{k}` is
//! `ResidPost(k)` = `ResidPre(k + 1)`.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_core::{Device, Tensor};
use rudder_lm::hooks::{Edit, Intervention, Interventions, Phases, Positions, Site};

use crate::{Result, SteerError};

/// Per-layer vectors keyed by llama.cpp's block index (`ResidPost(k)`).
#[derive(Clone, Debug, PartialEq)]
pub struct ControlVector {
    pub model_hint: String,
    pub layers: BTreeMap<usize, Vec<f32>>,
}

impl ControlVector {
    /// From vectors at typed sites. `ResidPre(l)` becomes block `l − 1`'s output. Sites
    /// llama.cpp cannot steer (`ResidPre(0)`, `ResidPre(1)` = `ResidPost(0)`, and anything
    /// other than the residual stream between blocks) are returned in the second list.
    pub fn from_sites(model_hint: &str, v: &[(Site, Vec<f32>)]) -> (Self, Vec<Site>) {
        let mut layers = BTreeMap::new();
        let mut skipped = Vec::new();
        for (s, vec) in v {
            let k = match *s {
                Site::ResidPost(k) => Some(k),
                Site::ResidPre(l) if l >= 1 => Some(l - 1),
                _ => None,
            };
            match k {
                Some(k) if k >= 1 => {
                    layers.insert(k, vec.clone());
                }
                _ => skipped.push(*s),
            }
        }
        (
            ControlVector {
                model_hint: model_hint.into(),
                layers,
            },
            skipped,
        )
    }

    /// rudder interventions doing what llama.cpp does with this file at `strength`:
    /// `h ← h + strength · direction.{k}` at `ResidPost(k)`, all positions, both phases.
    pub fn interventions(&self, strength: f32) -> Interventions {
        Interventions::new(
            self.layers
                .iter()
                .map(|(&k, v)| Intervention {
                    site: Site::ResidPost(k),
                    edit: Edit::AddVector { vector: v.clone() },
                    alpha: strength,
                    positions: Positions::All,
                    phases: Phases::Both,
                })
                .collect(),
        )
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        use gguf_file::Value as V;
        let d = self.layers.values().next().map(|v| v.len()).unwrap_or(0);
        if self.layers.values().any(|v| v.len() != d) || d == 0 {
            return Err(SteerError::Invalid(
                "control vector layers must be non-empty and of one width".into(),
            ));
        }
        let layer_count = self.layers.keys().max().copied().unwrap_or(0) as u32;
        let md = [
            ("general.architecture", V::String("controlvector".into())),
            (
                "controlvector.model_hint",
                V::String(self.model_hint.clone()),
            ),
            ("controlvector.layer_count", V::U32(layer_count)),
        ];
        let mut qt: Vec<(String, QTensor)> = Vec::new();
        for (k, v) in &self.layers {
            let t = Tensor::from_slice(v, d, &Device::Cpu)?;
            qt.push((
                format!("direction.{k}"),
                QTensor::quantize(&t, GgmlDType::F32)?,
            ));
        }
        let tmp = path.with_extension("gguf.partial");
        let mut f = std::fs::File::create(&tmp).map_err(|e| SteerError::file(&tmp, e))?;
        let md_ref: Vec<(&str, &V)> = md.iter().map(|(k, v)| (*k, v)).collect();
        let t_ref: Vec<(&str, &QTensor)> = qt.iter().map(|(k, v)| (k.as_str(), v)).collect();
        gguf_file::write(&mut f, &md_ref, &t_ref).map_err(|e| SteerError::file(&tmp, e))?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(|e| SteerError::file(path, e))
    }

    /// Read a control-vector GGUF; errors name the file and what is wrong with it.
    pub fn load(path: &Path) -> Result<Self> {
        let mut f = std::fs::File::open(path).map_err(|e| SteerError::file(path, e))?;
        let content = gguf_file::Content::read(&mut f)
            .map_err(|e| SteerError::file(path, format!("not a GGUF file: {e}")))?;
        let arch = content
            .metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        if arch != "controlvector" {
            return Err(SteerError::file(
                path,
                format!("general.architecture is {arch:?}, not \"controlvector\""),
            ));
        }
        let model_hint = content
            .metadata
            .get("controlvector.model_hint")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        let mut layers = BTreeMap::new();
        let mut width = None;
        for (name, info) in &content.tensor_infos {
            let k: usize = name
                .strip_prefix("direction.")
                .and_then(|k| k.parse().ok())
                .ok_or_else(|| {
                    SteerError::file(path, format!("tensor {name:?} is not direction.<layer>"))
                })?;
            if k == 0 {
                return Err(SteerError::file(
                    path,
                    "direction.0: llama.cpp control vectors start at layer 1",
                ));
            }
            let dims = info.shape.dims();
            if dims.len() != 1 {
                return Err(SteerError::file(
                    path,
                    format!("{name}: shape {dims:?}, expected one dimension"),
                ));
            }
            if *width.get_or_insert(dims[0]) != dims[0] {
                return Err(SteerError::file(
                    path,
                    format!(
                        "{name}: width {} differs from the other layers' {}",
                        dims[0],
                        width.unwrap_or(0)
                    ),
                ));
            }
            let size = f.metadata().map_err(|e| SteerError::file(path, e))?.len();
            rudder_lm::weights::check_gguf_tensor(
                path,
                name,
                info,
                content.tensor_data_offset,
                size,
            )
            .map_err(|e| SteerError::file(path, e.to_string()))?;
            let t = content
                .tensor(&mut f, name, &Device::Cpu)
                .map_err(|e| SteerError::file(path, format!("{name}: {e}")))?
                .dequantize(&Device::Cpu)?;
            let v = t.to_vec1::<f32>()?;
            if v.iter().any(|x| !x.is_finite()) {
                return Err(SteerError::file(path, format!("{name}: non-finite values")));
            }
            layers.insert(k, v);
        }
        if layers.is_empty() {
            return Err(SteerError::file(path, "no direction.<layer> tensors"));
        }
        Ok(ControlVector { model_hint, layers })
    }

    /// Check against a model: width and layer range.
    pub fn check(&self, layers: usize, hidden: usize, path: &Path) -> Result<()> {
        for (&k, v) in &self.layers {
            if v.len() != hidden {
                return Err(SteerError::file(
                    path,
                    format!(
                        "direction.{k} has width {}, the model's hidden size is {hidden}",
                        v.len()
                    ),
                ));
            }
            if k >= layers {
                return Err(SteerError::file(
                    path,
                    format!(
                        "direction.{k}: the model has {layers} layers (0..{})",
                        layers - 1
                    ),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_site_mapping() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("v.gguf");
        let v = vec![
            (Site::ResidPre(0), vec![1.0f32; 4]),
            (Site::ResidPre(1), vec![2.0; 4]),
            (Site::ResidPre(3), vec![3.0; 4]),
            (Site::ResidPost(3), vec![4.0, 5.0, 6.0, 7.0]),
        ];
        let (cv, skipped) = ControlVector::from_sites("tiny", &v);
        assert_eq!(skipped, vec![Site::ResidPre(0), Site::ResidPre(1)]);
        assert_eq!(cv.layers.keys().copied().collect::<Vec<_>>(), vec![2, 3]);
        cv.save(&p).unwrap();
        let back = ControlVector::load(&p).unwrap();
        assert_eq!(back, cv);
        let iv = back.interventions(0.5);
        assert_eq!(iv.interventions[0].site, Site::ResidPost(2));
        assert_eq!(iv.interventions[1].alpha, 0.5);
        assert!(back.check(4, 4, &p).is_ok());
        assert!(
            back.check(3, 4, &p)
                .unwrap_err()
                .to_string()
                .contains("direction.3")
        );
        assert!(
            back.check(4, 8, &p)
                .unwrap_err()
                .to_string()
                .contains("width 4")
        );
        // corrupted files: clear errors, no panic
        let bytes = std::fs::read(&p).unwrap();
        for cut in [0usize, 3, 10, bytes.len() / 2] {
            std::fs::write(&p, &bytes[..cut]).unwrap();
            let e = ControlVector::load(&p).unwrap_err().to_string();
            assert!(e.contains("v.gguf"), "{e}");
        }
        // a model file is not a control vector
        let mut other = bytes.clone();
        let at = other
            .windows(13)
            .position(|w| w == b"controlvector")
            .unwrap();
        other[at] = b'k';
        std::fs::write(&p, &other).unwrap();
        let e = ControlVector::load(&p).unwrap_err().to_string();
        assert!(e.contains("not \"controlvector\""), "{e}");
    }
}
