//! Difference-of-means directions between label groups (reference-group convention of the
//! reasoning-strength paper: r_{k←ref} = μ_k − μ_ref for every other group k, and the steering
//! direction r = mean over k of r_{k←ref}, unnormalised), with the per-group norms, the cosine
//! matrix between group differences, and projections of activations on a direction.

use serde::{Deserialize, Serialize};

use crate::{Result, SteerError};

pub fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

pub fn norm(a: &[f64]) -> f64 {
    dot(a, a).sqrt()
}

pub fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let n = norm(a) * norm(b);
    if n == 0.0 { f64::NAN } else { dot(a, b) / n }
}

/// `x·r̂` for every row of a row-major `[n, d]` matrix.
pub fn project(x: &[f32], d: usize, dir: &[f64]) -> Vec<f64> {
    let n = norm(dir);
    x.chunks(d)
        .map(|row| row.iter().zip(dir).map(|(v, r)| *v as f64 * r).sum::<f64>() / n)
        .collect()
}

/// Per-group means of the rows of a row-major `[n, d]` matrix (groups in the given order).
pub fn group_means(
    x: &[f32],
    d: usize,
    labels: &[String],
    groups: &[String],
) -> Result<Vec<Vec<f64>>> {
    let n = labels.len();
    if x.len() != n * d {
        return Err(SteerError::Invalid(format!(
            "{} activation values for {n} labels of width {d}",
            x.len()
        )));
    }
    let mut out = Vec::with_capacity(groups.len());
    for g in groups {
        let mut m = vec![0f64; d];
        let mut c = 0usize;
        for (row, l) in x.chunks(d).zip(labels) {
            if l == g {
                c += 1;
                for (a, v) in m.iter_mut().zip(row) {
                    *a += *v as f64;
                }
            }
        }
        if c == 0 {
            return Err(SteerError::Invalid(format!(
                "label group {g:?} has no members (labels present: {})",
                distinct(labels).join(", ")
            )));
        }
        m.iter_mut().for_each(|v| *v /= c as f64);
        out.push(m);
    }
    Ok(out)
}

/// Distinct labels in first-seen order.
pub fn distinct(labels: &[String]) -> Vec<String> {
    let mut v: Vec<String> = Vec::new();
    for l in labels {
        if !v.contains(l) {
            v.push(l.clone());
        }
    }
    v
}

/// One site's difference-of-means analysis.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Direction {
    /// The reference group (e.g. "Level 1") and the others, in order.
    pub reference: String,
    pub others: Vec<String>,
    /// `‖μ_k − μ_ref‖` per other group.
    pub norms: Vec<f64>,
    /// Cosines between the group differences (`others × others`).
    pub cosines: Vec<Vec<f64>>,
    /// Mean of the off-diagonal cosines.
    pub mean_cosine: f64,
    /// The steering direction: the mean of the group differences (unnormalised).
    pub vector: Vec<f64>,
}

/// Differences of every other group's mean from the reference group's mean, and their mean.
pub fn diff_of_means(
    x: &[f32],
    d: usize,
    labels: &[String],
    reference: &str,
    others: &[String],
) -> Result<Direction> {
    if others.is_empty() {
        return Err(SteerError::Invalid(
            "a direction needs at least one group besides the reference".into(),
        ));
    }
    let mut groups = vec![reference.to_string()];
    groups.extend(others.iter().cloned());
    let means = group_means(x, d, labels, &groups)?;
    let diffs: Vec<Vec<f64>> = means[1..]
        .iter()
        .map(|m| m.iter().zip(&means[0]).map(|(a, b)| a - b).collect())
        .collect();
    let k = diffs.len();
    let cosines: Vec<Vec<f64>> = (0..k)
        .map(|i| (0..k).map(|j| cosine(&diffs[i], &diffs[j])).collect())
        .collect();
    let off: Vec<f64> = (0..k)
        .flat_map(|i| (0..k).filter(move |&j| j != i).map(move |j| (i, j)))
        .map(|(i, j)| cosines[i][j])
        .collect();
    let mean_cosine = if off.is_empty() {
        1.0
    } else {
        off.iter().sum::<f64>() / off.len() as f64
    };
    let vector = (0..d)
        .map(|j| diffs.iter().map(|v| v[j]).sum::<f64>() / k as f64)
        .collect();
    Ok(Direction {
        reference: reference.to_string(),
        others: others.to_vec(),
        norms: diffs.iter().map(|v| norm(v)).collect(),
        cosines,
        mean_cosine,
        vector,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_computed_directions() {
        // d = 2; level 1 at (0,0) and (2,0) → μ1 = (1,0); level 2 at (1,2) → r2 = (0,2);
        // level 3 at (1,4),(1,4) → r3 = (0,4)
        let x = [0.0f32, 0.0, 2.0, 0.0, 1.0, 2.0, 1.0, 4.0, 1.0, 4.0];
        let l: Vec<String> = ["1", "1", "2", "3", "3"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let dm = diff_of_means(&x, 2, &l, "1", &["2".into(), "3".into()]).unwrap();
        assert_eq!(dm.norms, vec![2.0, 4.0]);
        assert!((dm.mean_cosine - 1.0).abs() < 1e-12);
        assert_eq!(dm.vector, vec![0.0, 3.0]);
        assert_eq!(project(&x, 2, &dm.vector), vec![0.0, 0.0, 2.0, 4.0, 4.0]);
        let e = diff_of_means(&x, 2, &l, "1", &["4".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"4\" has no members"), "{e}");
        assert!(group_means(&x[..4], 2, &l, &["1".into()]).is_err());
    }
}

/// Steering vectors at typed sites, saved as safetensors (one `[d]` tensor per site, named by
/// the site) with a JSON sidecar (`<file>.json`) recording how they were made: the sign
/// convention (`vector = mean(others) − mean(reference)`, so positive strength pushes toward
/// the other groups), the groups, the model and the chat-template hash.
#[derive(Clone, Debug)]
pub struct SteeringVectors {
    pub vectors: Vec<(rudder_lm::hooks::Site, Vec<f32>)>,
    pub meta: serde_json::Value,
}

impl SteeringVectors {
    pub fn save(&self, path: &std::path::Path) -> Result<()> {
        use candle_core::{Device, Tensor};
        let mut t = Vec::new();
        for (s, v) in &self.vectors {
            t.push((s.to_string(), Tensor::from_slice(v, v.len(), &Device::Cpu)?));
        }
        rudder_nn::checkpoint::save(&t, path).map_err(|e| SteerError::file(path, e))?;
        let body = serde_json::json!({
            "format": "rudder-steering-vectors-v1",
            "sites": self.vectors.iter().map(|(s, _)| s.to_string()).collect::<Vec<_>>(),
            "meta": self.meta,
        });
        crate::study::write_json(&crate::activations::index_path(path), &body)
    }

    /// Read a vector file: rudder safetensors (any tensors named by sites), or a llama.cpp
    /// control-vector GGUF (`.gguf`).
    pub fn load(path: &std::path::Path) -> Result<Self> {
        if path.extension().is_some_and(|e| e == "gguf") {
            let cv = crate::cvec::ControlVector::load(path)?;
            return Ok(SteeringVectors {
                vectors: cv
                    .layers
                    .iter()
                    .map(|(&k, v)| (rudder_lm::hooks::Site::ResidPost(k), v.clone()))
                    .collect(),
                meta: serde_json::json!({"source": "llama.cpp control vector", "model_hint": cv.model_hint}),
            });
        }
        let t = candle_core::safetensors::load(path, &candle_core::Device::Cpu)
            .map_err(|e| SteerError::file(path, e))?;
        let mut vectors = Vec::new();
        for (name, tensor) in t {
            let site: rudder_lm::hooks::Site = name
                .parse()
                .map_err(|e| SteerError::file(path, format!("tensor {name:?}: {e}")))?;
            if tensor.rank() != 1 {
                return Err(SteerError::file(
                    path,
                    format!(
                        "tensor {name}: shape {:?}, expected one dimension",
                        tensor.dims()
                    ),
                ));
            }
            vectors.push((site, tensor.to_vec1::<f32>()?));
        }
        if vectors.is_empty() {
            return Err(SteerError::file(path, "no vectors"));
        }
        vectors.sort_by_key(|(s, _)| *s);
        let meta = std::fs::read(crate::activations::index_path(path))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .map(|v| v["meta"].clone())
            .unwrap_or(serde_json::Value::Null);
        Ok(SteeringVectors { vectors, meta })
    }

    /// Check width and layers against a model.
    pub fn check(&self, layers: usize, hidden: usize, path: &std::path::Path) -> Result<()> {
        for (s, v) in &self.vectors {
            s.check(layers).map_err(|e| SteerError::file(path, e))?;
            if v.len() != hidden {
                return Err(SteerError::file(
                    path,
                    format!(
                        "vector at {s} has width {}, the model's hidden size is {hidden}",
                        v.len()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// `h ← h + α·v` at every stored site whose layer is in `layers` (all when `None`), at
    /// the given positions and phases.
    pub fn interventions(
        &self,
        alpha: f32,
        layers: Option<&[usize]>,
        positions: rudder_lm::hooks::Positions,
        phases: rudder_lm::hooks::Phases,
    ) -> rudder_lm::hooks::Interventions {
        use rudder_lm::hooks::{Edit, Intervention};
        rudder_lm::hooks::Interventions::new(
            self.vectors
                .iter()
                .filter(|(s, _)| match (layers, s.layer()) {
                    (None, _) => true,
                    (Some(ls), Some(l)) => ls.contains(&l),
                    (Some(_), None) => false,
                })
                .map(|(s, v)| Intervention {
                    site: *s,
                    edit: Edit::AddVector { vector: v.clone() },
                    alpha,
                    positions,
                    phases,
                })
                .collect(),
        )
    }
}
