//! The user–item graph of the CF reference repositories (cf-seeds.md [S3]):
//! `A = [[0, R], [Rᵀ, 0]]` over (users + items) nodes, no self-loops, built from train only,
//! normalised as `Â = D^{-1/2} A D^{-1/2}` (degree-0 rows stay 0), and LightGCN propagation
//! returning the mean of layers 0..L.

use crate::sparse::{Csr, SparseOperator};
use candle_core::{Result, Tensor};
use rudder_data::Interactions;

/// `Â` for a train split. Repeated (user, item) pairs count once.
pub fn norm_adj(train: &Interactions) -> SparseOperator {
    let nu = train.n_users();
    let ni = train.n_items();
    let sets = train.sorted_sets();
    let mut deg = vec![0f32; nu + ni];
    for (u, s) in sets.iter().enumerate() {
        deg[u] += s.len() as f32;
        for &i in s {
            deg[nu + i as usize] += 1.0;
        }
    }
    let inv: Vec<f32> = deg
        .iter()
        .map(|&d| if d > 0.0 { 1.0 / d.sqrt() } else { 0.0 })
        .collect();
    let mut t = Vec::with_capacity(2 * sets.iter().map(|s| s.len()).sum::<usize>());
    for (u, s) in sets.iter().enumerate() {
        for &i in s {
            let j = nu + i as usize;
            let w = inv[u] * inv[j];
            t.push((u as u32, j as u32, w));
            t.push((j as u32, u as u32, w));
        }
    }
    SparseOperator::symmetric(Csr::from_triples(nu + ni, nu + ni, &t))
}

/// LightGCN: `mean(E, ÂE, …, Â^L E)`; `L = 0` returns `E` (matrix factorisation).
pub fn lightgcn(e0: &Tensor, adj: &SparseOperator, n_layers: usize) -> Result<Tensor> {
    if n_layers == 0 {
        return Ok(e0.clone());
    }
    let mut acc = e0.clone();
    let mut cur = e0.clone();
    for _ in 0..n_layers {
        cur = adj.matmul(&cur)?;
        acc = (acc + &cur)?;
    }
    acc / (n_layers as f64 + 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn normalisation_matches_hand_computation() {
        // u0: {i0, i1}, u1: {i1}; degrees u0=2, u1=1, i0=1, i1=2
        let train = Interactions::from_lists(2, &[vec![0, 1, 1], vec![1]]);
        let adj = norm_adj(&train);
        let d = adj.a.to_dense();
        let n = 4;
        let at = |r: usize, c: usize| d[r * n + c];
        assert!((at(0, 2) - 1.0 / (2f32.sqrt() * 1.0)).abs() < 1e-6);
        assert!((at(0, 3) - 1.0 / 2.0).abs() < 1e-6);
        assert!((at(1, 3) - 1.0 / (1.0 * 2f32.sqrt())).abs() < 1e-6);
        assert_eq!(at(0, 0), 0.0, "no self-loops");
        for r in 0..n {
            for c in 0..n {
                assert_eq!(at(r, c), at(c, r), "symmetric");
            }
        }
    }

    #[test]
    fn propagation_is_the_layer_mean() -> Result<()> {
        let train = Interactions::from_lists(3, &[vec![0, 2], vec![1]]);
        let adj = norm_adj(&train);
        let dev = Device::Cpu;
        let e = Tensor::from_vec(
            (0..5 * 2).map(|x| x as f32).collect::<Vec<_>>(),
            (5, 2),
            &dev,
        )?;
        let out = lightgcn(&e, &adj, 2)?;
        let a = Tensor::from_vec(adj.a.to_dense(), (5, 5), &dev)?;
        let e1 = a.matmul(&e)?;
        let e2 = a.matmul(&e1)?;
        let want = ((e.clone() + e1)? + e2)?.affine(1.0 / 3.0, 0.0)?;
        let diff = (out - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5);
        assert_eq!(
            lightgcn(&e, &adj, 0)?.to_vec2::<f32>()?,
            e.to_vec2::<f32>()?
        );
        Ok(())
    }
}
