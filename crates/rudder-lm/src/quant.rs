//! Quantized matrix × activation kernels for GGUF weights (Q4_0, Q4_1, Q8_0).
//!
//! Activations are quantized on the fly to 8-bit blocks of 32 (scale, int8 values, integer
//! sum). Weights are repacked at load time so that sixteen weight rows are interleaved four
//! bytes at a time: one vector load then holds the same four columns of 8 (AVX2) or 16
//! (AVX-512) rows, one broadcast of four activation bytes pairs with it, and one `vpdpbusd`
//! (or `maddubs` + `madd` without VNNI) advances the dot products of all those rows at once.
//! Each block's partial sums are scaled once per (row group, activation row) instead of once
//! per (row, activation row), and the results of a row group are stored side by side, so no
//! horizontal sums remain. The same kernel serves one-token decoding and multi-token prefill;
//! tiles of 4 (AVX2) or 8 (AVX-512) activation rows reuse every unpacked weight vector.
//!
//! Formats are those of ggml: Q4_0 `{d: f16, qs: [u8; 16]}` → `d·(q−8)`, Q4_1
//! `{d: f16, m: f16, qs: [u8; 16]}` → `d·q+m`, Q8_0 `{d: f16, qs: [i8; 32]}` → `d·q`; in the
//! 4-bit formats byte `j` holds element `j` in its low nibble and element `j+16` in its high one.
//! With the activation block's scale `s` and integer sum `Σq`, every format reduces to
//! `d·s·Σ(u·q) + c·s·Σq` with unsigned weight bytes `u`: Q4_0 `u = q`, `c = −8d`; Q4_1 `u = q`,
//! `c = m`; Q8_0 on VNNI `u = q+128`, `c = −128d` (on plain AVX2 Q8_0 moves the weights' signs
//! onto the activations instead, `c = 0`).

use candle_core::quantized::GgmlDType;
use half::f16;
use rayon::prelude::*;

use crate::team::SendPtr;

pub const QK: usize = 32;
/// Weight rows interleaved in one group.
pub const QG: usize = 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QFormat {
    Q4_0,
    Q4_1,
    Q8_0,
}

impl QFormat {
    pub fn from_ggml(d: GgmlDType) -> Option<Self> {
        match d {
            GgmlDType::Q4_0 => Some(QFormat::Q4_0),
            GgmlDType::Q4_1 => Some(QFormat::Q4_1),
            GgmlDType::Q8_0 => Some(QFormat::Q8_0),
            _ => None,
        }
    }
    pub fn block_bytes(self) -> usize {
        match self {
            QFormat::Q4_0 => 18,
            QFormat::Q4_1 => 20,
            QFormat::Q8_0 => 34,
        }
    }
    fn quant_bytes(self) -> usize {
        match self {
            QFormat::Q4_0 | QFormat::Q4_1 => 16,
            QFormat::Q8_0 => 32,
        }
    }
    fn header_bytes(self) -> usize {
        self.block_bytes() - self.quant_bytes()
    }
}

/// A quantized `[rows, cols]` matrix, repacked at load time.
///
/// Rows are taken sixteen at a time (the last group padded with zero rows). For group `g` and
/// block `b` (index `gb = g·cols/32 + b`) the quants occupy `16 · quant_bytes` bytes at
/// `gb · 16 · quant_bytes`: chunk `j` (bytes `4j..4j+4` of every row's block) is 64 bytes, row
/// `i` of the group at offset `4i` in it. Scales `d` (and Q4_1's minimums `m`) are f16 at
/// `gb · 16 + i`.
#[derive(Clone)]
pub struct QMatrix {
    pub format: QFormat,
    pub rows: usize,
    pub cols: usize,
    groups: usize,
    qs: Vec<u8>,
    d: Vec<u16>,
    m: Vec<u16>,
}

/// Activation rows quantized to 8-bit blocks, cut into tiles of up to `tile` consecutive rows
/// (8 for the AVX-512 kernel, 4 otherwise) laid out for the kernels: within a tile of `t` rows,
/// the four bytes `4j..4j+4` of block `b` of row `k` sit at `((8b + j)·t + k)·4`, so a kernel
/// reaches every row of its tile from one pointer with constant offsets; block scales and
/// scaled sums are `[b][k]`.
struct QActs {
    tile: usize,
    tiles: Vec<QTile>,
}

struct QTile {
    t: usize,
    q: Vec<i8>,
    scale: Vec<f32>,
    /// `scale · Σq` of each block. The weights' offsets multiply it: using the quantized sum
    /// makes the product exactly `W·x̃` for the dequantized `W`, whose error is much smaller
    /// than mixing in the exact sum of `x`.
    sx: Vec<f32>,
}

impl QTile {
    /// Activation value `e` of block `b` of row `k`.
    fn q(&self, k: usize, b: usize, e: usize) -> i8 {
        self.q[((b * 8 + e / 4) * self.t + k) * 4 + e % 4]
    }
}

impl QActs {
    fn new(x: &[f32], n: usize, cols: usize, tile: usize) -> Self {
        let rows: Vec<&[f32]> = x.chunks(cols).collect();
        let one = |ti: usize| {
            let n0 = ti * tile;
            let t = (n - n0).min(tile);
            quantize_tile(&rows[n0..n0 + t], cols)
        };
        let count = n.div_ceil(tile);
        let tiles = if n > 8 {
            (0..count).into_par_iter().map(one).collect()
        } else {
            (0..count).map(one).collect()
        };
        QActs { tile, tiles }
    }
}

fn quantize_tile(rows: &[&[f32]], cols: usize) -> QTile {
    let (t, nb) = (rows.len(), cols / QK);
    let mut tile = QTile {
        t,
        q: vec![0; t * cols],
        scale: vec![0.0; t * nb],
        sx: vec![0.0; t * nb],
    };
    let mut q = [0i8; QK];
    for (k, row) in rows.iter().enumerate() {
        for b in 0..nb {
            let (d, isum) = quantize_block(&row[b * QK..(b + 1) * QK], &mut q);
            tile.scale[b * t + k] = d;
            tile.sx[b * t + k] = d * isum as f32;
            for (j, four) in q.chunks_exact(4).enumerate() {
                let o = ((b * 8 + j) * t + k) * 4;
                tile.q[o..o + 4].copy_from_slice(four);
            }
        }
    }
    tile
}

fn f16_to_f32(b: u16) -> f32 {
    f16::from_bits(b).to_f32()
}

impl QMatrix {
    /// From ggml block data (`rows · cols/32` blocks, row-major).
    pub fn new(format: QFormat, rows: usize, cols: usize, data: Vec<u8>) -> Result<Self, String> {
        if !cols.is_multiple_of(QK) {
            return Err(format!(
                "{cols} columns are not a multiple of the block size {QK}"
            ));
        }
        let nb = cols / QK;
        let want = rows
            .checked_mul(nb)
            .and_then(|n| n.checked_mul(format.block_bytes()))
            .ok_or_else(|| format!("{format:?} [{rows}, {cols}] is too large"))?;
        if data.len() != want {
            return Err(format!(
                "{format:?} [{rows}, {cols}] needs {want} bytes, got {}",
                data.len()
            ));
        }
        let (bb, qb, hb) = (
            format.block_bytes(),
            format.quant_bytes(),
            format.header_bytes(),
        );
        let groups = rows.div_ceil(QG);
        let mut qs = vec![0u8; groups * nb * QG * qb];
        let mut d = vec![0u16; groups * nb * QG];
        let mut m = vec![0u16; if format == QFormat::Q4_1 { d.len() } else { 0 }];
        for (r, row) in data.chunks_exact(nb * bb).enumerate() {
            let (g, i) = (r / QG, r % QG);
            for (b, blk) in row.chunks_exact(bb).enumerate() {
                let gb = g * nb + b;
                d[gb * QG + i] = u16::from_le_bytes([blk[0], blk[1]]);
                if format == QFormat::Q4_1 {
                    m[gb * QG + i] = u16::from_le_bytes([blk[2], blk[3]]);
                }
                let base = gb * QG * qb + i * 4;
                for (j, four) in blk[hb..].chunks_exact(4).enumerate() {
                    qs[base + j * QG * 4..][..4].copy_from_slice(four);
                }
            }
        }
        Ok(QMatrix {
            format,
            rows,
            cols,
            groups,
            qs,
            d,
            m,
        })
    }

    fn nb(&self) -> usize {
        self.cols / QK
    }

    /// Quant byte `p` of row `r`'s block `b`, and the block's `d` and offset coefficient `c`
    /// (see the module notes; Q8_0's byte is the signed value, `c = 0`).
    fn block(&self, r: usize, b: usize) -> (usize, f32, f32) {
        let gb = (r / QG) * self.nb() + b;
        let i = gb * QG + r % QG;
        let d = f16_to_f32(self.d[i]);
        let c = match self.format {
            QFormat::Q4_0 => -8.0 * d,
            QFormat::Q4_1 => f16_to_f32(self.m[i]),
            QFormat::Q8_0 => 0.0,
        };
        (gb * QG * self.format.quant_bytes() + (r % QG) * 4, d, c)
    }

    fn byte(&self, base: usize, p: usize) -> u8 {
        self.qs[base + (p / 4) * QG * 4 + p % 4]
    }

    /// Dequantize row `r` into `out` (length `cols`).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        for (b, chunk) in out.chunks_mut(QK).enumerate() {
            let (base, d, c) = self.block(r, b);
            match self.format {
                QFormat::Q4_0 | QFormat::Q4_1 => {
                    for j in 0..16 {
                        let q = self.byte(base, j);
                        chunk[j] = d * (q & 15) as f32 + c;
                        chunk[j + 16] = d * (q >> 4) as f32 + c;
                    }
                }
                QFormat::Q8_0 => {
                    for (j, v) in chunk.iter_mut().enumerate() {
                        *v = d * (self.byte(base, j) as i8) as f32;
                    }
                }
            }
        }
    }

    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        out.par_chunks_mut(self.cols)
            .enumerate()
            .for_each(|(r, o)| self.dequantize_row(r, o));
        out
    }

    /// `y[n, rows] = x[n, cols] · Wᵀ`, with `x` row-major.
    pub fn matmul(&self, x: &[f32], n: usize) -> Vec<f32> {
        matmul_many(&[self], x, n).pop().unwrap_or_default()
    }

    /// Row groups `g0..g1` against every activation row, written into `y` (`[n, rows]`).
    ///
    /// # Safety
    /// `y` must point to `n · rows` floats, no other thread may write the rows of groups
    /// `g0..g1`, and `kernel` must have been chosen from features detected at run time.
    unsafe fn groups_into(&self, g0: usize, g1: usize, qx: &QActs, y: *mut f32, kernel: Kernel) {
        match kernel {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe { avx::groups_into::<false>(self, g0, g1, qx, y) },
            #[cfg(target_arch = "x86_64")]
            Kernel::AvxVnni => unsafe { avx::groups_into::<true>(self, g0, g1, qx, y) },
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => unsafe { avx512::groups_into(self, g0, g1, qx, y) },
            Kernel::Scalar => {
                for r in g0 * QG..(g1 * QG).min(self.rows) {
                    for (ti, x) in qx.tiles.iter().enumerate() {
                        for k in 0..x.t {
                            let row = ti * qx.tile + k;
                            // SAFETY: row r belongs to this task; row·rows + r < n·rows.
                            unsafe { *y.add(row * self.rows + r) = dot_scalar(self, r, x, k) };
                        }
                    }
                }
            }
        }
    }
}

/// The kernels, fastest available first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kernel {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    AvxVnni,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

/// Every kernel this CPU runs (for tests comparing them).
fn kernels() -> Vec<Kernel> {
    let mut ks = vec![Kernel::Scalar];
    #[cfg(target_arch = "x86_64")]
    {
        if simd_available() {
            ks.push(Kernel::Avx2);
            if is_x86_feature_detected!("avxvnni") {
                ks.push(Kernel::AvxVnni);
            }
            if avx512_available() {
                ks.push(Kernel::Avx512);
            }
        }
    }
    ks
}

/// The kernel used: AVX-512 VNNI, else AVX-VNNI, else AVX2, else portable code. The
/// environment variables `RUDDER_NO_SIMD`, `RUDDER_NO_AVX512` and `RUDDER_NO_VNNI` step down.
fn kernel() -> Kernel {
    static K: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
    *K.get_or_init(|| {
        let ks = kernels();
        let off = |v: &str| std::env::var_os(v).is_some();
        ks.iter()
            .rev()
            .copied()
            .find(|k| match k {
                #[cfg(target_arch = "x86_64")]
                Kernel::Avx512 => !off("RUDDER_NO_AVX512") && !off("RUDDER_NO_VNNI"),
                #[cfg(target_arch = "x86_64")]
                Kernel::AvxVnni => !off("RUDDER_NO_VNNI"),
                _ => true,
            })
            .unwrap_or(Kernel::Scalar)
    })
}

/// Several matrices with the same input width applied to the same activations in one parallel
/// pass (Q/K/V, gate/up): one activation quantization and one fork-join instead of several.
pub fn matmul_many(ms: &[&QMatrix], x: &[f32], n: usize) -> Vec<Vec<f32>> {
    matmul_many_with(ms, x, n, kernel())
}

/// The kernels this CPU runs, by name (`scalar`, `avx2`, `avx-vnni`, `avx512-vnni`), for
/// benchmarks that compare them (`benches/quant_kernels.rs`).
pub fn kernel_names() -> Vec<&'static str> {
    kernels().into_iter().map(kernel_name).collect()
}

fn kernel_name(k: Kernel) -> &'static str {
    match k {
        Kernel::Scalar => "scalar",
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 => "avx2",
        #[cfg(target_arch = "x86_64")]
        Kernel::AvxVnni => "avx-vnni",
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512 => "avx512-vnni",
    }
}

/// [`QMatrix::matmul`] with a named kernel from [`kernel_names`] (`None` if this CPU lacks it).
pub fn matmul_with_kernel(m: &QMatrix, x: &[f32], n: usize, name: &str) -> Option<Vec<f32>> {
    let k = kernels().into_iter().find(|&k| kernel_name(k) == name)?;
    matmul_many_with(&[m], x, n, k).pop()
}

fn matmul_many_with(ms: &[&QMatrix], x: &[f32], n: usize, kern: Kernel) -> Vec<Vec<f32>> {
    let Some(first) = ms.first() else {
        return Vec::new();
    };
    let cols = first.cols;
    assert!(ms.iter().all(|m| m.cols == cols));
    assert_eq!(x.len(), n * cols);
    let tile = match kern {
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512 => 8,
        _ => 4,
    };
    let qx = QActs::new(x, n, cols, tile);
    let mut ys: Vec<Vec<f32>> = ms.iter().map(|m| vec![0f32; n * m.rows]).collect();
    let ptrs: Vec<SendPtr> = ys.iter_mut().map(|y| SendPtr(y.as_mut_ptr())).collect();
    let groups: Vec<usize> = ms.iter().map(|m| m.groups).collect();
    crate::team::for_group_tasks(&groups, n, 1, false, &|i, g0, g1, _, _| {
        // SAFETY: each task owns the rows of groups g0..g1 of output i; the kernel was
        // detected at run time.
        unsafe { ms[i].groups_into(g0, g1, &qx, ptrs[i].0, kern) };
    });
    ys
}

pub fn simd_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static AVX: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVX.get_or_init(|| {
            std::env::var_os("RUDDER_NO_SIMD").is_none()
                && is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

#[cfg(target_arch = "x86_64")]
fn avx512_available() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vnni")
}

/// Quantize 32 activations: scale `max|x|/127`, values rounded half to even (as the vector
/// path does); returns the scale and the integer sum.
fn quantize_block(x: &[f32], q: &mut [i8; QK]) -> (f32, i32) {
    #[cfg(target_arch = "x86_64")]
    if simd_available() {
        // SAFETY: AVX2 was detected; x holds 32 values.
        return unsafe { avx::quantize_block(x, q) };
    }
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
    let mut isum = 0i32;
    for (o, &v) in q.iter_mut().zip(x) {
        let v = (v * inv).round_ties_even() as i32;
        *o = v as i8;
        isum += v;
    }
    (d, isum)
}

/// Portable dot product of weight row `r` with row `k` of a quantized tile.
fn dot_scalar(m: &QMatrix, r: usize, x: &QTile, k: usize) -> f32 {
    let mut acc = 0f32;
    for b in 0..m.nb() {
        let (base, d, c) = m.block(r, b);
        let mut dot = 0i32;
        if m.format == QFormat::Q8_0 {
            for e in 0..QK {
                dot += (m.byte(base, e) as i8) as i32 * x.q(k, b, e) as i32;
            }
        } else {
            for e in 0..16 {
                let w = m.byte(base, e);
                dot += (w & 15) as i32 * x.q(k, b, e) as i32
                    + (w >> 4) as i32 * x.q(k, b, e + 16) as i32;
            }
        }
        acc += d * x.scale[b * x.t + k] * dot as f32 + c * x.sx[b * x.t + k];
    }
    acc
}

/// Activation rows per cache block: about 64 KiB of int8 values, so that a block stays in L2
/// while every weight group of a task passes over it (streaming all activation rows per weight
/// group makes long prefills memory-bound).
fn act_block(cols: usize) -> usize {
    ((65536 / cols.max(1)) / 8 * 8).max(8)
}

const Q4_0: u8 = 0;
const Q4_1: u8 = 1;
const Q8_0: u8 = 2;

fn format_code(f: QFormat) -> u8 {
    match f {
        QFormat::Q4_0 => Q4_0,
        QFormat::Q4_1 => Q4_1,
        QFormat::Q8_0 => Q8_0,
    }
}

/// Every (row group, tile) pair of a task as (group, first activation row of the tile, tile):
/// activation rows in L2-sized blocks ([`act_block`]), each block passed over by every row
/// group of the task. (An iterator, not a callback: the kernel calls stay in the caller's
/// `target_feature` function, where they inline.)
fn tile_walk<'a>(
    m: &QMatrix,
    g0: usize,
    g1: usize,
    qx: &'a QActs,
) -> impl Iterator<Item = (usize, usize, &'a QTile)> + 'a {
    // act_block is a multiple of 8, so blocks start on a tile boundary
    let per_block = act_block(m.cols) / qx.tile;
    let tile = qx.tile;
    qx.tiles
        .chunks(per_block)
        .enumerate()
        .flat_map(move |(b, block)| {
            (g0..g1).flat_map(move |g| {
                block
                    .iter()
                    .enumerate()
                    .map(move |(i, x)| (g, (b * per_block + i) * tile, x))
            })
        })
}

/// Writes `T` rows of kernel results (`W` lanes each, `valid` of them real) at output row
/// `r0` of activation rows `n0..`.
///
/// # Safety
/// `y` holds `[n, rows]` floats and the caller owns rows `r0..r0 + valid`.
#[inline(always)]
unsafe fn store<const W: usize>(
    out: &[[f32; W]],
    y: *mut f32,
    rows: usize,
    n0: usize,
    r0: usize,
    valid: usize,
) {
    for (k, o) in out.iter().enumerate() {
        // SAFETY: see above.
        unsafe { std::ptr::copy_nonoverlapping(o.as_ptr(), y.add((n0 + k) * rows + r0), valid) };
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)] // one index walks several register arrays
mod avx {
    use super::*;
    use std::arch::x86_64::*;

    /// Four activation bytes broadcast to every 32-bit lane.
    #[inline(always)]
    unsafe fn bcast(p: *const i8) -> __m256i {
        unsafe { _mm256_set1_epi32(std::ptr::read_unaligned(p as *const i32)) }
    }

    /// `acc + Σ` of four u8 × i8 products per 32-bit lane.
    #[inline(always)]
    unsafe fn dot4<const VNNI: bool>(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
        unsafe {
            if VNNI {
                _mm256_dpbusd_avx_epi32(acc, u, s)
            } else {
                _mm256_add_epi32(
                    acc,
                    _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)),
                )
            }
        }
    }

    /// Eight weight rows (half `h` of group `g`) against the `T` rows of a tile.
    #[inline(always)]
    unsafe fn half<const T: usize, const F: u8, const VNNI: bool>(
        m: &QMatrix,
        g: usize,
        h: usize,
        x: &QTile,
        out: &mut [[f32; 8]; T],
    ) {
        unsafe {
            let nb = m.nb();
            let qb = if F == Q8_0 { 32 } else { 16 };
            let (xq, xs, xx) = (x.q.as_ptr(), x.scale.as_ptr(), x.sx.as_ptr());
            let mask = _mm256_set1_epi8(15);
            let flip = _mm256_set1_epi8(-128);
            let mut facc = [_mm256_setzero_ps(); T];
            for b in 0..nb {
                let gb = g * nb + b;
                let wp = m.qs.as_ptr().add(gb * QG * qb + h * 32);
                let xb = xq.add(b * 32 * T);
                let mut iacc = [_mm256_setzero_si256(); T];
                if F == Q8_0 {
                    for j in 0..8 {
                        let w = _mm256_loadu_si256(wp.add(j * 64) as *const __m256i);
                        if VNNI {
                            let u = _mm256_xor_si256(w, flip);
                            for k in 0..T {
                                iacc[k] = dot4::<true>(iacc[k], u, bcast(xb.add((j * T + k) * 4)));
                            }
                        } else {
                            let u = _mm256_sign_epi8(w, w);
                            for k in 0..T {
                                let s = _mm256_sign_epi8(bcast(xb.add((j * T + k) * 4)), w);
                                iacc[k] = dot4::<false>(iacc[k], u, s);
                            }
                        }
                    }
                } else {
                    for j in 0..4 {
                        let w = _mm256_loadu_si256(wp.add(j * 64) as *const __m256i);
                        let lo = _mm256_and_si256(w, mask);
                        let hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), mask);
                        for k in 0..T {
                            iacc[k] = dot4::<VNNI>(iacc[k], lo, bcast(xb.add((j * T + k) * 4)));
                            iacc[k] =
                                dot4::<VNNI>(iacc[k], hi, bcast(xb.add(((j + 4) * T + k) * 4)));
                        }
                    }
                }
                let dv = _mm256_cvtph_ps(_mm_loadu_si128(
                    m.d.as_ptr().add(gb * QG + h * 8) as *const __m128i
                ));
                let cv = match F {
                    Q4_0 => _mm256_mul_ps(dv, _mm256_set1_ps(-8.0)),
                    Q4_1 => _mm256_cvtph_ps(_mm_loadu_si128(
                        m.m.as_ptr().add(gb * QG + h * 8) as *const __m128i
                    )),
                    _ => _mm256_mul_ps(dv, _mm256_set1_ps(-128.0)),
                };
                for k in 0..T {
                    let s = _mm256_mul_ps(dv, _mm256_set1_ps(*xs.add(b * T + k)));
                    facc[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc[k]), s, facc[k]);
                    if F != Q8_0 || VNNI {
                        facc[k] = _mm256_fmadd_ps(cv, _mm256_set1_ps(*xx.add(b * T + k)), facc[k]);
                    }
                }
            }
            for k in 0..T {
                _mm256_storeu_ps(out[k].as_mut_ptr(), facc[k]);
            }
        }
    }

    #[inline(always)]
    unsafe fn groups_loop<const F: u8, const VNNI: bool>(
        m: &QMatrix,
        g0: usize,
        g1: usize,
        qx: &QActs,
        y: *mut f32,
    ) {
        unsafe {
            for (g, n0, x) in tile_walk(m, g0, g1, qx) {
                for h in 0..2 {
                    let r0 = g * QG + h * 8;
                    if r0 >= m.rows {
                        break;
                    }
                    let mut out = [[0f32; 8]; 4];
                    match x.t {
                        4 => half::<4, F, VNNI>(m, g, h, x, &mut out),
                        3 => half::<3, F, VNNI>(m, g, h, x, (&mut out[..3]).try_into().unwrap()),
                        2 => half::<2, F, VNNI>(m, g, h, x, (&mut out[..2]).try_into().unwrap()),
                        _ => half::<1, F, VNNI>(m, g, h, x, (&mut out[..1]).try_into().unwrap()),
                    }
                    store(&out[..x.t], y, m.rows, n0, r0, (m.rows - r0).min(8));
                }
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn groups_avx2(m: &QMatrix, g0: usize, g1: usize, qx: &QActs, y: *mut f32) {
        unsafe {
            match format_code(m.format) {
                Q4_0 => groups_loop::<Q4_0, false>(m, g0, g1, qx, y),
                Q4_1 => groups_loop::<Q4_1, false>(m, g0, g1, qx, y),
                _ => groups_loop::<Q8_0, false>(m, g0, g1, qx, y),
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c,avxvnni")]
    unsafe fn groups_vnni(m: &QMatrix, g0: usize, g1: usize, qx: &QActs, y: *mut f32) {
        unsafe {
            match format_code(m.format) {
                Q4_0 => groups_loop::<Q4_0, true>(m, g0, g1, qx, y),
                Q4_1 => groups_loop::<Q4_1, true>(m, g0, g1, qx, y),
                _ => groups_loop::<Q8_0, true>(m, g0, g1, qx, y),
            }
        }
    }

    pub unsafe fn groups_into<const VNNI: bool>(
        m: &QMatrix,
        g0: usize,
        g1: usize,
        qx: &QActs,
        y: *mut f32,
    ) {
        unsafe {
            if VNNI {
                groups_vnni(m, g0, g1, qx, y)
            } else {
                groups_avx2(m, g0, g1, qx, y)
            }
        }
    }

    /// [`super::quantize_block`] with AVX2.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn quantize_block(x: &[f32], q: &mut [i8; QK]) -> (f32, i32) {
        unsafe {
            let absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
            let p = x.as_ptr();
            let v = [
                _mm256_loadu_ps(p),
                _mm256_loadu_ps(p.add(8)),
                _mm256_loadu_ps(p.add(16)),
                _mm256_loadu_ps(p.add(24)),
            ];
            let mut mx = _mm256_and_ps(v[0], absmask);
            for vi in &v[1..] {
                mx = _mm256_max_ps(mx, _mm256_and_ps(*vi, absmask));
            }
            let m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
            let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            let m1 = _mm_max_ss(m2, _mm_shuffle_ps(m2, m2, 1));
            let d = _mm_cvtss_f32(m1) / 127.0;
            let inv = _mm256_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
            let i = [
                _mm256_cvtps_epi32(_mm256_mul_ps(v[0], inv)),
                _mm256_cvtps_epi32(_mm256_mul_ps(v[1], inv)),
                _mm256_cvtps_epi32(_mm256_mul_ps(v[2], inv)),
                _mm256_cvtps_epi32(_mm256_mul_ps(v[3], inv)),
            ];
            let s = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
            let s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
            let s2 = _mm_add_epi32(s4, _mm_unpackhi_epi64(s4, s4));
            let s1 = _mm_add_epi32(s2, _mm_shuffle_epi32(s2, 1));
            // i32 → i16 → i8 packs interleave 128-bit lanes; the permute restores the order.
            let w01 = _mm256_packs_epi32(i[0], i[1]);
            let w23 = _mm256_packs_epi32(i[2], i[3]);
            let perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
            let bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(w01, w23), perm);
            _mm256_storeu_si256(q.as_mut_ptr() as *mut __m256i, bytes);
            (d, _mm_cvtsi128_si32(s1))
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)] // one index walks several register arrays
mod avx512 {
    use super::*;
    use std::arch::x86_64::*;

    #[inline(always)]
    unsafe fn bcast(p: *const i8) -> __m512i {
        unsafe { _mm512_set1_epi32(std::ptr::read_unaligned(p as *const i32)) }
    }

    /// All sixteen weight rows of group `g` against the `T` rows of a tile.
    #[inline(always)]
    unsafe fn group<const T: usize, const F: u8>(
        m: &QMatrix,
        g: usize,
        x: &QTile,
        out: &mut [[f32; 16]; T],
    ) {
        unsafe {
            let nb = m.nb();
            let qb = if F == Q8_0 { 32 } else { 16 };
            let (xq, xs, xx) = (x.q.as_ptr(), x.scale.as_ptr(), x.sx.as_ptr());
            let mask = _mm512_set1_epi8(15);
            let flip = _mm512_set1_epi8(-128);
            let mut facc = [_mm512_setzero_ps(); T];
            for b in 0..nb {
                let gb = g * nb + b;
                let wp = m.qs.as_ptr().add(gb * QG * qb);
                let xb = xq.add(b * 32 * T);
                let mut iacc = [_mm512_setzero_si512(); T];
                if F == Q8_0 {
                    for j in 0..8 {
                        let w = _mm512_loadu_si512(wp.add(j * 64) as *const __m512i);
                        let u = _mm512_xor_si512(w, flip);
                        for k in 0..T {
                            iacc[k] =
                                _mm512_dpbusd_epi32(iacc[k], u, bcast(xb.add((j * T + k) * 4)));
                        }
                    }
                } else {
                    for j in 0..4 {
                        let w = _mm512_loadu_si512(wp.add(j * 64) as *const __m512i);
                        let lo = _mm512_and_si512(w, mask);
                        let hi = _mm512_and_si512(_mm512_srli_epi16(w, 4), mask);
                        for k in 0..T {
                            iacc[k] =
                                _mm512_dpbusd_epi32(iacc[k], lo, bcast(xb.add((j * T + k) * 4)));
                            iacc[k] = _mm512_dpbusd_epi32(
                                iacc[k],
                                hi,
                                bcast(xb.add(((j + 4) * T + k) * 4)),
                            );
                        }
                    }
                }
                let dv = _mm512_cvtph_ps(_mm256_loadu_si256(
                    m.d.as_ptr().add(gb * QG) as *const __m256i
                ));
                let cv = match F {
                    Q4_0 => _mm512_mul_ps(dv, _mm512_set1_ps(-8.0)),
                    Q4_1 => _mm512_cvtph_ps(_mm256_loadu_si256(
                        m.m.as_ptr().add(gb * QG) as *const __m256i
                    )),
                    _ => _mm512_mul_ps(dv, _mm512_set1_ps(-128.0)),
                };
                for k in 0..T {
                    let s = _mm512_mul_ps(dv, _mm512_set1_ps(*xs.add(b * T + k)));
                    facc[k] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iacc[k]), s, facc[k]);
                    facc[k] = _mm512_fmadd_ps(cv, _mm512_set1_ps(*xx.add(b * T + k)), facc[k]);
                }
            }
            for k in 0..T {
                _mm512_storeu_ps(out[k].as_mut_ptr(), facc[k]);
            }
        }
    }

    #[inline(always)]
    unsafe fn groups_loop<const F: u8>(m: &QMatrix, g0: usize, g1: usize, qx: &QActs, y: *mut f32) {
        unsafe {
            for (g, n0, x) in tile_walk(m, g0, g1, qx) {
                let r0 = g * QG;
                let mut out = [[0f32; 16]; 8];
                match x.t {
                    8 => group::<8, F>(m, g, x, &mut out),
                    7 => group::<7, F>(m, g, x, (&mut out[..7]).try_into().unwrap()),
                    6 => group::<6, F>(m, g, x, (&mut out[..6]).try_into().unwrap()),
                    5 => group::<5, F>(m, g, x, (&mut out[..5]).try_into().unwrap()),
                    4 => group::<4, F>(m, g, x, (&mut out[..4]).try_into().unwrap()),
                    3 => group::<3, F>(m, g, x, (&mut out[..3]).try_into().unwrap()),
                    2 => group::<2, F>(m, g, x, (&mut out[..2]).try_into().unwrap()),
                    _ => group::<1, F>(m, g, x, (&mut out[..1]).try_into().unwrap()),
                }
                store(&out[..x.t], y, m.rows, n0, r0, (m.rows - r0).min(QG));
            }
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c,fma")]
    pub unsafe fn groups_into(m: &QMatrix, g0: usize, g1: usize, qx: &QActs, y: *mut f32) {
        unsafe {
            match format_code(m.format) {
                Q4_0 => groups_loop::<Q4_0>(m, g0, g1, qx, y),
                Q4_1 => groups_loop::<Q4_1>(m, g0, g1, qx, y),
                _ => groups_loop::<Q8_0>(m, g0, g1, qx, y),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor, quantized::QTensor};

    fn quantized(dtype: GgmlDType, rows: usize, cols: usize, std: f32) -> (QMatrix, QTensor) {
        let w = Tensor::randn(0f32, std, (rows, cols), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, dtype).unwrap();
        let m = QMatrix::new(
            QFormat::from_ggml(dtype).unwrap(),
            rows,
            cols,
            q.data().unwrap().to_vec(),
        )
        .unwrap();
        (m, q)
    }

    fn activations(n: usize, cols: usize) -> Vec<f32> {
        Tensor::randn(0f32, 1.0, (n, cols), &Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    }

    const DTYPES: [GgmlDType; 3] = [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0];

    #[test]
    fn repacked_weights_dequantize_as_candle_does() {
        // 37 rows: two full groups and a padded one.
        for dtype in DTYPES {
            let (m, q) = quantized(dtype, 37, 576, 1.0);
            let ours = m.dequantize();
            let theirs = q
                .dequantize(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert_eq!(ours.len(), theirs.len());
            for (a, b) in ours.iter().zip(&theirs) {
                assert!((a - b).abs() < 1e-6, "{dtype:?}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn every_kernel_gives_the_portable_result_for_every_tile_size() {
        // Row counts with a partial last group (and a partial half-group), activation counts
        // covering tiles of 8, 4, 3, 2 and 1 rows.
        let ks = kernels();
        eprintln!("kernels on this CPU: {ks:?}");
        for dtype in DTYPES {
            for rows in [37, 16, 8, 3] {
                let (m, _) = quantized(dtype, rows, 96, 1.0);
                for n in [1, 2, 3, 4, 5, 7, 8, 9, 13, 17] {
                    let x = activations(n, 96);
                    // The portable dot product over tiles of 3 rows (any tiling is the same).
                    let qx = QActs::new(&x, n, 96, 3);
                    let want: Vec<f32> = (0..n)
                        .flat_map(|i| {
                            let (tile, k) = (&qx.tiles[i / 3], i % 3);
                            (0..rows)
                                .map(|r| dot_scalar(&m, r, tile, k))
                                .collect::<Vec<_>>()
                        })
                        .collect();
                    for &kern in &ks {
                        let y = matmul_many_with(&[&m], &x, n, kern).pop().unwrap();
                        for (i, (a, b)) in y.iter().zip(&want).enumerate() {
                            assert!(
                                (a - b).abs() <= 1e-4 * b.abs().max(1.0),
                                "{dtype:?} {kern:?} rows {rows} n {n} [{i}]: {a} vs {b}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn products_match_the_dequantized_matrix_within_activation_rounding() {
        let (rows, cols, n) = (256, 576, 5);
        for dtype in DTYPES {
            let (m, _) = quantized(dtype, rows, cols, 0.05);
            let deq = m.dequantize();
            let x = activations(n, cols);
            let y = m.matmul(&x, n);
            let (mut num, mut den) = (0f64, 0f64);
            for i in 0..n {
                for r in 0..rows {
                    let e: f32 = (0..cols).map(|c| x[i * cols + c] * deq[r * cols + c]).sum();
                    num += ((y[i * rows + r] - e) as f64).powi(2);
                    den += (e as f64).powi(2);
                }
            }
            let rel = (num / den).sqrt();
            eprintln!("{dtype:?}: relative error {rel:.5}");
            assert!(rel < 0.01, "{dtype:?}: {rel}");
        }
    }

    #[test]
    fn vector_and_portable_activation_quantization_agree() {
        let x = activations(3, 128);
        let mut q = [0i8; QK];
        for xs in x.chunks(QK) {
            let (d, isum) = quantize_block(xs, &mut q);
            // The portable loop, written out.
            let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert_eq!(d, amax / 127.0);
            for (j, &v) in xs.iter().enumerate() {
                let want = (v * (1.0 / d)).round_ties_even() as i32;
                assert_eq!(want, q[j] as i32, "[{j}]");
            }
            assert_eq!(isum, q.iter().map(|&v| v as i32).sum::<i32>());
        }
        // A zero block quantizes to zeros.
        assert_eq!(quantize_block(&[0f32; 32], &mut q), (0.0, 0));
        assert!(q.iter().all(|&v| v == 0));
        // Tiles hold every row's blocks where the kernels look for them.
        let x = activations(5, 64);
        let acts = QActs::new(&x, 5, 64, 4);
        assert_eq!(acts.tiles.iter().map(|t| t.t).collect::<Vec<_>>(), [4, 1]);
        for i in 0..5 {
            let (tile, k) = (&acts.tiles[i / 4], i % 4);
            for b in 0..2 {
                let (d, isum) = quantize_block(&x[i * 64 + b * 32..i * 64 + b * 32 + 32], &mut q);
                assert_eq!(
                    (tile.scale[b * tile.t + k], tile.sx[b * tile.t + k]),
                    (d, d * isum as f32)
                );
                for (e, &v) in q.iter().enumerate() {
                    assert_eq!(tile.q(k, b, e), v);
                }
            }
        }
    }

    #[test]
    fn long_prefills_are_blocked_without_changing_a_row() {
        // 300 activation rows of width 576 span three L2 blocks (112 rows each, one partial):
        // every row equals the same row multiplied on its own.
        let (rows, cols, n) = (40, 576, 300);
        let (m, _) = quantized(GgmlDType::Q4_1, rows, cols, 0.05);
        let x = activations(n, cols);
        let y = m.matmul(&x, n);
        for i in [0, 7, 111, 112, 113, 224, 250, 299] {
            let yi = m.matmul(&x[i * cols..(i + 1) * cols], 1);
            for r in 0..rows {
                assert!(
                    (y[i * rows + r] - yi[r]).abs() <= 1e-5 * yi[r].abs().max(1.0),
                    "row {i}"
                );
            }
        }
    }

    #[test]
    fn wrong_sizes_are_refused() {
        assert!(QMatrix::new(QFormat::Q4_1, 2, 33, vec![0; 40]).is_err());
        assert!(QMatrix::new(QFormat::Q4_1, 2, 32, vec![0; 39]).is_err());
        assert!(QMatrix::new(QFormat::Q8_0, usize::MAX / 2, 64, vec![]).is_err());
    }
}
