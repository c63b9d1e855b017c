//! Prometheus text metrics: request counters by endpoint and status, latency and
//! time-to-first-token histograms, and the engine's gauges and counters.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use rudder_lm::engine::Stats;

const BUCKETS: [f64; 12] = [
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

#[derive(Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    sum: f64,
    n: u64,
}

impl Histogram {
    fn observe(&mut self, v: f64) {
        for (i, b) in BUCKETS.iter().enumerate() {
            if v <= *b {
                self.counts[i] += 1;
            }
        }
        self.sum += v;
        self.n += 1;
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {}",
                self.counts[i]
            );
        }
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}", self.n);
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braces} {}", self.n);
    }
}

#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    latency: Mutex<BTreeMap<String, Histogram>>,
    ttft: Mutex<Histogram>,
    pub in_flight: AtomicU64,
    /// Completion tokens per second over the last sampling window.
    pub rate_milli: AtomicU64,
    last: Mutex<(u64, Option<std::time::Instant>)>,
}

impl Metrics {
    pub fn request(&self, endpoint: &str, status: u16, seconds: f64) {
        *self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((endpoint.to_string(), status))
            .or_default() += 1;
        self.latency
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(endpoint.to_string())
            .or_default()
            .observe(seconds);
    }

    pub fn first_token(&self, seconds: f64) {
        self.ttft
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .observe(seconds);
    }

    /// Update the tokens/s gauge from the engine's completion counter (called every second).
    pub fn sample_rate(&self, stats: &Stats) {
        let now = std::time::Instant::now();
        let tokens = stats.completion_tokens.load(Ordering::Relaxed);
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = last.1 {
            let dt = now.duration_since(t).as_secs_f64();
            if dt > 0.0 {
                let r = (tokens - last.0) as f64 / dt;
                self.rate_milli.store((r * 1e3) as u64, Ordering::Relaxed);
            }
        }
        *last = (tokens, Some(now));
    }

    pub fn render(&self, stats: Option<&Stats>) -> String {
        let mut out = String::new();
        out.push_str("# HELP rudder_requests_total Requests answered, by endpoint and status.\n# TYPE rudder_requests_total counter\n");
        for ((ep, st), n) in self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "rudder_requests_total{{endpoint=\"{ep}\",status=\"{st}\"}} {n}"
            );
        }
        out.push_str("# HELP rudder_request_duration_seconds Time from request to the end of its answer.\n# TYPE rudder_request_duration_seconds histogram\n");
        for (ep, h) in self
            .latency
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            h.render(
                &mut out,
                "rudder_request_duration_seconds",
                &format!("endpoint=\"{ep}\""),
            );
        }
        out.push_str("# HELP rudder_time_to_first_token_seconds Time from request to its first generated token.\n# TYPE rudder_time_to_first_token_seconds histogram\n");
        self.ttft.lock().unwrap_or_else(|e| e.into_inner()).render(
            &mut out,
            "rudder_time_to_first_token_seconds",
            "",
        );
        let gauge = |out: &mut String, name: &str, help: &str, v: f64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        };
        gauge(
            &mut out,
            "rudder_requests_in_flight",
            "Requests being answered.",
            self.in_flight.load(Ordering::Relaxed) as f64,
        );
        if let Some(s) = stats {
            let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
            gauge(
                &mut out,
                "rudder_queue_depth",
                "Generations waiting for a batch row.",
                s.queued.load(Ordering::Relaxed) as f64,
            );
            gauge(
                &mut out,
                "rudder_batch_rows",
                "Generations in the decode batch.",
                s.active.load(Ordering::Relaxed) as f64,
            );
            gauge(
                &mut out,
                "rudder_tokens_per_second",
                "Generated tokens per second over the last second.",
                self.rate_milli.load(Ordering::Relaxed) as f64 / 1e3,
            );
            gauge(
                &mut out,
                "rudder_kv_cache_bytes",
                "Bytes held by the rows' key/value caches.",
                g(&s.kv_bytes) as f64,
            );
            counter(
                &mut out,
                "rudder_prompt_tokens_total",
                "Prompt tokens read.",
                g(&s.prompt_tokens),
            );
            counter(
                &mut out,
                "rudder_shared_prompt_tokens_total",
                "Prompt tokens copied from a row with the same prompt instead of computed.",
                g(&s.shared_prompt_tokens),
            );
            counter(
                &mut out,
                "rudder_completion_tokens_total",
                "Tokens generated.",
                g(&s.completion_tokens),
            );
            counter(
                &mut out,
                "rudder_engine_steps_total",
                "Batched forward passes.",
                g(&s.steps),
            );
            gauge(
                &mut out,
                "rudder_engine_busy_seconds",
                "Seconds the engine spent computing.",
                g(&s.busy_ns) as f64 / 1e9,
            );
            counter(
                &mut out,
                "rudder_generations_finished_total",
                "Generations that ran to their end.",
                g(&s.finished),
            );
            counter(
                &mut out,
                "rudder_generations_cancelled_total",
                "Generations cancelled (client gone).",
                g(&s.cancelled),
            );
            counter(
                &mut out,
                "rudder_generations_failed_total",
                "Generations that failed.",
                g(&s.failed),
            );
        }
        out
    }
}
