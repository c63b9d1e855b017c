//! Parameter initialisation matching PyTorch's, drawn from rudder's seeded streams.

use candle_core::{Device, Result, Tensor};
use rand_distr::Distribution;

/// `xavier_normal_` on an `[n, d]` table: N(0, σ²) with σ = sqrt(2 / (n + d)).
pub fn xavier_normal(n: usize, d: usize, seed: u64, key: u64, dev: &Device) -> Result<Tensor> {
    let sigma = (2.0 / (n + d) as f64).sqrt();
    normal(n, d, sigma, seed, key, dev)
}

/// An `[n, d]` table of N(0, σ²) values.
pub fn normal(n: usize, d: usize, sigma: f64, seed: u64, key: u64, dev: &Device) -> Result<Tensor> {
    let mut r = rudder_data::rng::stream(seed, &[0x1417, key]);
    let nd = rand_distr::Normal::new(0.0, sigma).unwrap();
    let v: Vec<f32> = (0..n * d).map(|_| nd.sample(&mut r) as f32).collect();
    Tensor::from_vec(v, (n, d), dev)
}

/// PyTorch `nn.Linear` default: weight and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
pub fn linear_uniform(
    out_dim: usize,
    in_dim: usize,
    seed: u64,
    key: u64,
    dev: &Device,
) -> Result<(Tensor, Tensor)> {
    let mut r = rudder_data::rng::stream(seed, &[0x11EA, key]);
    let b = 1.0 / (in_dim as f64).sqrt();
    let u = rand_distr::Uniform::new(-b, b).unwrap();
    let w: Vec<f32> = (0..out_dim * in_dim)
        .map(|_| u.sample(&mut r) as f32)
        .collect();
    let bias: Vec<f32> = (0..out_dim).map(|_| u.sample(&mut r) as f32).collect();
    Ok((
        Tensor::from_vec(w, (out_dim, in_dim), dev)?,
        Tensor::from_vec(bias, out_dim, dev)?,
    ))
}
