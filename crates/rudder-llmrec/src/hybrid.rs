//! LLaRA's hybrid prompts (llmrec-seeds.md §2.3): every history and candidate title is
//! followed by a marker token whose input embedding is replaced by a trainable projection of
//! the item's frozen SASRec embedding, `t1 [HistoryEmb], t2 [HistoryEmb], …` and
//! `c1 [CansEmb], …`.
//!
//! - [`attach_hybrid`] renders an example's hybrid prompt with the same template as its
//!   text-only prompt and records where each marker sits and which item it stands for. The
//!   text between markers is tokenized piece by piece, as a tokenizer with added marker tokens
//!   splits it; the marker's own token id is irrelevant (its embedding is replaced), rudder
//!   uses the pad id.
//! - [`Projector`]: `Linear(d_rec → d) → GELU → Linear(d → d)` (the reference's
//!   `64 → 4096 → 4096` for a 4096-wide model).
//! - [`Splice`]: the hook that writes the projected vectors over the embeddings at the marker
//!   positions (`blocks.0.hook_resid_pre`), differentiably, so the projector learns.

use candle_core::{DType, Device, Tensor, Var};
use rand::Rng;
use rudder_lm::hooks::{Hook, HookCtx, Site};
use rudder_lm::tokenizer::Tok;

use crate::data::{Catalog, RecExample};
use crate::lmdata::{LmExample, Tokenize};
use crate::prompts::Templates;
use crate::{LlmrecError, Result};

/// The hybrid form of an example.
#[derive(Clone, Debug, PartialEq)]
pub struct Hybrid {
    pub prompt: Vec<u32>,
    /// `(prompt position, item id)` of every marker, history first, then candidates.
    pub slots: Vec<(usize, u32)>,
    /// The history (oldest first) for the sequential model's user vector.
    pub history: Vec<u32>,
}

const MARK: char = '\u{E000}';

/// Add the hybrid prompt to every tokenized example (`lm[i]` is `rec[i]` tokenized with the same
/// `opt`, so the same template is drawn).
pub fn attach_hybrid(
    lm: &mut [LmExample],
    rec: &[RecExample],
    catalog: &Catalog,
    templates: &Templates,
    tok: &Tok,
    ctx: usize,
    opt: &Tokenize,
) -> Result<()> {
    if lm.len() != rec.len() {
        return Err(LlmrecError::Config(format!(
            "{} tokenized examples for {} records",
            lm.len(),
            rec.len()
        )));
    }
    let marker = tok.pad;
    for (i, (l, e)) in lm.iter_mut().zip(rec).enumerate() {
        let with_mark = |id: u32| format!("{} {MARK}", catalog.title(id));
        let hist: Vec<String> = e.history.iter().map(|&h| with_mark(h)).collect();
        let cands: Vec<String> = e.candidates.iter().map(|&c| with_mark(c)).collect();
        let hr: Vec<&str> = hist.iter().map(String::as_str).collect();
        let cr: Vec<&str> = cands.iter().map(String::as_str).collect();
        let text = templates.render(templates.pick(opt.seed, i), &hr, &cr);
        let pieces: Vec<&str> = text.split(MARK).collect();
        let items: Vec<u32> = e.history.iter().chain(&e.candidates).copied().collect();
        if pieces.len() != items.len() + 1 {
            return Err(LlmrecError::Input(format!(
                "example {i}: {} markers for {} items (a title contains U+E000?)",
                pieces.len() - 1,
                items.len()
            )));
        }
        let mut prompt = Vec::new();
        let mut slots = Vec::with_capacity(items.len());
        for (k, p) in pieces.iter().enumerate() {
            if !p.is_empty() {
                prompt.extend(tok.encode(p, k == 0)?);
            } else if k == 0 {
                prompt.extend(tok.encode("", true)?);
            }
            if k < items.len() {
                slots.push((prompt.len(), items[k]));
                prompt.push(marker);
            }
        }
        let longest = l.responses.iter().map(Vec::len).max().unwrap_or(0);
        if prompt.len() > opt.max_prompt_tokens || prompt.len() + longest > ctx {
            return Err(LlmrecError::Input(format!(
                "example {i}: the hybrid prompt has {} tokens, over --max-prompt-tokens {} or the context {ctx} with its answer; shorten the history",
                prompt.len(),
                opt.max_prompt_tokens
            )));
        }
        l.hybrid = Some(Hybrid {
            prompt,
            slots,
            history: e.history.clone(),
        });
    }
    Ok(())
}

/// `Linear(d_rec → d) → GELU(erf) → Linear(d → d)`, PyTorch's default initialisation.
pub struct Projector {
    pub w1: Var,
    pub b1: Var,
    pub w2: Var,
    pub b2: Var,
}

impl Projector {
    pub fn new(d_rec: usize, d: usize, seed: u64) -> Result<Projector> {
        let mut rng = rudder_data::rng::stream(seed, &[0x960_7EC]);
        let mut u = |n: usize, fan_in: usize, shape: &[usize]| -> Result<Var> {
            let b = 1.0 / (fan_in as f64).sqrt();
            let v: Vec<f32> = (0..n).map(|_| rng.random_range(-b..b) as f32).collect();
            Ok(Var::from_tensor(&Tensor::from_vec(
                v,
                shape,
                &Device::Cpu,
            )?)?)
        };
        Ok(Projector {
            w1: u(d * d_rec, d_rec, &[d, d_rec])?,
            b1: u(d, d_rec, &[d])?,
            w2: u(d * d, d, &[d, d])?,
            b2: u(d, d, &[d])?,
        })
    }

    /// `[m, d_rec] → [m, d]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = x
            .matmul(&self.w1.as_tensor().t()?)?
            .broadcast_add(self.b1.as_tensor())?
            .gelu_erf()?;
        Ok(h.matmul(&self.w2.as_tensor().t()?)?
            .broadcast_add(self.b2.as_tensor())?)
    }

    pub fn params(&self) -> Vec<(String, Var)> {
        vec![
            ("projector.0.weight".into(), self.w1.clone()),
            ("projector.0.bias".into(), self.b1.clone()),
            ("projector.2.weight".into(), self.w2.clone()),
            ("projector.2.bias".into(), self.b2.clone()),
        ]
    }
}

/// Writes `vectors[k]` over the input embedding of row `r` at prompt position `p` for every
/// `(p, k)` in `rows[r]` (positions count from the row's first real token).
pub struct Splice {
    pub rows: Vec<Vec<(usize, usize)>>,
    /// `[m, d]`
    pub vectors: Tensor,
}

impl Hook for Splice {
    fn touches(&self, site: Site) -> bool {
        site == Site::ResidPre(0)
    }

    fn at(&mut self, site: Site, ctx: &HookCtx, x: &mut Tensor) -> rudder_lm::Result<()> {
        if site != Site::ResidPre(0) {
            return Ok(());
        }
        let (b, t, d) = x.dims3()?;
        let inside = |r: usize, p: usize| {
            let c = p + ctx.pad[r];
            (c >= ctx.start && c < ctx.start + t).then(|| c - ctx.start)
        };
        if b != self.rows.len() {
            // a pass over other rows (answers branching from a prompt cache): it must come
            // after every marker
            if ctx.start < ctx.prompt_cols {
                return Err(rudder_lm::LmError::Hook(format!(
                    "splice: {b} rows in the pass, {} prompts",
                    self.rows.len()
                )));
            }
            return Ok(());
        }
        let m = self.vectors.dim(0)?;
        let mut place = vec![0f32; b * t * m];
        let mut keep = vec![1f32; b * t];
        let mut any = false;
        for (r, slots) in self.rows.iter().enumerate() {
            for &(p, k) in slots {
                if let Some(c) = inside(r, p) {
                    place[(r * t + c) * m + k] = 1.0;
                    keep[r * t + c] = 0.0;
                    any = true;
                }
            }
        }
        if !any {
            return Ok(());
        }
        let dev = Device::Cpu;
        let place = Tensor::from_vec(place, (b * t, m), &dev)?;
        let keep = Tensor::from_vec(keep, (b * t, 1), &dev)?.to_dtype(DType::F32)?;
        let flat = x.reshape((b * t, d))?;
        let y = (flat.broadcast_mul(&keep)? + place.matmul(&self.vectors)?)?;
        *x = y.reshape((b, t, d))?;
        Ok(())
    }
}
