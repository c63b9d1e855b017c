//! Rudder side of the LoRA training-throughput comparison (docs/benchmarks.md; the peer is
//! bench/llmrec_speed.py): one SFT optimizer step = forward + backward of BATCH sequences of
//! PROMPT prompt tokens + 4 answer tokens (loss on the answer only) + clipping + AdamW, in f32,
//! LoRA r 8, α 32, dropout 0.1 on all seven projections.
//!
//! With EXPERTS > 1 the adapter is MoE-LoRA (iLoRA) at the same total rank, gated per sequence
//! by the ResNet router over a fixed random 64-dim user vector (router forward and backward
//! included in the step), so plain and MoE-LoRA steps compare at equal rank.
//!
//! `cargo run --release -p rudder-llmrec --example step_profile -- MODEL [BATCH] [PROMPT] [STEPS] [EXPERTS]`
use std::time::Instant;

// The allocator of the `rudder` binary, so that the step costs what it costs in the CLI.
#[global_allocator]
static GLOBAL: rudder_nn::alloc::MiMalloc = rudder_nn::alloc::MiMalloc;

use rudder_lm::hooks::NoHook;
use rudder_lm::loader::{LoadOptions, load};
use rudder_lm::lora::LoraConfig;
use rudder_lm::score::continuation_logprobs;
use rudder_nn::optim::{Adam, AdamConfig, clip_grad_norm};

fn peak_rss_mb() -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn main() {
    rudder_nn::alloc::reset_instead_of_decommit();
    let args: Vec<String> = std::env::args().collect();
    let path = std::path::PathBuf::from(&args[1]);
    let b: usize = args.get(2).map_or(4, |s| s.parse().unwrap());
    let t: usize = args.get(3).map_or(180, |s| s.parse().unwrap());
    let steps: usize = args.get(4).map_or(4, |s| s.parse().unwrap());
    let experts: usize = args.get(5).map_or(1, |s| s.parse().unwrap());
    let mut lm = load(&path, &LoadOptions { dequantize: true }).unwrap();
    let ad = lm
        .decoder
        .attach_lora(
            &LoraConfig {
                experts,
                ..LoraConfig::default()
            },
            1,
        )
        .unwrap();
    let mut opt = Adam::new(ad.vars(), AdamConfig::adamw(1e-4, 0.0)).unwrap();
    let router = (experts > 1).then(|| {
        rudder_llmrec::router::Router::new(
            rudder_llmrec::router::RouterKind::Resnet,
            64,
            experts,
            lm.decoder.cfg.num_layers,
            3,
        )
        .unwrap()
    });
    if let Some(r) = &router {
        let vars = r.params().into_iter().map(|(_, v)| v).collect();
        opt.add_scaled_group(vars, AdamConfig::adam(1e-4), 0.3)
            .unwrap();
    }
    let users = candle_core::Tensor::randn(0f32, 1.0, (b, 64), &candle_core::Device::Cpu).unwrap();
    let mut params = ad.params.clone();
    if let Some(r) = &router {
        params.extend(r.params());
    }
    let pairs: Vec<(Vec<u32>, Vec<u32>)> = (0..b)
        .map(|r| {
            (
                (0..t as u32)
                    .map(|i| 100 + (i * 7 + r as u32) % 5000)
                    .collect(),
                vec![300, 400, 500, 2],
            )
        })
        .collect();
    lm.decoder.differentiable = true;
    ad.set_training(true);
    let mut times = Vec::new();
    let (mut fw, mut bw) = (0.0, 0.0);
    for s in 0..=steps {
        let t0 = Instant::now();
        if let Some(r) = &router {
            ad.set_gate(Some(&r.forward(&users, true).unwrap()))
                .unwrap();
        }
        let lp = continuation_logprobs(&lm.decoder, &pairs, 0, &mut NoHook).unwrap();
        let loss = (lp.sum_all().unwrap().neg().unwrap() / lp.elem_count() as f64).unwrap();
        let t1 = Instant::now();
        let g = loss.backward().unwrap();
        let t2 = Instant::now();
        ad.set_gate(None).unwrap();
        let mut gs: Vec<_> = params
            .iter()
            .map(|(_, v)| g.get(v.as_tensor()).unwrap().clone())
            .collect();
        clip_grad_norm(&mut gs, 0.3).unwrap();
        opt.step_with(|p| {
            params
                .iter()
                .position(|(_, v)| v.as_tensor().id() == p.id())
                .map(|i| gs[i].clone())
        })
        .unwrap();
        if s > 0 {
            times.push(t0.elapsed().as_secs_f64());
            fw += (t1 - t0).as_secs_f64();
            bw += (t2 - t1).as_secs_f64();
        }
    }
    times.sort_by(f64::total_cmp);
    let med = times[times.len() / 2];
    println!(
        "{}",
        serde_json::json!({"tool": "rudder", "batch": b, "prompt": t, "experts": experts, "threads": rayon::current_num_threads(),
            "median_step_s": med, "tokens_per_s": (b * (t + 4)) as f64 / med,
            "forward_s": fw / steps as f64, "backward_s": bw / steps as f64, "peak_rss_mb": peak_rss_mb()})
    );
}
