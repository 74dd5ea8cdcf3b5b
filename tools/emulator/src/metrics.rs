//! Prometheus metrics with vLLM's names, in the text exposition format.

use crate::lock;
use std::fmt::Write as _;
use std::sync::Mutex;

/// vLLM's bucket bounds for `vllm:time_to_first_token_seconds`.
pub const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
    80.0, 160.0, 640.0, 2560.0,
];

/// vLLM's bucket bounds for `vllm:e2e_request_latency_seconds`.
pub const E2E_BUCKETS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
    960.0, 1920.0, 7680.0,
];

/// Why a request finished, as vLLM labels `vllm:request_success_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
        }
    }
}

/// A histogram over fixed bounds.
#[derive(Debug, Clone)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Observations per bucket (not cumulative); the last is +Inf.
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
            count: 0,
        }
    }

    pub fn observe(&mut self, v: f64) {
        let v = if v.is_finite() { v.max(0.0) } else { 0.0 };
        let i = self.bounds.partition_point(|&b| b < v);
        if let Some(c) = self.counts.get_mut(i) {
            *c += 1;
        }
        self.sum += v;
        self.count += 1;
    }

    pub fn count(&self) -> u64 {
        self.count
    }
}

/// Which gauge to move.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gauge {
    Running,
    Waiting,
}

#[derive(Debug)]
struct State {
    running: i64,
    waiting: i64,
    ttft: Histogram,
    e2e: Histogram,
    prompt_tokens: u64,
    generation_tokens: u64,
    success_stop: u64,
    success_length: u64,
    ec_hits: u64,
    ec_misses: u64,
    images: u64,
    visual_tokens: u64,
}

/// One finished request, as the metrics see it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Finished {
    pub prompt_tokens: u64,
    pub generation_tokens: u64,
    pub reason: FinishReason,
    pub ttft_s: f64,
    pub e2e_s: f64,
}

/// The metrics of one instance (one role).
#[derive(Debug)]
pub struct Metrics {
    model: String,
    state: Mutex<State>,
}

impl Metrics {
    pub fn new(model: &str) -> Self {
        Self {
            model: model.into(),
            state: Mutex::new(State {
                running: 0,
                waiting: 0,
                ttft: Histogram::new(TTFT_BUCKETS),
                e2e: Histogram::new(E2E_BUCKETS),
                prompt_tokens: 0,
                generation_tokens: 0,
                success_stop: 0,
                success_length: 0,
                ec_hits: 0,
                ec_misses: 0,
                images: 0,
                visual_tokens: 0,
            }),
        }
    }

    pub fn add_gauge(&self, g: Gauge, delta: i64) {
        let mut s = lock(&self.state);
        match g {
            Gauge::Running => s.running += delta,
            Gauge::Waiting => s.waiting += delta,
        }
    }

    pub fn gauge(&self, g: Gauge) -> i64 {
        let s = lock(&self.state);
        match g {
            Gauge::Running => s.running,
            Gauge::Waiting => s.waiting,
        }
    }

    /// Encoder-cache lookups.
    pub fn ec_lookups(&self, hits: u64, misses: u64) {
        let mut s = lock(&self.state);
        s.ec_hits += hits;
        s.ec_misses += misses;
    }

    /// Images decoded for a request and their visual tokens.
    pub fn images(&self, images: u64, visual_tokens: u64) {
        let mut s = lock(&self.state);
        s.images += images;
        s.visual_tokens += visual_tokens;
    }

    pub fn finished(&self, f: Finished) {
        let mut s = lock(&self.state);
        s.prompt_tokens += f.prompt_tokens;
        s.generation_tokens += f.generation_tokens;
        match f.reason {
            FinishReason::Stop => s.success_stop += 1,
            FinishReason::Length => s.success_length += 1,
        }
        s.ttft.observe(f.ttft_s);
        s.e2e.observe(f.e2e_s);
    }

    /// The exposition text.
    pub fn render(&self) -> String {
        let s = lock(&self.state);
        let label = format!("model_name=\"{}\"", escape_label(&self.model));
        let mut out = String::with_capacity(8192);
        let mut family = |name: &str, kind: &str, help: &str, samples: &[(&str, String, String)]| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for (suffix, labels, value) in samples {
                let _ = writeln!(out, "{name}{suffix}{{{labels}}} {value}");
            }
        };
        let one = |v: String| [("", label.clone(), v)];
        family(
            "vllm:num_requests_running",
            "gauge",
            "Number of requests in model execution batches.",
            &one(s.running.to_string()),
        );
        family(
            "vllm:num_requests_waiting",
            "gauge",
            "Number of requests waiting to be processed.",
            &one(s.waiting.to_string()),
        );
        family(
            "vllm:time_to_first_token_seconds",
            "histogram",
            "Histogram of time to first token in seconds.",
            &histogram_samples(&s.ttft, &label),
        );
        family(
            "vllm:e2e_request_latency_seconds",
            "histogram",
            "Histogram of e2e request latency in seconds.",
            &histogram_samples(&s.e2e, &label),
        );
        family(
            "vllm:prompt_tokens_total",
            "counter",
            "Number of prefill tokens processed.",
            &one(s.prompt_tokens.to_string()),
        );
        family(
            "vllm:generation_tokens_total",
            "counter",
            "Number of generation tokens processed.",
            &one(s.generation_tokens.to_string()),
        );
        family(
            "vllm:request_success_total",
            "counter",
            "Count of successfully processed requests.",
            &[
                (
                    "",
                    format!("finished_reason=\"stop\",{label}"),
                    s.success_stop.to_string(),
                ),
                (
                    "",
                    format!("finished_reason=\"length\",{label}"),
                    s.success_length.to_string(),
                ),
            ],
        );
        family(
            "ec_cache_hits_total",
            "counter",
            "Images whose encoder output was found in the encoder cache.",
            &one(s.ec_hits.to_string()),
        );
        family(
            "ec_cache_misses_total",
            "counter",
            "Images not in the encoder cache (encoded by this instance).",
            &one(s.ec_misses.to_string()),
        );
        family(
            "emulator_images_total",
            "counter",
            "Images decoded.",
            &one(s.images.to_string()),
        );
        family(
            "emulator_visual_tokens_total",
            "counter",
            "Visual tokens of the images decoded (Qwen sizing rule).",
            &one(s.visual_tokens.to_string()),
        );
        out
    }
}

fn histogram_samples(h: &Histogram, label: &str) -> Vec<(&'static str, String, String)> {
    let mut out = Vec::with_capacity(h.bounds.len() + 3);
    let mut cumulative = 0u64;
    for (i, &b) in h.bounds.iter().enumerate() {
        cumulative += h.counts.get(i).copied().unwrap_or(0);
        out.push((
            "_bucket",
            format!("le=\"{}\",{label}", fmt_float(b)),
            cumulative.to_string(),
        ));
    }
    cumulative += h.counts.last().copied().unwrap_or(0);
    out.push(("_bucket", format!("le=\"+Inf\",{label}"), cumulative.to_string()));
    out.push(("_count", label.to_string(), h.count.to_string()));
    out.push(("_sum", label.to_string(), fmt_float(h.sum)));
    out
}

/// A float as Prometheus clients write it (always with a decimal point).
fn fmt_float(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.1}")
    } else {
        format!("{v}")
    }
}

/// Escapes a label value (backslash, double quote, newline).
pub fn escape_label(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::exposition::parse;

    #[test]
    fn renders_valid_exposition_with_vllm_names() {
        let m = Metrics::new("Qwen/Qwen2.5-VL-3B \"x\"\\y");
        m.add_gauge(Gauge::Running, 2);
        m.add_gauge(Gauge::Waiting, 1);
        m.ec_lookups(3, 1);
        m.images(4, 4096);
        for (ttft, e2e) in [(0.0005, 0.2), (0.03, 0.9), (3.0, 12.0), (5000.0, 9000.0)] {
            m.finished(Finished {
                prompt_tokens: 100,
                generation_tokens: 7,
                reason: FinishReason::Length,
                ttft_s: ttft,
                e2e_s: e2e,
            });
        }
        let text = m.render();
        let (types, samples) = parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        for (name, kind) in [
            ("vllm:num_requests_running", "gauge"),
            ("vllm:num_requests_waiting", "gauge"),
            ("vllm:time_to_first_token_seconds", "histogram"),
            ("vllm:e2e_request_latency_seconds", "histogram"),
            ("vllm:prompt_tokens_total", "counter"),
            ("vllm:generation_tokens_total", "counter"),
            ("vllm:request_success_total", "counter"),
            ("ec_cache_hits_total", "counter"),
            ("ec_cache_misses_total", "counter"),
            ("emulator_images_total", "counter"),
            ("emulator_visual_tokens_total", "counter"),
        ] {
            assert_eq!(types.get(name).map(String::as_str), Some(kind), "{name}");
        }
        let get = |name: &str, extra: &[(&str, &str)]| {
            samples
                .iter()
                .find(|s| {
                    s.name == name
                        && s.labels.get("model_name").map(String::as_str)
                            == Some("Qwen/Qwen2.5-VL-3B \"x\"\\y")
                        && extra
                            .iter()
                            .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(v))
                })
                .map(|s| s.value)
        };
        assert_eq!(get("vllm:num_requests_running", &[]), Some(2.0));
        assert_eq!(get("vllm:prompt_tokens_total", &[]), Some(400.0));
        assert_eq!(get("vllm:generation_tokens_total", &[]), Some(28.0));
        assert_eq!(
            get("vllm:request_success_total", &[("finished_reason", "length")]),
            Some(4.0)
        );
        assert_eq!(get("ec_cache_hits_total", &[]), Some(3.0));
        assert_eq!(get("emulator_visual_tokens_total", &[]), Some(4096.0));
        assert_eq!(
            get("vllm:time_to_first_token_seconds_bucket", &[("le", "0.001")]),
            Some(1.0)
        );
        assert_eq!(
            get("vllm:time_to_first_token_seconds_bucket", &[("le", "0.04")]),
            Some(2.0)
        );
        assert_eq!(
            get("vllm:time_to_first_token_seconds_bucket", &[("le", "2560.0")]),
            Some(3.0)
        );
        assert_eq!(
            get("vllm:time_to_first_token_seconds_bucket", &[("le", "+Inf")]),
            Some(4.0)
        );
        assert_eq!(get("vllm:time_to_first_token_seconds_count", &[]), Some(4.0));
        let sum = get("vllm:e2e_request_latency_seconds_sum", &[]).unwrap_or(0.0);
        assert!((sum - 9013.1).abs() < 1e-9, "{sum}");
    }

    #[test]
    fn the_parser_rejects_invalid_text() {
        for bad in [
            "x 1\n",
            "# TYPE x gauge\nx{a=\"1\"} one\n",
            "# TYPE x gauge\nx{a=1} 1\n",
            "# TYPE x gauge\nx{a=\"1\",a=\"2\"} 1\n",
            "# TYPE 1x gauge\n",
            "# TYPE x gauge\nx 1",
            "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_count 1\nh_sum 0\n",
            "# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_count 3\nh_sum 0\n",
            "# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_count 1\nh_sum 0\n",
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        assert!(parse("# HELP x y z\n# TYPE x counter\nx{a=\"q\\\"\"} 1.5e3\n").is_ok());
    }
}
