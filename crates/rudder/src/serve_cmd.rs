//! `rudder serve`: flags → [`rudder_serve::ServeConfig`] → the server.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use rudder_client::inproc::{InProcess, InProcessConfig, model_name};
use rudder_lm::engine::EngineConfig;
use rudder_lm::loader::{LoadOptions, load};
use rudder_serve::{AppState, ServeConfig};

#[derive(Args)]
#[command(after_help = "Examples:
  rudder serve --model smollm2-135m-instruct
  rudder serve --model model.gguf --embedding-model all-minilm-l6-v2 --port 9000
  rudder serve --model smollm2-135m-instruct --steer terse=terse.json   # per-request: \"rudder\": {\"steer\": \"terse\", \"strength\": 2}

Then point any OpenAI client at http://127.0.0.1:8080/v1 (see docs/serve.md).")]
pub struct ServeArgs {
    /// Generation model: a fetched asset name (smollm2-135m-instruct), a .gguf file or a
    /// Hugging Face model folder.
    #[arg(long, short)]
    pub model: Option<String>,
    /// The name clients use for it (default: the asset or file name).
    #[arg(long)]
    pub served_name: Option<String>,
    /// Sentence encoder served on /v1/embeddings (e.g. all-minilm-l6-v2 or a folder).
    #[arg(long)]
    pub embedding_model: Option<String>,
    /// Address to bind. Anything other than a loopback address exposes the server to the
    /// network: set --api-key then.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on /v1 endpoints.
    #[arg(long, env = "RUDDER_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Generations decoded together (continuous batching rows).
    #[arg(long, default_value_t = 32)]
    pub max_batch: usize,
    /// Generations that may wait for a row; beyond that requests get 429 + Retry-After.
    #[arg(long, default_value_t = 256)]
    pub max_queue: usize,
    /// Prompt tokens read per batched step (bounds how long a long prompt delays the others).
    #[arg(long, default_value_t = 512)]
    pub prefill_chunk: usize,
    /// Number format of the key/value cache: f32 (exact) or f16 (half the bytes per cached
    /// token: more rows fit, long batched decoding runs faster; numbers differ by the rounding).
    #[arg(long, default_value = "f32")]
    pub kv: rudder_lm::ragged::KvPrecision,
    /// New tokens when a request sets no max_tokens.
    #[arg(long, default_value_t = 512)]
    pub default_max_tokens: u32,
    /// The largest max_tokens a request may ask for.
    #[arg(long, default_value_t = 4096)]
    pub max_tokens_cap: u32,
    /// The largest n (choices per request).
    #[arg(long, default_value_t = 8)]
    pub max_n: u32,
    /// The largest request body, in bytes.
    #[arg(long, default_value_t = 4 << 20)]
    pub max_body_bytes: usize,
    /// A named steering file that requests may select: NAME=FILE, with FILE an intervention
    /// list (JSON), a steering-vector file (`rudder steer vector`, a llama.cpp control-vector
    /// GGUF) or an AlphaSteer file (`rudder steer alphasteer fit`); the request's
    /// `rudder.strength` scales it.
    /// Repeatable.
    #[arg(long, value_name = "NAME=FILE")]
    pub steer: Vec<String>,
    /// Seconds that running requests get to finish after SIGTERM/Ctrl-C.
    #[arg(long, default_value_t = 30.0)]
    pub shutdown_grace: f64,
    /// Dequantize GGUF weights to f32 (exact parity with f32 tools; slower).
    #[arg(long)]
    pub dequantize: bool,
}

pub fn run(a: ServeArgs) -> Result<()> {
    if a.model.is_none() && a.embedding_model.is_none() {
        bail!("nothing to serve: give --model and/or --embedding-model");
    }
    let host: IpAddr = a
        .host
        .parse()
        .with_context(|| format!("--host {:?} is not an IP address", a.host))?;
    if !host.is_loopback() && a.api_key.is_none() {
        eprintln!(
            "warning: serving on {host} without --api-key: anyone who can reach this port can use the model"
        );
    }
    let mut steer = Vec::new();
    for s in &a.steer {
        let (name, file) = s
            .split_once('=')
            .with_context(|| format!("--steer {s:?}: expected NAME=FILE"))?;
        steer.push((name.to_string(), PathBuf::from(file)));
    }
    let cfg = ServeConfig {
        host: a.host.clone(),
        port: a.port,
        api_key: a.api_key.clone(),
        inproc: InProcessConfig {
            engine: EngineConfig {
                max_rows: a.max_batch.max(1),
                max_queue: a.max_queue,
                prefill_chunk: a.prefill_chunk.max(1),
                kv: a.kv,
            },
            default_max_tokens: a.default_max_tokens.max(1),
            max_tokens_cap: a.max_tokens_cap.max(1),
            max_n: a.max_n.max(1),
        },
        steer,
        max_body_bytes: a.max_body_bytes,
        shutdown_grace: Duration::from_secs_f64(a.shutdown_grace.max(0.0)),
    };
    let mut steering = std::collections::HashMap::new();
    for (name, path) in &cfg.steer {
        steering.insert(
            name.clone(),
            crate::steer_cmd::steering_file(path, 1.0, None)
                .with_context(|| format!("--steer {name}"))?,
        );
    }
    let lm = match &a.model {
        None => None,
        Some(m) => {
            let path = crate::lm_cmd::resolve_model(m)?;
            let sp = crate::progress::spinner(&format!("loading {}", path.display()));
            let lm = load(
                &path,
                &LoadOptions {
                    dequantize: a.dequantize,
                },
            )?;
            sp.finish_and_clear();
            let c = &lm.decoder.cfg;
            for (name, iv) in &steering {
                iv.validate(c.num_layers, c.hidden_size)
                    .with_context(|| format!("--steer {name}"))?;
            }
            let name = a
                .served_name
                .clone()
                .unwrap_or_else(|| model_name(m, &path));
            Some(Arc::new(
                InProcess::new(lm, name, cfg.inproc.clone()).with_steering(steering),
            ))
        }
    };
    let encoder = match &a.embedding_model {
        None => None,
        Some(e) => {
            let path = crate::lm_cmd::resolve_model(e)?;
            let enc = rudder_lm::bert::TextEncoder::load(&path)?;
            Some((model_name(e, &path), Arc::new(enc)))
        }
    };
    let state = Arc::new(AppState::new(lm.clone(), encoder.clone(), &cfg));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let addr = std::net::SocketAddr::new(host, cfg.port);
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        let local = listener.local_addr()?;
        eprintln!("rudder serve: listening on http://{local}/v1");
        if let Some(l) = &lm {
            eprintln!(
                "  model {:?} ({} layers, context {}), batch {} rows, queue {}",
                l.name,
                l.lm().info.layers,
                l.lm().info.context,
                cfg.inproc.engine.max_rows,
                cfg.inproc.engine.max_queue
            );
            if !l.steering_names().is_empty() {
                eprintln!("  steering files: {}", l.steering_names().join(", "));
            }
        }
        if let Some((n, _)) = &encoder {
            eprintln!("  embeddings: {n:?}");
        }
        rudder_serve::serve(
            state,
            listener,
            cfg.shutdown_grace,
            rudder_serve::shutdown_signal(),
        )
        .await?;
        eprintln!("rudder serve: stopped");
        Ok(())
    })
}
