//! Weight sources: Hugging Face safetensors (single file or sharded with an index) and GGUF.
//!
//! Model code asks for tensors by their Hugging Face names; the GGUF source maps them to the
//! llama.cpp names (`blk.N.attn_q.weight`…). Every tensor is shape-checked, and every failure
//! names the file and the tensor.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::quantized::{GgmlDType, gguf_file};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use crate::linear::Weight;
use crate::{LmError, Result};

pub enum Weights {
    Safetensors {
        st: MmapedSafetensors,
        files: Vec<PathBuf>,
        names: HashMap<String, usize>,
    },
    Gguf {
        content: gguf_file::Content,
        file: File,
        path: PathBuf,
    },
    /// Tensors already in memory under Hugging Face names (tests, trainable copies).
    Memory(HashMap<String, Tensor>),
}

/// llama.cpp tensor name of a Hugging Face decoder tensor name.
pub fn gguf_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, kind) = rest.rsplit_once('.')?;
    let g = match module {
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        _ => return None,
    };
    Some(format!("blk.{layer}.{g}.{kind}"))
}

impl Weights {
    /// Open `model.safetensors`, or every shard listed in `model.safetensors.index.json`.
    pub fn open_safetensors_dir(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|e| LmError::file(&index, e))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| LmError::file(&index, format!("invalid JSON: {e}")))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| LmError::file(&index, "no \"weight_map\" object"))?;
            let mut shards: Vec<String> = map
                .values()
                .filter_map(|s| s.as_str().map(String::from))
                .collect();
            shards.sort();
            shards.dedup();
            shards.into_iter().map(|s| dir.join(s)).collect()
        } else {
            vec![dir.join("model.safetensors")]
        };
        for f in &files {
            if !f.exists() {
                return Err(LmError::file(f, "weights file not found"));
            }
        }
        // SAFETY: the files are memory-mapped read-only; rudder never writes to model files
        // while they are open.
        let st = unsafe { MmapedSafetensors::multi(&files) }
            .map_err(|e| LmError::file(&files[0], format!("not a valid safetensors file: {e}")))?;
        let mut names = HashMap::new();
        for (name, _) in st.tensors() {
            names.insert(name, 0);
        }
        Ok(Weights::Safetensors { st, files, names })
    }

    pub fn open_gguf(path: &Path) -> Result<Self> {
        let mut file = File::open(path).map_err(|e| LmError::file(path, e))?;
        let content = gguf_file::Content::read(&mut file)
            .map_err(|e| LmError::file(path, format!("not a valid GGUF file: {e}")))?;
        // Check every tensor lies inside the file before anything is read.
        let size = file.metadata()?.len();
        for (name, info) in &content.tensor_infos {
            check_gguf_tensor(path, name, info, content.tensor_data_offset, size)?;
        }
        Ok(Weights::Gguf {
            content,
            file,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        match self {
            Weights::Safetensors { files, .. } => &files[0],
            Weights::Gguf { path, .. } => path,
            Weights::Memory(_) => Path::new("<memory>"),
        }
    }

    fn key(&self, hf: &str) -> Option<String> {
        match self {
            Weights::Safetensors { names, .. } => {
                if names.contains_key(hf) {
                    Some(hf.to_string())
                } else {
                    // Some checkpoints drop the `model.` prefix.
                    let short = hf.strip_prefix("model.")?;
                    names.contains_key(short).then(|| short.to_string())
                }
            }
            Weights::Gguf { content, .. } => self_key_gguf(content, hf),
            Weights::Memory(m) => m.contains_key(hf).then(|| hf.to_string()),
        }
    }

    pub fn contains(&self, hf: &str) -> bool {
        self.key(hf).is_some()
    }

    fn missing(&self, hf: &str) -> LmError {
        let shown = match self {
            Weights::Gguf { .. } => gguf_name(hf).unwrap_or_else(|| hf.to_string()),
            _ => hf.to_string(),
        };
        LmError::file(self.path(), format!("tensor {shown} is missing"))
    }

    fn check_shape(&self, hf: &str, got: &[usize], want: &[usize]) -> Result<()> {
        if got != want {
            return Err(LmError::file(
                self.path(),
                format!("tensor {hf} has shape {got:?}, expected {want:?}"),
            ));
        }
        Ok(())
    }

    /// A tensor as f32 (dequantized or converted from f16/bf16), shape-checked.
    pub fn dense(&mut self, hf: &str, shape: &[usize]) -> Result<Tensor> {
        let key = self.key(hf).ok_or_else(|| self.missing(hf))?;
        let t = match self {
            Weights::Safetensors { st, files, .. } => st
                .load(&key, &Device::Cpu)
                .map_err(|e| LmError::file(&files[0], format!("tensor {key}: {e}")))?
                .to_dtype(DType::F32)?,
            Weights::Gguf {
                content,
                file,
                path,
            } => content
                .tensor(file, &key, &Device::Cpu)
                .map_err(|e| LmError::file(&*path, format!("tensor {key}: {e}")))?
                .dequantize(&Device::Cpu)?,
            Weights::Memory(m) => m[&key].clone(),
        };
        self.check_shape(hf, t.dims(), shape)?;
        Ok(t)
    }

    /// A `[out, in]` matrix: quantized GGUF weights stay quantized unless `dequantize`; f32,
    /// f16 and bf16 weights become f32, packed for inference ([`Weight::Packed`]) unless
    /// `dequantize` (training needs the plain tensor).
    pub fn matrix(&mut self, hf: &str, out: usize, inp: usize, dequantize: bool) -> Result<Weight> {
        if let Weights::Gguf {
            content,
            file,
            path,
        } = self
            && !dequantize
        {
            let key = self_key_gguf(content, hf).ok_or_else(|| {
                LmError::file(
                    &*path,
                    format!("tensor {} is missing", gguf_name(hf).unwrap_or_default()),
                )
            })?;
            let q = content
                .tensor(file, &key, &Device::Cpu)
                .map_err(|e| LmError::file(&*path, format!("tensor {key}: {e}")))?;
            let dims = q.shape().dims().to_vec();
            if dims != [out, inp] {
                return Err(LmError::file(
                    &*path,
                    format!("tensor {key} has shape {dims:?}, expected {:?}", [out, inp]),
                ));
            }
            // float weights: from the tensor just read, not read a second time
            if matches!(q.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) {
                return Weight::packed(&q.dequantize(&Device::Cpu)?);
            }
            return Weight::from_qtensor(q);
        }
        let t = self.dense(hf, &[out, inp])?;
        if dequantize {
            Ok(Weight::Dense(t))
        } else {
            Weight::packed(&t)
        }
    }

    /// GGUF metadata (empty for safetensors).
    pub fn metadata(&self) -> Option<&HashMap<String, gguf_file::Value>> {
        match self {
            Weights::Gguf { content, .. } => Some(&content.metadata),
            _ => None,
        }
    }
}

fn self_key_gguf(content: &gguf_file::Content, hf: &str) -> Option<String> {
    let g = gguf_name(hf)?;
    content.tensor_infos.contains_key(&g).then_some(g)
}

/// Check one GGUF tensor before anything of it is read: a non-empty shape whose element count
/// does not overflow, a whole number of quantisation blocks, and bytes that lie inside the
/// file. (candle reads a zero-element tensor through a misaligned pointer, and a product of
/// claimed dimensions can overflow; both were found by fuzzing.)
pub fn check_gguf_tensor(
    path: &Path,
    name: &str,
    info: &gguf_file::TensorInfo,
    data_offset: u64,
    file_size: u64,
) -> Result<()> {
    let dims = info.shape.dims();
    let n = dims
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| LmError::file(path, format!("tensor {name}: shape {dims:?} overflows")))?;
    if n == 0 {
        return Err(LmError::file(
            path,
            format!("tensor {name}: shape {dims:?} has no elements"),
        ));
    }
    let bs = info.ggml_dtype.block_size();
    if n % bs != 0 {
        return Err(LmError::file(
            path,
            format!("tensor {name}: {n} elements is not a multiple of the block size {bs}"),
        ));
    }
    let bytes = ((n / bs) as u64).checked_mul(info.ggml_dtype.type_size() as u64);
    let end = bytes.and_then(|b| {
        data_offset
            .checked_add(info.offset)
            .and_then(|x| x.checked_add(b))
    });
    let bytes = bytes.unwrap_or(u64::MAX);
    match end {
        Some(end) if end <= file_size => Ok(()),
        _ => Err(LmError::file(
            path,
            format!(
                "truncated: tensor {name} ({bytes} bytes at offset {}) lies beyond the file's {file_size} bytes",
                info.offset
            ),
        )),
    }
}
