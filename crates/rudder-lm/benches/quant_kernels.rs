//! Throughput of the quantized matmul kernels and of the packed f32 kernels (beside candle's
//! f32 matmul) on SmolLM2-135M's matrix shapes, every kernel this CPU runs, for 1 to 256
//! activation rows (decode steps of growing batches, then a prefill chunk). A benchmark, not a
//! test: it prints GMAC/s and asserts nothing.
//!
//! `cargo bench --profile fast -p rudder-lm --bench quant_kernels` (threads: RAYON_NUM_THREADS).
//! Arguments after `--`: `f32` prints the f32 table only; kernel names (`avx2`, `avx512`, …)
//! keep only those kernels; `no-candle` leaves out candle's matmul column; `rows=8,32` sets
//! the activation-row counts; `cold` cycles the f32 products through 256 MB of copies of each
//! matrix, so that weights come from memory as in a decode step, not from cache.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rudder_lm::dense::PackedMatrix;
use rudder_lm::quant::{QFormat, QMatrix, kernel_names, matmul_with_kernel};

/// GMAC/s of `f` (one `rows × cols` product of `n` activation rows): about two seconds of work
/// per cell at 1 GMAC/s in ten timed slices of at least one run each, the fastest slice
/// reported (on a shared VM other tenants slow some slices down; the best one is the kernel's).
fn gmacs(rows: usize, cols: usize, n: usize, mut f: impl FnMut()) -> String {
    let per = (200_000_000 / (rows * cols * n)).max(1);
    f();
    let mut best = f64::INFINITY;
    for _ in 0..10 {
        let t = std::time::Instant::now();
        for _ in 0..per {
            f();
        }
        best = best.min(t.elapsed().as_secs_f64() / per as f64);
    }
    format!("{:.1}", (rows * cols * n) as f64 / best / 1e9)
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
    let args: Vec<String> = std::env::args().skip(1).collect();
    // The portable loop (~1 GMAC/s) is left out, and kernels not named when any is.
    let keep = |names: Vec<&'static str>| -> Vec<&'static str> {
        let named = names.iter().any(|k| args.iter().any(|a| a == k));
        names
            .into_iter()
            .filter(|k| *k != "scalar" && (!named || args.iter().any(|a| a == k)))
            .collect()
    };
    let candle = !args.iter().any(|a| a == "no-candle");
    let cold = args.iter().any(|a| a == "cold");
    // `rows=8,32`: these activation-row counts instead of the default list
    let row_counts: Vec<usize> = args
        .iter()
        .find_map(|a| a.strip_prefix("rows="))
        .map(|l| {
            l.split(',')
                .map(|r| match r.trim().parse::<usize>() {
                    Ok(n) if n > 0 => n,
                    _ => {
                        eprintln!("rows={l}: {r:?} is not a positive row count");
                        std::process::exit(2)
                    }
                })
                .collect()
        })
        .unwrap_or_else(|| vec![1, 8, 16, 32, 256, 736]);
    let names = keep(kernel_names());
    println!("threads: {}", rayon::current_num_threads());
    // `cargo bench … --bench quant_kernels -- f32`: the f32 table only
    let quant_shapes = if args.iter().any(|a| a == "f32") {
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
        for &n in &row_counts {
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
    let names = keep(rudder_lm::dense::kernel_names());
    let mut head = names.clone();
    if candle {
        head.insert(0, "candle");
    }
    println!();
    println!("| f32 matrix | rows | {} |", head.join(" | "));
    println!("|---|---|{}", "---|".repeat(head.len()));
    for (name, rows, cols, _) in shapes {
        let w = Tensor::randn(0f32, 0.05, (rows, cols), &Device::Cpu).unwrap();
        let wv: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
        // `cold`: enough copies to fill 256 MB, used in turn, so that every product reads its
        // weights from memory as a decode step does (the 30 layers are 425 MB in f32)
        let copies = if cold {
            (256usize << 20).div_ceil(rows * cols * 4)
        } else {
            1
        };
        let ps: Vec<PackedMatrix> = (0..copies)
            .map(|_| PackedMatrix::new(rows, cols, &wv).unwrap())
            .collect();
        let wt = w.t().unwrap();
        for &n in &row_counts {
            let x = acts(n, cols);
            let xt = Tensor::from_slice(&x, (n, cols), &Device::Cpu).unwrap();
            let mut cells = Vec::new();
            if candle {
                cells.push(gmacs(rows, cols, n, || {
                    std::hint::black_box(xt.matmul(&wt).unwrap());
                }));
            }
            for &k in &names {
                let mut i = 0;
                cells.push(gmacs(rows, cols, n, || {
                    i = (i + 1) % ps.len();
                    std::hint::black_box(rudder_lm::dense::matmul_with_kernel(&ps[i], &x, n, k));
                }));
            }
            println!("| {name} {rows}×{cols} | {n} | {} |", cells.join(" | "));
        }
    }
}
