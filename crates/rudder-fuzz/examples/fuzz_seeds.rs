//! Write each fuzz target's seed inputs to `<out>/<target>/seed-<n>` (bench/fuzz.sh runs this
//! first): `cargo run -p rudder-fuzz --example fuzz_seeds -- OUT [SHARED_DATA] [ASSET_DIR]`.
fn main() {
    let mut args = std::env::args().skip(1);
    let out = std::path::PathBuf::from(args.next().expect("usage: seeds OUT [SHARED] [ASSETS]"));
    let shared = args.next().map(std::path::PathBuf::from);
    let assets = args.next().map(std::path::PathBuf::from);
    let mut n = std::collections::HashMap::new();
    for (t, bytes) in rudder_fuzz::seeds(shared.as_deref(), assets.as_deref()) {
        let k = n.entry(t).or_insert(0);
        let d = out.join(t);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(format!("seed-{k}")), bytes).unwrap();
        *k += 1;
    }
    for (t, k) in n {
        println!("{t}: {k} seeds");
    }
}
