//! Time the pieces of one LoRA training micro-batch on a real model:
//! `cargo run --release -p rudder-llmrec --example step_profile -- MODEL [BATCH] [PROMPT_TOKENS]`.
use std::time::Instant;

use rudder_lm::hooks::NoHook;
use rudder_lm::loader::{LoadOptions, load};
use rudder_lm::lora::LoraConfig;
use rudder_lm::score::continuation_logprobs;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let path = std::path::PathBuf::from(&args[1]);
    let b: usize = args.get(2).map_or(4, |s| s.parse().unwrap());
    let t: usize = args.get(3).map_or(180, |s| s.parse().unwrap());
    let mut lm = load(&path, &LoadOptions { dequantize: true }).unwrap();
    let p: f64 = std::env::var("LORA_DROPOUT").map_or(0.1, |v| v.parse().unwrap());
    let ad = lm.decoder.attach_lora(&LoraConfig { dropout: p, ..LoraConfig::default() }, 1).unwrap();
    let pairs: Vec<(Vec<u32>, Vec<u32>)> = (0..b)
        .map(|r| ((0..t as u32).map(|i| 100 + (i * 7 + r as u32) % 5000).collect(), vec![300, 400, 500, 2]))
        .collect();
    for (label, diff, train) in [("inference", false, false), ("graph, no dropout", true, false), ("training", true, true)] {
        lm.decoder.differentiable = diff;
        ad.set_training(train);
        let t0 = Instant::now();
        let lp = continuation_logprobs(&lm.decoder, &pairs, 0, &mut NoHook).unwrap();
        let loss = lp.sum_all().unwrap();
        let f = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        if diff {
            let g = loss.backward().unwrap();
            std::hint::black_box(g);
        }
        let bw = t1.elapsed().as_secs_f64();
        println!("{label:>18}: forward {f:.2} s, backward {bw:.2} s ({} tokens)", b * (t + 4));
    }
}
