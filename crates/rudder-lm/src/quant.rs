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

/// A quantized `[rows, cols]` matrix in one of the supported block formats.
#[derive(Clone)]
pub struct QMatrix {
    pub format: QFormat,
    pub rows: usize,
    pub cols: usize,
    data: Vec<u8>,
}

/// One activation row quantized to 8-bit blocks.
pub struct Q8Row {
    scale: Vec<f32>,
    /// Integer sum of each block's quantized values (Q4_0's −8 offset and Q4_1's minimum:
    /// using the quantized sum makes the product exactly `W·x̃` for the dequantized `W`, whose
    /// error is much smaller than mixing in the exact sum of `x`).
    isum: Vec<i32>,
    q: Vec<i8>,
}

fn f16_at(b: &[u8], o: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[o], b[o + 1]])).to_f32()
}

impl QMatrix {
    pub fn new(format: QFormat, rows: usize, cols: usize, data: Vec<u8>) -> Result<Self, String> {
        if cols % QK != 0 {
            return Err(format!("{cols} columns are not a multiple of the block size {QK}"));
        }
        let want = rows * cols / QK * format.block_bytes();
        if data.len() != want {
            return Err(format!("{format:?} [{rows}, {cols}] needs {want} bytes, got {}", data.len()));
        }
        Ok(QMatrix { format, rows, cols, data })
    }

    fn row_bytes(&self) -> usize {
        self.cols / QK * self.format.block_bytes()
    }

    /// Dequantize row `r` into `out` (length `cols`).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let bb = self.format.block_bytes();
        let row = &self.data[r * self.row_bytes()..(r + 1) * self.row_bytes()];
        for (b, chunk) in out.chunks_mut(QK).enumerate() {
            let blk = &row[b * bb..(b + 1) * bb];
            match self.format {
                QFormat::Q4_0 => {
                    let d = f16_at(blk, 0);
                    for j in 0..16 {
                        chunk[j] = d * ((blk[2 + j] & 15) as f32 - 8.0);
                        chunk[j + 16] = d * ((blk[2 + j] >> 4) as f32 - 8.0);
                    }
                }
                QFormat::Q4_1 => {
                    let (d, m) = (f16_at(blk, 0), f16_at(blk, 2));
                    for j in 0..16 {
                        chunk[j] = d * (blk[4 + j] & 15) as f32 + m;
                        chunk[j + 16] = d * (blk[4 + j] >> 4) as f32 + m;
                    }
                }
                QFormat::Q8_0 => {
                    let d = f16_at(blk, 0);
                    for j in 0..32 {
                        chunk[j] = d * (blk[2 + j] as i8) as f32;
                    }
                }
            }
        }
    }

    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        out.par_chunks_mut(self.cols).enumerate().for_each(|(r, o)| self.dequantize_row(r, o));
        out
    }

    /// `y[n, rows] = x[n, cols] · Wᵀ`, with `x` row-major.
    pub fn matmul(&self, x: &[f32], n: usize) -> Vec<f32> {
        assert_eq!(x.len(), n * self.cols);
        let qx: Vec<Q8Row> = if n > 8 {
            x.par_chunks(self.cols).map(quantize_row).collect()
        } else {
            x.chunks(self.cols).map(quantize_row).collect()
        };
        let mut y = vec![0f32; n * self.rows];
        let rows = self.rows;
        let ptr = SyncPtr(y.as_mut_ptr());
        // Enough chunks to balance the pool, few enough to keep rayon's overhead small.
        let chunk = (rows / (rayon::current_num_threads() * 4)).clamp(8, 256);
        let avx2 = simd_available();
        (0..rows.div_ceil(chunk)).into_par_iter().for_each(|c| {
            let p = &ptr;
            let r0 = c * chunk;
            let r1 = (r0 + chunk).min(rows);
            for r in r0..r1 {
                let row = &self.data[r * self.row_bytes()..(r + 1) * self.row_bytes()];
                for n0 in (0..n).step_by(4) {
                    let t = (n - n0).min(4);
                    let mut out = [0f32; 4];
                    self.dot_tile(row, &qx[n0..n0 + t], &mut out[..t], avx2);
                    for (k, v) in out[..t].iter().enumerate() {
                        // SAFETY: each (token, row) cell is written by exactly one task.
                        unsafe { *p.0.add((n0 + k) * rows + r) = *v };
                    }
                }
            }
        });
        y
    }

    fn dot_tile(&self, row: &[u8], xs: &[Q8Row], out: &mut [f32], avx2: bool) {
        #[cfg(target_arch = "x86_64")]
        if avx2 {
            // SAFETY: AVX2 and FMA were detected at run time.
            unsafe { avx::dot_tile(self.format, row, xs, out) };
            return;
        }
        let _ = avx2;
        dot_tile_scalar(self.format, row, xs, out);
    }
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
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

pub fn quantize_row(x: &[f32]) -> Q8Row {
    let nb = x.len() / QK;
    let mut r = Q8Row { scale: vec![0.0; nb], isum: vec![0; nb], q: vec![0; x.len()] };
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
        r.isum[b] = isum;
    }
    r
}

fn dot_tile_scalar(format: QFormat, row: &[u8], xs: &[Q8Row], out: &mut [f32]) {
    let bb = format.block_bytes();
    let nb = row.len() / bb;
    for (o, x) in out.iter_mut().zip(xs) {
        let mut acc = 0f32;
        for b in 0..nb {
            let blk = &row[b * bb..(b + 1) * bb];
            let q = &x.q[b * QK..(b + 1) * QK];
            let dx = x.scale[b];
            match format {
                QFormat::Q4_0 | QFormat::Q4_1 => {
                    let off = if format == QFormat::Q4_0 { 2 } else { 4 };
                    let mut dot = 0i32;
                    for j in 0..16 {
                        dot += (blk[off + j] & 15) as i32 * q[j] as i32;
                        dot += (blk[off + j] >> 4) as i32 * q[j + 16] as i32;
                    }
                    let d = f16_at(blk, 0);
                    if format == QFormat::Q4_0 {
                        acc += d * dx * (dot - 8 * x.isum[b]) as f32;
                    } else {
                        acc += d * dx * dot as f32 + f16_at(blk, 2) * dx * x.isum[b] as f32;
                    }
                }
                QFormat::Q8_0 => {
                    let mut dot = 0i32;
                    for j in 0..32 {
                        dot += (blk[2 + j] as i8) as i32 * q[j] as i32;
                    }
                    acc += f16_at(blk, 0) * dx * dot as f32;
                }
            }
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
    unsafe fn hsum(v: __m256) -> f32 {
        {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
        }
    }

    /// Unsigned 4-bit weights (0..15) of one block as 32 bytes in element order.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn unpack4(p: *const u8) -> __m256i {
        unsafe {
        let raw = _mm_loadu_si128(p as *const __m128i);
        let m = _mm_set1_epi8(15);
        let lo = _mm_and_si128(raw, m);
        let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), m);
        _mm256_set_m128i(hi, lo)
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_tile(format: QFormat, row: &[u8], xs: &[Q8Row], out: &mut [f32]) {
        unsafe {
        let bb = format.block_bytes();
        let nb = row.len() / bb;
        let ones = _mm256_set1_epi16(1);
        let t = xs.len();
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut extra = [0f32; 4];
        let rp = row.as_ptr();
        for b in 0..nb {
            let blk = rp.add(b * bb);
            let d = f16::from_bits(u16::from_le_bytes([*blk, *blk.add(1)])).to_f32();
            match format {
                QFormat::Q4_0 | QFormat::Q4_1 => {
                    let (w, m) = if format == QFormat::Q4_0 {
                        (unpack4(blk.add(2)), 0.0)
                    } else {
                        let m = f16::from_bits(u16::from_le_bytes([*blk.add(2), *blk.add(3)])).to_f32();
                        (unpack4(blk.add(4)), m)
                    };
                    for k in 0..t {
                        let x = xs.get_unchecked(k);
                        let xv = _mm256_loadu_si256(x.q.as_ptr().add(b * QK) as *const __m256i);
                        let p = _mm256_madd_epi16(_mm256_maddubs_epi16(w, xv), ones);
                        let s = d * *x.scale.get_unchecked(b);
                        acc[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(s), acc[k]);
                        extra[k] += if format == QFormat::Q4_0 {
                            -8.0 * s * *x.isum.get_unchecked(b) as f32
                        } else {
                            m * *x.scale.get_unchecked(b) * *x.isum.get_unchecked(b) as f32
                        };
                    }
                }
                QFormat::Q8_0 => {
                    let w = _mm256_loadu_si256(blk.add(2) as *const __m256i);
                    let aw = _mm256_sign_epi8(w, w);
                    for k in 0..t {
                        let x = xs.get_unchecked(k);
                        let xv = _mm256_loadu_si256(x.q.as_ptr().add(b * QK) as *const __m256i);
                        let sx = _mm256_sign_epi8(xv, w);
                        let p = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, sx), ones);
                        let s = d * *x.scale.get_unchecked(b);
                        acc[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(s), acc[k]);
                    }
                }
            }
        }
        for k in 0..t {
            out[k] = hsum(acc[k]) + extra[k];
        }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor, quantized::QTensor};

    fn check(dtype: GgmlDType) {
        let (rows, cols, n) = (37, 96, 6);
        let w = Tensor::randn(0f32, 1.0, (rows, cols), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, dtype).unwrap();
        let m = QMatrix::new(QFormat::from_ggml(dtype).unwrap(), rows, cols, q.data().unwrap().to_vec()).unwrap();
        // Dequantization agrees with candle's.
        let ours = m.dequantize();
        let theirs = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (a, b) in ours.iter().zip(&theirs) {
            assert!((a - b).abs() < 1e-6, "{dtype:?}: {a} vs {b}");
        }
        // Both kernels agree with the f32 product of the dequantized matrix within 8-bit
        // activation rounding.
        let x: Vec<f32> = (0..n * cols).map(|i| ((i * 7919 % 101) as f32 / 50.0) - 1.0).collect();
        let exact: Vec<f32> = (0..n)
            .flat_map(|i| {
                let (x, ours) = (&x, &ours);
                (0..rows).map(move |r| (0..cols).map(|c| x[i * cols + c] * ours[r * cols + c]).sum::<f32>())
            })
            .collect();
        let y = m.matmul(&x, n);
        let qx: Vec<Q8Row> = x.chunks(cols).map(quantize_row).collect();
        for r in 0..rows {
            let row = &m.data[r * m.row_bytes()..(r + 1) * m.row_bytes()];
            let mut s = vec![0f32; n];
            dot_tile_scalar(m.format, row, &qx, &mut s[..n.min(4)]);
            for k in 0..n.min(4) {
                assert!((s[k] - y[k * rows + r]).abs() < 1e-3, "simd vs scalar {dtype:?}");
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

    #[test]
    fn relative_error_of_int8_activations_is_small() {
        let (rows, cols, n) = (256, 576, 5);
        let w = Tensor::randn(0f32, 0.05, (rows, cols), &Device::Cpu).unwrap();
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let q = QTensor::quantize(&w, dtype).unwrap();
            let m = QMatrix::new(QFormat::from_ggml(dtype).unwrap(), rows, cols, q.data().unwrap().to_vec()).unwrap();
            let deq = m.dequantize();
            let x = Tensor::randn(0f32, 1.0, (n, cols), &Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
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
