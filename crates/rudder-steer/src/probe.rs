//! Linear probes in f64 with faer: ridge (closed form, Cholesky), Lasso (coordinate descent on
//! scikit-learn's objective and duality-gap stopping rule), logistic regression (Newton / IRLS
//! with scikit-learn's C-scaled L2 penalty). Intercepts are fitted by centring, as
//! scikit-learn does, and never penalised.
//!
//! - Ridge: `‖y − Xw − b‖² + α‖w‖²`.
//! - Lasso: `(1 / 2n)‖y − Xw − b‖² + α‖w‖₁` (the paper writes it without 1/n; sklearn's
//!   scaling is what makes α = 10 mean what the reference code meant).
//! - Logistic: `C·Σ log(1 + exp(−ỹᵢ(xᵢ·w + b))) + ½‖w‖²`, ỹ ∈ {−1, +1}.

use faer::prelude::Solve;
use faer::{Mat, MatRef, Side};
use serde::{Deserialize, Serialize};

use crate::{Result, SteerError};

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ProbeKind {
    Ridge {
        alpha: f64,
    },
    Lasso {
        alpha: f64,
        /// Stop when the duality gap falls below `tol · ‖y − ȳ‖²` (sklearn's rule).
        #[serde(default = "lasso_tol")]
        tol: f64,
        #[serde(default = "lasso_iter")]
        max_iter: usize,
    },
    Logistic {
        /// Inverse regularisation strength (sklearn's C).
        c: f64,
    },
}

fn lasso_tol() -> f64 {
    1e-4
}
fn lasso_iter() -> usize {
    10_000
}

impl ProbeKind {
    pub fn lasso(alpha: f64) -> Self {
        ProbeKind::Lasso {
            alpha,
            tol: lasso_tol(),
            max_iter: lasso_iter(),
        }
    }
    pub fn name(&self) -> &'static str {
        match self {
            ProbeKind::Ridge { .. } => "ridge",
            ProbeKind::Lasso { .. } => "lasso",
            ProbeKind::Logistic { .. } => "logistic",
        }
    }
}

/// A fitted linear model: `x·w + b` (a logit for logistic probes).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Linear {
    pub coef: Vec<f64>,
    pub intercept: f64,
    /// Coordinate-descent sweeps or Newton steps taken (0 for the closed form).
    pub iterations: usize,
    /// Whether the stopping rule was met before the iteration limit.
    pub converged: bool,
}

impl Linear {
    pub fn predict_row(&self, x: &[f64]) -> f64 {
        self.coef.iter().zip(x).map(|(w, v)| w * v).sum::<f64>() + self.intercept
    }

    pub fn predict(&self, x: MatRef<'_, f64>) -> Vec<f64> {
        (0..x.nrows())
            .map(|i| {
                (0..x.ncols())
                    .map(|j| self.coef[j] * x[(i, j)])
                    .sum::<f64>()
                    + self.intercept
            })
            .collect()
    }
}

fn check(x: MatRef<'_, f64>, y: &[f64]) -> Result<()> {
    if x.nrows() != y.len() {
        return Err(SteerError::Invalid(format!(
            "{} rows of activations but {} targets",
            x.nrows(),
            y.len()
        )));
    }
    if x.nrows() < 2 {
        return Err(SteerError::Invalid(format!(
            "a probe needs at least 2 rows, got {}",
            x.nrows()
        )));
    }
    if y.iter().any(|v| !v.is_finite())
        || (0..x.ncols()).any(|j| (0..x.nrows()).any(|i| !x[(i, j)].is_finite()))
    {
        return Err(SteerError::Invalid(
            "non-finite activations or targets".into(),
        ));
    }
    Ok(())
}

/// Column means of `x`, and `x` with them subtracted.
/// `XᵀX`, computing one triangle (half the products of a general multiplication) and
/// mirroring it.
pub fn gram(x: MatRef<'_, f64>) -> Mat<f64> {
    use faer::linalg::matmul::triangular::{BlockStructure, matmul};
    let d = x.ncols();
    let mut g = Mat::<f64>::zeros(d, d);
    matmul(
        g.as_mut(),
        BlockStructure::TriangularLower,
        faer::Accum::Replace,
        x.transpose(),
        BlockStructure::Rectangular,
        x,
        BlockStructure::Rectangular,
        1.0,
        faer::get_global_parallelism(),
    );
    for j in 0..d {
        for i in 0..j {
            g[(i, j)] = g[(j, i)];
        }
    }
    g
}

fn centre(x: MatRef<'_, f64>) -> (Vec<f64>, Mat<f64>) {
    let (n, d) = (x.nrows(), x.ncols());
    let means: Vec<f64> = (0..d)
        .map(|j| (0..n).map(|i| x[(i, j)]).sum::<f64>() / n as f64)
        .collect();
    let xc = Mat::from_fn(n, d, |i, j| x[(i, j)] - means[j]);
    (means, xc)
}

/// Fit a probe.
pub fn fit(kind: ProbeKind, x: MatRef<'_, f64>, y: &[f64]) -> Result<Linear> {
    check(x, y)?;
    match kind {
        ProbeKind::Ridge { alpha } => ridge(x, y, alpha),
        ProbeKind::Lasso {
            alpha,
            tol,
            max_iter,
        } => lasso(x, y, alpha, tol, max_iter),
        ProbeKind::Logistic { c } => logistic(x, y, c),
    }
}

fn ridge(x: MatRef<'_, f64>, y: &[f64], alpha: f64) -> Result<Linear> {
    if !(alpha >= 0.0) {
        return Err(SteerError::Invalid(format!(
            "ridge alpha {alpha} must be ≥ 0"
        )));
    }
    let d = x.ncols();
    let (xm, xc) = centre(x);
    let ym = crate::stats::mean(y);
    let yc = Mat::from_fn(y.len(), 1, |i, _| y[i] - ym);
    let n = y.len();
    if alpha > 0.0 && n < d {
        // fewer rows than features: the dual form w = Xcᵀ(XcXcᵀ + αI)⁻¹yc (an n×n system,
        // the same solution), as scikit-learn's solver does in this case
        let mut k = &xc * xc.transpose();
        for i in 0..n {
            k[(i, i)] += alpha;
        }
        if let Ok(llt) = k.llt(Side::Lower) {
            let w = xc.transpose() * llt.solve(&yc);
            let coef: Vec<f64> = (0..d).map(|j| w[(j, 0)]).collect();
            let intercept = ym - coef.iter().zip(&xm).map(|(w, m)| w * m).sum::<f64>();
            return Ok(Linear {
                coef,
                intercept,
                iterations: 0,
                converged: true,
            });
        }
    }
    let mut g = gram(xc.as_ref());
    for j in 0..d {
        g[(j, j)] += alpha;
    }
    let rhs = xc.transpose() * &yc;
    let w = match g.llt(Side::Lower) {
        Ok(llt) => llt.solve(&rhs),
        // singular (α = 0 with collinear columns): the minimum-norm least-squares solution
        Err(_) => {
            g.thin_svd()
                .map_err(|e| SteerError::Invalid(format!("SVD failed: {e:?}")))?
                .pseudoinverse()
                * &rhs
        }
    };
    let coef: Vec<f64> = (0..d).map(|j| w[(j, 0)]).collect();
    let intercept = ym - coef.iter().zip(&xm).map(|(w, m)| w * m).sum::<f64>();
    Ok(Linear {
        coef,
        intercept,
        iterations: 0,
        converged: true,
    })
}

fn soft(x: f64, t: f64) -> f64 {
    if x > t {
        x - t
    } else if x < -t {
        x + t
    } else {
        0.0
    }
}

/// Coordinate descent on the Gram matrix (each coordinate update costs O(d)), with sklearn's
/// stopping rule: after a sweep whose largest weight change is below `tol` times the largest
/// weight, the duality gap is computed and the fit stops once it is below `tol · ‖yc‖²`.
fn lasso(x: MatRef<'_, f64>, y: &[f64], alpha: f64, tol: f64, max_iter: usize) -> Result<Linear> {
    if !(alpha > 0.0) {
        return Err(SteerError::Invalid(format!(
            "lasso alpha {alpha} must be > 0 (use ridge with alpha 0 for least squares)"
        )));
    }
    let (n, d) = (x.nrows(), x.ncols());
    let (xm, xc) = centre(x);
    let ym = crate::stats::mean(y);
    let yc: Vec<f64> = y.iter().map(|v| v - ym).collect();
    let g = gram(xc.as_ref());
    let ycm = Mat::from_fn(n, 1, |i, _| yc[i]);
    let qm = xc.transpose() * &ycm;
    let q: Vec<f64> = (0..d).map(|j| qm[(j, 0)]).collect();
    let y2: f64 = yc.iter().map(|v| v * v).sum();
    let l1 = alpha * n as f64; // sklearn's alpha × n_samples
    let tol_abs = tol * y2;
    let mut w = vec![0f64; d];
    let mut h = vec![0f64; d]; // G·w
    let gcols: Vec<Vec<f64>> = (0..d)
        .map(|j| (0..d).map(|k| g[(k, j)]).collect())
        .collect();
    let mut converged = false;
    let mut it = 0;
    while it < max_iter {
        it += 1;
        let (mut w_max, mut d_max) = (0f64, 0f64);
        for j in 0..d {
            let gjj = gcols[j][j];
            if gjj == 0.0 {
                continue;
            }
            let old = w[j];
            let rho = q[j] - h[j] + gjj * old;
            let new = soft(rho, l1) / gjj;
            if new != old {
                let delta = new - old;
                for (hk, gk) in h.iter_mut().zip(&gcols[j]) {
                    *hk += delta * gk;
                }
                w[j] = new;
            }
            d_max = d_max.max((new - old).abs());
            w_max = w_max.max(new.abs());
        }
        if w_max == 0.0 || d_max / w_max < tol || it == max_iter {
            // duality gap (sklearn's enet_coordinate_descent_gram with beta = 0)
            let xta_max = (0..d).map(|j| (q[j] - h[j]).abs()).fold(0f64, f64::max);
            let wq: f64 = w.iter().zip(&q).map(|(a, b)| a * b).sum();
            let whw: f64 = w.iter().zip(&h).map(|(a, b)| a * b).sum();
            let r2 = (y2 + whw - 2.0 * wq).max(0.0);
            let (cst, mut gap) = if xta_max > l1 {
                let c = l1 / xta_max;
                (c, 0.5 * (r2 + r2 * c * c))
            } else {
                (1.0, r2)
            };
            let l1n: f64 = w.iter().map(|v| v.abs()).sum();
            gap += l1 * l1n - cst * (y2 - wq);
            if gap < tol_abs {
                converged = true;
                break;
            }
        }
    }
    let intercept = ym - w.iter().zip(&xm).map(|(a, m)| a * m).sum::<f64>();
    Ok(Linear {
        coef: w,
        intercept,
        iterations: it,
        converged,
    })
}

fn sigmoid(z: f64) -> f64 {
    if z >= 0.0 {
        1.0 / (1.0 + (-z).exp())
    } else {
        let e = z.exp();
        e / (1.0 + e)
    }
}

/// Newton's method on the C-scaled logistic loss with an unpenalised intercept.
fn logistic(x: MatRef<'_, f64>, y: &[f64], c: f64) -> Result<Linear> {
    if !(c > 0.0) {
        return Err(SteerError::Invalid(format!("logistic C {c} must be > 0")));
    }
    if y.iter().any(|&v| v != 0.0 && v != 1.0) {
        return Err(SteerError::Invalid(
            "logistic probes need 0/1 labels".into(),
        ));
    }
    let (n, d) = (x.nrows(), x.ncols());
    // [x, 1] with the last coordinate the intercept
    let mut beta = vec![0f64; d + 1];
    let mut converged = false;
    let mut it = 0;
    while it < 100 {
        it += 1;
        let mut grad = vec![0f64; d + 1];
        let mut hess = Mat::<f64>::zeros(d + 1, d + 1);
        let mut wts = vec![0f64; n];
        for i in 0..n {
            let z: f64 = (0..d).map(|j| beta[j] * x[(i, j)]).sum::<f64>() + beta[d];
            let p = sigmoid(z);
            let r = p - y[i];
            for j in 0..d {
                grad[j] += c * r * x[(i, j)];
            }
            grad[d] += c * r;
            wts[i] = c * p * (1.0 - p);
        }
        for j in 0..d {
            grad[j] += beta[j];
        }
        let xa = Mat::from_fn(n, d + 1, |i, j| if j < d { x[(i, j)] } else { 1.0 });
        let xw = Mat::from_fn(n, d + 1, |i, j| xa[(i, j)] * wts[i]);
        let xtwx = xa.transpose() * &xw;
        for a in 0..=d {
            for b in 0..=d {
                hess[(a, b)] = xtwx[(a, b)];
            }
        }
        for j in 0..d {
            hess[(j, j)] += 1.0;
        }
        hess[(d, d)] += 1e-10;
        let gm = Mat::from_fn(d + 1, 1, |i, _| grad[i]);
        let step = match hess.llt(Side::Lower) {
            Ok(l) => l.solve(&gm),
            Err(_) => {
                return Err(SteerError::Invalid(
                    "logistic Hessian is not positive definite".into(),
                ));
            }
        };
        let mut sz = 0f64;
        for j in 0..=d {
            beta[j] -= step[(j, 0)];
            sz = sz.max(step[(j, 0)].abs());
        }
        let gmax = grad.iter().fold(0f64, |m, v| m.max(v.abs()));
        if sz < 1e-10 * (1.0 + beta.iter().fold(0f64, |m, v| m.max(v.abs()))) || gmax < 1e-9 {
            converged = true;
            break;
        }
    }
    Ok(Linear {
        coef: beta[..d].to_vec(),
        intercept: beta[d],
        iterations: it,
        converged,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data() -> (Mat<f64>, Vec<f64>) {
        // y = 2·x0 − x1 + 3 + small noise; x2 irrelevant
        let x = Mat::from_fn(40, 3, |i, j| {
            let t = i as f64;
            match j {
                0 => (t * 0.37).sin() * 3.0,
                1 => (t * 0.11).cos() * 2.0 + t * 0.05,
                _ => ((t * 1.7).sin() * 13.0).fract(),
            }
        });
        let y = (0..40)
            .map(|i| 2.0 * x[(i, 0)] - x[(i, 1)] + 3.0 + 0.01 * ((i * 7 % 5) as f64 - 2.0))
            .collect();
        (x, y)
    }

    #[test]
    fn gram_equals_the_full_product() {
        let x = Mat::from_fn(7, 5, |i, j| ((i * 3 + j * 5) % 7) as f64 - 2.5);
        let g = gram(x.as_ref());
        let full = x.transpose() * &x;
        assert!((&g - &full).norm_l2() < 1e-12);
    }

    #[test]
    fn ridge_matches_the_normal_equations_and_recovers_the_line() {
        let (x, y) = data();
        let m = fit(ProbeKind::Ridge { alpha: 0.0 }, x.as_ref(), &y).unwrap();
        assert!(
            (m.coef[0] - 2.0).abs() < 0.01 && (m.coef[1] + 1.0).abs() < 0.01,
            "{m:?}"
        );
        assert!((m.intercept - 3.0).abs() < 0.05);
        // hand-computed 1-d case: x = [0, 1, 2], y = [1, 3, 5], alpha = 2:
        // xc = [-1, 0, 1], yc = [-2, 0, 2] → w = 4 / (2 + 2) = 1, b = 3 − 1·1 = 2
        let x1 = Mat::from_fn(3, 1, |i, _| i as f64);
        let m = fit(
            ProbeKind::Ridge { alpha: 2.0 },
            x1.as_ref(),
            &[1.0, 3.0, 5.0],
        )
        .unwrap();
        assert!((m.coef[0] - 1.0).abs() < 1e-12 && (m.intercept - 2.0).abs() < 1e-12);
        // fewer rows than features: the dual form equals the normal equations
        let xw = Mat::from_fn(6, 10, |i, j| {
            ((i * 7 + j * 3) % 11) as f64 - 5.0 + 0.1 * j as f64
        });
        let yw: Vec<f64> = (0..6).map(|i| i as f64 * 1.5 - 2.0).collect();
        let m = fit(ProbeKind::Ridge { alpha: 3.0 }, xw.as_ref(), &yw).unwrap();
        let (_, xc) = centre(xw.as_ref());
        let ym = yw.iter().sum::<f64>() / 6.0;
        let mut g = xc.transpose() * &xc;
        for j in 0..10 {
            g[(j, j)] += 3.0;
        }
        let rhs = xc.transpose() * Mat::from_fn(6, 1, |i, _| yw[i] - ym);
        let w = g.llt(Side::Lower).unwrap().solve(&rhs);
        for j in 0..10 {
            assert!(
                (m.coef[j] - w[(j, 0)]).abs() < 1e-10,
                "{j}: {} vs {}",
                m.coef[j],
                w[(j, 0)]
            );
        }
    }

    #[test]
    fn lasso_hand_case_and_sparsity() {
        // 1-d: w = S(xcᵀyc, nα) / xcᵀxc = S(4, 3·0.5) / 2 = 1.25, b = 3 − 1.25 = 1.75
        let x1 = Mat::from_fn(3, 1, |i, _| i as f64);
        let m = fit(
            ProbeKind::Lasso {
                alpha: 0.5,
                tol: 1e-12,
                max_iter: 100,
            },
            x1.as_ref(),
            &[1.0, 3.0, 5.0],
        )
        .unwrap();
        assert!((m.coef[0] - 1.25).abs() < 1e-12 && (m.intercept - 1.75).abs() < 1e-12);
        assert!(m.converged);
        let (x, y) = data();
        let m = fit(
            ProbeKind::Lasso {
                alpha: 0.05,
                tol: 1e-10,
                max_iter: 10_000,
            },
            x.as_ref(),
            &y,
        )
        .unwrap();
        assert!(m.converged);
        assert_eq!(m.coef[2], 0.0, "the irrelevant feature is dropped: {m:?}");
        assert!(m.coef[0] > 1.8 && m.coef[1] < -0.8);
        // KKT: |xcⱼᵀ r| / n ≤ α, with equality (and the sign of wⱼ) where wⱼ ≠ 0
        let p = m.predict(x.as_ref());
        for j in 0..3 {
            let xm = (0..40).map(|i| x[(i, j)]).sum::<f64>() / 40.0;
            let g: f64 = (0..40)
                .map(|i| (x[(i, j)] - xm) * (y[i] - p[i]))
                .sum::<f64>()
                / 40.0;
            if m.coef[j] != 0.0 {
                assert!((g - 0.05 * m.coef[j].signum()).abs() < 1e-6, "{j}: {g}");
            } else {
                assert!(g.abs() <= 0.05 + 1e-9);
            }
        }
        // a huge alpha zeroes everything: the intercept is the mean
        let m = fit(ProbeKind::lasso(1e6), x.as_ref(), &y).unwrap();
        assert!(m.coef.iter().all(|&v| v == 0.0));
        assert!((m.intercept - crate::stats::mean(&y)).abs() < 1e-9);
    }

    #[test]
    fn logistic_separates_and_is_stationary() {
        let (x, y) = data();
        let m0 = crate::stats::mean(&y);
        let lab: Vec<f64> = y.iter().map(|&v| if v > m0 { 1.0 } else { 0.0 }).collect();
        let m = fit(ProbeKind::Logistic { c: 1.0 }, x.as_ref(), &lab).unwrap();
        assert!(m.converged);
        let acc = m
            .predict(x.as_ref())
            .iter()
            .zip(&lab)
            .filter(|(z, l)| (**z > 0.0) == (**l == 1.0))
            .count();
        assert!(acc >= 36, "{acc}/40");
        // gradient of the penalised loss is zero at the optimum
        let z = m.predict(x.as_ref());
        for j in 0..3 {
            let g: f64 = (0..40)
                .map(|i| (sigmoid(z[i]) - lab[i]) * x[(i, j)])
                .sum::<f64>()
                + m.coef[j];
            assert!(g.abs() < 1e-6, "{j}: {g}");
        }
        assert!(fit(ProbeKind::Logistic { c: 1.0 }, x.as_ref(), &y).is_err());
    }

    #[test]
    fn bad_shapes_are_errors() {
        let x = Mat::<f64>::zeros(3, 2);
        assert!(fit(ProbeKind::Ridge { alpha: 1.0 }, x.as_ref(), &[1.0, 2.0]).is_err());
        assert!(fit(ProbeKind::lasso(0.0), x.as_ref(), &[1.0, 2.0, 3.0]).is_err());
        let mut x = Mat::<f64>::zeros(3, 2);
        x[(0, 0)] = f64::NAN;
        assert!(
            fit(
                ProbeKind::Ridge { alpha: 1.0 },
                x.as_ref(),
                &[1.0, 2.0, 3.0]
            )
            .is_err()
        );
    }
}
