//! The softmax preference loss of S-DPO (llmrec-seeds.md §1.5) and its DPO special case.
//!
//! With rewards `r = log πθ(y|x) − log π_ref(y|x)` of the chosen answer `w` and k rejected
//! answers `j`: `L = softplus(logsumexp_j β (r_j − r_w))`, i.e. the cross-entropy of the
//! chosen answer in a softmax over `{β r_w, β r_1..β r_k}`; with k = 1 it is DPO's
//! `−log σ(β (r_w − r_1))`. Logged as the reference does: `rewards/chosen = β r_w`,
//! `rewards/rejected` (mean over j of `β r_j`), margins, and accuracy (chosen above **all**
//! rejected).

use candle_core::{D, Tensor};

use crate::Result;

#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RewardStats {
    pub chosen: f64,
    pub rejected: f64,
    pub margin: f64,
    pub accuracy: f64,
}

/// `policy` and `reference`: `[B, 1 + k]` sequence log-probabilities, column 0 the chosen
/// answer. Returns the mean loss (a scalar tensor, differentiable through `policy`) and the
/// reward statistics.
pub fn sdpo_loss(policy: &Tensor, reference: &Tensor, beta: f64) -> Result<(Tensor, RewardStats)> {
    let (b, n) = policy.dims2()?;
    let r = ((policy - reference)? * beta)?; // β r
    let rw = r.narrow(1, 0, 1)?;
    let rj = r.narrow(1, 1, n - 1)?;
    let diff = rj.broadcast_sub(&rw)?; // [B, k]
    let m = diff.max_keepdim(D::Minus1)?.detach();
    let lse = (diff
        .broadcast_sub(&m)?
        .exp()?
        .sum_keepdim(D::Minus1)?
        .log()?
        + m)?;
    let loss = (rudder_nn::ops::softplus(&lse)?.sum_all()? / b as f64)?;
    let rv = r.to_vec2::<f32>()?;
    let mut st = RewardStats::default();
    for row in &rv {
        let rej = row[1..].iter().map(|&x| x as f64).sum::<f64>() / (n - 1) as f64;
        st.chosen += row[0] as f64;
        st.rejected += rej;
        st.margin += row[0] as f64 - rej;
        st.accuracy += row[1..].iter().all(|&x| row[0] > x) as u8 as f64;
    }
    for v in [
        &mut st.chosen,
        &mut st.rejected,
        &mut st.margin,
        &mut st.accuracy,
    ] {
        *v /= b as f64;
    }
    Ok((loss, st))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn loss_gradients_and_dpo_special_case() {
        let dev = Device::Cpu;
        let pol = [[-3.0f32, -4.0, -2.5, -6.0], [-1.0, -5.0, -7.0, -2.0]];
        let refv = [[-3.5f32, -3.0, -3.0, -5.0], [-2.0, -4.0, -6.0, -2.5]];
        let beta = 0.7;
        let p = Var::from_slice(&pol.concat(), (2, 4), &dev).unwrap();
        let r = Tensor::from_slice(&refv.concat(), (2, 4), &dev).unwrap();
        let (loss, st) = sdpo_loss(p.as_tensor(), &r, beta).unwrap();
        // direct formula: −log softmax_w over {β r}
        let mut want = 0.0;
        let mut gw = [[0f64; 4]; 2];
        for b in 0..2 {
            let rr: Vec<f64> = (0..4)
                .map(|j| beta * (pol[b][j] - refv[b][j]) as f64)
                .collect();
            let z: f64 = rr.iter().map(|x| x.exp()).sum();
            want += -(rr[0].exp() / z).ln() / 2.0;
            // ∂L/∂r_w = −β(1 − p_w), ∂L/∂r_j = β p_j   (per example, then /B)
            for j in 0..4 {
                let pj = rr[j].exp() / z;
                gw[b][j] = if j == 0 {
                    -beta * (1.0 - pj)
                } else {
                    beta * pj
                } / 2.0;
            }
        }
        let got = loss.to_scalar::<f32>().unwrap() as f64;
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        let g = loss.backward().unwrap();
        let g = g.get(p.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
        for b in 0..2 {
            for j in 0..4 {
                assert!((g[b][j] as f64 - gw[b][j]).abs() < 1e-5, "grad {b},{j}");
            }
        }
        // row 0 ties its best negative (0.35 = 0.35: not above all), row 1 beats all three
        assert_eq!(st.accuracy, 0.5);
        // k = 1: DPO
        let p1 = Tensor::from_slice(&[-2.0f32, -3.0], (1, 2), &dev).unwrap();
        let r1 = Tensor::from_slice(&[-2.5f32, -2.0], (1, 2), &dev).unwrap();
        let (l1, _) = sdpo_loss(&p1, &r1, 0.1).unwrap();
        let m: f64 = 0.1 * ((-2.0 + 2.5) - (-3.0 + 2.0));
        let dpo = (1.0f64 + (-m).exp()).ln();
        assert!((l1.to_scalar::<f32>().unwrap() as f64 - dpo).abs() < 1e-6);
    }
}
