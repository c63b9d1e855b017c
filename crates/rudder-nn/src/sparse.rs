//! CSR sparse matrices and `Y = A · X` (A sparse `m × n`, X dense `n × d`) as a candle custom
//! op whose backward is `∂X = Aᵀ · ∂Y` (the same kernel on the stored transpose).

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Arc;

/// A CSR matrix of f32 values.
#[derive(Debug, Clone, PartialEq)]
pub struct Csr {
    pub n_rows: usize,
    pub n_cols: usize,
    pub indptr: Vec<usize>,
    pub indices: Vec<u32>,
    pub values: Vec<f32>,
}

impl Csr {
    /// Build from (row, col, value) triples; duplicates are summed, columns sorted per row.
    pub fn from_triples(n_rows: usize, n_cols: usize, triples: &[(u32, u32, f32)]) -> Csr {
        let mut t = triples.to_vec();
        t.sort_unstable_by_key(|&(r, c, _)| (r, c));
        let mut indptr = vec![0usize; n_rows + 1];
        let mut indices: Vec<u32> = Vec::with_capacity(t.len());
        let mut values: Vec<f32> = Vec::with_capacity(t.len());
        let mut last: Option<(u32, u32)> = None;
        for (r, c, v) in t {
            assert!(
                (r as usize) < n_rows && (c as usize) < n_cols,
                "index out of range"
            );
            if last == Some((r, c)) {
                *values.last_mut().unwrap() += v;
                continue;
            }
            last = Some((r, c));
            indptr[r as usize + 1] += 1;
            indices.push(c);
            values.push(v);
        }
        for r in 0..n_rows {
            indptr[r + 1] += indptr[r];
        }
        Csr {
            n_rows,
            n_cols,
            indptr,
            indices,
            values,
        }
    }

    pub fn nnz(&self) -> usize {
        self.indices.len()
    }

    /// `Aᵀ` by a counting sort on columns (O(nnz); rows of the result come out sorted because
    /// the source rows are visited in order).
    pub fn transpose(&self) -> Csr {
        self.transpose_map().0
    }

    /// `Aᵀ` and, for each entry `q` of it, the entry of `A` it came from.
    pub fn transpose_map(&self) -> (Csr, Vec<u32>) {
        let nnz = self.nnz();
        let mut indptr = vec![0usize; self.n_cols + 1];
        for &c in &self.indices {
            indptr[c as usize + 1] += 1;
        }
        for c in 0..self.n_cols {
            indptr[c + 1] += indptr[c];
        }
        let mut next = indptr.clone();
        let mut indices = vec![0u32; nnz];
        let mut values = vec![0f32; nnz];
        let mut from = vec![0u32; nnz];
        for r in 0..self.n_rows {
            for p in self.indptr[r]..self.indptr[r + 1] {
                let c = self.indices[p] as usize;
                let q = next[c];
                next[c] += 1;
                indices[q] = r as u32;
                values[q] = self.values[p];
                from[q] = p as u32;
            }
        }
        let t = Csr {
            n_rows: self.n_cols,
            n_cols: self.n_rows,
            indptr,
            indices,
            values,
        };
        (t, from)
    }

    /// The same pattern with `values` (one per stored entry, in storage order), keeping only
    /// the entries whose value is non-zero. Built in parallel over row blocks.
    pub fn with_values_nonzero(&self, values: &[f32]) -> Csr {
        assert_eq!(values.len(), self.nnz(), "one value per stored entry");
        const BLOCK: usize = 4096;
        let parts: Vec<(Vec<usize>, Vec<u32>, Vec<f32>)> = (0..self.n_rows.div_ceil(BLOCK))
            .into_par_iter()
            .map(|b| {
                let (r0, r1) = (b * BLOCK, ((b + 1) * BLOCK).min(self.n_rows));
                let span = self.indptr[r0]..self.indptr[r1];
                let kept = values[span.clone()].iter().filter(|v| **v != 0.0).count();
                let (mut counts, mut idx, mut val) = (
                    Vec::with_capacity(r1 - r0),
                    Vec::with_capacity(kept),
                    Vec::with_capacity(kept),
                );
                for r in r0..r1 {
                    let before = idx.len();
                    for p in self.indptr[r]..self.indptr[r + 1] {
                        if values[p] != 0.0 {
                            idx.push(self.indices[p]);
                            val.push(values[p]);
                        }
                    }
                    counts.push(idx.len() - before);
                }
                (counts, idx, val)
            })
            .collect();
        let kept: usize = parts.iter().map(|p| p.1.len()).sum();
        let mut indptr = Vec::with_capacity(self.n_rows + 1);
        indptr.push(0usize);
        let (mut indices, mut vals) = (Vec::with_capacity(kept), Vec::with_capacity(kept));
        for (counts, idx, val) in parts {
            for c in counts {
                indptr.push(indptr.last().copied().unwrap_or(0) + c);
            }
            indices.extend_from_slice(&idx);
            vals.extend_from_slice(&val);
        }
        Csr {
            n_rows: self.n_rows,
            n_cols: self.n_cols,
            indptr,
            indices,
            values: vals,
        }
    }

    pub fn to_dense(&self) -> Vec<f32> {
        let mut d = vec![0f32; self.n_rows * self.n_cols];
        for r in 0..self.n_rows {
            for p in self.indptr[r]..self.indptr[r + 1] {
                d[r * self.n_cols + self.indices[p] as usize] += self.values[p];
            }
        }
        d
    }

    /// `out = self · x` with `x` row-major `n_cols × d`, `out` row-major `n_rows × d`.
    pub fn matmul_into(&self, x: &[f32], d: usize, out: &mut [f32]) {
        assert_eq!(x.len(), self.n_cols * d);
        assert_eq!(out.len(), self.n_rows * d);
        if self.n_rows == 0 || d == 0 {
            return;
        }
        // chunks of rows; rayon's work stealing evens out rows of very different degrees
        let rows_per_chunk = (self.n_rows / (rayon::current_num_threads() * 8)).max(16);
        out.par_chunks_mut(rows_per_chunk * d)
            .enumerate()
            .for_each(|(c, chunk)| {
                let r0 = c * rows_per_chunk;
                let r1 = r0 + chunk.len() / d;
                rows_kernel(self, x, d, r0, r1, chunk);
            });
    }
}

/// Rows `r0..r1` of `A · x` into `out` (the rows' slice of the output).
fn rows_kernel(a: &Csr, x: &[f32], d: usize, r0: usize, r1: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if d.is_multiple_of(16)
            && std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports AVX2 and FMA (checked just above).
            unsafe { rows_avx2(a, x, d, r0, r1, out) };
            return;
        }
    }
    rows_generic(a, x, d, r0, r1, out)
}

#[inline(always)]
fn rows_blocked<const B: usize>(
    a: &Csr,
    x: &[f32],
    d: usize,
    r0: usize,
    r1: usize,
    out: &mut [f32],
) {
    // B accumulators per block stay in registers while the row's non-zeros stream by
    for r in r0..r1 {
        let (p0, p1) = (a.indptr[r], a.indptr[r + 1]);
        let orow = &mut out[(r - r0) * d..(r - r0 + 1) * d];
        for c in (0..d).step_by(B) {
            let mut acc = [0f32; B];
            for p in p0..p1 {
                let w = a.values[p];
                let xr = &x[a.indices[p] as usize * d + c..][..B];
                for k in 0..B {
                    acc[k] = w.mul_add(xr[k], acc[k]);
                }
            }
            orow[c..c + B].copy_from_slice(&acc);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rows_avx2(a: &Csr, x: &[f32], d: usize, r0: usize, r1: usize, out: &mut [f32]) {
    if d.is_multiple_of(64) {
        rows_blocked::<64>(a, x, d, r0, r1, out)
    } else if d.is_multiple_of(32) {
        rows_blocked::<32>(a, x, d, r0, r1, out)
    } else {
        rows_blocked::<16>(a, x, d, r0, r1, out)
    }
}

fn rows_generic(a: &Csr, x: &[f32], d: usize, r0: usize, r1: usize, out: &mut [f32]) {
    for r in r0..r1 {
        let orow = &mut out[(r - r0) * d..(r - r0 + 1) * d];
        orow.iter_mut().for_each(|v| *v = 0.0);
        for p in a.indptr[r]..a.indptr[r + 1] {
            let w = a.values[p];
            let xr = &x[a.indices[p] as usize * d..][..d];
            for (o, &xv) in orow.iter_mut().zip(xr) {
                *o += w * xv;
            }
        }
    }
}

impl Csr {
    /// `A · x` with the portable kernel only (for tests of the dispatched one).
    pub fn matmul_generic(&self, x: &[f32], d: usize) -> Vec<f32> {
        let mut out = vec![0f32; self.n_rows * d];
        rows_generic(self, x, d, 0, self.n_rows, &mut out);
        out
    }
}

/// A fixed sparsity pattern whose values change from step to step (edge dropout): the
/// transpose's pattern and entry map are built once, so each reweighted operator costs a few
/// O(nnz) passes instead of a transpose.
#[derive(Debug, Clone)]
pub struct Reweightable {
    a: Arc<Csr>,
    at: Arc<Csr>,
    /// Entry `q` of `at` holds entry `from_a[q]` of `a`.
    from_a: Vec<u32>,
}

impl Reweightable {
    /// Shares `a` (e.g. with the operator built over the same matrix).
    pub fn new(a: Arc<Csr>) -> Reweightable {
        let (at, from_a) = a.transpose_map();
        Reweightable {
            a,
            at: Arc::new(at),
            from_a,
        }
    }

    /// The base matrix.
    pub fn base(&self) -> &Csr {
        &self.a
    }

    /// The operator with `values[p]` on entry `p` of the base (storage order); entries whose
    /// value is zero are left out of both stored matrices, so the kernels skip them.
    pub fn with_values(&self, values: &[f32]) -> SparseOperator {
        let vt: Vec<f32> = self
            .from_a
            .par_iter()
            .map(|&p| values[p as usize])
            .collect();
        let (a, at) = rayon::join(
            || self.a.with_values_nonzero(values),
            || self.at.with_values_nonzero(&vt),
        );
        SparseOperator {
            a: Arc::new(a),
            at: Arc::new(at),
        }
    }
}

/// A sparse matrix together with its transpose, shared by forward and backward.
#[derive(Debug, Clone)]
pub struct SparseOperator {
    pub a: Arc<Csr>,
    pub at: Arc<Csr>,
}

impl SparseOperator {
    pub fn new(a: Csr) -> SparseOperator {
        let at = Arc::new(a.transpose());
        SparseOperator { a: Arc::new(a), at }
    }

    /// For a symmetric matrix the transpose is the matrix itself (no copy).
    pub fn symmetric(a: Csr) -> SparseOperator {
        let a = Arc::new(a);
        SparseOperator { at: a.clone(), a }
    }

    /// `A · x`, differentiable with respect to `x`.
    pub fn matmul(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.contiguous()?.apply_op1(SpMM {
            a: self.a.clone(),
            at: self.at.clone(),
        })
    }
}

struct SpMM {
    a: Arc<Csr>,
    at: Arc<Csr>,
}

impl CustomOp1 for SpMM {
    fn name(&self) -> &'static str {
        "csr-spmm"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = layout.shape().dims();
        if dims.len() != 2 || dims[0] != self.a.n_cols {
            candle_core::bail!(
                "csr-spmm: expected a {} × d matrix, got {:?}",
                self.a.n_cols,
                dims
            );
        }
        let d = dims[1];
        let x = crate::cpu::f32_slice(storage, layout, "csr-spmm")?;
        let mut out = vec![0f32; self.a.n_rows * d];
        self.a.matmul_into(x, d, &mut out);
        Ok((CpuStorage::F32(out), Shape::from((self.a.n_rows, d))))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let g = grad_res.contiguous()?.apply_op1(SpMM {
            a: self.at.clone(),
            at: self.a.clone(),
        })?;
        Ok(Some(g))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn random_csr(m: usize, n: usize, seed: u64) -> Csr {
        let mut t = Vec::new();
        let mut s = seed;
        for r in 0..m {
            for c in 0..n {
                s = rudder_data::rng::mix64(s);
                if s.is_multiple_of(3) {
                    t.push((r as u32, c as u32, ((s >> 20) % 1000) as f32 / 500.0 - 1.0));
                }
            }
        }
        Csr::from_triples(m, n, &t)
    }

    #[test]
    fn matches_dense_matmul_forward_and_backward() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let a = random_csr(70, 50, 1);
        let op = SparseOperator::new(a.clone());
        let xs: Vec<f32> = (0..50 * 8)
            .map(|i| ((i * 37 % 101) as f32) / 50.0 - 1.0)
            .collect();
        let x = Var::from_slice(&xs, (50, 8), &dev)?;
        let dense = Tensor::from_vec(a.to_dense(), (70, 50), &dev)?;
        let ys = op.matmul(x.as_tensor())?;
        let yd = dense.matmul(x.as_tensor())?;
        let diff = (ys.clone() - yd.clone())?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(diff < 1e-5, "{diff}");
        // gradient of a weighted sum through both paths
        let w = Tensor::from_vec(
            (0..70 * 8)
                .map(|i| (i % 7) as f32 - 3.0)
                .collect::<Vec<_>>(),
            (70, 8),
            &dev,
        )?;
        let gs = (ys * &w)?.sum_all()?.backward()?;
        let gd = (yd * &w)?.sum_all()?.backward()?;
        let diff = (gs.get(x.as_tensor()).unwrap() - gd.get(x.as_tensor()).unwrap())?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(diff < 1e-4, "{diff}");
        Ok(())
    }

    #[test]
    fn finite_difference_gradient() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let a = random_csr(12, 9, 2);
        let op = SparseOperator::new(a);
        let xs: Vec<f32> = (0..9 * 3)
            .map(|i| ((i * 13 % 17) as f32) / 8.0 - 1.0)
            .collect();
        // f(x) = sum((A x)^2)
        let f = |v: &[f32]| -> candle_core::Result<f32> {
            let t = Tensor::from_slice(v, (9, 3), &dev)?;
            op.matmul(&t)?.sqr()?.sum_all()?.to_scalar::<f32>()
        };
        let x = Var::from_slice(&xs, (9, 3), &dev)?;
        let g = op.matmul(x.as_tensor())?.sqr()?.sum_all()?.backward()?;
        let g = g
            .get(x.as_tensor())
            .unwrap()
            .flatten_all()?
            .to_vec1::<f32>()?;
        let eps = 1e-2f32;
        for k in 0..xs.len() {
            let mut p = xs.clone();
            p[k] += eps;
            let mut m = xs.clone();
            m[k] -= eps;
            let fd = (f(&p)? - f(&m)?) / (2.0 * eps);
            assert!(
                (fd - g[k]).abs() < 1e-2 * (1.0 + fd.abs()),
                "k={k} fd={fd} g={}",
                g[k]
            );
        }
        Ok(())
    }

    #[test]
    fn simd_kernel_matches_portable_kernel() {
        for d in [16usize, 64, 7] {
            let a = random_csr(90, 40, 7);
            let x: Vec<f32> = (0..40 * d)
                .map(|i| ((i * 31 % 97) as f32) / 40.0 - 1.0)
                .collect();
            let mut fast = vec![0f32; 90 * d];
            a.matmul_into(&x, d, &mut fast);
            let slow = a.matmul_generic(&x, d);
            for (f, s) in fast.iter().zip(&slow) {
                assert!((f - s).abs() < 1e-4, "d={d}: {f} vs {s}");
            }
        }
    }

    #[test]
    fn duplicates_are_summed_and_transpose_is_exact() {
        let a = Csr::from_triples(2, 3, &[(0, 1, 1.0), (0, 1, 2.0), (1, 0, 4.0)]);
        assert_eq!(a.nnz(), 2);
        assert_eq!(a.to_dense(), vec![0.0, 3.0, 0.0, 4.0, 0.0, 0.0]);
        assert_eq!(a.transpose().transpose(), a);
    }

    #[test]
    fn counting_sort_transpose_equals_triples_transpose() {
        let a = random_csr(40, 65, 11);
        let mut t = Vec::new();
        for r in 0..a.n_rows {
            for p in a.indptr[r]..a.indptr[r + 1] {
                t.push((a.indices[p], r as u32, a.values[p]));
            }
        }
        let (at, from) = a.transpose_map();
        assert_eq!(at, Csr::from_triples(65, 40, &t));
        for (q, &p) in from.iter().enumerate() {
            assert_eq!(at.values[q], a.values[p as usize]);
        }
    }

    #[test]
    fn reweighted_operator_matches_dense_and_drops_zeros() {
        let a = random_csr(30, 30, 5);
        let rw = Reweightable::new(Arc::new(a.clone()));
        // zero every third entry, scale the others
        let values: Vec<f32> = (0..a.nnz())
            .map(|p| if p % 3 == 0 { 0.0 } else { a.values[p] * 1.25 })
            .collect();
        let op = rw.with_values(&values);
        let expect = Csr {
            values: values.clone(),
            ..a.clone()
        };
        assert_eq!(op.a.to_dense(), expect.to_dense());
        assert_eq!(op.at.to_dense(), expect.transpose().to_dense());
        let zeros = values.iter().filter(|v| **v == 0.0).count();
        assert_eq!(op.a.nnz(), a.nnz() - zeros);
        assert_eq!(op.at.nnz(), a.nnz() - zeros);
    }
}
