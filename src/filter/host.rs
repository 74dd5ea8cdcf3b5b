//! The host calls the state machine needs.

/// Per-request host calls.
pub trait HttpHost {
    fn request_header(&self, name: &str) -> Option<String>;
    fn remove_request_header(&mut self, name: &str);
    /// The buffered request body, `[0, size)`.
    fn request_body(&self, size: usize) -> Option<Vec<u8>>;
    /// Replaces the buffered body `[0, size)` with `body`.
    fn replace_request_body(&mut self, size: usize, body: &[u8]);
    fn add_response_header(&mut self, name: &str, value: &str);
    /// Sends a local reply; the request goes no further upstream.
    fn send_local_reply(&mut self, status: u32, headers: &[(&str, &str)], body: &[u8]);
    /// Monotonic-enough time in microseconds.
    fn now_micros(&self) -> u64;
}

/// Counters the filter reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Counter {
    /// Requests on a configured path that the filter inspected.
    Requests,
    ImagesResized,
    ImagesPassed,
    VisualTokensBefore,
    VisualTokensAfter,
    /// Requests forwarded unchanged after an error, under `fail_open`.
    FailOpen,
}

impl Counter {
    pub const ALL: [Counter; 6] = [
        Counter::Requests,
        Counter::ImagesResized,
        Counter::ImagesPassed,
        Counter::VisualTokensBefore,
        Counter::VisualTokensAfter,
        Counter::FailOpen,
    ];

    /// Stat name (Envoy shows it as `wasmcustom.<name>`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Requests => "vlm_budget_requests_total",
            Self::ImagesResized => "vlm_budget_images_resized_total",
            Self::ImagesPassed => "vlm_budget_images_passed_total",
            Self::VisualTokensBefore => "vlm_budget_visual_tokens_before_total",
            Self::VisualTokensAfter => "vlm_budget_visual_tokens_after_total",
            Self::FailOpen => "vlm_budget_fail_open_total",
        }
    }
}

/// Name of the transcode-time histogram (milliseconds per request).
pub const TRANSCODE_HISTOGRAM: &str = "vlm_budget_transcode_ms";

/// Name of the gauge of the VM's linear memory (bytes; grows, never shrinks).
pub const VM_MEMORY_GAUGE: &str = "vlm_budget_vm_memory_bytes";

/// Name of the error counter for an error code.
pub fn error_metric_name(code: &str) -> String {
    format!("vlm_budget_errors_{code}_total")
}

/// Metric sink.
pub trait Metrics {
    fn add(&self, counter: Counter, n: u64);
    fn error(&self, code: &'static str);
    fn transcode_ms(&self, ms: u64);
}
