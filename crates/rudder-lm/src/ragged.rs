//! Ragged batches for continuous batching: every row has its own KV cache and its own length,
//! and adds any number of new tokens to a step (a chunk of its prompt, or one decode token).
//!
//! The weight products (Q/K/V, O, gate/up/down, which are where decoding spends its time) run
//! once over the new tokens of all rows together; attention runs per row over that row's own
//! cache, so rows can enter and leave the batch between steps without padding or re-packing.
//! Hooks are called per row with a `[1, t, d]` view and that row's own [`HookCtx`], so each
//! request can carry its own interventions and captures. Inference only (no autograd).

use std::sync::Arc;

use candle_core::{Device, Tensor};
use half::f16;
use serde::{Deserialize, Serialize};

use crate::config::DecoderConfig;
use crate::decoder::Decoder;
use crate::hooks::{Hook, HookCtx, Phase, Site};
use crate::linear::forward_many_vecs;
use crate::team::SendPtr;
use crate::{LmError, Result};

/// The number format of the cached keys and values. `F32` (the default) computes exactly what
/// the padded decoder does; `F16` halves the bytes that attention reads at every decode step
/// (what llama.cpp caches by default): attention of long batched rollouts is bound by reading
/// the cache, so it runs faster, and the outputs differ from f32's by the rounding of the keys
/// and values to half precision.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvPrecision {
    #[default]
    F32,
    F16,
}

impl std::str::FromStr for KvPrecision {
    type Err = LmError;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Ok(KvPrecision::F32),
            "f16" => Ok(KvPrecision::F16),
            _ => Err(LmError::Config(format!(
                "KV cache precision `{s}`: expected f32 or f16"
            ))),
        }
    }
}

/// One layer's keys (or values) in the cache's number format.
enum Buf {
    F32(Vec<f32>),
    F16(Vec<f16>),
}

impl Buf {
    fn new(p: KvPrecision, cap: usize) -> Self {
        match p {
            KvPrecision::F32 => Buf::F32(Vec::with_capacity(cap)),
            KvPrecision::F16 => Buf::F16(Vec::with_capacity(cap)),
        }
    }

    #[cfg(test)]
    fn push(&mut self, x: &[f32]) {
        match self {
            Buf::F32(b) => b.extend_from_slice(x),
            Buf::F16(b) => b.extend(x.iter().map(|&v| f16::from_f32(v))),
        }
    }

    fn reserve(&mut self, n: usize) {
        match self {
            Buf::F32(b) => b.reserve(n),
            Buf::F16(b) => b.reserve(n),
        }
    }

    /// Room for `n` more values: where the first of them goes. Write them through
    /// [`Dst::put`], then [`Buf::commit`] them.
    fn spare(&mut self, n: usize) -> Dst {
        self.reserve(n);
        match self {
            Buf::F32(b) => Dst::F32(b.spare_capacity_mut().as_mut_ptr().cast()),
            Buf::F16(b) => Dst::F16(b.spare_capacity_mut().as_mut_ptr().cast()),
        }
    }

    /// Count the `n` values after the current end as pushed.
    ///
    /// # Safety
    /// All `n` were written through this buffer's [`Buf::spare`] pointer since (and no
    /// reallocation happened in between).
    unsafe fn commit(&mut self, n: usize) {
        match self {
            Buf::F32(b) => unsafe { b.set_len(b.len() + n) },
            Buf::F16(b) => unsafe { b.set_len(b.len() + n) },
        }
    }

    /// Move the first `n` values out into a buffer of their own.
    fn split_front(&mut self, n: usize) -> Buf {
        match self {
            Buf::F32(b) => Buf::F32(b.drain(..n).collect()),
            Buf::F16(b) => Buf::F16(b.drain(..n).collect()),
        }
    }

    /// Append the first `n` values of `other` (same format).
    fn extend_from(&mut self, other: &Buf, n: usize) {
        match (self, other) {
            (Buf::F32(a), Buf::F32(b)) => a.extend_from_slice(&b[..n]),
            (Buf::F16(a), Buf::F16(b)) => a.extend_from_slice(&b[..n]),
            _ => unreachable!("one cache holds one number format"),
        }
    }

    /// Bytes of the values held (not of the room reserved for later ones, which is memory
    /// reserved but not touched).
    fn bytes(&self) -> usize {
        match self {
            Buf::F32(b) => b.len() * 4,
            Buf::F16(b) => b.len() * 2,
        }
    }
}

/// The free end of a [`Buf`] (see [`Buf::spare`]), for the tasks that write new positions in
/// parallel: each writes its own tokens' ranges.
#[derive(Clone, Copy)]
enum Dst {
    F32(*mut f32),
    F16(*mut f16),
}

// SAFETY: a Dst is only written through by tasks that own disjoint ranges of it (see `put`).
unsafe impl Send for Dst {}
unsafe impl Sync for Dst {}

impl Dst {
    /// Write `x` at values `at..at + x.len()` past the buffer's end (converted to its format).
    ///
    /// # Safety
    /// The range lies inside the room [`Buf::spare`] made, and no other task writes it.
    unsafe fn put(self, at: usize, x: &[f32]) {
        match self {
            Dst::F32(p) => unsafe { std::ptr::copy_nonoverlapping(x.as_ptr(), p.add(at), x.len()) },
            Dst::F16(p) => {
                for (i, &v) in x.iter().enumerate() {
                    unsafe { p.add(at + i).write(f16::from_f32(v)) };
                }
            }
        }
    }
}

/// Keys and values of the first `len` positions of a prompt, per layer, read by every row
/// that shares them (the rollouts of one question): one copy in memory, so a batch of rollouts
/// streams the prompt's keys and values once per layer instead of once per row.
pub struct SharedKv {
    k: Vec<Buf>,
    v: Vec<Buf>,
    len: usize,
}

/// One sequence's keys and values, per layer, position-major `[len, kv_heads, head_dim]`:
/// positions `[0, s)` in an optional [`SharedKv`] prefix, the rest `[s, len)` in the row's own
/// buffers.
pub struct RowCache {
    shared: Option<Arc<SharedKv>>,
    k: Vec<Buf>,
    v: Vec<Buf>,
    /// Values per position and layer (`kv_heads * head_dim`).
    width: usize,
    precision: KvPrecision,
    /// Positions processed so far.
    pub len: usize,
    /// Positions `[0, prompt_len)` are prompt (what `Positions::Prompt/LastPrompt` select).
    pub prompt_len: usize,
}

impl RowCache {
    /// An empty f32 cache.
    pub fn new(cfg: &DecoderConfig, prompt_len: usize) -> Self {
        Self::with_precision(cfg, prompt_len, KvPrecision::F32)
    }

    /// An empty cache in the given number format.
    pub fn with_precision(cfg: &DecoderConfig, prompt_len: usize, p: KvPrecision) -> Self {
        Self::with_room_for(cfg, prompt_len, prompt_len, p)
    }

    /// An empty cache with room for `room` positions from the start (the prompt and the tokens
    /// it may generate), so that appending never copies the cache to grow it. Memory the row
    /// never reaches is reserved, not touched.
    pub fn with_room_for(
        cfg: &DecoderConfig,
        prompt_len: usize,
        room: usize,
        p: KvPrecision,
    ) -> Self {
        let width = cfg.num_kv_heads * cfg.head_dim;
        Self::with_room(
            cfg.num_layers,
            width,
            p,
            room.max(prompt_len),
            prompt_len,
            None,
        )
    }

    fn with_room(
        layers: usize,
        width: usize,
        precision: KvPrecision,
        room: usize,
        prompt_len: usize,
        shared: Option<Arc<SharedKv>>,
    ) -> Self {
        let per = room * width;
        RowCache {
            k: (0..layers).map(|_| Buf::new(precision, per)).collect(),
            v: (0..layers).map(|_| Buf::new(precision, per)).collect(),
            width,
            precision,
            len: shared.as_ref().map_or(0, |s| s.len),
            shared,
            prompt_len,
        }
    }

    /// Make room for `positions` more positions in the row's own buffers (see
    /// [`RowCache::with_room_for`]).
    pub fn reserve(&mut self, positions: usize) {
        let n = positions * self.width;
        for b in self.k.iter_mut().chain(self.v.iter_mut()) {
            b.reserve(n);
        }
    }

    /// The cache's number format.
    pub fn precision(&self) -> KvPrecision {
        self.precision
    }

    /// Positions held in the shared prefix.
    fn shared_len(&self) -> usize {
        self.shared.as_ref().map_or(0, |s| s.len)
    }

    /// The start of a row with the same prompt: the first `n` positions (at most `len`). They
    /// are shared, not copied: the first call moves this row's first `n` positions into a
    /// [`SharedKv`] that this row and every later copy read (one copy of the prompt's keys and
    /// values in memory however many rollouts read it). A row whose shared prefix has another
    /// length gives a private copy instead.
    pub fn prefix(&mut self, n: usize) -> Self {
        let n = n.min(self.len);
        let (layers, w, p) = (self.k.len(), self.width, self.precision);
        let room = self.prompt_len.saturating_sub(n) + 1;
        let s = self.shared_len();
        if n > 0 && s == n {
            return Self::with_room(layers, w, p, room, self.prompt_len, self.shared.clone());
        }
        if n > 0 && s == 0 {
            let cut = |b: &mut Vec<Buf>| -> Vec<Buf> {
                b.iter_mut().map(|x| x.split_front(n * w)).collect()
            };
            let shared = Arc::new(SharedKv {
                k: cut(&mut self.k),
                v: cut(&mut self.v),
                len: n,
            });
            self.shared = Some(shared.clone());
            return Self::with_room(layers, w, p, room, self.prompt_len, Some(shared));
        }
        // a private copy of positions [0, n) read through both pieces
        let mut c = Self::with_room(layers, w, p, self.prompt_len.max(n), self.prompt_len, None);
        let from_shared = n.min(s);
        for l in 0..layers {
            if let Some(sh) = &self.shared {
                c.k[l].extend_from(&sh.k[l], from_shared * w);
                c.v[l].extend_from(&sh.v[l], from_shared * w);
            }
            c.k[l].extend_from(&self.k[l], (n - from_shared) * w);
            c.v[l].extend_from(&self.v[l], (n - from_shared) * w);
        }
        c.len = n;
        c
    }

    /// Bytes held by the keys and values: the row's own, plus its share of a shared prefix
    /// (the prefix's bytes divided among the rows that read them).
    pub fn bytes(&self) -> usize {
        let own: usize = self.k.iter().chain(&self.v).map(Buf::bytes).sum();
        own + self.shared.as_ref().map_or(0, |s| {
            let b: usize = s.k.iter().chain(&s.v).map(Buf::bytes).sum();
            b / Arc::strong_count(s)
        })
    }

    /// Layer `l`'s keys and values as (shared prefix, own positions), in the cache's format.
    fn layer(&self, l: usize) -> KvAny<'_> {
        fn parts<'a, T: Elem>(c: &'a RowCache, l: usize) -> Kv<'a, T> {
            let get = |b: &'a Buf| T::of(b).expect("one cache holds one number format");
            let (sk, sv) = match &c.shared {
                Some(s) => (get(&s.k[l]), get(&s.v[l])),
                None => (&[][..], &[][..]),
            };
            Kv {
                parts: [(sk, sv), (get(&c.k[l]), get(&c.v[l]))],
            }
        }
        match self.precision {
            KvPrecision::F32 => KvAny::F32(parts(self, l)),
            KvPrecision::F16 => KvAny::F16(parts(self, l)),
        }
    }
}

/// A number format the attention kernels read keys and values in.
trait Elem: Copy + Sync {
    fn of(b: &Buf) -> Option<&[Self]>;
    fn f32(self) -> f32;
    /// Eight consecutive values as f32 lanes.
    ///
    /// # Safety
    /// `p` points at eight readable values; the CPU has AVX2 and F16C.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

impl Elem for f32 {
    fn of(b: &Buf) -> Option<&[f32]> {
        match b {
            Buf::F32(v) => Some(v),
            Buf::F16(_) => None,
        }
    }
    #[inline(always)]
    fn f32(self) -> f32 {
        self
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> std::arch::x86_64::__m256 {
        unsafe { std::arch::x86_64::_mm256_loadu_ps(p) }
    }
}

impl Elem for f16 {
    fn of(b: &Buf) -> Option<&[f16]> {
        match b {
            Buf::F16(v) => Some(v),
            Buf::F32(_) => None,
        }
    }
    #[inline(always)]
    fn f32(self) -> f32 {
        self.to_f32()
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const f16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) }
    }
}

/// One row's keys and values at one layer, in two contiguous pieces (a shared prefix, then the
/// row's own positions), each position-major `[positions, kv_heads, head_dim]`.
struct Kv<'a, T> {
    parts: [(&'a [T], &'a [T]); 2],
}

impl<T> Clone for Kv<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Kv<'_, T> {}

#[derive(Clone, Copy)]
enum KvAny<'a> {
    F32(Kv<'a, f32>),
    F16(Kv<'a, f16>),
}

impl<T> Kv<'_, T> {
    /// The pieces covering positions `[0, upto)`: (keys, values, first position, positions).
    fn pieces(&self, kvd: usize, upto: usize) -> impl Iterator<Item = (&[T], &[T], usize, usize)> {
        let mut start = 0;
        self.parts.into_iter().filter_map(move |(k, v)| {
            let n = (k.len() / kvd).min(upto.saturating_sub(start));
            let p0 = start;
            start += k.len() / kvd;
            (n > 0).then_some((k, v, p0, n))
        })
    }
}

/// What one row adds to a step.
pub struct RaggedRow<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut RowCache,
    pub phase: Phase,
    pub hook: Option<&'a mut dyn Hook>,
}

const NO_PAD: [usize; 1] = [0];

impl Decoder {
    /// Run the new tokens of every row, appending to each row's cache. Returns the final-norm
    /// hidden state of each row's last new token, `[rows, d]` (feed it to [`Decoder::logits`]).
    pub fn forward_ragged(&self, rows: &mut [RaggedRow]) -> Result<Tensor> {
        let c = &self.cfg;
        let d = c.hidden_size;
        if rows.is_empty() {
            return Err(LmError::Config(
                "a ragged step needs at least one row".into(),
            ));
        }
        let mut offs = Vec::with_capacity(rows.len() + 1);
        offs.push(0usize);
        for (i, r) in rows.iter().enumerate() {
            if r.tokens.is_empty() {
                return Err(LmError::Config(format!("row {i} adds no tokens")));
            }
            if r.cache.k.len() != c.num_layers {
                return Err(LmError::Config(format!(
                    "row {i}: cache built for {} layers, the model has {}",
                    r.cache.k.len(),
                    c.num_layers
                )));
            }
            if r.cache.width != c.num_kv_heads * c.head_dim {
                return Err(LmError::Config(format!(
                    "row {i}: cache built for {} floats per position, the model has {}",
                    r.cache.width,
                    c.num_kv_heads * c.head_dim
                )));
            }
            let total = r.cache.len + r.tokens.len();
            if total > c.max_position_embeddings {
                return Err(LmError::TooLong {
                    len: total,
                    ctx: c.max_position_embeddings,
                    detail: "max_position_embeddings".into(),
                });
            }
            offs.push(offs[i] + r.tokens.len());
        }
        let n = offs[rows.len()];
        let ids: Vec<u32> = rows.iter().flat_map(|r| r.tokens.iter().copied()).collect();
        let dev = Device::Cpu;
        let mut h = self
            .embed
            .index_select(&Tensor::from_vec(ids, n, &dev)?, 0)?;
        // absolute position of every new token, and its RoPE table row
        let pos: Vec<usize> = rows
            .iter()
            .flat_map(|r| (0..r.tokens.len()).map(|i| r.cache.len + i))
            .collect();
        let half = c.head_dim / 2;
        let mut cos = Vec::with_capacity(n * half);
        let mut sin = Vec::with_capacity(n * half);
        for &p in &pos {
            for &f in &self.inv_freq {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        let plan = Plan::new(rows, offs, pos, cos, sin);
        let offs = &plan.offs;
        for l in 0..c.num_layers {
            hook_rows(Site::ResidPre(l), rows, offs, &mut h)?;
            let xn = self.norm(&h, &self.layers[l].ln_attn)?;
            let mut a = self.attention_ragged(l, &xn, rows, &plan)?;
            hook_rows(Site::AttnOut(l), rows, offs, &mut a)?;
            h = crate::rowwise::add(&h, &a)?;
            hook_rows(Site::ResidMid(l), rows, offs, &mut h)?;
            let xn = self.norm(&h, &self.layers[l].ln_mlp)?;
            let mut m = self.mlp(l, &xn)?;
            hook_rows(Site::MlpOut(l), rows, offs, &mut m)?;
            h = crate::rowwise::add(&h, &m)?;
            hook_rows(Site::ResidPost(l), rows, offs, &mut h)?;
        }
        let mut out = self.norm(&h, &self.norm)?;
        hook_rows(Site::FinalNorm, rows, offs, &mut out)?;
        for r in rows.iter_mut() {
            r.cache.len += r.tokens.len();
        }
        let last: Vec<u32> = offs[1..].iter().map(|&o| (o - 1) as u32).collect();
        let k = last.len();
        let sel = out.index_select(&Tensor::from_vec(last, k, &dev)?, 0)?;
        debug_assert_eq!(sel.dims2()?, (k, d));
        Ok(sel)
    }

    fn attention_ragged(
        &self,
        l: usize,
        x: &Tensor,
        rows: &mut [RaggedRow],
        plan: &Plan,
    ) -> Result<Tensor> {
        let (offs, row_of) = (&plan.offs, &plan.row_of);
        let c = &self.cfg;
        let layer = &self.layers[l];
        let (h, kvh, hd) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let (qd, kvd) = (h * hd, kvh * hd);
        let n = x.dim(0)?;
        let [mut q, mut k, v]: [Vec<f32>; 3] =
            forward_many_vecs(&[&layer.q, &layer.k, &layer.v], x)?
                .try_into()
                .map_err(|_| LmError::Config("q/k/v projection count".into()))?;
        let half = hd / 2;
        let inter = c.rope_interleaved;
        // where each row's new keys and values go in its cache
        let dst: Vec<(Dst, Dst)> = rows
            .iter_mut()
            .enumerate()
            .map(|(r, row)| {
                let m = (offs[r + 1] - offs[r]) * kvd;
                (row.cache.k[l].spare(m), row.cache.v[l].spare(m))
            })
            .collect();
        // RoPE on the team, in blocks of tokens (on one core it was ~2 % of a decode step); each
        // task also writes its tokens' keys and values into their rows' caches (done serially,
        // the copies and the caches' growth were ~2 % of a step)
        let (qp, kp) = (SendPtr(q.as_mut_ptr()), SendPtr(k.as_mut_ptr()));
        crate::rowwise::for_row_blocks(n, qd + kvd, &|t0, m| {
            // SAFETY: blocks of tokens are disjoint, and inside `q` (n · qd) and `k` (n · kvd).
            let (qs, ks) = unsafe {
                (
                    std::slice::from_raw_parts_mut(qp.at(t0 * qd), m * qd),
                    std::slice::from_raw_parts_mut(kp.at(t0 * kvd), m * kvd),
                )
            };
            for (i, (qt, kt)) in qs
                .chunks_exact_mut(qd)
                .zip(ks.chunks_exact_mut(kvd))
                .enumerate()
            {
                let t = t0 + i;
                let (cs, sn) = (
                    &plan.cos[t * half..(t + 1) * half],
                    &plan.sin[t * half..(t + 1) * half],
                );
                for head in qt.chunks_exact_mut(hd).chain(kt.chunks_exact_mut(hd)) {
                    rope_in_place(head, cs, sn, inter);
                }
                let r = row_of[t];
                let at = (t - offs[r]) * kvd;
                // SAFETY: token t alone writes values at..at+kvd of its row's new room.
                unsafe {
                    dst[r].0.put(at, kt);
                    dst[r].1.put(at, &v[t * kvd..(t + 1) * kvd]);
                }
            }
        });
        for (r, row) in rows.iter_mut().enumerate() {
            let m = (offs[r + 1] - offs[r]) * kvd;
            // SAFETY: the tasks above wrote every token of the row, through `spare`'s pointers.
            unsafe {
                row.cache.k[l].commit(m);
                row.cache.v[l].commit(m);
            }
        }
        let caches: Vec<KvAny> = rows.iter().map(|r| r.cache.layer(l)).collect();
        let shape = AttnShape::new(h, kvh, hd);
        // every value is written by the task of its run (`attend` writes its output)
        let mut y = crate::team::unwritten(n * qd);
        let yp = SendPtr(y.as_mut_ptr());
        // Runs are shared out by the decoding team (rayon's workers would fall asleep between
        // the layers' short attention calls, see `crate::team`).
        crate::team::Team::global().run(plan.runs.len(), &|i| {
            let (t, m) = plan.runs[i];
            let qs = &q[t * qd..(t + m) * qd];
            // SAFETY: task i alone writes rows t..t+m of y (the runs partition the tokens).
            let ys = unsafe { std::slice::from_raw_parts_mut(yp.at(t * qd), m * qd) };
            // causal: token t reads positions 0..=pos[t], the next one more
            attend(
                &shape,
                qs,
                caches[row_of[t]],
                plan.pos[t] + 1,
                ys,
                plan.cold[row_of[t]],
            );
        });
        // SAFETY: the runs partition the tokens and each task wrote all of its tokens' values.
        unsafe { y.set_len(n * qd) };
        layer
            .o
            .forward(&Tensor::from_vec(y, (n, qd), &Device::Cpu)?)
    }
}

/// What every layer of a ragged step shares: where each row's tokens are (`offs`, `row_of`),
/// their positions and RoPE tables, and how attention is shared out (`runs`, `cold`).
struct Plan {
    offs: Vec<usize>,
    pos: Vec<usize>,
    cos: Vec<f32>,
    sin: Vec<f32>,
    /// The row of every new token.
    row_of: Vec<usize>,
    /// (first token, tokens) of each attention task.
    runs: Vec<(usize, usize)>,
    /// Per row: whether its cache is expected out of the CPU's caches (see [`attend_avx2`]).
    cold: Vec<bool>,
}

impl Plan {
    fn new(
        rows: &[RaggedRow],
        offs: Vec<usize>,
        pos: Vec<usize>,
        cos: Vec<f32>,
        sin: Vec<f32>,
    ) -> Plan {
        let row_of: Vec<usize> = (0..rows.len())
            .flat_map(|r| std::iter::repeat_n(r, offs[r + 1] - offs[r]))
            .collect();
        // a row adding one token (a decode step) finds its cache cold: the weights of a whole
        // step went through the CPU's caches since it was read; a prompt chunk's tokens share
        // theirs, which the first of them brings in
        let cold: Vec<bool> = rows.iter().map(|r| r.tokens.len() == 1).collect();
        // Runs of up to RUN consecutive tokens of one row (a decode step's row is a run of one),
        // each one task; rows reading one shared prompt prefix go one after the other, so its
        // keys and values are read from memory once and from cache by the others.
        let mut order: Vec<usize> = (0..rows.len()).collect();
        if rows.iter().any(|r| r.cache.shared.is_some()) {
            let key = |r: usize| {
                rows[r]
                    .cache
                    .shared
                    .as_ref()
                    .map_or(0, |s| Arc::as_ptr(s) as usize)
            };
            order.sort_by_key(|&r| (key(r), r));
        }
        let runs: Vec<(usize, usize)> = order
            .iter()
            .flat_map(|&r| {
                let (a, b) = (offs[r], offs[r + 1]);
                (a..b).step_by(RUN).map(move |t| (t, RUN.min(b - t)))
            })
            .collect();
        Plan {
            offs,
            pos,
            cos,
            sin,
            row_of,
            runs,
            cold,
        }
    }
}

/// Tokens of a prompt chunk per attention task: each block of keys and values, once in cache,
/// serves all of them. Measured in one process (2 threads, Zen 4, AVX2, 9/3 heads × 64, 30
/// layers of whole-prompt chunks), against one token per task: 256-token prompts 84 vs 90–98
/// ms, 1,024 tokens 694 vs 782, 2,048 tokens 2,975 vs 3,515 (runs of 4 and 16 within a few %).
const RUN: usize = 8;

struct AttnShape {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    scale: f32,
}

impl AttnShape {
    /// Scores scaled by 1/√head_dim.
    fn new(heads: usize, kv_heads: usize, head_dim: usize) -> Self {
        AttnShape {
            heads,
            kv_heads,
            head_dim,
            scale: 1.0 / (head_dim as f32).sqrt(),
        }
    }
}

/// Attention of `q.len() / (heads · head_dim)` consecutive tokens of one row, all heads, written
/// to `out` (laid out as `q`): the first token reads positions `0..upto` of the row's cache,
/// each next one position more (causal). [`attend_avx2`] when the CPU has AVX2 and the head
/// width is a multiple of 8, else [`attend_impl`] token by token.
fn attend(sh: &AttnShape, q: &[f32], kv: KvAny, upto: usize, out: &mut [f32], cold: bool) {
    match kv {
        KvAny::F32(kv) => attend_in(sh, q, kv, upto, out, cold),
        KvAny::F16(kv) => attend_in(sh, q, kv, upto, out, cold),
    }
}

/// `cold`: the cache is expected out of the CPU's caches (see [`attend_avx2`]).
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
fn attend_in<T: Elem>(
    sh: &AttnShape,
    q: &[f32],
    kv: Kv<T>,
    upto: usize,
    out: &mut [f32],
    cold: bool,
) {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::quant::simd_available() && sh.head_dim.is_multiple_of(8) {
            // SAFETY: AVX2, FMA and F16C were detected at run time.
            return unsafe { attend_avx2(sh, q, kv, upto, out, cold) };
        }
    }
    let qd = sh.heads * sh.head_dim;
    for (i, (qt, ot)) in q.chunks_exact(qd).zip(out.chunks_exact_mut(qd)).enumerate() {
        attend_impl(sh, qt, kv, upto + i, ot)
    }
}

/// Positions per block of the AVX2 kernel: one block's keys (or values) are 96 KiB at 64 f32
/// values × 3 key/value heads, so they stay in L2 (512 KiB on the smallest, Zen 3) while every
/// query head of the token reads them.
#[cfg(target_arch = "x86_64")]
const BLOCK: usize = 128;

/// [`attend_impl`] with AVX2 intrinsics (head widths a multiple of 8: [`attend_in`] sends
/// others to the portable loop), the cache
/// walked in blocks of [`BLOCK`] positions. Scores: the query heads sharing a key/value head
/// (up to three at once) against four positions at a time, so each key vector loaded serves
/// all of them, reduced with one horizontal-add tree per two heads; then a vector exponential;
/// then the weighted sum of values, again up to three heads at once over half a head's width,
/// its running sums carried from block to block (and across the cache's two pieces) in `acc`.
///
/// With `cold` (a decode step: the row's cache was last touched a whole step ago and has been
/// pushed out by the weights since) the first block of keys is read in a plain sweep, one load
/// per cache line, and every block then prefetches the next one into L2 while it is worked on
/// (the last block of keys the first of values), a few lines per step of the loops: the
/// arithmetic alone, its loads mixed with multiply-adds, keeps too few lines in flight to
/// stream the cache at the memory's speed. Measured on Zen 4 (2 threads, in one process,
/// alternating with the kernel this one replaced: 8 positions × 1 head per score step, neither
/// sweep nor prefetch), 32 rows × 30 layers × 320 positions: f32 cache 28–30 → 18–19 ms per
/// decode step (sweeping every block instead of prefetching: 22–25; a sweep of the whole cache
/// alone takes 14), f16 19 → 14 ms; 16 rows × 640 positions, f32, 33–35 → 20 ms; from cache (a
/// prompt chunk) about 10–30 % less time.
///
/// `q` may hold a run of consecutive tokens of one row (a prompt chunk's task, [`RUN`]): each
/// block of keys, then of values, is read by every token of the run in turn while it is in
/// cache, each token stopping at its own causal limit.
///
/// The arithmetic of a position does not depend on blocks, pieces or runs: each score is one chain
/// of fused multiply-adds over the head's lanes reduced in [`hsum`]'s order, each output lane
/// one chain over the positions in order.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn attend_avx2<T: Elem>(
    sh: &AttnShape,
    q: &[f32],
    kv: Kv<T>,
    upto: usize,
    out: &mut [f32],
    cold: bool,
) {
    let (hd, kvd) = (sh.head_dim, sh.kv_heads * sh.head_dim);
    let qd = sh.heads * hd;
    let toks = q.len() / qd.max(1);
    assert!(hd.is_multiple_of(8) && toks >= 1 && q.len() == toks * qd && out.len() == toks * qd);
    // the last token reads the most positions; token i stops at upto + i
    let last = upto + toks - 1;
    let pieces: Vec<_> = kv.pieces(kvd, last).collect();
    assert_eq!(pieces.iter().map(|p| p.3).sum::<usize>(), last);
    for &(kc, vc, _, n) in &pieces {
        assert!(kc.len() >= n * kvd && vc.len() >= n * kvd);
    }
    // (keys, values, first position, positions) of each block
    let blocks: Vec<_> = pieces
        .iter()
        .flat_map(|&(kc, vc, p0, n)| {
            (0..n).step_by(BLOCK).map(move |b0| {
                let b = (n - b0).min(BLOCK);
                let r = b0 * kvd..(b0 + b) * kvd;
                (&kc[r.clone()], &vc[r], p0 + b0, b)
            })
        })
        .collect();
    let rep = sh.heads / sh.kv_heads;
    // runs of up to three query heads of one key/value head: (key/value head, first head, heads)
    let runs: Vec<(usize, usize, usize)> = (0..sh.kv_heads)
        .flat_map(|g| {
            (0..rep)
                .step_by(3)
                .map(move |j| (g, g * rep + j, (rep - j).min(3)))
        })
        .collect();
    // score rows `last` apart, a token's rows `heads · last` apart
    let at = Shape {
        hd,
        kvd,
        stride: last,
        scale: sh.scale,
    };
    let mut s = vec![0f32; toks * sh.heads * last];
    // the weighted sums of values build up in `out` itself
    out.fill(0.0);
    let nv = hd / 8;
    // positions of a block that token i reads (0 when the block starts past its last)
    let seen = |i: usize, p0: usize, n: usize| (upto + i).saturating_sub(p0).min(n);
    // SAFETY: every pointer below stays inside the slices checked above (tokens < toks,
    // positions < the block's length and < the token's upto, heads < heads, lanes < head_dim).
    unsafe {
        for (bi, &(kc, _, p0, n)) in blocks.iter().enumerate() {
            if cold && bi == 0 {
                sweep(kc);
            }
            // while this block is scored: the next block's keys, after the last the first
            // block's values, into L2
            let next = match blocks.get(bi + 1) {
                Some(b) => b.0,
                None => blocks[0].1,
            };
            let mut pf = Prefetch::new(cold, next, toks * runs.len() * n.div_ceil(4));
            // every token of the run against this block while its keys are in cache
            for i in 0..toks {
                let m = seen(i, p0, n);
                let (qi, si) = (
                    q.as_ptr().add(i * qd),
                    s.as_mut_ptr().add(i * sh.heads * last),
                );
                for &(g, h0, r) in &runs {
                    let (qh, sr) = (qi.add(h0 * hd), si.add(h0 * last + p0));
                    match r {
                        3 => scores::<T, 3>(&at, qh, kc, m, g, sr, &mut pf),
                        2 => scores::<T, 2>(&at, qh, kc, m, g, sr, &mut pf),
                        _ => scores::<T, 1>(&at, qh, kc, m, g, sr, &mut pf),
                    }
                }
            }
        }
        for (i, rows) in s.chunks_exact_mut(sh.heads * last).enumerate() {
            for row in rows.chunks_exact_mut(last) {
                softmax_avx2(&mut row[..upto + i]);
            }
        }
        for (bi, &(_, vc, p0, n)) in blocks.iter().enumerate() {
            let next = blocks.get(bi + 1).map_or(&[][..], |b| b.1);
            let mut pf = Prefetch::new(cold, next, toks * runs.len() * nv.div_ceil(4) * n);
            for i in 0..toks {
                let m = seen(i, p0, n);
                let (si, ai) = (
                    s.as_ptr().add(i * sh.heads * last),
                    out.as_mut_ptr().add(i * qd),
                );
                for &(g, h0, r) in &runs {
                    let (sr, ar) = (si.add(h0 * last + p0), ai.add(h0 * hd));
                    match r {
                        3 => mix::<T, 3>(&at, sr, vc, m, g, ar, &mut pf),
                        2 => mix::<T, 2>(&at, sr, vc, m, g, ar, &mut pf),
                        _ => mix::<T, 1>(&at, sr, vc, m, g, ar, &mut pf),
                    }
                }
            }
        }
    }
}

/// Sizes the AVX2 attention helpers share.
#[cfg(target_arch = "x86_64")]
struct Shape {
    hd: usize,
    kvd: usize,
    /// Floats from one head's score row to the next (the run's longest row).
    stride: usize,
    scale: f32,
}

/// Prefetches (into L2) of one region spread over the calls of a loop: `step` bytes, whole
/// lines, per call.
#[cfg(target_arch = "x86_64")]
struct Prefetch {
    at: usize,
    end: usize,
    step: usize,
}

#[cfg(target_arch = "x86_64")]
impl Prefetch {
    fn new<T>(on: bool, region: &[T], calls: usize) -> Self {
        let (at, len) = (region.as_ptr() as usize, std::mem::size_of_val(region));
        if !on || calls == 0 || len == 0 {
            return Prefetch {
                at,
                end: at,
                step: 0,
            };
        }
        Prefetch {
            at,
            end: at + len,
            step: len.div_ceil(calls).div_ceil(64) * 64,
        }
    }

    #[inline(always)]
    fn step(&mut self) {
        use std::arch::x86_64::*;
        let stop = (self.at + self.step).min(self.end);
        while self.at < stop {
            // SAFETY: a prefetch never faults; the address lies in the region anyway.
            unsafe { _mm_prefetch::<_MM_HINT_T1>(self.at as *const i8) };
            self.at += 64;
        }
    }
}

/// Read `x` from memory into cache: one load per 64-byte line, nothing computed.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2")]
fn sweep<T>(x: &[T]) {
    use std::arch::x86_64::*;
    let (p, len) = (x.as_ptr() as *const u8, std::mem::size_of_val(x));
    let mut a = [_mm256_setzero_si256(); 4];
    let mut i = 0;
    // SAFETY: every 32-byte load lies inside `x` (i + 32 ≤ len).
    unsafe {
        while i + 3 * 64 + 32 <= len {
            for (c, a) in a.iter_mut().enumerate() {
                *a = _mm256_or_si256(*a, _mm256_loadu_si256(p.add(i + c * 64) as *const __m256i));
            }
            i += 4 * 64;
        }
        while i + 32 <= len {
            a[0] = _mm256_or_si256(a[0], _mm256_loadu_si256(p.add(i) as *const __m256i));
            i += 64;
        }
    }
    std::hint::black_box(a);
}

/// Scores of `R` consecutive query heads (from `q`, `hd` apart) of key/value head `g` against
/// the `n` positions of one block (`kc`), scaled, written to `s` (head rows `stride` apart).
// indices name registers of a tile (acc[head][position], a[head][vector])
#[allow(clippy::needless_range_loop)]
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn scores<T: Elem, const R: usize>(
    at: &Shape,
    q: *const f32,
    kc: &[T],
    n: usize,
    g: usize,
    s: *mut f32,
    pf: &mut Prefetch,
) {
    use std::arch::x86_64::*;
    let (hd, kvd, nv) = (at.hd, at.kvd, at.hd / 8);
    // SAFETY (all below): the caller's q holds R heads of hd lanes, s R rows of stride floats
    // from here, kc n positions of kvd values, g < kvd / hd.
    let kg = unsafe { kc.as_ptr().add(g * hd) };
    let scale = _mm256_set1_ps(at.scale);
    let mut p = 0;
    while p + 4 <= n {
        pf.step();
        let mut acc = [[_mm256_setzero_ps(); 4]; R];
        for c in 0..nv {
            let qv: [__m256; R] =
                std::array::from_fn(|j| unsafe { _mm256_loadu_ps(q.add(j * hd + c * 8)) });
            for i in 0..4 {
                let k = unsafe { T::load8(kg.add((p + i) * kvd + c * 8)) };
                for j in 0..R {
                    acc[j][i] = _mm256_fmadd_ps(qv[j], k, acc[j][i]);
                }
            }
        }
        // two heads' four positions per horizontal-add tree: lanes 0-3 and 4-7
        for j in (0..R).step_by(2) {
            let hi = if j + 1 < R {
                acc[j + 1]
            } else {
                [_mm256_setzero_ps(); 4]
            };
            let [a0, a1, a2, a3] = acc[j];
            let v = _mm256_mul_ps(hsum8([a0, a1, a2, a3, hi[0], hi[1], hi[2], hi[3]]), scale);
            unsafe {
                _mm_storeu_ps(s.add(j * at.stride + p), _mm256_castps256_ps128(v));
                if j + 1 < R {
                    _mm_storeu_ps(s.add((j + 1) * at.stride + p), _mm256_extractf128_ps(v, 1));
                }
            }
        }
        p += 4;
    }
    for p in p..n {
        pf.step();
        for j in 0..R {
            let mut a = _mm256_setzero_ps();
            for c in 0..nv {
                unsafe {
                    let k = T::load8(kg.add(p * kvd + c * 8));
                    a = _mm256_fmadd_ps(_mm256_loadu_ps(q.add(j * hd + c * 8)), k, a);
                }
            }
            unsafe { *s.add(j * at.stride + p) = hsum(a) * at.scale };
        }
    }
}

/// Add the `n` positions of one block of values (`vc`, key/value head `g`) weighted by the
/// probabilities of `R` consecutive query heads (`s`, rows `stride` apart) to their running sums
/// `acc` (`hd` apart), four vectors of a head at a time.
// indices name registers of a tile (acc[head][position], a[head][vector])
#[allow(clippy::needless_range_loop)]
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn mix<T: Elem, const R: usize>(
    at: &Shape,
    s: *const f32,
    vc: &[T],
    n: usize,
    g: usize,
    acc: *mut f32,
    pf: &mut Prefetch,
) {
    use std::arch::x86_64::*;
    let (hd, kvd, nv) = (at.hd, at.kvd, at.hd / 8);
    // SAFETY (all below): as in `scores`, with acc holding R heads of hd floats.
    let mut c0 = 0;
    while c0 < nv {
        let cn = (nv - c0).min(4);
        let mut a = [[_mm256_setzero_ps(); 4]; R];
        for j in 0..R {
            for c in 0..cn {
                a[j][c] = unsafe { _mm256_loadu_ps(acc.add(j * hd + (c0 + c) * 8)) };
            }
        }
        let vg = unsafe { vc.as_ptr().add(g * hd + c0 * 8) };
        for p in 0..n {
            pf.step();
            let w: [__m256; R] =
                std::array::from_fn(|j| unsafe { _mm256_broadcast_ss(&*s.add(j * at.stride + p)) });
            let vp = unsafe { vg.add(p * kvd) };
            // the whole-width case with a constant trip count, so that its loop unrolls
            if cn == 4 {
                for c in 0..4 {
                    let v = unsafe { T::load8(vp.add(c * 8)) };
                    for j in 0..R {
                        a[j][c] = _mm256_fmadd_ps(w[j], v, a[j][c]);
                    }
                }
            } else {
                for c in 0..cn {
                    let v = unsafe { T::load8(vp.add(c * 8)) };
                    for j in 0..R {
                        a[j][c] = _mm256_fmadd_ps(w[j], v, a[j][c]);
                    }
                }
            }
        }
        for j in 0..R {
            for c in 0..cn {
                unsafe { _mm256_storeu_ps(acc.add(j * hd + (c0 + c) * 8), a[j][c]) };
            }
        }
        c0 += cn;
    }
}

/// Lane `i` of the result is the sum of the eight lanes of `a[i]`.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
fn hsum8(a: [std::arch::x86_64::__m256; 8]) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let t0 = _mm256_hadd_ps(a[0], a[1]);
    let t1 = _mm256_hadd_ps(a[2], a[3]);
    let t2 = _mm256_hadd_ps(a[4], a[5]);
    let t3 = _mm256_hadd_ps(a[6], a[7]);
    let u0 = _mm256_hadd_ps(t0, t1);
    let u1 = _mm256_hadd_ps(t2, t3);
    _mm256_add_ps(
        _mm256_permute2f128_ps(u0, u1, 0x20),
        _mm256_permute2f128_ps(u0, u1, 0x31),
    )
}

/// The sum of the eight lanes, added in the same order as one lane of [`hsum8`]
/// (((x0+x1)+(x2+x3)) + ((x4+x5)+(x6+x7))), so a position's score does not depend on whether
/// it falls in a block of eight or in the tail — nor, then, on where a row's cache is split
/// into a shared prefix and its own positions.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
fn hsum(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let t = _mm256_hadd_ps(v, v);
    let u = _mm256_hadd_ps(t, t);
    _mm_cvtss_f32(_mm_add_ss(
        _mm256_castps256_ps128(u),
        _mm256_extractf128_ps(u, 1),
    ))
}

/// In-place softmax with the vector form of [`crate::bert::exp_neg`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn softmax_avx2(row: &mut [f32]) {
    use std::arch::x86_64::*;
    let mx = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let n8 = row.len() / 8 * 8;
    let mut zv = _mm256_setzero_ps();
    for c in row[..n8].chunks_exact_mut(8) {
        // SAFETY: c holds eight floats.
        unsafe {
            let x = _mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), _mm256_set1_ps(mx));
            let e = exp_neg8(x);
            _mm256_storeu_ps(c.as_mut_ptr(), e);
            zv = _mm256_add_ps(zv, e);
        }
    }
    let mut z = hsum(zv);
    for v in &mut row[n8..] {
        *v = crate::bert::exp_neg(*v - mx);
        z += *v;
    }
    let inv = 1.0 / z;
    row.iter_mut().for_each(|v| *v *= inv);
}

/// `e^x` for `x ≤ 0`, eight lanes: the same range reduction and polynomial as
/// [`crate::bert::exp_neg`].
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
fn exp_neg8(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let x = _mm256_max_ps(x, _mm256_set1_ps(-87.0));
    let magic = _mm256_set1_ps(12582912.0);
    let n = _mm256_sub_ps(
        _mm256_add_ps(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
            magic,
        ),
        magic,
    );
    let r = _mm256_sub_ps(
        _mm256_sub_ps(x, _mm256_mul_ps(n, _mm256_set1_ps(0.693_145_75))),
        _mm256_mul_ps(n, _mm256_set1_ps(1.428_606_8e-6)),
    );
    let mut p = _mm256_set1_ps(1.0 / 720.0);
    for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(c));
    }
    let e = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)),
        23,
    );
    _mm256_mul_ps(p, _mm256_castsi256_ps(e))
}

#[inline(always)]
fn attend_impl<T: Elem>(sh: &AttnShape, q: &[f32], kv: Kv<T>, upto: usize, out: &mut [f32]) {
    let (hd, kvd) = (sh.head_dim, sh.kv_heads * sh.head_dim);
    let rep = sh.heads / sh.kv_heads;
    let mut s = vec![0f32; rep * upto];
    out.fill(0.0);
    for g in 0..sh.kv_heads {
        for (kc, _, p0, n) in kv.pieces(kvd, upto) {
            for p in 0..n {
                let k = &kc[p * kvd + g * hd..p * kvd + (g + 1) * hd];
                for j in 0..rep {
                    let h = g * rep + j;
                    s[j * upto + p0 + p] = dot(&q[h * hd..(h + 1) * hd], k) * sh.scale;
                }
            }
        }
        for j in 0..rep {
            let row = &mut s[j * upto..(j + 1) * upto];
            let mx = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut z = 0f32;
            for v in row.iter_mut() {
                *v = crate::bert::exp_neg(*v - mx);
                z += *v;
            }
            let inv = 1.0 / z;
            row.iter_mut().for_each(|v| *v *= inv);
        }
        for (_, vc, p0, n) in kv.pieces(kvd, upto) {
            for p in 0..n {
                let v = &vc[p * kvd + g * hd..p * kvd + (g + 1) * hd];
                for j in 0..rep {
                    let h = g * rep + j;
                    let w = s[j * upto + p0 + p];
                    for (o, &x) in out[h * hd..(h + 1) * hd].iter_mut().zip(v) {
                        *o += w * x.f32();
                    }
                }
            }
        }
    }
}

#[inline(always)]
fn dot<T: Elem>(a: &[f32], b: &[T]) -> f32 {
    // eight independent accumulators so the loop vectorises
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i].f32();
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y.f32();
    }
    s
}

/// Rotate one head in place: rotate-half (NeoX / Hugging Face) or interleaved (GPT-J / GGUF
/// Llama), with the same f32 tables as the padded path.
fn rope_in_place(x: &mut [f32], cos: &[f32], sin: &[f32], interleaved: bool) {
    let half = cos.len();
    if interleaved {
        for i in 0..half {
            let (x1, x2) = (x[2 * i], x[2 * i + 1]);
            x[2 * i] = x1 * cos[i] - x2 * sin[i];
            x[2 * i + 1] = x1 * sin[i] + x2 * cos[i];
        }
    } else {
        for i in 0..half {
            let (x1, x2) = (x[i], x[i + half]);
            x[i] = x1 * cos[i] - x2 * sin[i];
            x[i + half] = x2 * cos[i] + x1 * sin[i];
        }
    }
}

/// Call each row's hook (if any) on its own `[1, t, d]` slice of the `[n, d]` activation.
fn hook_rows(site: Site, rows: &mut [RaggedRow], offs: &[usize], x: &mut Tensor) -> Result<()> {
    if !rows
        .iter()
        .any(|r| r.hook.as_ref().is_some_and(|h| h.touches(site)))
    {
        return Ok(());
    }
    let mut pieces = Vec::with_capacity(rows.len());
    let mut changed = false;
    for (r, row) in rows.iter_mut().enumerate() {
        let t = offs[r + 1] - offs[r];
        let piece = x.narrow(0, offs[r], t)?;
        match row.hook.as_mut().filter(|h| h.touches(site)) {
            None => pieces.push(piece),
            Some(hook) => {
                let ctx = HookCtx {
                    phase: row.phase,
                    start: row.cache.len,
                    pad: &NO_PAD,
                    prompt_cols: row.cache.prompt_len,
                };
                let orig = piece.unsqueeze(0)?;
                let mut p = orig.clone();
                hook.at(site, &ctx, &mut p)?;
                if p.id() != orig.id() {
                    changed = true;
                }
                pieces.push(p.squeeze(0)?);
            }
        }
    }
    if changed {
        *x = Tensor::cat(&pieces, 0)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut x = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((x >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
            })
            .collect()
    }

    /// Positions `[0, upto)` of layer `l` as read through the cache's two pieces.
    fn read(c: &RowCache, l: usize, upto: usize) -> (Vec<f32>, Vec<f32>) {
        let (mut k, mut v) = (Vec::new(), Vec::new());
        let KvAny::F32(kv) = c.layer(l) else {
            panic!("an f32 cache")
        };
        for (kc, vc, _, n) in kv.pieces(c.width, upto) {
            k.extend_from_slice(&kc[..n * c.width]);
            v.extend_from_slice(&vc[..n * c.width]);
        }
        (k, v)
    }

    #[test]
    fn prompt_prefixes_are_shared_once_and_copied_when_lengths_differ() {
        let (w, len) = (6, 5);
        let k: Vec<Vec<f32>> = (0..2).map(|l| values(len * w, 10 + l)).collect();
        let v: Vec<Vec<f32>> = (0..2).map(|l| values(len * w, 20 + l)).collect();
        let mut donor = RowCache {
            shared: None,
            k: k.iter().map(|x| Buf::F32(x.clone())).collect(),
            v: v.iter().map(|x| Buf::F32(x.clone())).collect(),
            width: w,
            precision: KvPrecision::F32,
            len,
            prompt_len: 4,
        };
        let a = donor.prefix(3);
        let b = donor.prefix(3);
        // one shared copy of positions 0..3, read by the donor and both new rows
        let s = donor.shared.as_ref().expect("the donor's prefix is shared");
        assert!(Arc::ptr_eq(s, a.shared.as_ref().unwrap()));
        assert!(Arc::ptr_eq(s, b.shared.as_ref().unwrap()));
        assert_eq!((a.len, b.len, donor.len), (3, 3, 5));
        assert_eq!(
            f32::of(&donor.k[1]).unwrap().len(),
            2 * w,
            "the donor keeps positions 3..5 as its own"
        );
        // another length: a private copy, through both of the donor's pieces
        let c = donor.prefix(4);
        assert!(c.shared.is_none());
        assert_eq!(c.len, 4);
        for l in 0..2 {
            assert_eq!(read(&donor, l, 5), (k[l].clone(), v[l].clone()));
            assert_eq!(read(&donor, l, 4), read(&c, l, 4));
            let want = (k[l][..3 * w].to_vec(), v[l][..3 * w].to_vec());
            assert_eq!(read(&a, l, 3), want);
            assert_eq!(f32::of(&c.k[l]).unwrap(), &k[l][..4 * w]);
        }
        // the shared bytes are divided among the rows that read them
        let own: usize = a.k.iter().chain(&a.v).map(Buf::bytes).sum();
        assert_eq!(a.bytes() - own, (3 * w * 2 * 2 * 4) / 3);
    }

    #[test]
    fn a_run_of_tokens_attends_exactly_as_each_token_alone() {
        // consecutive tokens of one row in one call (a prompt chunk's task) give bit for bit
        // what one call per token gives, across block edges (128) and cache pieces, both
        // number formats, cold and warm
        for (heads, kv_heads, hd) in [(9, 3, 64), (4, 2, 12), (8, 2, 64)] {
            let sh = AttnShape::new(heads, kv_heads, hd);
            let (qd, kvd) = (heads * hd, kv_heads * hd);
            for (upto, toks) in [(1, 1), (1, 8), (5, 3), (121, 8), (127, 2), (250, 7)] {
                let total = upto + toks - 1;
                let q = values(toks * qd, 7);
                let kc = values(total * kvd, 8);
                let vc = values(total * kvd, 9);
                let kh: Vec<f16> = kc.iter().map(|&x| f16::from_f32(x)).collect();
                let vh: Vec<f16> = vc.iter().map(|&x| f16::from_f32(x)).collect();
                for cut in [0, upto / 2, total] {
                    for cold in [false, true] {
                        let (k0, k1) = kc.split_at(cut * kvd);
                        let (v0, v1) = vc.split_at(cut * kvd);
                        let (h0, h1) = kh.split_at(cut * kvd);
                        let (w0, w1) = vh.split_at(cut * kvd);
                        let caches = [
                            KvAny::F32(Kv {
                                parts: [(k0, v0), (k1, v1)],
                            }),
                            KvAny::F16(Kv {
                                parts: [(h0, w0), (h1, w1)],
                            }),
                        ];
                        for kv in caches {
                            // NaN first: attention writes its output, it does not add to it
                            let mut run = vec![f32::NAN; toks * qd];
                            attend(&sh, &q, kv, upto, &mut run, cold);
                            for i in 0..toks {
                                let mut one = vec![f32::NAN; qd];
                                attend(&sh, &q[i * qd..(i + 1) * qd], kv, upto + i, &mut one, cold);
                                assert!(
                                    one == run[i * qd..(i + 1) * qd],
                                    "{heads}/{kv_heads}×{hd} upto {upto} toks {toks} cut {cut} token {i}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn vector_attention_equals_the_portable_loop() {
        // Head widths 64 and 128 (whole 8-lane chunks), 80 (a partial chunk of values), 12
        // (not a multiple of 8: the portable loop); 1 to 4 query heads per key/value head (runs
        // of 3, 2 and 1 heads); context lengths around the 4-position groups and across
        // 128-position blocks; the cache swept first (a decode step's cold cache) or not.
        for (heads, kv_heads, hd) in [
            (9, 3, 64),
            (4, 4, 128),
            (6, 2, 80),
            (4, 2, 64),
            (8, 2, 64),
            (4, 2, 12),
        ] {
            let sh = AttnShape::new(heads, kv_heads, hd);
            for upto in [1, 7, 8, 9, 17, 300] {
                let q = values(heads * hd, 1);
                let kc = values(upto * kv_heads * hd, 2);
                let vc = values(upto * kv_heads * hd, 3);
                let kvd = kv_heads * hd;
                let whole = Kv {
                    parts: [(&[], &[]), (&kc, &vc)],
                };
                let mut want = vec![0f32; heads * hd];
                attend_impl(&sh, &q, whole, upto, &mut want);
                // the same cache in two pieces (a shared prefix of `cut` positions, the rest
                // the row's own), and a longer cache read only up to `upto`
                let longer = [kc.clone(), values(5 * kvd, 4)].concat();
                let vlonger = [vc.clone(), values(5 * kvd, 5)].concat();
                for cut in [0, 1, upto / 2, upto.saturating_sub(1), upto] {
                    let (k0, k1) = kc.split_at(cut * kvd);
                    let (v0, v1) = vc.split_at(cut * kvd);
                    let split = Kv {
                        parts: [(k0, v0), (k1, v1)],
                    };
                    let (k1, v1) = (&longer[cut * kvd..], &vlonger[cut * kvd..]);
                    let past = Kv {
                        parts: [(k0, v0), (k1, v1)],
                    };
                    let mut first = None;
                    for (kv, cold) in [(whole, false), (split, true), (past, false), (past, true)] {
                        let mut got = vec![0f32; heads * hd];
                        attend_in(&sh, &q, kv, upto, &mut got, cold);
                        // bit for bit the same wherever the cache is split: rows with a shared
                        // prompt prefix generate exactly what they would with their own copy
                        match &first {
                            None => first = Some(got.clone()),
                            Some(f) => assert_eq!(f, &got, "hd {hd} upto {upto} cut {cut}"),
                        }
                        let mut port = vec![0f32; heads * hd];
                        attend_impl(&sh, &q, kv, upto, &mut port);
                        for (i, ((a, p), b)) in got.iter().zip(&port).zip(&want).enumerate() {
                            assert!(
                                (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                                "hd {hd} upto {upto} cut {cut} [{i}]: {a} vs {b}"
                            );
                            assert!(
                                (p - b).abs() <= 1e-5 * b.abs().max(1.0),
                                "portable, hd {hd} upto {upto} cut {cut} [{i}]: {p} vs {b}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn half_precision_cache_reads_exactly_its_rounded_values() {
        // attention over an f16 cache equals, bit for bit, attention over an f32 cache holding
        // the same rounded values (the kernel widens each value exactly, then does the same
        // arithmetic), vector and portable, whole and split
        for (heads, kv_heads, hd) in [(9, 3, 64), (6, 2, 80), (4, 2, 12)] {
            let sh = AttnShape::new(heads, kv_heads, hd);
            let kvd = kv_heads * hd;
            for upto in [1, 9, 300] {
                let q = values(heads * hd, 1);
                let k16: Vec<f16> = values(upto * kvd, 2)
                    .into_iter()
                    .map(f16::from_f32)
                    .collect();
                let v16: Vec<f16> = values(upto * kvd, 3)
                    .into_iter()
                    .map(f16::from_f32)
                    .collect();
                let k32: Vec<f32> = k16.iter().map(|x| x.to_f32()).collect();
                let v32: Vec<f32> = v16.iter().map(|x| x.to_f32()).collect();
                for cut in [0, upto / 2] {
                    let half = Kv {
                        parts: [
                            (&k16[..cut * kvd], &v16[..cut * kvd]),
                            (&k16[cut * kvd..], &v16[cut * kvd..]),
                        ],
                    };
                    let full = Kv {
                        parts: [
                            (&k32[..cut * kvd], &v32[..cut * kvd]),
                            (&k32[cut * kvd..], &v32[cut * kvd..]),
                        ],
                    };
                    let (mut a, mut b) = (vec![0f32; heads * hd], vec![0f32; heads * hd]);
                    attend(&sh, &q, KvAny::F16(half), upto, &mut a, cut > 0);
                    attend(&sh, &q, KvAny::F32(full), upto, &mut b, cut == 0);
                    assert_eq!(a, b, "hd {hd} upto {upto} cut {cut}");
                    let (mut a, mut b) = (vec![0f32; heads * hd], vec![0f32; heads * hd]);
                    attend_impl(&sh, &q, half, upto, &mut a);
                    attend_impl(&sh, &q, full, upto, &mut b);
                    assert_eq!(a, b, "portable, hd {hd} upto {upto} cut {cut}");
                }
            }
        }
        // a cache keeps its format through sharing and private copies
        let mut c = RowCache::with_room(2, 6, KvPrecision::F16, 4, 4, None);
        let w = c.width;
        for l in 0..c.k.len() {
            c.k[l].push(&values(3 * w, 7));
            c.v[l].push(&values(3 * w, 8));
        }
        c.len = 3;
        let shared = c.prefix(2);
        let copy = c.prefix(1);
        for x in [&c, &shared, &copy] {
            assert_eq!(x.precision(), KvPrecision::F16);
            assert!(matches!(x.layer(0), KvAny::F16(_)));
        }
        // two bytes a value: the shared row's part of the prefix is (2 positions × k and v ×
        // 2 layers × w values × 2 bytes) / 2 rows (the donor and it; `copy` is private)
        let own: usize = shared.k.iter().chain(&shared.v).map(Buf::bytes).sum();
        assert_eq!(shared.bytes() - own, 2 * 2 * 2 * w * 2 / 2);
    }
}
