//! What the three sequential recommenders share: the configuration, the model trait the one
//! trainer drives ([`crate::seqtrain`]), parameter helpers and batching of histories.
//!
//! Histories are right-padded to the window with the pad id `n_items` (LLaRA's layout); the
//! user representation is read at position `len − 1`, and scores over the catalogue come from
//! a separate output layer `Linear(d → n_items)` (not tied to the item embeddings).

use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::Result;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SeqKind {
    Sasrec,
    Gru4rec,
    Caser,
}

impl SeqKind {
    pub fn name(self) -> &'static str {
        match self {
            SeqKind::Sasrec => "sasrec",
            SeqKind::Gru4rec => "gru4rec",
            SeqKind::Caser => "caser",
        }
    }
}

/// Hyper-parameters (llmrec-seeds.md §3; DROS's defaults: d 64, window 10, dropout 0.1, Adam
/// lr 1e-3 with L2 1e-4, batch 256, BCE with one negative).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SeqConfig {
    pub model: SeqKind,
    pub hidden: usize,
    pub window: usize,
    pub dropout: f64,
    pub lr: f64,
    /// L2 coefficient added to the gradient (PyTorch Adam `weight_decay`).
    pub l2: f64,
    pub batch_size: usize,
    pub epochs: usize,
    /// Stop after this many evaluations without a better validation NDCG@10 (0 = never).
    pub patience: usize,
    pub seed: u64,
    /// Caser: horizontal filter heights and filters per height.
    pub caser_heights: Vec<usize>,
    pub caser_filters: usize,
}

impl SeqConfig {
    pub fn new(model: SeqKind) -> Self {
        SeqConfig {
            model,
            hidden: 64,
            window: 10,
            dropout: 0.1,
            lr: 1e-3,
            l2: 1e-4,
            batch_size: 256,
            epochs: 100,
            patience: 10,
            seed: 1234,
            caser_heights: vec![2, 3, 4],
            caser_filters: 16,
        }
    }
}

/// Randomness of one forward pass: `None` in evaluation (no dropout).
pub type DropRng<'a> = Option<&'a mut rudder_data::rng::Rng>;

pub trait SeqModel {
    /// User representations `[B, d']` of right-padded histories `seq [B, window]` (u32) with
    /// real lengths `lens`.
    fn encode(&self, seq: &Tensor, lens: &[usize], rng: DropRng) -> Result<Tensor>;
    /// The model's parameters.
    fn param_set(&self) -> &ParamSet;
    /// The output layer: weights `[n_items, d']` and bias `[n_items]`.
    fn head(&self) -> (&Var, &Var) {
        self.param_set().head()
    }
    /// Every trainable parameter with its name.
    fn params(&self) -> Vec<(String, Var)> {
        self.param_set().all()
    }
    /// The item-embedding table `[n_items + 1, d]` (row `n_items` is padding).
    fn item_embeddings(&self) -> &Var {
        &self.param_set().emb
    }

    /// Scores of every item `[B, n_items]` (evaluation mode).
    fn scores(&self, seq: &Tensor, lens: &[usize]) -> Result<Tensor> {
        let h = self.encode(seq, lens, None)?;
        let (w, b) = self.head();
        Ok(h.matmul(&w.as_tensor().t()?)?
            .broadcast_add(b.as_tensor())?)
    }
}

/// The parameters of a sequential model: the item table `[n_items + 1, d]` (N(0, 0.01), row
/// `n_items` is padding) and the other tensors by name; the output layer is `out.weight` /
/// `out.bias`.
pub struct ParamSet {
    pub emb: Var,
    pub named: Vec<(String, Var)>,
    pub seed: u64,
}

impl ParamSet {
    pub fn new(n_items: usize, d: usize, seed: u64) -> Result<ParamSet> {
        let emb = var(rudder_nn::init::normal(
            n_items + 1,
            d,
            0.01,
            seed,
            1,
            &Device::Cpu,
        )?)?;
        Ok(ParamSet {
            emb,
            named: Vec::new(),
            seed,
        })
    }
    pub fn add(&mut self, name: impl Into<String>, v: Var) {
        self.named.push((name.into(), v));
    }
    /// `{name}.weight [out, inp]` and `{name}.bias [out]`, PyTorch's `nn.Linear` initialisation.
    pub fn add_linear(&mut self, name: &str, out: usize, inp: usize, key: u64) -> Result<()> {
        let (w, b) = rudder_nn::init::linear_uniform(out, inp, self.seed, key, &Device::Cpu)?;
        self.add(format!("{name}.weight"), var(w)?);
        self.add(format!("{name}.bias"), var(b)?);
        Ok(())
    }
    pub fn get(&self, name: &str) -> &Var {
        &self
            .named
            .iter()
            .find(|(n, _)| n == name)
            .expect("parameter")
            .1
    }
    /// `x · Wᵀ + b` with the named linear layer.
    pub fn linear(&self, x: &Tensor, name: &str) -> Result<Tensor> {
        linear(
            x,
            self.get(&format!("{name}.weight")),
            self.get(&format!("{name}.bias")),
        )
    }
    /// The embeddings `[B, L, d]` of the ids `seq [B, L]`.
    pub fn embed(&self, seq: &Tensor) -> Result<Tensor> {
        let (b, l) = seq.dims2()?;
        let d = self.emb.dims()[1];
        Ok(self
            .emb
            .as_tensor()
            .index_select(&seq.flatten_all()?, 0)?
            .reshape((b, l, d))?)
    }
    pub fn head(&self) -> (&Var, &Var) {
        (self.get("out.weight"), self.get("out.bias"))
    }
    pub fn all(&self) -> Vec<(String, Var)> {
        let mut v = vec![("item_emb".to_string(), self.emb.clone())];
        v.extend(self.named.iter().cloned());
        v
    }
}

/// A fresh parameter from a tensor.
pub fn var(t: Tensor) -> Result<Var> {
    Ok(Var::from_tensor(&t)?)
}

pub fn zeros(shape: &[usize]) -> Result<Var> {
    Ok(Var::zeros(shape, DType::F32, &Device::Cpu)?)
}

pub fn filled(shape: &[usize], v: f64) -> Result<Var> {
    var((Tensor::ones(shape, DType::F32, &Device::Cpu)? * v)?)
}

/// `x [.., in] · wᵀ + b` for `w [out, in]`.
pub fn linear(x: &Tensor, w: &Var, b: &Var) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let inp = *dims.last().unwrap_or(&1);
    let n = x.elem_count() / inp.max(1);
    let y = x
        .reshape((n, inp))?
        .matmul(&w.as_tensor().t()?)?
        .broadcast_add(b.as_tensor())?;
    let mut shape = dims;
    *shape.last_mut().unwrap() = w.dims()[0];
    Ok(y.reshape(shape)?)
}

/// Histories as the model input: ids `[B, window]` right-padded with `pad` (the last `window`
/// items when longer) and the real lengths (at least 1, as LLaRA clamps `len_seq`).
pub fn batch(histories: &[&[u32]], window: usize, pad: u32) -> Result<(Tensor, Vec<usize>)> {
    let mut ids = Vec::with_capacity(histories.len() * window);
    let mut lens = Vec::with_capacity(histories.len());
    for h in histories {
        let h = &h[h.len().saturating_sub(window)..];
        ids.extend_from_slice(h);
        ids.extend(std::iter::repeat_n(pad, window - h.len()));
        lens.push(h.len().max(1));
    }
    Ok((
        Tensor::from_vec(ids, (histories.len(), window), &Device::Cpu)?,
        lens,
    ))
}

/// Row `lens[b] − 1` of every batch row of `h [B, L, d]` → `[B, d]`.
pub fn gather_last(h: &Tensor, lens: &[usize]) -> Result<Tensor> {
    let (b, l, d) = h.dims3()?;
    let idx: Vec<u32> = lens
        .iter()
        .enumerate()
        .map(|(r, &n)| (r * l + n.clamp(1, l) - 1) as u32)
        .collect();
    Ok(h.reshape((b * l, d))?
        .index_select(&Tensor::from_vec(idx, b, &Device::Cpu)?, 0)?)
}

/// `1` at real positions, `0` at padding: `[B, L, 1]`.
pub fn pad_mask(seq: &Tensor, pad: u32) -> Result<Tensor> {
    let v = seq.flatten_all()?.to_vec1::<u32>()?;
    let m: Vec<f32> = v
        .iter()
        .map(|&i| if i == pad { 0.0 } else { 1.0 })
        .collect();
    let (b, l) = seq.dims2()?;
    Ok(Tensor::from_vec(m, (b, l, 1), &Device::Cpu)?)
}
