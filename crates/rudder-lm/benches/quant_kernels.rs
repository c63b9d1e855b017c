//! Throughput of the quantized matmul kernels and of the packed f32 kernels (beside candle's
//! f32 matmul) on SmolLM2-135M's matrix shapes, every kernel this CPU runs, for 1 to 256
//! activation rows (decode steps of growing batches, then a prefill chunk). A benchmark, not a
//! test: it prints GMAC/s and asserts nothing.
//!
//! `cargo bench --profile fast -p rudder-lm --bench quant_kernels` (threads: RAYON_NUM_THREADS)

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rudder_lm::dense::PackedMatrix;
use rudder_lm::quant::{QFormat, QMatrix, kernel_names, matmul_with_kernel};

/// GMAC/s of `f` (one `rows × cols` product of `n` activation rows), about two seconds of work
/// per cell at 1 GMAC/s, at least 3 runs.
fn gmacs(rows: usize, cols: usize, n: usize, mut f: impl FnMut()) -> String {
    let reps = (2_000_000_000 / (rows * cols * n)).max(3);
    f();
    let t = std::time::Instant::now();
    for _ in 0..reps {
        f();
    }
    let s = t.elapsed().as_secs_f64() / reps as f64;
    format!("{:.1}", (rows * cols * n) as f64 / s / 1e9)
}

fn acts(n: usize, cols: usize) -> Vec<f32> {
    (0..n * cols)
        .map(|i| ((i * 7919 % 101) as f32 / 50.0) - 1.0)
        .collect()
}

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
    // `cargo bench … --bench quant_kernels -- f32`: the f32 table only
    let quant_shapes = if std::env::args().any(|a| a == "f32") {
        &shapes[..0]
    } else {
        &shapes[..]
    };
    if !quant_shapes.is_empty() {
        println!("| matrix | rows | {} |", names.join(" | "));
        println!("|---|---|{}", "---|".repeat(names.len()));
    }
    for &(name, rows, cols, dt) in quant_shapes {
        let w = Tensor::randn(0f32, 0.05, (rows, cols), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, dt).unwrap();
        let fmt = QFormat::from_ggml(dt).unwrap();
        let m = QMatrix::new(fmt, rows, cols, q.data().unwrap().to_vec()).unwrap();
        for n in [1usize, 8, 16, 32, 256, 736] {
            let x = acts(n, cols);
            let cells: Vec<String> = names
                .iter()
                .map(|&k| {
                    gmacs(rows, cols, n, || {
                        std::hint::black_box(matmul_with_kernel(&m, &x, n, k));
                    })
                })
                .collect();
            println!(
                "| {name} {rows}×{cols} {dt:?} | {n} | {} |",
                cells.join(" | ")
            );
        }
    }
    // f32: the packed kernels beside candle's matmul (gemm), which the f32 path used before.
    let names: Vec<&str> = rudder_lm::dense::kernel_names()
        .into_iter()
        .filter(|k| *k != "scalar")
        .collect();
    println!();
    println!("| f32 matrix | rows | candle | {} |", names.join(" | "));
    println!("|---|---|---|{}", "---|".repeat(names.len()));
    for (name, rows, cols, _) in shapes {
        let w = Tensor::randn(0f32, 0.05, (rows, cols), &Device::Cpu).unwrap();
        let p =
            PackedMatrix::new(rows, cols, &w.flatten_all().unwrap().to_vec1().unwrap()).unwrap();
        let wt = w.t().unwrap();
        for n in [1usize, 8, 16, 32, 256, 736] {
            let x = acts(n, cols);
            let xt = Tensor::from_slice(&x, (n, cols), &Device::Cpu).unwrap();
            let mut cells = vec![gmacs(rows, cols, n, || {
                std::hint::black_box(xt.matmul(&wt).unwrap());
            })];
            for &k in &names {
                cells.push(gmacs(rows, cols, n, || {
                    std::hint::black_box(rudder_lm::dense::matmul_with_kernel(&p, &x, n, k));
                }));
            }
            println!("| {name} {rows}×{cols} | {n} | {} |", cells.join(" | "));
        }
    }
}
