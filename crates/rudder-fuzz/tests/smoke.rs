//! The fuzz targets on stable: every crash input found so far (tests/crashes/<target>/*) must
//! now be handled without a panic, and a short seeded mutation run over each target's seeds
//! must not panic either. The coverage-guided runs live in `fuzz/` (bench/fuzz.sh).

use rand::SeedableRng;
use std::path::{Path, PathBuf};

fn target(name: &str) -> fn(&[u8]) {
    rudder_fuzz::TARGETS
        .iter()
        .find(|(n, _)| *n == name)
        .unwrap_or_else(|| panic!("no target {name}"))
        .1
}

fn shared() -> Option<PathBuf> {
    let p = std::env::var_os("RUDDER_SHARED_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data"));
    p.is_dir().then_some(p)
}

fn assets() -> Option<PathBuf> {
    rudder_data::assets::for_tests("ml-100k").and_then(|p| p.parent().map(Path::to_path_buf))
}

#[test]
fn every_crash_found_so_far_is_an_error_not_a_panic() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/crashes");
    let mut n = 0;
    for t in std::fs::read_dir(&dir).unwrap() {
        let t = t.unwrap().path();
        let name = t.file_name().unwrap().to_string_lossy().into_owned();
        let f = target(&name);
        for c in std::fs::read_dir(&t).unwrap() {
            let c = c.unwrap().path();
            let bytes = std::fs::read(&c).unwrap();
            let r = std::panic::catch_unwind(|| f(&bytes));
            assert!(r.is_ok(), "{name}: {} panics", c.display());
            n += 1;
        }
    }
    assert!(n > 0, "no regression inputs under {}", dir.display());
}

#[test]
fn seeded_mutation_smoke_run() {
    let seeds = rudder_fuzz::seeds(shared().as_deref(), assets().as_deref());
    // every target has at least one seed
    for (name, _) in rudder_fuzz::TARGETS {
        assert!(seeds.iter().any(|(n, _)| n == name), "no seed for {name}");
    }
    let iters: usize = std::env::var("RUDDER_FUZZ_SMOKE_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(20261130);
    for (name, seed) in &seeds {
        // large seeds (a real tokenizer.json) cost seconds per input: fewer mutations
        let k = if seed.len() > 100_000 { 2 } else { iters };
        let f = target(name);
        assert!(
            std::panic::catch_unwind(|| f(seed)).is_ok(),
            "{name}: a seed panics"
        );
        for i in 0..k {
            let m = rudder_fuzz::mutate(seed, &mut rng);
            let r = std::panic::catch_unwind(|| f(&m));
            if r.is_err() {
                let out = std::env::temp_dir().join(format!("rudder-fuzz-crash-{name}-{i}"));
                std::fs::write(&out, &m).unwrap();
                panic!(
                    "{name}: mutation {i} panics (input saved to {})",
                    out.display()
                );
            }
        }
    }
}
