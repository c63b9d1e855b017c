//! LoRA adapters on the decoder's projections (Hu et al. 2021, as Hugging Face PEFT applies
//! them): `y = W x + (α/r) · B (A · dropout(x))` with `A ∈ R^{r×in}` (Kaiming-uniform init,
//! bound `1/√in`) and `B ∈ R^{out×r}` (zeros), over frozen base weights that may be f32 or
//! quantized. Only `A` and `B` are [`Var`]s, so only they receive gradients.
//!
//! Adapters are saved and loaded in PEFT's layout (`adapter_config.json` +
//! `adapter_model.safetensors`, tensors named
//! `base_model.model.model.layers.{l}.self_attn.q_proj.lora_A.weight`), so they move between
//! rudder and Python `peft`. GGUF Llama files keep Q/K rows in llama.cpp's interleaved order;
//! the `B` rows of q/k adapters are reordered on the way in and out so files always hold the
//! Hugging Face order. [`export_hf`] writes the base model itself as a Hugging Face folder.
//!
//! **MoE-LoRA** (iLoRA, llmrec-seeds.md §2.4): with `experts = K > 1` the rank is split into K
//! experts of `r/K` rows of `A` (and columns of `B`); expert outputs are mixed by a gate
//! `g ∈ R^{G×K}` per sequence, shared by every token and layer, with scaling `α/(r/K)`:
//! `y = W x + (α/(r/K)) Σ_k g_k B_k (A_k x)`. That equals LoRA with the rank activations
//! `A x` multiplied by `g` repeated `r/K` times, which is how it runs. The gate is set for a
//! batch with [`Adapter::set_gate`] (`G` = 1, broadcast, or one row per batch row).

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::config::Arch;
use crate::decoder::Decoder;
use crate::linear::{Linear, Weight};
use crate::loader::LanguageModel;
use crate::{LmError, Result};

/// The seven projections of a decoder layer LoRA can adapt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    QProj,
    KProj,
    VProj,
    OProj,
    GateProj,
    UpProj,
    DownProj,
}

pub const ALL_TARGETS: [Target; 7] = [
    Target::QProj,
    Target::KProj,
    Target::VProj,
    Target::OProj,
    Target::GateProj,
    Target::UpProj,
    Target::DownProj,
];

impl Target {
    /// PEFT's `target_modules` name.
    pub fn name(self) -> &'static str {
        match self {
            Target::QProj => "q_proj",
            Target::KProj => "k_proj",
            Target::VProj => "v_proj",
            Target::OProj => "o_proj",
            Target::GateProj => "gate_proj",
            Target::UpProj => "up_proj",
            Target::DownProj => "down_proj",
        }
    }
    /// The module path inside `model.layers.{l}`.
    pub fn module(self) -> &'static str {
        match self {
            Target::QProj => "self_attn.q_proj",
            Target::KProj => "self_attn.k_proj",
            Target::VProj => "self_attn.v_proj",
            Target::OProj => "self_attn.o_proj",
            Target::GateProj => "mlp.gate_proj",
            Target::UpProj => "mlp.up_proj",
            Target::DownProj => "mlp.down_proj",
        }
    }
    /// Accepts `q`, `q_proj`, `gate`, `gate_proj`, ….
    pub fn parse(s: &str) -> Option<Target> {
        let s = s.trim();
        ALL_TARGETS
            .into_iter()
            .find(|t| t.name() == s || t.name().trim_end_matches("_proj") == s)
    }
    fn linear(self, dec: &mut Decoder, l: usize) -> &mut Linear {
        let layer = &mut dec.layers[l];
        match self {
            Target::QProj => &mut layer.q,
            Target::KProj => &mut layer.k,
            Target::VProj => &mut layer.v,
            Target::OProj => &mut layer.o,
            Target::GateProj => &mut layer.gate,
            Target::UpProj => &mut layer.up,
            Target::DownProj => &mut layer.down,
        }
    }
    /// Heads whose rows a GGUF Llama file interleaves (q and k only).
    fn permuted_heads(self, dec: &Decoder) -> Option<usize> {
        if !dec.cfg.rope_interleaved {
            return None;
        }
        match self {
            Target::QProj => Some(dec.cfg.num_heads),
            Target::KProj => Some(dec.cfg.num_kv_heads),
            _ => None,
        }
    }
}

/// Rank, scaling and dropout of an adapter; defaults are S-DPO's (r 8, α 32, dropout 0.1, all
/// seven projections).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub targets: Vec<Target>,
    /// MoE-LoRA experts splitting the rank (1 = plain LoRA).
    #[serde(default = "one")]
    pub experts: usize,
}

fn one() -> usize {
    1
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            r: 8,
            alpha: 32.0,
            dropout: 0.1,
            targets: ALL_TARGETS.to_vec(),
            experts: 1,
        }
    }
}

impl LoraConfig {
    /// `α / r` (plain LoRA) or `α / (r/K)` (MoE-LoRA, as iLoRA scales each expert).
    pub fn scale(&self) -> f64 {
        self.alpha / (self.r / self.experts.max(1)) as f64
    }
    pub fn validate(&self) -> Result<()> {
        if self.r == 0 || self.targets.is_empty() {
            return Err(LmError::Config(
                "LoRA needs a positive rank and at least one target module".into(),
            ));
        }
        if self.experts == 0 || !self.r.is_multiple_of(self.experts) {
            return Err(LmError::Config(format!(
                "MoE-LoRA: {} experts do not divide the rank {} (each expert takes r/K rows)",
                self.experts, self.r
            )));
        }
        if !(0.0..1.0).contains(&self.dropout) || !self.alpha.is_finite() {
            return Err(LmError::Config(format!(
                "LoRA dropout {} must be in [0, 1) and alpha {} finite",
                self.dropout, self.alpha
            )));
        }
        Ok(())
    }
}

/// Train/eval switch and the dropout random stream shared by an adapter's layers. Every
/// dropout call draws a fresh ChaCha stream numbered by a call counter, so the same seed and
/// the same sequence of forward passes give the same masks.
#[derive(Debug)]
pub struct LoraRuntime {
    training: AtomicBool,
    seed: u64,
    calls: AtomicU64,
    /// MoE-LoRA: the rank gate `[G, r]` of the current batch (each expert's weight repeated
    /// over its rows), `None` for plain LoRA.
    experts: usize,
    /// One gate for every layer, or one per layer (empty: none set).
    gate: std::sync::Mutex<Vec<Tensor>>,
}

impl LoraRuntime {
    fn new(seed: u64, experts: usize) -> Self {
        LoraRuntime {
            training: AtomicBool::new(false),
            seed,
            calls: AtomicU64::new(0),
            experts,
            gate: std::sync::Mutex::new(Vec::new()),
        }
    }

    fn gate(&self, layer: usize) -> Option<Tensor> {
        let g = self.gate.lock().unwrap_or_else(|e| e.into_inner());
        match g.len() {
            0 => None,
            1 => Some(g[0].clone()),
            _ => g.get(layer).cloned(),
        }
    }
}

/// The adapter attached to one linear layer.
#[derive(Clone, Debug)]
pub struct LoraSlot {
    /// The decoder layer (selects a per-layer gate).
    pub layer: usize,
    pub a: Var,
    pub b: Var,
    pub scale: f64,
    pub dropout: f64,
    pub rt: Arc<LoraRuntime>,
}

impl LoraSlot {
    /// `x · wᵀ + delta(x)` as one op (`rudder_nn::fused::lora_linear`) when training a plain
    /// (single-expert) adapter over a frozen dense weight; `None` otherwise (the caller
    /// composes the product and [`LoraSlot::delta`]). The same dropout stream and the same
    /// numbers as the composition.
    pub fn fused_forward(&self, x: &Tensor, w: &Tensor) -> Option<Result<Tensor>> {
        if !self.rt.training.load(Ordering::Relaxed) || w.track_op() {
            return None;
        }
        if self.rt.experts > 1 {
            // MoE-LoRA: the gated rank activations come from outside the op
            return Some((|| {
                let h = self.rank_activations(x)?;
                Ok(rudder_nn::fused::frozen_plus_low_rank(
                    x,
                    w,
                    &h,
                    self.b.as_tensor(),
                    self.scale,
                )?)
            })());
        }
        let stream = if self.dropout > 0.0 {
            self.rt.calls.fetch_add(1, Ordering::Relaxed)
        } else {
            0
        };
        Some(
            rudder_nn::fused::lora_linear(
                x,
                w,
                self.a.as_tensor(),
                self.b.as_tensor(),
                self.scale,
                self.dropout,
                self.rt.seed,
                stream,
            )
            .map_err(Into::into),
        )
    }

    /// `scale · B (A · dropout(x))` for `x [n, in]` → `[n, out]`.
    pub fn delta(&self, x: &Tensor) -> Result<Tensor> {
        let b = if self.rt.training.load(Ordering::Relaxed) {
            self.b.as_tensor().clone()
        } else {
            self.b.as_tensor().detach()
        };
        Ok((self.rank_activations(x)?.matmul(&b.t()?)? * self.scale)?)
    }

    /// `A · dropout(x)` `[n, r]`, times the expert gate for MoE-LoRA.
    fn rank_activations(&self, x: &Tensor) -> Result<Tensor> {
        // Outside training the adapter is a constant: no graph is recorded (a KV cache would
        // otherwise keep every step's graph alive).
        let training = self.rt.training.load(Ordering::Relaxed);
        let a = if training {
            self.a.as_tensor().clone()
        } else {
            self.a.as_tensor().detach()
        };
        // Training with dropout: one op that keeps the mask as one byte per value and no
        // masked copy of the input (`rudder_nn::fused::dropout_project`).
        let h = if self.dropout > 0.0 && training {
            let call = self.rt.calls.fetch_add(1, Ordering::Relaxed);
            rudder_nn::fused::dropout_project(x, &a, self.dropout, self.rt.seed, call)?
        } else {
            x.matmul(&a.t()?)?
        };
        if self.rt.experts <= 1 {
            return Ok(h);
        }
        let g = self.rt.gate(self.layer).ok_or_else(|| {
            LmError::Config(
                "MoE-LoRA adapter without a gate: set one for the batch (Adapter::set_gate)".into(),
            )
        })?;
        let (rows, r) = g.dims2()?;
        let n = h.dim(0)?;
        if !n.is_multiple_of(rows) {
            return Err(LmError::Config(format!(
                "MoE-LoRA gate has {rows} rows for {n} token positions"
            )));
        }
        let g = if training { g } else { g.detach() };
        Ok(h.reshape((rows, n / rows, r))?
            .broadcast_mul(&g.unsqueeze(1)?)?
            .reshape((n, r))?)
    }
}

/// Handle on the adapter attached to a decoder: its configuration, the named trainable
/// parameters (PEFT names, Hugging Face row order is applied only when saving) and the
/// train/eval switch.
pub struct Adapter {
    pub cfg: LoraConfig,
    /// Decoder layers the adapter spans.
    pub layers: usize,
    pub rt: Arc<LoraRuntime>,
    /// `(peft name, var)` in layer, then target order: `…lora_A.weight`, `…lora_B.weight`.
    pub params: Vec<(String, Var)>,
}

fn peft_name(l: usize, t: Target, ab: &str) -> String {
    format!(
        "base_model.model.model.layers.{l}.{}.lora_{ab}.weight",
        t.module()
    )
}

impl Adapter {
    /// MoE-LoRA: the expert weights `[G, K]` of the next forward passes (`G` = 1 for every row,
    /// or one row per batch row, in batch order; a sequence's rows must be contiguous as the
    /// decoder lays out `[B, T]`); `None` clears it. Differentiable: the gradient reaches
    /// whatever computed the gate. Plain LoRA refuses a gate.
    pub fn set_gate(&self, gate: Option<&Tensor>) -> Result<()> {
        let gates: Vec<Tensor> = gate.into_iter().cloned().collect();
        self.store_gates(&gates)
    }

    /// MoE-LoRA with one gate per decoder layer (`gates[l]`, each `[G, K]`), as the
    /// reference's per-layer `Dense` gates would mix the experts.
    pub fn set_layer_gates(&self, gates: &[Tensor]) -> Result<()> {
        if gates.len() != self.layers {
            return Err(LmError::Config(format!(
                "{} layer gates for {} layers",
                gates.len(),
                self.layers
            )));
        }
        self.store_gates(gates)
    }

    fn store_gates(&self, gates: &[Tensor]) -> Result<()> {
        let (k, r) = (self.cfg.experts, self.cfg.r);
        if k <= 1 && !gates.is_empty() {
            return Err(LmError::Config("a plain LoRA adapter takes no gate".into()));
        }
        // [K, r] with row k holding ones on expert k's r/K rank rows: `g · spread` repeats each
        // expert's weight over its rows
        let re = r / k.max(1);
        let mut m = vec![0f32; k * r];
        for e in 0..k {
            m[e * r + e * re..e * r + (e + 1) * re].fill(1.0);
        }
        let spread = Tensor::from_vec(m, (k, r), &Device::Cpu)?;
        let mut expanded = Vec::with_capacity(gates.len());
        for g in gates {
            let (_, gk) = g.dims2()?;
            if gk != k {
                return Err(LmError::Config(format!(
                    "gate of width {gk} for {k} experts"
                )));
            }
            expanded.push(g.matmul(&spread)?);
        }
        *self.rt.gate.lock().unwrap_or_else(|e| e.into_inner()) = expanded;
        Ok(())
    }

    /// Training (dropout on, gradients recorded) or evaluation (neither).
    pub fn set_training(&self, on: bool) {
        self.rt.training.store(on, Ordering::Relaxed);
    }
    pub fn vars(&self) -> Vec<Var> {
        self.params.iter().map(|(_, v)| v.clone()).collect()
    }
    pub fn num_params(&self) -> usize {
        self.params.iter().map(|(_, v)| v.elem_count()).sum()
    }
    /// The dropout call counter (saved in checkpoints so that a resumed run draws the same
    /// masks as an uninterrupted one).
    pub fn dropout_calls(&self) -> u64 {
        self.rt.calls.load(Ordering::Relaxed)
    }
    pub fn set_dropout_calls(&self, n: u64) {
        self.rt.calls.store(n, Ordering::Relaxed);
    }
    /// Current values under their PEFT names, in the decoder's row order.
    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        self.params
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect()
    }
    /// Overwrite the values from `map` (names as [`Adapter::tensors`] gives them).
    pub fn load_tensors(&self, map: &HashMap<String, Tensor>, source: &Path) -> Result<()> {
        for (n, v) in &self.params {
            let t = map
                .get(n)
                .ok_or_else(|| LmError::file(source, format!("tensor {n} is missing")))?;
            if t.dims() != v.dims() {
                return Err(LmError::file(
                    source,
                    format!(
                        "tensor {n} has shape {:?}, expected {:?}",
                        t.dims(),
                        v.dims()
                    ),
                ));
            }
            v.set(&t.to_dtype(DType::F32)?)?;
        }
        Ok(())
    }
}

fn permute(t: &Tensor, heads: usize, to_hf: bool) -> Result<Tensor> {
    let (o, i) = t.dims2()?;
    let hd = o / heads;
    let (a, b) = if to_hf { (hd / 2, 2) } else { (2, hd / 2) };
    Ok(t.reshape((heads, a, b, i))?
        .transpose(1, 2)?
        .reshape((o, i))?
        .contiguous()?)
}

impl Decoder {
    /// Attach a fresh adapter (PEFT initialisation, drawn from `seed`) to every target
    /// projection of every layer, replacing any adapter already there.
    pub fn attach_lora(&mut self, cfg: &LoraConfig, seed: u64) -> Result<Adapter> {
        cfg.validate()?;
        let rt = Arc::new(LoraRuntime::new(seed, cfg.experts));
        let mut params = Vec::new();
        let mut init = ChaCha8Rng::seed_from_u64(seed);
        for l in 0..self.cfg.num_layers {
            for &t in &cfg.targets {
                let lin = t.linear(self, l);
                let (out, inp) = lin.weight.dims();
                let bound = 1.0 / (inp as f32).sqrt();
                let av: Vec<f32> = (0..cfg.r * inp)
                    .map(|_| init.random_range(-bound..bound))
                    .collect();
                let a = Var::from_tensor(&Tensor::from_vec(av, (cfg.r, inp), &Device::Cpu)?)?;
                let b = Var::zeros((out, cfg.r), DType::F32, &Device::Cpu)?;
                lin.lora = Some(LoraSlot {
                    layer: l,
                    a: a.clone(),
                    b: b.clone(),
                    scale: cfg.scale(),
                    dropout: cfg.dropout,
                    rt: rt.clone(),
                });
                params.push((peft_name(l, t, "A"), a));
                params.push((peft_name(l, t, "B"), b));
            }
        }
        Ok(Adapter {
            cfg: cfg.clone(),
            layers: self.cfg.num_layers,
            rt,
            params,
        })
    }

    /// Remove every adapter (the base model alone again).
    pub fn detach_lora(&mut self) {
        for l in 0..self.cfg.num_layers {
            for t in ALL_TARGETS {
                t.linear(self, l).lora = None;
            }
        }
    }

    /// Fold the attached adapters into the weights (`W += (α/r) B A`) and detach them.
    /// Needs f32 weights: a quantized matrix cannot absorb the update without requantizing.
    pub fn merge_lora(&mut self) -> Result<()> {
        for l in 0..self.cfg.num_layers {
            for t in ALL_TARGETS {
                let lin = t.linear(self, l);
                let Some(slot) = lin.lora.take() else {
                    continue;
                };
                if slot.rt.experts > 1 {
                    lin.lora = Some(slot);
                    return Err(LmError::Config(
                        "a MoE-LoRA adapter cannot be merged: its gate differs per sequence".into(),
                    ));
                }
                let Weight::Dense(w) = &lin.weight else {
                    lin.lora = Some(slot);
                    return Err(LmError::Config(format!(
                        "layer {l} {}: merging LoRA needs f32 weights (load the model dequantized)",
                        t.name()
                    )));
                };
                let upd = (slot.b.as_tensor().matmul(slot.a.as_tensor())? * slot.scale)?;
                lin.weight = Weight::Dense((w + upd)?);
            }
        }
        Ok(())
    }

    /// Save the adapter attached as `adapter` in PEFT's layout into `dir`.
    pub fn save_peft(&self, adapter: &Adapter, dir: &Path, base_model: &str) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| LmError::file(dir, e))?;
        let mut map = HashMap::new();
        for l in 0..self.cfg.num_layers {
            for &t in &adapter.cfg.targets {
                for ab in ["A", "B"] {
                    let name = peft_name(l, t, ab);
                    let v = adapter
                        .params
                        .iter()
                        .find(|(n, _)| *n == name)
                        .map(|(_, v)| v.as_tensor().clone())
                        .ok_or_else(|| LmError::Config(format!("adapter lacks {name}")))?;
                    let v = match (ab, t.permuted_heads(self)) {
                        ("B", Some(h)) => permute(&v, h, true)?,
                        _ => v,
                    };
                    map.insert(name, v);
                }
            }
        }
        let cfg = serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": adapter.cfg.r,
            "lora_alpha": adapter.cfg.alpha,
            "lora_dropout": adapter.cfg.dropout,
            "target_modules": adapter.cfg.targets.iter().map(|t| t.name()).collect::<Vec<_>>(),
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "use_rslora": false,
            "use_dora": false,
            "rudder_experts": adapter.cfg.experts,
            "modules_to_save": null,
            "layers_to_transform": null,
            "revision": null,
        });
        let st = dir.join("adapter_model.safetensors");
        let tmp = dir.join(".adapter_model.safetensors.tmp");
        candle_core::safetensors::save(&map, &tmp)?;
        std::fs::rename(&tmp, &st).map_err(|e| LmError::file(&st, e))?;
        let cj = dir.join("adapter_config.json");
        let tmp = dir.join(".adapter_config.json.tmp");
        std::fs::write(&tmp, serde_json::to_string_pretty(&cfg).unwrap_or_default())
            .map_err(|e| LmError::file(&tmp, e))?;
        std::fs::rename(&tmp, &cj).map_err(|e| LmError::file(&cj, e))?;
        Ok(())
    }

    /// Load a PEFT LoRA adapter folder (from rudder or Python `peft`) and attach it. Refuses
    /// adapters of other kinds, for modules rudder cannot adapt, for another model shape, and
    /// files with missing or extra tensors.
    pub fn load_peft(&mut self, dir: &Path, seed: u64) -> Result<Adapter> {
        let cj = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&cj).map_err(|e| LmError::file(&cj, e))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| LmError::file(&cj, format!("invalid JSON: {e}")))?;
        let field = |k: &str| {
            v.get(k)
                .ok_or_else(|| LmError::file(&cj, format!("field {k} is missing")))
        };
        let kind = field("peft_type")?.as_str().unwrap_or("");
        if kind != "LORA" {
            return Err(LmError::file(
                &cj,
                format!("field peft_type: {kind:?} is not a LoRA adapter"),
            ));
        }
        let r = field("r")?
            .as_u64()
            .ok_or_else(|| LmError::file(&cj, "field r: not a positive integer"))?
            as usize;
        let alpha = field("lora_alpha")?
            .as_f64()
            .ok_or_else(|| LmError::file(&cj, "field lora_alpha: not a number"))?;
        let dropout = v
            .get("lora_dropout")
            .and_then(|x| x.as_f64())
            .unwrap_or(0.0);
        for (k, bad) in [
            ("use_dora", true),
            ("use_rslora", true),
            ("fan_in_fan_out", true),
        ] {
            if v.get(k).and_then(|x| x.as_bool()) == Some(bad) {
                return Err(LmError::file(
                    &cj,
                    format!("field {k}: true is not supported"),
                ));
            }
        }
        if v.get("bias")
            .and_then(|x| x.as_str())
            .is_some_and(|b| b != "none")
        {
            return Err(LmError::file(&cj, "field bias: only \"none\" is supported"));
        }
        let tm: Vec<String> = match field("target_modules")? {
            serde_json::Value::Array(a) => a
                .iter()
                .map(|x| x.as_str().unwrap_or("").to_string())
                .collect(),
            serde_json::Value::String(s) => vec![s.clone()],
            _ => return Err(LmError::file(&cj, "field target_modules: not a list")),
        };
        let mut targets = Vec::new();
        for m in &tm {
            let t = Target::parse(m).ok_or_else(|| {
                LmError::file(
                    &cj,
                    format!("field target_modules: {m:?} is not one of q/k/v/o/gate/up/down_proj"),
                )
            })?;
            targets.push(t);
        }
        targets.sort_by_key(|t| ALL_TARGETS.iter().position(|x| x == t));
        let experts = v
            .get("rudder_experts")
            .and_then(|x| x.as_u64())
            .unwrap_or(1) as usize;
        let cfg = LoraConfig {
            r,
            alpha,
            dropout,
            targets,
            experts,
        };
        cfg.validate().map_err(|e| LmError::file(&cj, e))?;
        let st = dir.join("adapter_model.safetensors");
        if !st.exists() {
            return Err(LmError::file(
                &st,
                "no such file (adapter_model.bin is not read; convert it to safetensors)",
            ));
        }
        let raw = candle_core::safetensors::load(&st, &Device::Cpu)
            .map_err(|e| LmError::file(&st, format!("not a safetensors file: {e}")))?;
        // PEFT may store names with the adapter name (".default") in older releases.
        let mut map: HashMap<String, Tensor> = HashMap::new();
        for (k, t) in raw {
            map.insert(
                k.replace(".lora_A.default.", ".lora_A.")
                    .replace(".lora_B.default.", ".lora_B."),
                t,
            );
        }
        let adapter = self.attach_lora(&cfg, seed)?;
        let mut want: HashSet<&str> = HashSet::new();
        for (n, _) in &adapter.params {
            want.insert(n.as_str());
        }
        if let Some(extra) = map.keys().filter(|k| !want.contains(k.as_str())).min() {
            self.detach_lora();
            return Err(LmError::file(
                &st,
                format!(
                    "tensor {extra} does not belong to a {}-layer model with targets {tm:?}",
                    self.cfg.num_layers
                ),
            ));
        }
        // Back to the decoder's row order.
        let mut fixed = HashMap::new();
        for l in 0..self.cfg.num_layers {
            for &t in &cfg.targets {
                for ab in ["A", "B"] {
                    let name = peft_name(l, t, ab);
                    let Some(x) = map.get(&name) else { continue };
                    let x = x.to_dtype(DType::F32)?;
                    let x = match (ab, t.permuted_heads(self)) {
                        ("B", Some(h)) if x.dims2().is_ok_and(|(o, _)| o % h == 0) => {
                            permute(&x, h, false)?
                        }
                        _ => x,
                    };
                    fixed.insert(name, x);
                }
            }
        }
        if let Err(e) = adapter.load_tensors(&fixed, &st) {
            self.detach_lora();
            return Err(e);
        }
        Ok(adapter)
    }
}

/// Write `lm` as a Hugging Face model folder (`config.json`, f32 `model.safetensors`,
/// `tokenizer.json`, `tokenizer_config.json`), dequantizing GGUF weights and restoring the
/// Hugging Face Q/K row order. Attached adapters are not included (merge them first to bake
/// them in).
pub fn export_hf(lm: &LanguageModel, dir: &Path) -> Result<()> {
    let dec = &lm.decoder;
    let c = &dec.cfg;
    std::fs::create_dir_all(dir).map_err(|e| LmError::file(dir, e))?;
    let mut map: HashMap<String, Tensor> = HashMap::new();
    map.insert("model.embed_tokens.weight".into(), dec.embed.clone());
    map.insert("model.norm.weight".into(), dec.norm.clone());
    for (l, layer) in dec.layers.iter().enumerate() {
        let p = format!("model.layers.{l}");
        map.insert(format!("{p}.input_layernorm.weight"), layer.ln_attn.clone());
        map.insert(
            format!("{p}.post_attention_layernorm.weight"),
            layer.ln_mlp.clone(),
        );
        for t in ALL_TARGETS {
            let lin = match t {
                Target::QProj => &layer.q,
                Target::KProj => &layer.k,
                Target::VProj => &layer.v,
                Target::OProj => &layer.o,
                Target::GateProj => &layer.gate,
                Target::UpProj => &layer.up,
                Target::DownProj => &layer.down,
            };
            let w = lin.weight.to_dense()?;
            let w = match t.permuted_heads(dec) {
                Some(h) => permute(&w, h, true)?,
                None => w,
            };
            map.insert(format!("{p}.{}.weight", t.module()), w);
            if let Some(b) = &lin.bias {
                map.insert(format!("{p}.{}.bias", t.module()), b.clone());
            }
        }
    }
    if !c.tie_word_embeddings {
        map.insert("lm_head.weight".into(), dec.lm_head.weight.to_dense()?);
    }
    let st = dir.join("model.safetensors");
    candle_core::safetensors::save(&map, &st)?;
    let mut cfg = serde_json::json!({
        "architectures": [if c.arch == Arch::Llama { "LlamaForCausalLM" } else { "Qwen2ForCausalLM" }],
        "model_type": c.arch.name(),
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "max_position_embeddings": c.max_position_embeddings,
        "tie_word_embeddings": c.tie_word_embeddings,
        "attention_bias": c.qkv_bias,
        "torch_dtype": "float32",
    });
    if let Some(s) = &c.rope_scaling {
        cfg["rope_scaling"] = serde_json::json!({
            "rope_type": "llama3",
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position_embeddings,
        });
    }
    if let Some(b) = lm.tok.bos {
        cfg["bos_token_id"] = b.into();
    }
    if let Some(&e) = lm.tok.eos.first() {
        cfg["eos_token_id"] = e.into();
    }
    cfg["pad_token_id"] = lm.tok.pad.into();
    let cj = dir.join("config.json");
    std::fs::write(&cj, serde_json::to_string_pretty(&cfg).unwrap_or_default())
        .map_err(|e| LmError::file(&cj, e))?;
    lm.tok
        .inner
        .save(dir.join("tokenizer.json"), false)
        .map_err(|e| LmError::Tokenizer(e.to_string()))?;
    let mut tc = serde_json::json!({
        "bos_token": lm.tok.bos_text,
        "eos_token": lm.tok.eos_text,
        "add_bos_token": lm.tok.add_bos,
        "tokenizer_class": "PreTrainedTokenizerFast",
    });
    if let Some(t) = &lm.tok.chat_template {
        tc["chat_template"] = t.clone().into();
    }
    let tp = dir.join("tokenizer_config.json");
    std::fs::write(&tp, serde_json::to_string_pretty(&tc).unwrap_or_default())
        .map_err(|e| LmError::file(&tp, e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{TinySpec, write_gguf, write_hf_dir};
    use crate::hooks::{NoHook, Phase};
    use crate::loader::{LoadOptions, load};
    use candle_core::quantized::GgmlDType;

    fn tiny(dir: &Path) -> LanguageModel {
        write_hf_dir(dir, &TinySpec::new(Arch::Llama)).unwrap();
        load(dir, &LoadOptions { dequantize: true }).unwrap()
    }

    fn logits(dec: &Decoder, ids: &[u32]) -> Vec<f32> {
        let t = Tensor::from_slice(ids, (1, ids.len()), &Device::Cpu).unwrap();
        let mut cache = dec.new_cache(vec![0]);
        let h = dec
            .forward(&t, &mut cache, Phase::Prefill, &mut NoHook)
            .unwrap();
        dec.logits(&h)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    fn randomize(a: &Adapter, seed: u64) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        for (_, v) in &a.params {
            let n = v.elem_count();
            let x: Vec<f32> = (0..n).map(|_| rng.random_range(-0.3..0.3)).collect();
            v.set(&Tensor::from_vec(x, v.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }

    fn rel(a: &[f32], b: &[f32]) -> f32 {
        let num: f32 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
        let den: f32 = b.iter().map(|y| y * y).sum();
        (num / den).sqrt()
    }

    const IDS: [u32; 7] = [5, 17, 40, 99, 3, 120, 64];

    #[test]
    fn every_adapter_parameter_receives_gradient_and_nothing_else_does() {
        // Qwen2 has q/k/v biases: the fused training layer adds them after the adapter
        let d = tempfile::tempdir().unwrap();
        write_hf_dir(d.path(), &TinySpec::new(Arch::Qwen2)).unwrap();
        let mut qwen = load(d.path(), &LoadOptions { dequantize: true }).unwrap();
        let ad = qwen.decoder.attach_lora(&LoraConfig::default(), 3).unwrap();
        randomize(&ad, 9);
        let ids = [(IDS[..4].to_vec(), IDS[4..].to_vec())];
        let plain = crate::score::continuation_logprobs(&qwen.decoder, &ids, 0, &mut NoHook)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        ad.set_training(true);
        qwen.decoder.differentiable = true;
        let lp = crate::score::continuation_logprobs(&qwen.decoder, &ids, 0, &mut NoHook).unwrap();
        // dropout moves the values a little; without it training and inference agree
        let grads = lp.sum_all().unwrap().backward().unwrap();
        rudder_nn::grad::assert_all_receive_gradient(&grads, &ad.params);
        let undropped = LoraConfig {
            dropout: 0.0,
            ..LoraConfig::default()
        };
        qwen.decoder.detach_lora();
        let ad0 = qwen.decoder.attach_lora(&undropped, 3).unwrap();
        for ((_, v0), (_, v)) in ad0.params.iter().zip(&ad.params) {
            v0.set(v.as_tensor()).unwrap();
        }
        ad0.set_training(true);
        let trained = crate::score::continuation_logprobs(&qwen.decoder, &ids, 0, &mut NoHook)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(rel(&trained, &plain) < 1e-4, "{trained:?} vs {plain:?}");

        let d = tempfile::tempdir().unwrap();
        let mut lm = tiny(d.path());
        let ad = lm.decoder.attach_lora(&LoraConfig::default(), 3).unwrap();
        assert_eq!(ad.params.len(), 2 * 7 * lm.decoder.cfg.num_layers);
        randomize(&ad, 9);
        ad.set_training(true);
        lm.decoder.differentiable = true;
        let lp = crate::score::continuation_logprobs(
            &lm.decoder,
            &[(IDS[..4].to_vec(), IDS[4..].to_vec())],
            0,
            &mut NoHook,
        )
        .unwrap();
        let grads = lp.sum_all().unwrap().backward().unwrap();
        rudder_nn::grad::assert_all_receive_gradient(&grads, &ad.params);
        // the frozen base weights are constants: no gradient is stored for them
        assert!(grads.get(&lm.decoder.embed).is_none());
        // with B = 0 (fresh adapter) the model is the base model
        lm.decoder.differentiable = false;
        ad.set_training(false);
        let fresh = lm.decoder.attach_lora(&LoraConfig::default(), 3).unwrap();
        let with = logits(&lm.decoder, &IDS);
        lm.decoder.detach_lora();
        assert_eq!(with, logits(&lm.decoder, &IDS));
        drop(fresh);
    }

    #[test]
    fn moe_lora_gates_experts_per_sequence() {
        let d = tempfile::tempdir().unwrap();
        let mut lm = tiny(d.path());
        let moe = LoraConfig {
            experts: 4,
            dropout: 0.0,
            ..Default::default()
        };
        assert_eq!(moe.scale(), 16.0); // α/(r/K), as iLoRA scales
        let bad = LoraConfig {
            experts: 3,
            ..Default::default()
        };
        let e = lm.decoder.attach_lora(&bad, 1).err().unwrap().to_string();
        assert!(e.contains("3 experts do not divide the rank 8"), "{e}");
        let ad = lm.decoder.attach_lora(&moe, 3).unwrap();
        randomize(&ad, 4);
        // no gate: a clear error, not a silent plain LoRA
        let t = Tensor::from_slice(&IDS, (1, IDS.len()), &Device::Cpu).unwrap();
        let mut c = lm.decoder.new_cache(vec![0]);
        let e = lm
            .decoder
            .forward(&t, &mut c, Phase::Prefill, &mut NoHook)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("without a gate"), "{e}");
        // a one-hot gate on expert k equals plain LoRA on rank rows 2k..2k+2 with α/2 scaling
        let k = 2;
        let onehot = Tensor::from_vec(vec![0f32, 0.0, 1.0, 0.0], (1, 4), &Device::Cpu).unwrap();
        ad.set_gate(Some(&onehot)).unwrap();
        let gated = logits(&lm.decoder, &IDS);
        let vals: Vec<Tensor> = ad
            .params
            .iter()
            .map(|(_, v)| v.as_tensor().copy().unwrap())
            .collect();
        lm.decoder.detach_lora();
        let plain = lm
            .decoder
            .attach_lora(
                &LoraConfig {
                    r: 2,
                    alpha: 32.0,
                    dropout: 0.0,
                    ..Default::default()
                },
                0,
            )
            .unwrap();
        for ((n, v), full) in plain.params.iter().zip(&vals) {
            let part = if n.ends_with("lora_A.weight") {
                full.narrow(0, 2 * k, 2).unwrap()
            } else {
                full.narrow(1, 2 * k, 2).unwrap()
            };
            v.set(&part.contiguous().unwrap()).unwrap();
        }
        assert!(rel(&gated, &logits(&lm.decoder, &IDS)) < 1e-5);
        lm.decoder.detach_lora();
        // per-row gates: each row of a batch follows its own gate; every A/B and the gate's
        // source receive gradient in training
        let ad = lm.decoder.attach_lora(&moe, 3).unwrap();
        randomize(&ad, 4);
        let src = Var::from_tensor(
            &Tensor::from_vec(
                vec![0.1f32, 0.2, 0.3, 0.4, 0.7, 0.1, 0.1, 0.1],
                (2, 4),
                &Device::Cpu,
            )
            .unwrap(),
        )
        .unwrap();
        ad.set_training(true);
        lm.decoder.differentiable = true;
        ad.set_gate(Some(src.as_tensor())).unwrap();
        let pair = (IDS[..4].to_vec(), IDS[4..].to_vec());
        let lp = crate::score::continuation_logprobs(
            &lm.decoder,
            &[pair.clone(), pair.clone()],
            0,
            &mut NoHook,
        )
        .unwrap();
        let grads = lp.sum_all().unwrap().backward().unwrap();
        rudder_nn::grad::assert_all_receive_gradient(&grads, &ad.params);
        let gs = grads
            .get(src.as_tensor())
            .expect("the gate receives a gradient");
        assert!(
            gs.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 0.0
        );
        let v = lp.reshape((2, 3)).unwrap().to_vec2::<f32>().unwrap();
        assert!(v[0] != v[1], "different gates, different outputs");
        // a gate for the wrong number of rows is refused
        let three = Tensor::ones((3, 4), DType::F32, &Device::Cpu).unwrap();
        ad.set_gate(Some(&three)).unwrap();
        assert!(
            crate::score::continuation_logprobs(&lm.decoder, &[pair.clone(), pair], 0, &mut NoHook)
                .is_err()
        );
        assert!(lm.decoder.merge_lora().is_err());
        // per-layer gates: one per layer, each layer reads its own
        let layers = lm.decoder.cfg.num_layers;
        let e = ad
            .set_layer_gates(&[onehot.clone()])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("1 layer gates for {layers} layers")),
            "{e}"
        );
        ad.set_training(false);
        lm.decoder.differentiable = false;
        let same: Vec<Tensor> = (0..layers).map(|_| onehot.clone()).collect();
        ad.set_layer_gates(&same).unwrap();
        let a = logits(&lm.decoder, &IDS);
        ad.set_gate(Some(&onehot)).unwrap();
        assert_eq!(
            a,
            logits(&lm.decoder, &IDS),
            "equal per-layer gates = one shared gate"
        );
        let mut other = same.clone();
        other[0] = Tensor::from_vec(vec![1f32, 0.0, 0.0, 0.0], (1, 4), &Device::Cpu).unwrap();
        ad.set_layer_gates(&other).unwrap();
        assert_ne!(a, logits(&lm.decoder, &IDS));
    }

    #[test]
    fn merged_equals_unmerged_and_dropout_is_seeded() {
        let d = tempfile::tempdir().unwrap();
        let mut lm = tiny(d.path());
        let ad = lm.decoder.attach_lora(&LoraConfig::default(), 1).unwrap();
        randomize(&ad, 2);
        let base_free = logits(&lm.decoder, &IDS);
        ad.set_training(true);
        let t1 = logits(&lm.decoder, &IDS);
        let calls = ad.dropout_calls();
        assert!(calls > 0);
        let t2 = logits(&lm.decoder, &IDS);
        assert_ne!(t1, t2, "dropout masks must differ between calls");
        ad.set_dropout_calls(calls);
        assert_eq!(t2, logits(&lm.decoder, &IDS), "same call number, same mask");
        ad.set_training(false);
        assert_eq!(base_free, logits(&lm.decoder, &IDS));
        lm.decoder.merge_lora().unwrap();
        let merged = logits(&lm.decoder, &IDS);
        assert!(
            rel(&merged, &base_free) < 1e-5,
            "{}",
            rel(&merged, &base_free)
        );
    }

    #[test]
    fn peft_round_trip_between_hf_and_gguf_row_orders() {
        let d = tempfile::tempdir().unwrap();
        let mut hf = tiny(&d.path().join("hf"));
        let ad = hf.decoder.attach_lora(&LoraConfig::default(), 4).unwrap();
        randomize(&ad, 5);
        let want = logits(&hf.decoder, &IDS);
        let pd = d.path().join("adapter");
        hf.decoder.save_peft(&ad, &pd, "tiny").unwrap();
        // a GGUF copy of the same model keeps Q/K rows interleaved
        let g = d.path().join("tiny.gguf");
        write_gguf(&g, &TinySpec::new(Arch::Llama), GgmlDType::F32).unwrap();
        let mut gg = load(&g, &LoadOptions { dequantize: true }).unwrap();
        assert!(gg.decoder.cfg.rope_interleaved);
        let back = gg.decoder.load_peft(&pd, 0).unwrap();
        assert!(rel(&logits(&gg.decoder, &IDS), &want) < 1e-5);
        // and saving from the GGUF model gives the same files' tensors
        let pd2 = d.path().join("adapter2");
        gg.decoder.save_peft(&back, &pd2, "tiny").unwrap();
        let a = candle_core::safetensors::load(pd.join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
        let b = candle_core::safetensors::load(pd2.join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
        assert_eq!(a.len(), b.len());
        for (k, x) in &a {
            let y = &b[k];
            let d = rudder_nn::grad::max_abs(&(x - y).unwrap());
            assert!(d < 1e-7, "{k}");
        }
        // the GGUF model exported as a Hugging Face folder loads back to the same logits
        gg.decoder.detach_lora();
        let base = logits(&gg.decoder, &IDS);
        let ex = d.path().join("exported");
        export_hf(&gg, &ex).unwrap();
        let re = load(&ex, &LoadOptions::default()).unwrap();
        assert!(!re.decoder.cfg.rope_interleaved);
        assert!(rel(&logits(&re.decoder, &IDS), &base) < 1e-5);
    }

    #[test]
    fn bad_adapters_are_refused_with_the_file_and_reason() {
        let d = tempfile::tempdir().unwrap();
        let mut lm = tiny(&d.path().join("m"));
        let ad = lm.decoder.attach_lora(&LoraConfig::default(), 4).unwrap();
        let pd = d.path().join("a");
        lm.decoder.save_peft(&ad, &pd, "tiny").unwrap();
        lm.decoder.detach_lora();
        let st = pd.join("adapter_model.safetensors");
        let orig = candle_core::safetensors::load(&st, &Device::Cpu).unwrap();
        let err = |lm: &mut LanguageModel| lm.decoder.load_peft(&pd, 0).err().unwrap().to_string();
        // missing tensor
        let mut m = orig.clone();
        m.remove("base_model.model.model.layers.1.mlp.up_proj.lora_B.weight");
        candle_core::safetensors::save(&m, &st).unwrap();
        let e = err(&mut lm);
        assert!(
            e.contains("adapter_model.safetensors")
                && e.contains("up_proj.lora_B")
                && e.contains("missing"),
            "{e}"
        );
        // extra tensor (an adapter for a deeper model)
        let mut m = orig.clone();
        m.insert(
            "base_model.model.model.layers.7.mlp.up_proj.lora_B.weight".into(),
            Tensor::zeros((128, 8), DType::F32, &Device::Cpu).unwrap(),
        );
        candle_core::safetensors::save(&m, &st).unwrap();
        let e = err(&mut lm);
        assert!(
            e.contains("layers.7") && e.contains("does not belong"),
            "{e}"
        );
        // another model shape
        let mut m = orig.clone();
        m.insert(
            "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight".into(),
            Tensor::zeros((96, 8), DType::F32, &Device::Cpu).unwrap(),
        );
        candle_core::safetensors::save(&m, &st).unwrap();
        let e = err(&mut lm);
        assert!(e.contains("shape [96, 8]"), "{e}");
        // the failed loads left no adapter behind
        assert!(lm.decoder.layers[0].q.lora.is_none());
        // unsupported module
        candle_core::safetensors::save(&orig, &st).unwrap();
        let cj = pd.join("adapter_config.json");
        let text = std::fs::read_to_string(&cj).unwrap();
        std::fs::write(&cj, text.replace("\"down_proj\"", "\"embed_tokens\"")).unwrap();
        let e = err(&mut lm);
        assert!(
            e.contains("adapter_config.json") && e.contains("embed_tokens"),
            "{e}"
        );
        std::fs::write(&cj, "{").unwrap();
        assert!(err(&mut lm).contains("invalid JSON"));
    }
}
