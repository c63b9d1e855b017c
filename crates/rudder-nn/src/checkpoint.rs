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
}
