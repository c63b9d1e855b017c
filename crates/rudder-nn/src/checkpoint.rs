//! Checkpoints as safetensors, written to a temporary file and renamed into place.

use candle_core::{Device, Result, Tensor};
use std::collections::HashMap;
use std::path::Path;

pub fn save(tensors: &[(String, Tensor)], path: &Path) -> Result<()> {
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p)?;
    }
    let tmp = path.with_file_name(format!(
        ".{}.{}.partial",
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        std::process::id()
    ));
    let map: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(n, t)| (n.clone(), t.clone()))
        .collect();
    let r = candle_core::safetensors::save(&map, &tmp).and_then(|_| {
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    });
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

pub fn load(path: &Path, dev: &Device) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, dev)
}

/// Name of the tensor that carries a training checkpoint's JSON metadata (UTF-8 bytes).
pub const META: &str = "__meta__";

/// A training checkpoint: tensors plus JSON metadata (loop position, counters, history) in one
/// safetensors file, so that one rename makes the whole state visible at once.
pub fn save_state(tensors: &[(String, Tensor)], meta: &str, path: &Path) -> Result<()> {
    let bytes = meta.as_bytes();
    let mut all = tensors.to_vec();
    all.push((
        META.to_string(),
        Tensor::from_slice(bytes, bytes.len(), &Device::Cpu)?,
    ));
    save(&all, path)
}

/// Load a checkpoint written by [`save_state`]: its tensors and its metadata.
pub fn load_state(path: &Path, dev: &Device) -> Result<(HashMap<String, Tensor>, String)> {
    let mut t = load(path, dev)?;
    let meta = t.remove(META).ok_or_else(|| {
        candle_core::Error::Msg(format!(
            "{}: not a training checkpoint (no {META})",
            path.display()
        ))
    })?;
    let meta = String::from_utf8(meta.to_vec1::<u8>()?).map_err(|_| {
        candle_core::Error::Msg(format!(
            "{}: checkpoint metadata is not UTF-8",
            path.display()
        ))
    })?;
    Ok((t, meta))
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn roundtrip() -> Result<()> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ck.safetensors");
        let t = Tensor::from_slice(&[1f32, 2., 3., 4.], (2, 2), &Device::Cpu)?;
        save(&[("w".into(), t.clone())], &p)?;
        let back = load(&p, &Device::Cpu)?;
        assert_eq!(back["w"].to_vec2::<f32>()?, t.to_vec2::<f32>()?);
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temp file left"
        );
        Ok(())
    }

    #[test]
    fn state_roundtrip_with_meta_and_adam() -> Result<()> {
        use crate::optim::{Adam, AdamConfig};
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.safetensors");
        let w = candle_core::Var::from_slice(&[1f32, -2., 3.], 3, &Device::Cpu)?;
        let mut opt = Adam::new(vec![w.clone()], AdamConfig::adam(0.1))?;
        let g = |t: &Tensor| Some(t.affine(2.0, 1.0).unwrap());
        opt.step_with(g)?;
        let (steps, st) = opt.state("opt")?;
        save_state(&st, r#"{"epoch":3}"#, &p)?;
        let (t, meta) = load_state(&p, &Device::Cpu)?;
        assert_eq!(meta, r#"{"epoch":3}"#);
        // a fresh optimizer with the loaded state takes the same next step as the original
        let w2 = candle_core::Var::from_tensor(w.as_tensor())?;
        let mut opt2 = Adam::new(vec![w2.clone()], AdamConfig::adam(0.1))?;
        opt2.load_state("opt", steps, &t)?;
        opt.step_with(g)?;
        opt2.step_with(g)?;
        assert_eq!(
            w.as_tensor().to_vec1::<f32>()?,
            w2.as_tensor().to_vec1::<f32>()?
        );
        assert!(opt2.load_state("other", 1, &t).is_err());
        Ok(())
    }
}
