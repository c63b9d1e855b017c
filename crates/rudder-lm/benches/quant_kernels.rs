//! Throughput of the quantized matmul kernels on SmolLM2-135M's matrix shapes, every kernel
//! this CPU runs, for 1 to 256 activation rows (decode steps of growing batches, then a prefill
//! chunk). A benchmark, not a test: it prints GMAC/s and asserts nothing.
//!
//! `cargo bench --profile fast -p rudder-lm --bench quant_kernels` (threads: RAYON_NUM_THREADS)

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rudder_lm::quant::{QFormat, QMatrix, kernel_names, matmul_with_kernel};

fn main() {
    let shapes = [
        ("attn q/o", 576, 576, GgmlDType::Q4_1),
        ("mlp gate/up", 1536, 576, GgmlDType::Q4_1),
        ("mlp down", 576, 1536, GgmlDType::Q4_1),
        ("lm head", 49152, 576, GgmlDType::Q8_0),
    ];
    // The portable loop (~1 GMAC/s) is left out.
    let names: Vec<&str> = kernel_names()
        .into_iter()
        .filter(|k| *k != "scalar")
        .collect();
    println!("threads: {}", rayon::current_num_threads());
    println!("| matrix | rows | {} |", names.join(" | "));
    println!("|---|---|{}", "---|".repeat(names.len()));
    for (name, rows, cols, dt) in shapes {
        let w = Tensor::randn(0f32, 0.05, (rows, cols), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, dt).unwrap();
        let fmt = QFormat::from_ggml(dt).unwrap();
        let m = QMatrix::new(fmt, rows, cols, q.data().unwrap().to_vec()).unwrap();
        for n in [1usize, 8, 16, 32, 256] {
            let x: Vec<f32> = (0..n * cols)
                .map(|i| ((i * 7919 % 101) as f32 / 50.0) - 1.0)
                .collect();
            let mut cells = Vec::new();
            for &k in &names {
                // about two seconds of work per cell at 1 GMAC/s, at least 3 runs
                let reps = (2_000_000_000 / (rows * cols * n)).max(3);
                let _ = matmul_with_kernel(&m, &x, n, k);
                let t = std::time::Instant::now();
                for _ in 0..reps {
                    std::hint::black_box(matmul_with_kernel(&m, &x, n, k));
                }
                let s = t.elapsed().as_secs_f64() / reps as f64;
                cells.push(format!("{:.1}", (rows * cols * n) as f64 / s / 1e9));
            }
            println!(
                "| {name} {rows}×{cols} {dt:?} | {n} | {} |",
                cells.join(" | ")
            );
        }
    }
}
