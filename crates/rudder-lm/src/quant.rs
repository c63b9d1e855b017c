//! Quantized matrix × activation kernels for GGUF weights (Q4_0, Q4_1, Q8_0).
//!
//! Activations are quantized on the fly to 8-bit blocks of 32 (scale, int8 values, integer
//! sum), and every weight block is dotted with integer arithmetic
//! (`maddubs`/`madd` on AVX2, a portable loop elsewhere). Rows of the weight matrix are split
//! over the rayon pool; each weight block is unpacked once and reused for a tile of up to four
//! activation rows, so the same kernel serves one-token decoding and multi-token prefill.
//! Formats are those of ggml: Q4_0 `{d: f16, qs: [u8; 16]}` → `d·(q−8)`, Q4_1
//! `{d: f16, m: f16, qs: [u8; 16]}` → `d·q+m`, Q8_0 `{d: f16, qs: [i8; 32]}` → `d·q`; in the
//! 4-bit formats byte `j` holds element `j` in its low nibble and element `j+16` in its high one.

use candle_core::quantized::GgmlDType;
use half::f16;
use rayon::prelude::*;

pub const QK: usize = 32;

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
}

/// A quantized `[rows, cols]` matrix, repacked at load time into three planes so that the
/// kernels convert scales eight at a time: the packed quants of every block, the f16 block
/// scales `d`, and (Q4_1) the f16 block minimums `m`.
#[derive(Clone)]
pub struct QMatrix {
    pub format: QFormat,
    pub rows: usize,
    pub cols: usize,
    qs: Vec<u8>,
    d: Vec<u16>,
    m: Vec<u16>,
}

/// One activation row quantized to 8-bit blocks.
pub struct Q8Row {
    scale: Vec<f32>,
    /// `scale · Σq` of each block. Q4_0's −8 offset and Q4_1's minimum multiply it: using the
    /// quantized sum makes the product exactly `W·x̃` for the dequantized `W`, whose error is
    /// much smaller than mixing in the exact sum of `x`.
    sx: Vec<f32>,
    q: Vec<i8>,
}

fn f16_to_f32(b: u16) -> f32 {
    f16::from_bits(b).to_f32()
}

impl QFormat {
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

impl QMatrix {
    /// From ggml block data (`rows · cols/32` blocks, row-major).
    pub fn new(format: QFormat, rows: usize, cols: usize, data: Vec<u8>) -> Result<Self, String> {
        if cols % QK != 0 {
            return Err(format!(
                "{cols} columns are not a multiple of the block size {QK}"
            ));
        }
        let nblocks = rows * cols / QK;
        let want = nblocks * format.block_bytes();
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
        let mut qs = Vec::with_capacity(nblocks * qb);
        let mut d = Vec::with_capacity(nblocks);
        let mut m = Vec::with_capacity(if format == QFormat::Q4_1 { nblocks } else { 0 });
        for blk in data.chunks_exact(bb) {
            d.push(u16::from_le_bytes([blk[0], blk[1]]));
            if format == QFormat::Q4_1 {
                m.push(u16::from_le_bytes([blk[2], blk[3]]));
            }
            qs.extend_from_slice(&blk[hb..]);
        }
        Ok(QMatrix {
            format,
            rows,
            cols,
            qs,
            d,
            m,
        })
    }

    fn nb(&self) -> usize {
        self.cols / QK
    }

    /// Dequantize row `r` into `out` (length `cols`).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let (nb, qb) = (self.nb(), self.format.quant_bytes());
        for (b, chunk) in out.chunks_mut(QK).enumerate() {
            let i = r * nb + b;
            let q = &self.qs[i * qb..(i + 1) * qb];
            let d = f16_to_f32(self.d[i]);
            match self.format {
                QFormat::Q4_0 | QFormat::Q4_1 => {
                    let (scale, off) = if self.format == QFormat::Q4_0 {
                        (d, -8.0 * d)
                    } else {
                        (d, f16_to_f32(self.m[i]))
                    };
                    for j in 0..16 {
                        chunk[j] = scale * (q[j] & 15) as f32 + off;
                        chunk[j + 16] = scale * (q[j] >> 4) as f32 + off;
                    }
                }
                QFormat::Q8_0 => {
                    for j in 0..32 {
                        chunk[j] = d * (q[j] as i8) as f32;
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

    /// Rows `r0..r1` against every activation row, written into `y` (`[n, rows]`).
    ///
    /// # Safety
    /// `y` must point to `n · rows` floats, and no other thread may write rows `r0..r1`.
    unsafe fn rows_into(&self, r0: usize, r1: usize, qx: &[Q8Row], y: *mut f32, kernel: Kernel) {
        match kernel {
            // SAFETY: the kernel was chosen from features detected at run time.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe { avx::rows_into::<false>(self, r0, r1, qx, y) },
            #[cfg(target_arch = "x86_64")]
            Kernel::Vnni => unsafe { avx::rows_into::<true>(self, r0, r1, qx, y) },
            Kernel::Scalar => {
                for r in r0..r1 {
                    for n0 in (0..qx.len()).step_by(4) {
                        let t = (qx.len() - n0).min(4);
                        let mut out = [0f32; 4];
                        dot_tile_scalar(self, r, &qx[n0..n0 + t], &mut out[..t]);
                        for (k, v) in out[..t].iter().enumerate() {
                            unsafe { *y.add((n0 + k) * self.rows + r) = *v };
                        }
                    }
                }
            }
        }
    }
}

#[derive(Clone, Copy)]
enum Kernel {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Vnni,
}

fn kernel() -> Kernel {
    #[cfg(target_arch = "x86_64")]
    if simd_available() {
        return if vnni_available() {
            Kernel::Vnni
        } else {
            Kernel::Avx2
        };
    }
    Kernel::Scalar
}

/// Several matrices with the same input width applied to the same activations in one parallel
/// pass (Q/K/V, gate/up): one activation quantization and one fork-join instead of several.
pub fn matmul_many(ms: &[&QMatrix], x: &[f32], n: usize) -> Vec<Vec<f32>> {
    let Some(first) = ms.first() else {
        return Vec::new();
    };
    let cols = first.cols;
    assert!(ms.iter().all(|m| m.cols == cols));
    assert_eq!(x.len(), n * cols);
    let qx: Vec<Q8Row> = if n > 8 {
        x.par_chunks(cols).map(quantize_row).collect()
    } else {
        x.chunks(cols).map(quantize_row).collect()
    };
    let mut ys: Vec<Vec<f32>> = ms.iter().map(|m| vec![0f32; n * m.rows]).collect();
    let ptrs: Vec<SyncPtr> = ys.iter_mut().map(|y| SyncPtr(y.as_mut_ptr())).collect();
    let total: usize = ms.iter().map(|m| m.rows).sum();
    // Enough chunks to balance the pool, few enough to keep rayon's overhead small.
    let chunk = (total / (rayon::current_num_threads() * 4)).clamp(16, 512);
    let mut tasks = Vec::new();
    for (i, m) in ms.iter().enumerate() {
        let mut r = 0;
        while r < m.rows {
            tasks.push((i, r, (r + chunk).min(m.rows)));
            r += chunk;
        }
    }
    let kern = kernel();
    let task = |ti: usize| {
        let (i, r0, r1) = tasks[ti];
        // SAFETY: each task owns rows r0..r1 of output i.
        unsafe { ms[i].rows_into(r0, r1, &qx, ptrs[i].0, kern) };
    };
    if n <= 8 {
        // Decoding: many short products with serial work between them.
        crate::team::Team::global().run(tasks.len(), &task);
    } else {
        // Prefill: long products while candle's own ops use rayon too.
        (0..tasks.len()).into_par_iter().for_each(task);
    }
    ys
}

struct SyncPtr(*mut f32);
unsafe impl Sync for SyncPtr {}
unsafe impl Send for SyncPtr {}

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

fn vnni_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static V: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *V.get_or_init(|| {
            std::env::var_os("RUDDER_NO_VNNI").is_none() && is_x86_feature_detected!("avxvnni")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

pub fn quantize_row(x: &[f32]) -> Q8Row {
    let nb = x.len() / QK;
    let mut r = Q8Row {
        scale: vec![0.0; nb],
        sx: vec![0.0; nb],
        q: vec![0; x.len()],
    };
    for b in 0..nb {
        let xs = &x[b * QK..(b + 1) * QK];
        let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
        let mut isum = 0i32;
        for (j, &v) in xs.iter().enumerate() {
            let q = (v * inv).round() as i32;
            r.q[b * QK + j] = q as i8;
            isum += q;
        }
        r.scale[b] = d;
        r.sx[b] = d * isum as f32;
    }
    r
}

/// Offset coefficient of block `i` (multiplies the activation block's `sx`).
fn offset(m: &QMatrix, i: usize) -> f32 {
    match m.format {
        QFormat::Q4_0 => -8.0 * f16_to_f32(m.d[i]),
        QFormat::Q4_1 => f16_to_f32(m.m[i]),
        QFormat::Q8_0 => 0.0,
    }
}

fn dot_tile_scalar(m: &QMatrix, r: usize, xs: &[Q8Row], out: &mut [f32]) {
    let (nb, qb) = (m.nb(), m.format.quant_bytes());
    for (o, x) in out.iter_mut().zip(xs) {
        let mut acc = 0f32;
        for b in 0..nb {
            let i = r * nb + b;
            let w = &m.qs[i * qb..(i + 1) * qb];
            let q = &x.q[b * QK..(b + 1) * QK];
            let mut dot = 0i32;
            if m.format == QFormat::Q8_0 {
                for j in 0..32 {
                    dot += (w[j] as i8) as i32 * q[j] as i32;
                }
            } else {
                for j in 0..16 {
                    dot += (w[j] & 15) as i32 * q[j] as i32 + (w[j] >> 4) as i32 * q[j + 16] as i32;
                }
            }
            acc += f16_to_f32(m.d[i]) * x.scale[b] * dot as f32 + offset(m, i) * x.sx[b];
        }
        *o = acc;
    }
}

#[cfg(target_arch = "x86_64")]
mod avx {
    use super::*;
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// The 32 weights of one block as bytes in element order: unsigned 0..15 for the 4-bit
    /// formats, |w| for Q8_0 (its signs are moved onto the activations).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load_block(fmt: QFormat, p: *const u8) -> (__m256i, __m256i) {
        unsafe {
            if fmt == QFormat::Q8_0 {
                let w = _mm256_loadu_si256(p as *const __m256i);
                (_mm256_sign_epi8(w, w), w)
            } else {
                let raw = _mm_loadu_si128(p as *const __m128i);
                let m = _mm_set1_epi8(15);
                let lo = _mm_and_si128(raw, m);
                let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), m);
                (_mm256_set_m128i(hi, lo), _mm256_setzero_si256())
            }
        }
    }

    /// Integer dot product of one block: 32 u8 × i8 products summed into 8 i32 lanes
    /// (`vpdpbusd` with AVX-VNNI, `maddubs` + `madd` otherwise).
    #[inline(always)]
    unsafe fn block_dot<const VNNI: bool>(w: __m256i, x: __m256i) -> __m256i {
        unsafe {
            if VNNI {
                _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), w, x)
            } else {
                _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1))
            }
        }
    }

    #[inline(always)]
    unsafe fn rows_loop<const VNNI: bool>(
        m: &QMatrix,
        r0: usize,
        r1: usize,
        qx: &[Q8Row],
        y: *mut f32,
    ) {
        unsafe {
            // Activation rows in blocks of about 64 KiB of int8 values, so that a block stays
            // in L2 while every weight row of the task passes over it (streaming all rows per
            // weight row made long prefills memory-bound: 10× slower at 5,000 rows).
            let n_all = qx.len();
            let cols = m.nb() * QK;
            let nblock = ((65536 / cols.max(1)) / 8 * 8).max(8);
            let mut nb0 = 0;
            while nb0 < n_all {
                let nb1 = (nb0 + nblock).min(n_all);
                rows_block::<VNNI>(m, r0, r1, qx, nb0, nb1, y);
                nb0 = nb1;
            }
        }
    }

    #[inline(always)]
    unsafe fn rows_block<const VNNI: bool>(
        m: &QMatrix,
        r0: usize,
        r1: usize,
        qx: &[Q8Row],
        nb0: usize,
        n: usize,
        y: *mut f32,
    ) {
        unsafe {
            for r in r0..r1 {
                let mut n0 = nb0;
                while n0 < n {
                    let t = if n - n0 >= 8 { 8 } else { (n - n0).min(4) };
                    let mut out = [0f32; 8];
                    let xs = &qx[n0..n0 + t];
                    match t {
                        8 => tile::<8, VNNI>(m, r, xs, &mut out),
                        4 => tile::<4, VNNI>(m, r, xs, &mut out),
                        3 => tile::<3, VNNI>(m, r, xs, &mut out),
                        2 => tile::<2, VNNI>(m, r, xs, &mut out),
                        _ => tile::<1, VNNI>(m, r, xs, &mut out),
                    }
                    for k in 0..t {
                        *y.add((n0 + k) * m.rows + r) = out[k];
                    }
                    n0 += t;
                }
            }
        }
    }

    /// One weight row against `T` activation rows: each weight block is unpacked once and
    /// dotted with the `T` rows, whose pointers, partial sums and combined scales stay in
    /// registers (`T` is a constant, so the loops unroll).
    #[inline(always)]
    unsafe fn tile<const T: usize, const VNNI: bool>(
        m: &QMatrix,
        r: usize,
        xs: &[Q8Row],
        out: &mut [f32; 8],
    ) {
        unsafe {
            let fmt = m.format;
            let (nb, qb) = (m.nb(), fmt.quant_bytes());
            let base = r * nb;
            let qp = m.qs.as_ptr().add(base * qb);
            let mut xq = [std::ptr::null::<i8>(); T];
            let mut xsc = [std::ptr::null::<f32>(); T];
            let mut xsx = [std::ptr::null::<f32>(); T];
            for k in 0..T {
                let x = xs.get_unchecked(k);
                xq[k] = x.q.as_ptr();
                xsc[k] = x.scale.as_ptr();
                xsx[k] = x.sx.as_ptr();
            }
            let mut acc = [_mm256_setzero_ps(); T];
            let mut eacc = [_mm256_setzero_ps(); T];
            let mut s = [[0f32; 8]; T];
            let groups = nb / 8;
            for g in 0..groups {
                let b0 = g * 8;
                let dv = _mm256_cvtph_ps(_mm_loadu_si128(
                    m.d.as_ptr().add(base + b0) as *const __m128i
                ));
                let cv = match fmt {
                    QFormat::Q4_0 => _mm256_mul_ps(dv, _mm256_set1_ps(-8.0)),
                    QFormat::Q4_1 => _mm256_cvtph_ps(_mm_loadu_si128(
                        m.m.as_ptr().add(base + b0) as *const __m128i
                    )),
                    QFormat::Q8_0 => _mm256_setzero_ps(),
                };
                for k in 0..T {
                    let sv = _mm256_mul_ps(dv, _mm256_loadu_ps(xsc[k].add(b0)));
                    _mm256_storeu_ps(s[k].as_mut_ptr(), sv);
                    eacc[k] = _mm256_fmadd_ps(cv, _mm256_loadu_ps(xsx[k].add(b0)), eacc[k]);
                }
                for j in 0..8 {
                    let b = b0 + j;
                    let (w, sign) = load_block(fmt, qp.add(b * qb));
                    for k in 0..T {
                        let mut xv = _mm256_loadu_si256(xq[k].add(b * QK) as *const __m256i);
                        if fmt == QFormat::Q8_0 {
                            xv = _mm256_sign_epi8(xv, sign);
                        }
                        let p = block_dot::<VNNI>(w, xv);
                        acc[k] = _mm256_fmadd_ps(
                            _mm256_cvtepi32_ps(p),
                            _mm256_broadcast_ss(&s[k][j]),
                            acc[k],
                        );
                    }
                }
            }
            let mut tail = [0f32; T];
            for b in groups * 8..nb {
                let i = base + b;
                let d = f16_to_f32(*m.d.get_unchecked(i));
                let c = offset(m, i);
                let (w, sign) = load_block(fmt, qp.add(b * qb));
                for k in 0..T {
                    let mut xv = _mm256_loadu_si256(xq[k].add(b * QK) as *const __m256i);
                    if fmt == QFormat::Q8_0 {
                        xv = _mm256_sign_epi8(xv, sign);
                    }
                    let p = block_dot::<VNNI>(w, xv);
                    acc[k] = _mm256_fmadd_ps(
                        _mm256_cvtepi32_ps(p),
                        _mm256_set1_ps(d * *xsc[k].add(b)),
                        acc[k],
                    );
                    tail[k] += c * *xsx[k].add(b);
                }
            }
            for k in 0..T {
                out[k] = hsum(acc[k]) + hsum(eacc[k]) + tail[k];
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn rows_avx2(m: &QMatrix, r0: usize, r1: usize, qx: &[Q8Row], y: *mut f32) {
        unsafe { rows_loop::<false>(m, r0, r1, qx, y) }
    }

    #[target_feature(enable = "avx2,fma,f16c,avxvnni")]
    unsafe fn rows_vnni(m: &QMatrix, r0: usize, r1: usize, qx: &[Q8Row], y: *mut f32) {
        unsafe { rows_loop::<true>(m, r0, r1, qx, y) }
    }

    pub unsafe fn rows_into<const VNNI: bool>(
        m: &QMatrix,
        r0: usize,
        r1: usize,
        qx: &[Q8Row],
        y: *mut f32,
    ) {
        unsafe {
            if VNNI {
                rows_vnni(m, r0, r1, qx, y)
            } else {
                rows_avx2(m, r0, r1, qx, y)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor, quantized::QTensor};

    fn check(dtype: GgmlDType) {
        check_n(dtype, 6);
        check_n(dtype, 1);
        // 8-row tiles, then 4, then single rows
        check_n(dtype, 13);
    }

    fn check_n(dtype: GgmlDType, n: usize) {
        let (rows, cols) = (37, 576);
        let w = Tensor::randn(0f32, 1.0, (rows, cols), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, dtype).unwrap();
        let m = QMatrix::new(
            QFormat::from_ggml(dtype).unwrap(),
            rows,
            cols,
            q.data().unwrap().to_vec(),
        )
        .unwrap();
        // Dequantization agrees with candle's.
        let ours = m.dequantize();
        let theirs = q
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (a, b) in ours.iter().zip(&theirs) {
            assert!((a - b).abs() < 1e-6, "{dtype:?}: {a} vs {b}");
        }
        // Both kernels agree with the f32 product of the dequantized matrix within 8-bit
        // activation rounding.
        let x: Vec<f32> = (0..n * cols)
            .map(|i| ((i * 7919 % 101) as f32 / 50.0) - 1.0)
            .collect();
        let exact: Vec<f32> = (0..n)
            .flat_map(|i| {
                let (x, ours) = (&x, &ours);
                (0..rows).map(move |r| {
                    (0..cols)
                        .map(|c| x[i * cols + c] * ours[r * cols + c])
                        .sum::<f32>()
                })
            })
            .collect();
        let y = m.matmul(&x, n);
        let qx: Vec<Q8Row> = x.chunks(cols).map(quantize_row).collect();
        for r in 0..rows {
            let mut s = vec![0f32; n];
            dot_tile_scalar(&m, r, &qx[..n.min(4)], &mut s[..n.min(4)]);
            for k in 0..n.min(4) {
                assert!(
                    (s[k] - y[k * rows + r]).abs() < 1e-3,
                    "simd vs scalar {dtype:?}"
                );
            }
        }
        let scale = exact.iter().fold(0f32, |a, v| a.max(v.abs()));
        for (a, b) in y.iter().zip(&exact) {
            assert!((a - b).abs() < 0.02 * scale, "{dtype:?}: {a} vs {b}");
        }
    }

    #[test]
    fn kernels_match_dequantized_products() {
        check(GgmlDType::Q4_0);
        check(GgmlDType::Q4_1);
        check(GgmlDType::Q8_0);
    }
}

#[cfg(test)]
mod precision {
    use super::*;
    use candle_core::{Device, Tensor, quantized::QTensor};

    fn quantized(dtype: GgmlDType, rows: usize, cols: usize) -> QMatrix {
        let w = Tensor::randn(0f32, 0.05, (rows, cols), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, dtype).unwrap();
        QMatrix::new(
            QFormat::from_ggml(dtype).unwrap(),
            rows,
            cols,
            q.data().unwrap().to_vec(),
        )
        .unwrap()
    }

    fn activations(n: usize, cols: usize) -> Vec<f32> {
        Tensor::randn(0f32, 1.0, (n, cols), &Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    }

    #[test]
    fn long_prefills_are_blocked_without_changing_a_row() {
        // 300 activation rows of width 576 span three L2 blocks (112 rows each, one partial):
        // every row equals the same row multiplied on its own.
        let (rows, cols, n) = (40, 576, 300);
        let m = quantized(GgmlDType::Q4_1, rows, cols);
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
    fn relative_error_of_int8_activations_is_small() {
        let (rows, cols, n) = (256, 576, 5);
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let m = quantized(dtype, rows, cols);
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
}
