//! Hook sites, the hook trait, activation capture and serialisable interventions.
//!
//! Site names follow TransformerLens (`blocks.5.hook_resid_pre`, `ln_final.hook_normalized`).
//! Hugging Face `hidden_states[i]` is `ResidPre(i)` for `i < L` and `FinalNorm` for `i = L`;
//! `ResidPost(l)` is the same point as `ResidPre(l+1)` (steering-seeds.md §1), and both names
//! exist so that a vector fitted at one convention is never applied one layer off silently.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::str::FromStr;

use candle_core::{DType, Device, IndexOp, Tensor};
use serde::{Deserialize, Serialize};

use crate::{LmError, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Site {
    /// Input of block `l` (the residual stream before the block).
    ResidPre(usize),
    /// Output of the attention sub-block of block `l` (before it is added to the residual).
    AttnOut(usize),
    /// Residual stream between attention and MLP of block `l`.
    ResidMid(usize),
    /// Output of the MLP sub-block of block `l`.
    MlpOut(usize),
    /// Output of block `l`.
    ResidPost(usize),
    /// Output of the final norm (the input of the LM head).
    FinalNorm,
}

impl Site {
    pub fn layer(self) -> Option<usize> {
        match self {
            Site::ResidPre(l)
            | Site::AttnOut(l)
            | Site::ResidMid(l)
            | Site::MlpOut(l)
            | Site::ResidPost(l) => Some(l),
            Site::FinalNorm => None,
        }
    }

    /// The sites matching Hugging Face `output_hidden_states` for a model with `layers` blocks.
    pub fn hf_hidden_states(layers: usize) -> Vec<Site> {
        let mut v: Vec<Site> = (0..layers).map(Site::ResidPre).collect();
        v.push(Site::FinalNorm);
        v
    }

    pub fn check(self, layers: usize) -> Result<()> {
        match self.layer() {
            Some(l) if l >= layers => Err(LmError::Hook(format!(
                "{self}: the model has {layers} layers (0..{})",
                layers - 1
            ))),
            _ => Ok(()),
        }
    }
}

impl fmt::Display for Site {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Site::ResidPre(l) => write!(f, "blocks.{l}.hook_resid_pre"),
            Site::AttnOut(l) => write!(f, "blocks.{l}.hook_attn_out"),
            Site::ResidMid(l) => write!(f, "blocks.{l}.hook_resid_mid"),
            Site::MlpOut(l) => write!(f, "blocks.{l}.hook_mlp_out"),
            Site::ResidPost(l) => write!(f, "blocks.{l}.hook_resid_post"),
            Site::FinalNorm => write!(f, "ln_final.hook_normalized"),
        }
    }
}

impl FromStr for Site {
    type Err = LmError;
    fn from_str(s: &str) -> Result<Self> {
        if s == "ln_final.hook_normalized" || s == "final_norm" {
            return Ok(Site::FinalNorm);
        }
        let err = || {
            LmError::Hook(format!(
                "unknown site {s:?}: expected blocks.N.hook_{{resid_pre,attn_out,resid_mid,mlp_out,resid_post}} or ln_final.hook_normalized"
            ))
        };
        let rest = s.strip_prefix("blocks.").ok_or_else(err)?;
        let (l, kind) = rest.split_once('.').ok_or_else(err)?;
        let l: usize = l.parse().map_err(|_| err())?;
        Ok(match kind {
            "hook_resid_pre" => Site::ResidPre(l),
            "hook_attn_out" => Site::AttnOut(l),
            "hook_resid_mid" => Site::ResidMid(l),
            "hook_mlp_out" => Site::MlpOut(l),
            "hook_resid_post" => Site::ResidPost(l),
            _ => return Err(err()),
        })
    }
}

impl TryFrom<String> for Site {
    type Error = LmError;
    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}
impl From<Site> for String {
    fn from(s: Site) -> String {
        s.to_string()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Prefill,
    Decode,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phases {
    #[default]
    Both,
    Prefill,
    Decode,
}

impl Phases {
    pub fn matches(self, p: Phase) -> bool {
        matches!(
            (self, p),
            (Phases::Both, _) | (Phases::Prefill, Phase::Prefill) | (Phases::Decode, Phase::Decode)
        )
    }
}

/// Which token positions a hook reads or edits. Padding columns are never selected.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Positions {
    #[default]
    All,
    /// Every prompt token.
    Prompt,
    /// The last prompt token of each row (left padding aware).
    LastPrompt,
    /// Generated tokens only.
    Generated,
    /// Tokens whose position (0-based, padding excluded) is at least this index.
    FromIndex(usize),
}

impl FromStr for Positions {
    type Err = LmError;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "all" => Positions::All,
            "prompt" => Positions::Prompt,
            "last" | "last_prompt" => Positions::LastPrompt,
            "generated" => Positions::Generated,
            _ => match s.strip_prefix("from:").and_then(|k| k.parse().ok()) {
                Some(k) => Positions::FromIndex(k),
                None => {
                    return Err(LmError::Hook(format!(
                        "unknown positions {s:?}: expected all, prompt, last, generated or from:K"
                    )));
                }
            },
        })
    }
}

/// Where a forward call is: which columns it covers and which of them are prompt.
#[derive(Clone, Copy, Debug)]
pub struct HookCtx<'a> {
    pub phase: Phase,
    /// Column index (into the padded sequence) of the first column of this call.
    pub start: usize,
    /// Left padding of each row.
    pub pad: &'a [usize],
    /// Columns `[0, prompt_cols)` of the padded sequence are prompt.
    pub prompt_cols: usize,
}

impl HookCtx<'_> {
    fn selected(&self, p: Positions, row: usize, col: usize) -> bool {
        let c = self.start + col;
        let pad = self.pad[row];
        if c < pad {
            return false;
        }
        match p {
            Positions::All => true,
            Positions::Prompt => c < self.prompt_cols,
            Positions::LastPrompt => c + 1 == self.prompt_cols,
            Positions::Generated => c >= self.prompt_cols,
            Positions::FromIndex(k) => c - pad >= k,
        }
    }

    /// Selected `(row, local column, position)` triples of a `[b, t, d]` activation.
    pub fn select(&self, p: Positions, b: usize, t: usize) -> Vec<(usize, usize, usize)> {
        let mut v = Vec::new();
        for r in 0..b {
            for c in 0..t {
                if self.selected(p, r, c) {
                    v.push((r, c, self.start + c - self.pad[r]));
                }
            }
        }
        v
    }

    /// Which positions of a `[b, t, d]` activation are selected: all, none, or a `[b, t, 1]`
    /// 0/1 mask.
    pub fn mask(&self, p: Positions, b: usize, t: usize, dev: &Device) -> Result<Selected> {
        let m: Vec<f32> = (0..b)
            .flat_map(|r| (0..t).map(move |c| (r, c)))
            .map(|(r, c)| if self.selected(p, r, c) { 1.0 } else { 0.0 })
            .collect();
        Ok(if m.iter().all(|&v| v == 1.0) {
            Selected::All
        } else if m.iter().all(|&v| v == 0.0) {
            Selected::None
        } else {
            Selected::Mask(Tensor::from_vec(m, (b, t, 1), dev)?)
        })
    }
}

pub enum Selected {
    All,
    None,
    Mask(Tensor),
}

/// Called at every site of every forward pass, in execution order; may replace `x`
/// (`[batch, tokens, hidden]`).
pub trait Hook {
    fn at(&mut self, site: Site, ctx: &HookCtx, x: &mut Tensor) -> Result<()>;

    /// Whether `at` may read or change anything at `site` (callers may skip the call, and the
    /// work of preparing it, when not).
    fn touches(&self, _site: Site) -> bool {
        true
    }
}

/// Runs nothing.
pub struct NoHook;
impl Hook for NoHook {
    fn at(&mut self, _: Site, _: &HookCtx, _: &mut Tensor) -> Result<()> {
        Ok(())
    }
    fn touches(&self, _: Site) -> bool {
        false
    }
}

impl<H: Hook + ?Sized> Hook for &mut H {
    fn at(&mut self, site: Site, ctx: &HookCtx, x: &mut Tensor) -> Result<()> {
        (**self).at(site, ctx, x)
    }
    fn touches(&self, site: Site) -> bool {
        (**self).touches(site)
    }
}

/// Two hooks in sequence (e.g. interventions, then a capture that sees their effect).
pub struct Chain<A, B>(pub A, pub B);
impl<A: Hook, B: Hook> Hook for Chain<A, B> {
    fn at(&mut self, site: Site, ctx: &HookCtx, x: &mut Tensor) -> Result<()> {
        self.0.at(site, ctx, x)?;
        self.1.at(site, ctx, x)
    }
    fn touches(&self, site: Site) -> bool {
        self.0.touches(site) || self.1.touches(site)
    }
}

// ---------------------------------------------------------------------------------------------
// Interventions

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Edit {
    /// `h ← h + α·v`.
    AddVector { vector: Vec<f32> },
    /// `h ← h + α·(h·M)`, with `M` a row-major `[d, d]` matrix and `h` a row vector.
    MatrixAdd { matrix: Vec<f32> },
    /// `h ← h − α·(h·r̂)·r̂` (α = 1 removes the direction entirely).
    ProjectOut { direction: Vec<f32> },
    /// `h ← h + α·(u·h_last)·v`: one gate per row, read from the row's last prompt token at
    /// this site (after the edits listed before this one), the same term added to every
    /// selected position (AlphaSteer's rank-1 steering, `u·h_last` being `h_last·S` with
    /// `S = u vᵀ`). It acts only in the call that holds the last prompt token — the prefill —
    /// so decode steps are never steered, and a prompt must be prefilled in one call (the
    /// engine keeps such prompts whole).
    GatedAdd { gate: Vec<f32>, vector: Vec<f32> },
}

fn one() -> f32 {
    1.0
}

/// One edit at one site. A list of them is a plain serialisable value
/// (`{"site": "blocks.3.hook_resid_pre", "kind": "add_vector", "vector": [...], "alpha": 4.0}`)
/// recorded with every result it produced.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Intervention {
    pub site: Site,
    #[serde(flatten)]
    pub edit: Edit,
    #[serde(default = "one")]
    pub alpha: f32,
    #[serde(default)]
    pub positions: Positions,
    #[serde(default)]
    pub phases: Phases,
}

impl Intervention {
    fn dim(&self) -> usize {
        match &self.edit {
            Edit::AddVector { vector } => vector.len(),
            Edit::ProjectOut { direction } => direction.len(),
            Edit::MatrixAdd { matrix } => (matrix.len() as f64).sqrt() as usize,
            Edit::GatedAdd { vector, .. } => vector.len(),
        }
    }
}

/// Interventions applied in list order at each site (gates and later edits read the already
/// edited residual).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Interventions {
    pub interventions: Vec<Intervention>,
    #[serde(skip)]
    cache: Vec<Option<Tensor>>,
}

impl Interventions {
    pub fn new(interventions: Vec<Intervention>) -> Self {
        Interventions {
            interventions,
            cache: Vec::new(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.interventions.is_empty()
    }

    /// Whether an edit reads the last prompt token (a gate), so the prompt must be prefilled
    /// in one forward call.
    pub fn needs_whole_prompt(&self) -> bool {
        self.interventions
            .iter()
            .any(|iv| matches!(iv.edit, Edit::GatedAdd { .. }))
    }

    /// Read a JSON list (or `{"interventions": [...]}`) from a file.
    pub fn from_json_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| LmError::file(path, e))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| LmError::file(path, format!("invalid JSON: {e}")))?;
        let list = if v.is_array() {
            v
        } else {
            v.get("interventions").cloned().unwrap_or(v)
        };
        let iv: Vec<Intervention> = serde_json::from_value(list)
            .map_err(|e| LmError::file(path, format!("not an intervention list: {e}")))?;
        Ok(Interventions::new(iv))
    }

    /// Check sites and vector sizes against a model.
    pub fn validate(&self, layers: usize, hidden: usize) -> Result<()> {
        for (i, iv) in self.interventions.iter().enumerate() {
            iv.site.check(layers)?;
            let ok = match &iv.edit {
                Edit::MatrixAdd { matrix } => matrix.len() == hidden * hidden,
                Edit::GatedAdd { gate, vector } => gate.len() == hidden && vector.len() == hidden,
                _ => iv.dim() == hidden,
            };
            if !ok {
                return Err(LmError::Hook(format!(
                    "intervention {i} at {}: its {} does not match the hidden size {hidden}",
                    iv.site,
                    match &iv.edit {
                        Edit::MatrixAdd { matrix } => format!("matrix of {} values", matrix.len()),
                        Edit::GatedAdd { gate, vector } => format!(
                            "gate of length {} and vector of length {}",
                            gate.len(),
                            vector.len()
                        ),
                        _ => format!("vector of length {}", iv.dim()),
                    }
                )));
            }
        }
        Ok(())
    }

    fn tensor(&mut self, i: usize, dev: &Device) -> Result<Tensor> {
        if self.cache.len() != self.interventions.len() {
            self.cache = vec![None; self.interventions.len()];
        }
        if let Some(t) = &self.cache[i] {
            return Ok(t.clone());
        }
        let iv = &self.interventions[i];
        let d = iv.dim();
        let t = match &iv.edit {
            Edit::AddVector { vector } => Tensor::from_slice(vector, (1, 1, d), dev)?,
            // [d, 2]: the gate in column 0, the vector in column 1
            Edit::GatedAdd { gate, vector } => {
                let mut m = Vec::with_capacity(2 * d);
                for (g, v) in gate.iter().zip(vector) {
                    m.push(*g);
                    m.push(*v);
                }
                Tensor::from_vec(m, (d, 2), dev)?
            }
            Edit::MatrixAdd { matrix } => Tensor::from_slice(matrix, (d, d), dev)?,
            Edit::ProjectOut { direction } => {
                let n = direction
                    .iter()
                    .map(|v| v * v)
                    .sum::<f32>()
                    .sqrt()
                    .max(1e-12);
                let u: Vec<f32> = direction.iter().map(|v| v / n).collect();
                Tensor::from_vec(u, (d, 1), dev)?
            }
        };
        self.cache[i] = Some(t.clone());
        Ok(t)
    }
}

impl Hook for Interventions {
    fn touches(&self, site: Site) -> bool {
        self.interventions.iter().any(|iv| iv.site == site)
    }

    fn at(&mut self, site: Site, ctx: &HookCtx, x: &mut Tensor) -> Result<()> {
        for i in 0..self.interventions.len() {
            let iv = &self.interventions[i];
            if iv.site != site || !iv.phases.matches(ctx.phase) {
                continue;
            }
            let (alpha, positions) = (iv.alpha as f64, iv.positions);
            let (b, t, d) = x.dims3()?;
            let mask = match ctx.mask(positions, b, t, x.device())? {
                Selected::None => continue,
                Selected::All => None,
                Selected::Mask(m) => Some(m),
            };
            let p = self.tensor(i, x.device())?;
            let delta = match &self.interventions[i].edit {
                Edit::AddVector { .. } => p.affine(alpha, 0.0)?.broadcast_as((b, t, d))?,
                Edit::MatrixAdd { .. } => x
                    .reshape((b * t, d))?
                    .matmul(&p)?
                    .reshape((b, t, d))?
                    .affine(alpha, 0.0)?,
                Edit::ProjectOut { .. } => {
                    let proj = x.reshape((b * t, d))?.matmul(&p)?; // [bt, 1]
                    proj.matmul(&p.t()?)?
                        .reshape((b, t, d))?
                        .affine(-alpha, 0.0)?
                }
                Edit::GatedAdd { .. } => {
                    // the last prompt column, if this call holds it (same for every row:
                    // rows are left-padded to a common prompt width)
                    let last = ctx
                        .prompt_cols
                        .checked_sub(1 + ctx.start)
                        .filter(|&c| c < t);
                    let Some(c) = last else { continue };
                    let h_last = x.narrow(1, c, 1)?.reshape((b, d))?;
                    let gates = h_last.matmul(&p.narrow(1, 0, 1)?)?; // [b, 1]
                    let v = p.narrow(1, 1, 1)?.t()?; // [1, d]
                    gates
                        .matmul(&v)?
                        .reshape((b, 1, d))?
                        .affine(alpha, 0.0)?
                        .broadcast_as((b, t, d))?
                }
            };
            let delta = match mask {
                Some(m) => delta.broadcast_mul(&m)?,
                None => delta,
            };
            *x = (&*x + delta)?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Capture

/// Which prompt and position a captured row came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RowId {
    pub prompt: usize,
    pub position: usize,
}

/// Copies activations at chosen sites and positions into memory, in `[N, d]` matrices whose
/// rows are described by [`Capture::rows`].
pub struct Capture {
    sites: Vec<Site>,
    pub positions: Positions,
    pub phases: Phases,
    data: BTreeMap<Site, Vec<f32>>,
    rows: Vec<RowId>,
    hidden: Option<usize>,
    prompt_offset: usize,
    prompt_ids: Option<Vec<usize>>,
}

impl Capture {
    pub fn new(sites: Vec<Site>, positions: Positions) -> Self {
        Capture {
            sites,
            positions,
            phases: Phases::Prefill,
            data: BTreeMap::new(),
            rows: Vec::new(),
            hidden: None,
            prompt_offset: 0,
            prompt_ids: None,
        }
    }

    /// Rows captured from the next forward calls: batch row `r` is prompt `ids[r]` (batches
    /// grouped by length rather than in prompt order).
    pub fn set_prompt_ids(&mut self, ids: Vec<usize>) {
        self.prompt_ids = Some(ids);
    }

    /// Put the captured rows in (prompt, position) order, every site's matrix with them.
    pub fn sort_rows(&mut self) {
        let mut order: Vec<usize> = (0..self.rows.len()).collect();
        order.sort_by_key(|&i| (self.rows[i].prompt, self.rows[i].position));
        if order.iter().enumerate().all(|(k, &i)| k == i) {
            return;
        }
        let d = self.hidden.unwrap_or(0);
        self.rows = order.iter().map(|&i| self.rows[i]).collect();
        for v in self.data.values_mut() {
            let mut out = Vec::with_capacity(v.len());
            for &i in &order {
                out.extend_from_slice(&v[i * d..(i + 1) * d]);
            }
            *v = out;
        }
    }

    /// Rows captured from the next forward calls belong to prompts numbered from `offset`.
    pub fn set_prompt_offset(&mut self, offset: usize) {
        self.prompt_offset = offset;
        self.prompt_ids = None;
    }

    pub fn sites(&self) -> &[Site] {
        &self.sites
    }

    pub fn rows(&self) -> &[RowId] {
        &self.rows
    }

    /// The `[N, d]` matrix captured at `site`.
    pub fn get(&self, site: Site) -> Result<Tensor> {
        let d = self.hidden.unwrap_or(0);
        let v = self
            .data
            .get(&site)
            .ok_or_else(|| LmError::Hook(format!("nothing captured at {site}")))?;
        Ok(Tensor::from_slice(
            v,
            (v.len() / d.max(1), d),
            &Device::Cpu,
        )?)
    }

    /// Write every site's matrix to one safetensors file (tensor names = site names) and a JSON
    /// index next to it (`<file>.json`) with the row ids and `meta`; both atomically.
    pub fn save(&self, path: &Path, meta: serde_json::Value) -> Result<()> {
        let mut tensors: Vec<(String, Tensor)> = Vec::new();
        for &s in &self.sites {
            if self.data.contains_key(&s) {
                tensors.push((s.to_string(), self.get(s)?));
            }
        }
        rudder_nn::checkpoint::save(&tensors, path).map_err(|e| LmError::file(path, e))?;
        let index = serde_json::json!({
            "format": "rudder-activations-v1",
            "sites": self.sites.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            "positions": self.positions,
            "hidden_size": self.hidden,
            "rows": self.rows,
            "meta": meta,
        });
        let mut p = path.as_os_str().to_owned();
        p.push(".json");
        let p = std::path::PathBuf::from(p);
        let tmp = p.with_extension("json.partial");
        std::fs::write(
            &tmp,
            serde_json::to_string_pretty(&index).unwrap_or_default(),
        )
        .map_err(|e| LmError::file(&tmp, e))?;
        std::fs::rename(&tmp, &p).map_err(|e| LmError::file(&p, e))?;
        Ok(())
    }
}

impl Hook for Capture {
    fn touches(&self, site: Site) -> bool {
        self.sites.contains(&site)
    }

    fn at(&mut self, site: Site, ctx: &HookCtx, x: &mut Tensor) -> Result<()> {
        if !self.phases.matches(ctx.phase) || !self.sites.contains(&site) {
            return Ok(());
        }
        let (b, t, d) = x.dims3()?;
        self.hidden = Some(d);
        let sel = ctx.select(self.positions, b, t);
        if sel.is_empty() {
            return Ok(());
        }
        if site == self.sites[0] {
            let ids = self.prompt_ids.as_deref();
            self.rows.extend(sel.iter().map(|&(r, _, p)| RowId {
                prompt: ids.map_or(self.prompt_offset + r, |ids| ids[r]),
                position: p,
            }));
        }
        let x = x.to_dtype(DType::F32)?;
        let buf = self.data.entry(site).or_default();
        if sel.len() == b
            && self.positions == Positions::LastPrompt
            && sel.iter().all(|s| s.1 == t - 1)
        {
            buf.extend(
                x.i((.., t - 1, ..))?
                    .contiguous()?
                    .flatten_all()?
                    .to_vec1::<f32>()?,
            );
        } else {
            let flat = x.reshape((b * t, d))?;
            let idx: Vec<u32> = sel.iter().map(|&(r, c, _)| (r * t + c) as u32).collect();
            let idx = Tensor::from_vec(idx, sel.len(), x.device())?;
            buf.extend(
                flat.index_select(&idx, 0)?
                    .flatten_all()?
                    .to_vec1::<f32>()?,
            );
        }
        Ok(())
    }
}
