//! Access to the f32 data behind candle CPU storage, shared by the custom ops.

use candle_core::{CpuStorage, Layout, Result, Storage, Tensor};

/// The contiguous f32 slice a layout selects from CPU storage; `op` names the caller in errors.
pub fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: input must be contiguous")))?;
    match s {
        CpuStorage::F32(v) => Ok(&v[a..b]),
        _ => candle_core::bail!("{op}: only f32 is supported"),
    }
}

/// Mutable variant of [`f32_slice`] (in-place ops).
pub fn f32_slice_mut<'a>(s: &'a mut CpuStorage, l: &Layout, op: &str) -> Result<&'a mut [f32]> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: input must be contiguous")))?;
    match s {
        CpuStorage::F32(v) => Ok(&mut v[a..b]),
        _ => candle_core::bail!("{op}: only f32 is supported"),
    }
}

/// Run `f` on a CPU tensor's f32 data without copying it (made contiguous first if needed).
pub fn with_f32<R>(t: &Tensor, op: &str, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let t = t.contiguous()?;
    let (st, l) = t.storage_and_layout();
    let Storage::Cpu(cs) = &*st else {
        candle_core::bail!("{op}: CPU tensors expected");
    };
    f(f32_slice(cs, l, op)?)
}
