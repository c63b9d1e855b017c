//! The `rudder` command line: flags → configs → library calls. Errors are printed as one
//! message (with its causes) and a non-zero exit code, never a panic.

mod alphasteer_cmd;
mod assets_cmd;
mod bench_cmd;
mod cf_cmd;
mod data_cmd;
mod demo_cmd;
mod embed_cmd;
mod llmrec_cmd;
mod lm_cmd;
mod plots;
mod progress;
mod runs;
mod serve_cmd;
mod sim_cmd;
mod steer_cmd;

use clap::{Parser, Subcommand};

// mimalloc, purged pages reset instead of decommitted: see `rudder_nn::alloc`.
#[global_allocator]
static GLOBAL: rudder_nn::alloc::MiMalloc = rudder_nn::alloc::MiMalloc;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "rudder",
    version,
    about = "Language-model-era recommender systems in one binary",
    long_about = "rudder re-implements graph collaborative filtering that reads language \
representations, adversarial contrastive and debiasing losses, language-model recommenders tuned \
with preference losses, generative-agent simulation and activation steering — on CPU, from one \
binary.\n\nData arguments (--data, DATA) accept a folder or file in any supported format, the \
name of a fetched asset (e.g. ml-1m; see `rudder assets list`), or `synth` for the embedded \
synthetic world (`synth:SEED` for another seed).",
    after_help = "Start with:  rudder demo        (runs on the embedded synthetic world)\n            rudder assets list"
)]
struct Cli {
    /// More log output (-v info, -vv debug). RUDDER_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Worker threads for training and evaluation (default: all cores; RAYON_NUM_THREADS).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate, inspect, convert and split datasets.
    #[command(subcommand)]
    Data(data_cmd::DataCmd),
    /// List and fetch named datasets and models into the cache ($RUDDER_HOME).
    #[command(subcommand)]
    Assets(assets_cmd::AssetsCmd),
    /// Graph collaborative filtering: MF / LightGCN with BPR, InfoNCE, AdvInfoNCE.
    #[command(subcommand)]
    Cf(cf_cmd::CfCmd),
    /// The main job: split a dataset and rank it with baselines through the one evaluator,
    /// printing a comparison table and writing a run folder.
    Demo(demo_cmd::DemoArgs),
    /// Language models (Llama/Qwen2 families, safetensors or GGUF): generate, chat, score,
    /// capture activations.
    #[command(subcommand)]
    Lm(lm_cmd::LmCmd),
    /// Sentence embeddings of a text column (item titles…) with a BERT-family encoder.
    Embed(embed_cmd::EmbedArgs),
    /// Serve a model over the OpenAI API (chat, completions, embeddings) with continuous
    /// batching and per-request steering; see docs/serve.md.
    Serve(serve_cmd::ServeArgs),
    /// Activation steering: capture, probes, directions, llama.cpp control vectors, and the
    /// reasoning-strength study (see docs/steer.md).
    #[command(subcommand)]
    Steer(steer_cmd::SteerCmd),
    /// Language-model recommenders: SASRec / GRU4Rec / Caser baselines, LoRA SFT, DPO and
    /// S-DPO on a rudder-lm model, HR@1 / ValidRatio and likelihood evaluation (docs/llmrec.md).
    #[command(subcommand)]
    Llmrec(llmrec_cmd::LlmrecCmd),
    /// Generative-agent simulation: Agent4Rec user agents browsing a recommender, the taste
    /// discrimination test, persona generation (docs/sim.md).
    #[command(subcommand)]
    Sim(sim_cmd::SimCmd),
    /// Benchmarks of recommenders: AgentRecBench (language-model agents and classical models
    /// ranking 20 candidates through a visibility-enforcing tool API; docs/agentrec.md).
    #[command(subcommand)]
    Bench(bench_cmd::BenchCmd),
}

fn main() -> ExitCode {
    rudder_nn::alloc::reset_instead_of_decommit();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    // Transparent huge pages make every fresh tensor allocation fault in and zero 2 MiB;
    // autograd allocates many mid-sized tensors per step, so opt this process out.
    #[cfg(target_os = "linux")]
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
    // Output piped into `head` and closed early ends the process quietly, as for any Unix
    // tool, instead of a panic in println! (not for the server, whose sockets may close).
    #[cfg(unix)]
    if !matches!(cli.command, Command::Serve(_)) {
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    // candle's elementwise ops run on its own spinning thread pool; with the default spin limit
    // (25,000 rounds) those threads keep spinning while gemm's rayon workers compute and steal
    // their cores (measured: MiniLM embedding 920 → 1,320 texts/s on 2 cores with 200).
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        unsafe { std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "200") };
    }
    if let Some(t) = cli.threads {
        // candle's kernels read RAYON_NUM_THREADS; set it before any thread pool exists
        unsafe { std::env::set_var("RAYON_NUM_THREADS", t.max(1).to_string()) };
    }
    let default = match cli.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("RUDDER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let r = match cli.command {
        Command::Data(c) => data_cmd::run(c),
        Command::Assets(c) => assets_cmd::run(c),
        Command::Cf(c) => cf_cmd::run(c),
        Command::Demo(a) => demo_cmd::run(a),
        Command::Lm(c) => lm_cmd::run(c),
        Command::Embed(a) => embed_cmd::run(a),
        Command::Serve(a) => serve_cmd::run(a),
        Command::Steer(c) => steer_cmd::run(c),
        Command::Llmrec(c) => llmrec_cmd::run(c),
        Command::Sim(c) => sim_cmd::run(c),
        Command::Bench(c) => bench_cmd::run(c),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            // library errors already quote their source (`file: No such file or directory`):
            // print a cause only when it adds something
            let mut said = e.to_string();
            for cause in e.chain().skip(1) {
                let c = cause.to_string();
                if !said.contains(&c) {
                    eprintln!("  caused by: {c}");
                    said.push_str(&c);
                }
            }
            ExitCode::FAILURE
        }
    }
}
