//! Dense f32 weight matrices packed once at load, for inference.
//!
//! candle's matmul hands `x · Wᵀ` to the gemm crate, which repacks the weight matrix on every
//! call: a decoding step of a batch reads every weight twice and writes it once. Here the
//! weights are repacked when the model loads: 16 rows interleaved column by column
//! (`[group][column][16]`), so one 512-bit load (two 256-bit loads) holds one column of 16
//! rows, a broadcast activation multiplies it, and one fused multiply-add advances 16 dot
//! products of one activation row. A tile of activation rows (8 with AVX-512, 6 with AVX2)
//! reuses every weight load; the products of a tile stay in registers until the last column.
//! Rows past the last real row of the last group are zero (stores are masked).

use crate::team::SendPtr;

/// Rows per interleaved group.
pub const PG: usize = 16;

/// A `[rows, cols]` f32 matrix in 16-row interleaved groups.
pub struct PackedMatrix {
    pub rows: usize,
    pub cols: usize,
    groups: usize,
    /// `[group][column][16]`.
    data: Vec<f32>,
}

impl PackedMatrix {
    /// Pack a row-major `[rows, cols]` matrix.
    pub fn new(rows: usize, cols: usize, w: &[f32]) -> Result<Self, String> {
        if rows == 0 || cols == 0 {
            return Err(format!("a {rows}×{cols} matrix has no elements"));
        }
        if w.len() != rows * cols {
            return Err(format!(
                "{} values for a {rows}×{cols} matrix ({} expected)",
                w.len(),
                rows * cols
            ));
        }
        let groups = rows.div_ceil(PG);
        let mut data = vec![0f32; groups * cols * PG];
        for (r, row) in w.chunks_exact(cols).enumerate() {
            let (g, lane) = (r / PG, r % PG);
            let base = g * cols * PG + lane;
            for (c, &v) in row.iter().enumerate() {
                data[base + c * PG] = v;
            }
        }
        Ok(PackedMatrix {
            rows,
            cols,
            groups,
            data,
        })
    }

    /// The row-major `[rows, cols]` matrix back.
    pub fn unpack(&self) -> Vec<f32> {
        let mut w = vec![0f32; self.rows * self.cols];
        for (r, row) in w.chunks_exact_mut(self.cols).enumerate() {
            let base = (r / PG) * self.cols * PG + r % PG;
            for (c, o) in row.iter_mut().enumerate() {
                *o = self.data[base + c * PG];
            }
        }
        w
    }

    /// `y[n, rows] = x[n, cols] · Wᵀ`, with `x` row-major.
    pub fn matmul(&self, x: &[f32], n: usize) -> Vec<f32> {
        matmul_many(&[self], x, n).pop().unwrap_or_default()
    }

    /// The 16 values of column `c` of group `g`.
    fn col(&self, g: usize, c: usize) -> &[f32] {
        let i = (g * self.cols + c) * PG;
        &self.data[i..i + PG]
    }

    /// Row groups `g0..g1` against every activation row, written into `y` (`[n, rows]`).
    ///
    /// # Safety
    /// `y` points to `n · rows` floats, no other thread writes the rows of groups `g0..g1`,
    /// `x` holds `n · cols` floats, and `kernel` was chosen from features detected at run time.
    unsafe fn groups_into(
        &self,
        g0: usize,
        g1: usize,
        x: &[f32],
        n: usize,
        y: *mut f32,
        kernel: Kernel,
    ) {
        match kernel {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe { avx2::groups_into(self, g0, g1, x, n, y) },
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => unsafe { avx512::groups_into(self, g0, g1, x, n, y) },
            Kernel::Scalar => {
                for g in g0..g1 {
                    let valid = (self.rows - g * PG).min(PG);
                    for (i, xr) in x.chunks_exact(self.cols).enumerate().take(n) {
                        let mut acc = [0f32; PG];
                        for (c, &xv) in xr.iter().enumerate() {
                            for (a, &w) in acc.iter_mut().zip(self.col(g, c)) {
                                *a += w * xv;
                            }
                        }
                        // SAFETY: rows g·16.. of activation row i belong to this task.
                        unsafe {
                            std::ptr::copy_nonoverlapping(
                                acc.as_ptr(),
                                y.add(i * self.rows + g * PG),
                                valid,
                            )
                        };
                    }
                }
            }
        }
    }
}

/// The kernels, fastest available last.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kernel {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

fn kernels() -> Vec<Kernel> {
    let mut ks = vec![Kernel::Scalar];
    #[cfg(target_arch = "x86_64")]
    if crate::quant::simd_available() {
        ks.push(Kernel::Avx2);
        if is_x86_feature_detected!("avx512f") {
            ks.push(Kernel::Avx512);
        }
    }
    ks
}

/// AVX-512, else AVX2 + FMA, else portable code (`RUDDER_NO_AVX512`, `RUDDER_NO_SIMD` step
/// down, as for the quantized kernels).
fn kernel() -> Kernel {
    static K: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
    *K.get_or_init(|| {
        let mut ks = kernels();
        #[cfg(target_arch = "x86_64")]
        if std::env::var_os("RUDDER_NO_AVX512").is_some() {
            ks.retain(|k| *k != Kernel::Avx512);
        }
        ks.pop().unwrap_or(Kernel::Scalar)
    })
}

fn kernel_name(k: Kernel) -> &'static str {
    match k {
        Kernel::Scalar => "scalar",
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 => "avx2",
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512 => "avx512",
    }
}

/// The kernels this CPU runs, by name (`scalar`, `avx2`, `avx512`), for benchmarks.
pub fn kernel_names() -> Vec<&'static str> {
    kernels().into_iter().map(kernel_name).collect()
}

/// [`PackedMatrix::matmul`] with a named kernel from [`kernel_names`] (`None` if this CPU
/// lacks it).
pub fn matmul_with_kernel(m: &PackedMatrix, x: &[f32], n: usize, name: &str) -> Option<Vec<f32>> {
    let k = kernels().into_iter().find(|&k| kernel_name(k) == name)?;
    matmul_many_with(&[m], x, n, k).pop()
}

/// Several matrices with the same input width applied to the same activations in one parallel
/// pass (Q/K/V, gate/up).
pub fn matmul_many(ms: &[&PackedMatrix], x: &[f32], n: usize) -> Vec<Vec<f32>> {
    matmul_many_with(ms, x, n, kernel())
}

fn matmul_many_with(ms: &[&PackedMatrix], x: &[f32], n: usize, kern: Kernel) -> Vec<Vec<f32>> {
    let Some(first) = ms.first() else {
        return Vec::new();
    };
    let cols = first.cols;
    assert!(ms.iter().all(|m| m.cols == cols));
    assert_eq!(x.len(), n * cols);
    if n == 0 {
        return ms.iter().map(|_| Vec::new()).collect();
    }
    // not zeroed first: the tasks write every element (see the SAFETY note below)
    let mut ys: Vec<Vec<f32>> = ms
        .iter()
        .map(|m| crate::team::unwritten(n * m.rows))
        .collect();
    let ptrs: Vec<SendPtr> = ys.iter_mut().map(|y| SendPtr(y.as_mut_ptr())).collect();
    let groups: Vec<usize> = ms.iter().map(|m| m.groups).collect();
    // tasks of an even number of groups, so that the AVX-512 kernel's group pairs stay whole
    crate::team::for_group_tasks(&groups, n, 2, true, &|i, g0, g1, n0, n1| {
        // SAFETY: each task owns the rows of groups g0..g1 of activation rows n0..n1 of output
        // i; the kernel was detected at run time; x holds n · cols values (asserted above).
        unsafe {
            ms[i].groups_into(
                g0,
                g1,
                &x[n0 * cols..n1 * cols],
                n1 - n0,
                ptrs[i].0.add(n0 * ms[i].rows),
                kern,
            )
        };
    });
    for (y, m) in ys.iter_mut().zip(ms) {
        // SAFETY: the tasks cover every (group, activation row) pair of every matrix, and a
        // kernel writes all the valid rows of each group it owns for each activation row it
        // owns (masked stores past the last real row), so all n · rows values are written.
        unsafe { y.set_len(n * m.rows) };
    }
    ys
}

/// Activation rows per cache block: about 128 KiB of them, so that a block stays in L2 while
/// every weight group of a task passes over it (a multiple of 24, so tiles of 8 and 6 divide it).
fn act_block(cols: usize) -> usize {
    ((131072 / (4 * cols.max(1))) / 24 * 24).max(24)
}

/// One tile of a task's work: output groups `g..g+gs` against activation rows `n0..n0+t`, the
/// `idx`-th of the `tiles` tiles of its activation block.
#[derive(Clone, Copy)]
struct Tile {
    g: usize,
    gs: usize,
    n0: usize,
    t: usize,
    idx: usize,
    tiles: usize,
}

/// Runs `$body` with `$tl` bound to every tile of a task's work: activation rows in
/// [`act_block`]s, each block walked by every unit of `$unit` groups of `$g0..$g1` (the last one
/// may be shorter), in tiles of at most `$tile` rows whose heights differ by at most one (32
/// rows in tiles of 6 are 6, 6, 5, 5, 5, 5, not five of 6 and one of 2: a short tile has too
/// few independent sums to keep the FMA units busy, and reads the weight panel for little
/// work). Plain loops expanded in place, so that the kernel calls stay in the caller's
/// `target_feature` function, where they inline (an iterator of tiles measured 4 % of a
/// decode step in its own `next`).
macro_rules! for_each_tile {
    ($cols:expr, ($g0:expr, $g1:expr), $n:expr, $unit:expr, $tile:expr, |$tl:ident| $body:block) => {{
        let (blk, g0, g1, n, unit, tile) = (act_block($cols), $g0, $g1, $n, $unit, $tile);
        let mut b0 = 0;
        while b0 < n {
            let b1 = (b0 + blk).min(n);
            let tiles = (b1 - b0).div_ceil(tile);
            let (base, extra) = ((b1 - b0) / tiles, (b1 - b0) % tiles);
            let mut g = g0;
            while g < g1 {
                let gs = unit.min(g1 - g);
                for idx in 0..tiles {
                    let $tl = Tile {
                        g,
                        gs,
                        n0: b0 + idx * base + idx.min(extra),
                        t: base + usize::from(idx < extra),
                        idx,
                        tiles,
                    };
                    $body
                }
                g += unit;
            }
            b0 = b1;
        }
    }};
}

/// Software prefetch of the next weight panel (`RUDDER_NO_PREFETCH` turns it off, for
/// measurements).
fn prefetch_on() -> bool {
    static P: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *P.get_or_init(|| std::env::var_os("RUDDER_NO_PREFETCH").is_none())
}

/// What tile `tl` (of a task whose groups end at `g1`) prefetches, as (first byte, bytes per
/// column): its share of the next unit's weight panel, so that the panel is in L2 when its
/// first tile starts (a decode step of a batch reads each panel from DRAM once, then reuses it
/// from cache for the other tiles). Nothing for the last unit of a task, and nothing when a
/// block holds a single tile (one decoding row streams from memory at full speed without help
/// and loses some of it to the extra instructions).
fn next_panel(m: &PackedMatrix, tl: Tile, g1: usize) -> Option<(*const i8, usize)> {
    let k = m.cols;
    if !prefetch_on() || tl.tiles < 2 || tl.g + tl.gs >= g1 {
        return None;
    }
    let bytes = (g1 - tl.g - tl.gs).min(tl.gs) * k * PG * 4;
    let share = bytes.div_ceil(tl.tiles);
    let stride = share.div_ceil(k).clamp(8, 128);
    // The slice of tile `idx` starts inside the next panel; the addresses prefetched from it
    // stay within that panel or at most a few lines past its end (the kernels round up to whole
    // lines and to four columns), and a prefetch of any address never faults (hence wrapping
    // arithmetic, no dereference).
    let start = m.data.as_ptr().wrapping_add((tl.g + tl.gs) * k * PG) as *const i8;
    Some((start.wrapping_add(tl.idx * share), stride))
}

/// Calls `$f::<R>` for the run-time tile height `$t` (1..=`$max`).
macro_rules! by_height {
    ($t:expr, $f:ident, [$($r:literal),*], $args:tt) => {
        match $t {
            $($r => $f::<$r> $args,)*
            _ => unreachable!("tile height {}", $t),
        }
    };
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)] // one index walks several register arrays
mod avx512 {
    use super::*;
    use std::arch::x86_64::*;

    /// Output rows `16·g .. 16·(g+G)` of activation rows `n0 .. n0+R`, prefetching `pf` (see
    /// [`next_panel`]).
    #[inline(always)]
    unsafe fn tile<const G: usize, const R: usize>(
        m: &PackedMatrix,
        g: usize,
        x: *const f32,
        n0: usize,
        y: *mut f32,
        pf: Option<(*const i8, usize)>,
    ) {
        unsafe {
            let k = m.cols;
            let w = m.data.as_ptr().add(g * k * PG);
            let xp = x.add(n0 * k);
            let mut acc = [[_mm512_setzero_ps(); R]; G];
            macro_rules! column {
                ($c:expr) => {{
                    let c = $c;
                    let mut wv = [_mm512_setzero_ps(); G];
                    for gi in 0..G {
                        wv[gi] = _mm512_loadu_ps(w.add((gi * k + c) * PG));
                    }
                    for r in 0..R {
                        let b = _mm512_set1_ps(*xp.add(r * k + c));
                        for gi in 0..G {
                            acc[gi][r] = _mm512_fmadd_ps(wv[gi], b, acc[gi][r]);
                        }
                    }
                }};
            }
            // Column by column, first prefetching (into L2) the line(s) at `p + c·stride` (two
            // lines when the stride is over one). Each multiply-add takes its broadcast operand
            // from memory here, so unlike the AVX2 loop this one does not unroll (four columns
            // per iteration measured ~15 % slower, one thread, Zen 4).
            match pf {
                Some((p, stride)) => {
                    for c in 0..k {
                        let a = p.wrapping_add(c * stride);
                        _mm_prefetch::<_MM_HINT_T1>(a);
                        if stride > 64 {
                            _mm_prefetch::<_MM_HINT_T1>(a.wrapping_add(64));
                        }
                        column!(c);
                    }
                }
                None => {
                    for c in 0..k {
                        column!(c);
                    }
                }
            }
            for gi in 0..G {
                let row0 = (g + gi) * PG;
                let valid = (m.rows - row0).min(PG);
                let mask = ((1u32 << valid) - 1) as __mmask16;
                for r in 0..R {
                    _mm512_mask_storeu_ps(y.add((n0 + r) * m.rows + row0), mask, acc[gi][r]);
                }
            }
        }
    }

    #[inline(always)]
    unsafe fn pair<const R: usize>(
        m: &PackedMatrix,
        g: usize,
        x: *const f32,
        n0: usize,
        y: *mut f32,
        pf: Option<(*const i8, usize)>,
    ) {
        unsafe { tile::<2, R>(m, g, x, n0, y, pf) }
    }

    #[inline(always)]
    unsafe fn single<const R: usize>(
        m: &PackedMatrix,
        g: usize,
        x: *const f32,
        n0: usize,
        y: *mut f32,
        pf: Option<(*const i8, usize)>,
    ) {
        unsafe { tile::<1, R>(m, g, x, n0, y, pf) }
    }

    /// # Safety
    /// As [`PackedMatrix::groups_into`], with AVX-512F present.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn groups_into(
        m: &PackedMatrix,
        g0: usize,
        g1: usize,
        x: &[f32],
        n: usize,
        y: *mut f32,
    ) {
        let xp = x.as_ptr();
        for_each_tile!(m.cols, (g0, g1), n, 2, 8, |tl| {
            let pf = next_panel(m, tl, g1);
            let Tile { g, gs, n0, t, .. } = tl;
            // SAFETY: forwarded from the caller.
            unsafe {
                if gs == 2 {
                    by_height!(t, pair, [1, 2, 3, 4, 5, 6, 7, 8], (m, g, xp, n0, y, pf))
                } else {
                    by_height!(t, single, [1, 2, 3, 4, 5, 6, 7, 8], (m, g, xp, n0, y, pf))
                }
            }
        });
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)]
mod avx2 {
    use super::*;
    use std::arch::x86_64::*;

    /// Output rows `16·g .. 16·g+16` (two 8-lane halves) of activation rows `n0 .. n0+R`,
    /// prefetching `pf` (see [`next_panel`]). Unlike the AVX-512 kernel (whose multiply-adds
    /// take their broadcast operand from memory), every activation here is a separate
    /// broadcast instruction, so the loop keeps its other instructions few: four columns per
    /// iteration, pointers bumped once per iteration, rows 0–2 and 3–5 addressed from two
    /// pointers as base + {0, k, 2k} (scaled-index operands, no per-row address arithmetic),
    /// and the prefetch issued once per four columns (a line at a time) rather than per column.
    /// Measured beside the per-column loop in one process, alternating (AMD Zen 4, AVX2 path):
    /// equal or faster at every batch, 0–17 %.
    #[inline(always)]
    unsafe fn tile<const R: usize>(
        m: &PackedMatrix,
        g: usize,
        x: *const f32,
        n0: usize,
        y: *mut f32,
        pf: Option<(*const i8, usize)>,
    ) {
        unsafe {
            let k = m.cols;
            let mut wp = m.data.as_ptr().add(g * k * PG);
            let mut xa = x.add(n0 * k);
            let mut xb = if R > 3 { xa.add(3 * k) } else { xa };
            let mut acc = [[_mm256_setzero_ps(); 2]; R];
            // column `wp`/`xa`/`xb` + $o
            macro_rules! column {
                ($o:expr) => {{
                    let lo = _mm256_loadu_ps(wp.add($o * PG));
                    let hi = _mm256_loadu_ps(wp.add($o * PG + 8));
                    for r in 0..R {
                        let base = if r < 3 { xa } else { xb };
                        let b = _mm256_broadcast_ss(&*base.add((r % 3) * k + $o));
                        acc[r][0] = _mm256_fmadd_ps(lo, b, acc[r][0]);
                        acc[r][1] = _mm256_fmadd_ps(hi, b, acc[r][1]);
                    }
                }};
            }
            // prefetch cursor and bytes per column (a null cursor and 0 without prefetch; a
            // prefetch never faults, hence wrapping arithmetic)
            let (mut pa, stride) = pf.unwrap_or((std::ptr::null(), 0));
            let k4 = k / 4 * 4;
            let mut c = 0;
            while c < k4 {
                let mut off = 0;
                while off < 4 * stride {
                    _mm_prefetch::<_MM_HINT_T1>(pa.wrapping_add(off));
                    off += 64;
                }
                pa = pa.wrapping_add(4 * stride);
                column!(0);
                column!(1);
                column!(2);
                column!(3);
                wp = wp.add(4 * PG);
                xa = xa.add(4);
                xb = xb.add(4);
                c += 4;
            }
            while c < k {
                if stride > 0 {
                    _mm_prefetch::<_MM_HINT_T1>(pa);
                    pa = pa.wrapping_add(stride);
                }
                column!(0);
                wp = wp.add(PG);
                xa = xa.add(1);
                xb = xb.add(1);
                c += 1;
            }
            let row0 = g * PG;
            let valid = (m.rows - row0).min(PG);
            for r in 0..R {
                let out = y.add((n0 + r) * m.rows + row0);
                if valid == PG {
                    _mm256_storeu_ps(out, acc[r][0]);
                    _mm256_storeu_ps(out.add(8), acc[r][1]);
                } else {
                    let mut buf = [0f32; PG];
                    _mm256_storeu_ps(buf.as_mut_ptr(), acc[r][0]);
                    _mm256_storeu_ps(buf.as_mut_ptr().add(8), acc[r][1]);
                    std::ptr::copy_nonoverlapping(buf.as_ptr(), out, valid);
                }
            }
        }
    }

    /// # Safety
    /// As [`PackedMatrix::groups_into`], with AVX2 and FMA present.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn groups_into(
        m: &PackedMatrix,
        g0: usize,
        g1: usize,
        x: &[f32],
        n: usize,
        y: *mut f32,
    ) {
        let xp = x.as_ptr();
        for_each_tile!(m.cols, (g0, g1), n, 1, 6, |tl| {
            let pf = next_panel(m, tl, g1);
            let Tile { g, n0, t, .. } = tl;
            // SAFETY: forwarded from the caller.
            unsafe { by_height!(t, tile, [1, 2, 3, 4, 5, 6], (m, g, xp, n0, y, pf)) }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..len)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32) - 0.5
            })
            .collect()
    }

    fn reference(w: &[f32], rows: usize, cols: usize, x: &[f32], n: usize) -> Vec<f32> {
        let mut y = vec![0f32; n * rows];
        for i in 0..n {
            for r in 0..rows {
                let mut s = 0f64;
                for c in 0..cols {
                    s += w[r * cols + c] as f64 * x[i * cols + c] as f64;
                }
                y[i * rows + r] = s as f32;
            }
        }
        y
    }

    #[test]
    fn packing_round_trips() {
        let (rows, cols) = (37, 11);
        let w = data(rows * cols, 1);
        let p = PackedMatrix::new(rows, cols, &w).unwrap();
        assert_eq!(p.unpack(), w);
        assert!(PackedMatrix::new(3, 4, &w[..11]).is_err());
        assert!(PackedMatrix::new(0, 4, &[]).is_err());
    }

    #[test]
    fn every_kernel_matches_the_plain_product() {
        // Row counts with partial groups and odd group counts; activation counts covering
        // every tile height of both vector kernels and more than one cache block.
        for &(rows, cols) in &[(16, 8), (37, 19), (70, 64), (96, 5000)] {
            let w = data(rows * cols, rows as u64);
            let p = PackedMatrix::new(rows, cols, &w).unwrap();
            for n in [1, 2, 3, 5, 6, 7, 8, 9, 13, 16, 31, 64] {
                let x = data(n * cols, 7 + n as u64);
                let want = reference(&w, rows, cols, &x, n);
                for k in kernels() {
                    let got = matmul_many_with(&[&p], &x, n, k).pop().unwrap();
                    for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            (a - b).abs() <= 1e-4 * (1.0 + b.abs()) * (cols as f32).sqrt(),
                            "{k:?} {rows}×{cols} n={n} at {i}: {a} vs {b}"
                        );
                    }
                }
            }
        }
    }

    fn tile_walk(cols: usize, gs: (usize, usize), n: usize, unit: usize, tile: usize) -> Vec<Tile> {
        let mut v = Vec::new();
        for_each_tile!(cols, (gs.0, gs.1), n, unit, tile, |tl| {
            v.push(tl);
        });
        v
    }

    #[test]
    fn tiles_cover_each_block_once_with_heights_within_one() {
        for (cols, n, tile) in [
            (576, 32, 6),
            (576, 16, 6),
            (576, 8, 6),
            (576, 200, 8),
            (19, 7, 6),
        ] {
            let blk = act_block(cols);
            let tiles = tile_walk(cols, (3, 4), n, 1, tile);
            let mut next = 0;
            for tl in &tiles {
                assert_eq!(
                    tl.n0, next,
                    "{cols} {n} {tile}: tiles leave a gap or overlap"
                );
                assert!(tl.t >= 1 && tl.t <= tile && tl.idx < tl.tiles);
                assert_eq!(
                    tl.n0 / blk,
                    (tl.n0 + tl.t - 1) / blk,
                    "a tile crosses a block"
                );
                next += tl.t;
            }
            assert_eq!(next, n);
            for b in tiles.chunk_by(|a, b| a.n0 / blk == b.n0 / blk) {
                let (lo, hi) = (b.iter().map(|t| t.t).min(), b.iter().map(|t| t.t).max());
                assert!(
                    hi.unwrap() - lo.unwrap() <= 1,
                    "{cols} {n} {tile}: uneven tiles"
                );
                assert_eq!(b.len(), b[0].tiles);
            }
        }
        let heights: Vec<usize> = tile_walk(576, (0, 1), 32, 1, 6)
            .iter()
            .map(|t| t.t)
            .collect();
        assert_eq!(heights, [6, 6, 5, 5, 5, 5]);
    }

    #[test]
    fn many_matrices_share_one_pass() {
        let cols = 40;
        let (a, b) = (data(33 * cols, 3), data(64 * cols, 4));
        let (pa, pb) = (
            PackedMatrix::new(33, cols, &a).unwrap(),
            PackedMatrix::new(64, cols, &b).unwrap(),
        );
        let x = data(50 * cols, 5);
        let ys = matmul_many(&[&pa, &pb], &x, 50);
        assert_eq!(ys[0], pa.matmul(&x, 50));
        assert_eq!(ys[1], pb.matmul(&x, 50));
        assert_eq!(matmul_many(&[&pa], &[], 0), vec![Vec::<f32>::new()]);
    }

    #[test]
    fn blocks_cover_long_inputs() {
        // More activation rows than one cache block (cols 4096 → 24-row blocks).
        let (rows, cols, n) = (20, 4096, 53);
        let w = data(rows * cols, 9);
        let x = data(n * cols, 10);
        assert!(n > act_block(cols));
        let p = PackedMatrix::new(rows, cols, &w).unwrap();
        let want = reference(&w, rows, cols, &x, n);
        for k in kernels() {
            let got = matmul_many_with(&[&p], &x, n, k).pop().unwrap();
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() < 1e-3, "{k:?}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn long_products_split_into_row_blocks_cover_every_output() {
        // Past 64 rows the tasks also split activation rows (prefill); outputs are not zeroed
        // first, so a missed (group, row) pair would show as a wrong value here.
        let cols = 19;
        let shapes = [(37usize, cols), (70, cols), (16, cols)];
        let ws: Vec<Vec<f32>> = shapes
            .iter()
            .map(|&(r, c)| data(r * c, r as u64 + 1))
            .collect();
        let ps: Vec<PackedMatrix> = shapes
            .iter()
            .zip(&ws)
            .map(|(&(r, c), w)| PackedMatrix::new(r, c, w).unwrap())
            .collect();
        let refs: Vec<&PackedMatrix> = ps.iter().collect();
        for n in [65, 97, 200, 517] {
            let x = data(n * cols, 100 + n as u64);
            for k in kernels() {
                let ys = matmul_many_with(&refs, &x, n, k);
                for ((&(rows, _), w), y) in shapes.iter().zip(&ws).zip(&ys) {
                    let want = reference(w, rows, cols, &x, n);
                    assert_eq!(y.len(), want.len());
                    for (i, (a, b)) in y.iter().zip(&want).enumerate() {
                        assert!(
                            (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                            "{k:?} {rows}×{cols} n={n} at {i}: {a} vs {b}"
                        );
                    }
                }
            }
        }
    }
}
