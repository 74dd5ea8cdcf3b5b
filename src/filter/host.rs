//! The host calls the state machine needs.

use crate::core::residual::{Margin, ResidualHistogram};
use crate::core::traffic::{ClusterSignal, TrafficState};

/// An HTTP call to the encode or the prefill cluster.
#[derive(Debug, Clone, Copy)]
pub struct EncodeCall<'a> {
    pub cluster: &'a str,
    pub authority: &'a str,
    pub path: &'a str,
    pub request_id: &'a str,
    pub body: &'a [u8],
    pub timeout_ms: u64,
}

/// An HTTP call to the transcode service (`transcode: "offload"`): one
/// image's bytes, its target in `headers`.
#[derive(Debug, Clone, Copy)]
pub struct TranscodeCall<'a> {
    pub cluster: &'a str,
    pub authority: &'a str,
    pub path: &'a str,
    pub content_type: &'a str,
    pub headers: &'a [(&'static str, String)],
    pub body: &'a [u8],
    pub timeout_ms: u64,
}

/// A request's headers, read with one host call (each call into the host
/// costs about a microsecond in V8, so one map read beats one call per
/// header). Envoy gives names in lower case; a value that is not UTF-8
/// reads as absent (Envoy accepts such bytes, and they must not crash the
/// filter).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestHeaders(Vec<(String, Vec<u8>)>);

impl RequestHeaders {
    pub fn new(pairs: Vec<(String, Vec<u8>)>) -> Self {
        Self(pairs)
    }

    /// The first value of `name` (lower case), if present and UTF-8.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }

    /// The `content-encoding` of a body the filter cannot read as sent:
    /// any coding but `identity` (a value that is not UTF-8 included, shown
    /// lossily). `None` for a plain body.
    pub fn content_encoding(&self) -> Option<String> {
        let plain = |v: &[u8]| {
            v.split(|&b| b == b',').all(|c| {
                let c = c.trim_ascii();
                c.is_empty() || c.eq_ignore_ascii_case(b"identity")
            })
        };
        self.0
            .iter()
            .filter(|(k, _)| k == "content-encoding")
            .find(|(_, v)| !plain(v))
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    }
}

/// Per-request host calls.
pub trait HttpHost {
    /// The request headers (only valid in the request headers callback).
    fn request_headers(&self) -> RequestHeaders;
    fn remove_request_header(&mut self, name: &str);
    /// Sets a request header (only valid in the request headers callback).
    fn set_request_header(&mut self, name: &str, value: &str);
    /// A new unique request id.
    fn new_request_id(&mut self) -> String;
    /// Dispatches an encode or prefill call; its answer comes to
    /// `RequestFilter::on_call_response` with the returned token.
    fn dispatch(&mut self, call: &EncodeCall<'_>) -> Result<u32, String>;
    /// Dispatches a transcode call; its answer comes to
    /// `RequestFilter::on_call_response` with the returned token.
    fn dispatch_transcode(&mut self, call: &TranscodeCall<'_>) -> Result<u32, String>;
    /// The body of the call answer being delivered, `[0, size)`.
    fn call_response_body(&self, size: usize) -> Option<Vec<u8>>;
    /// Lets a paused request continue upstream.
    fn resume_request(&mut self);
    /// The buffered request body, `[0, size)`.
    fn request_body(&self, size: usize) -> Option<Vec<u8>>;
    /// Replaces the buffered body `[0, size)` with `body`.
    fn replace_request_body(&mut self, size: usize, body: &[u8]);
    fn add_response_header(&mut self, name: &str, value: &str);
    /// The response headers (only valid in the response headers callback).
    fn response_headers(&self) -> RequestHeaders;
    /// The current piece of the response body, `[0, size)`.
    fn response_body(&self, size: usize) -> Option<Vec<u8>>;
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
    /// Encode calls dispatched (retries included).
    EncodeCalls,
    /// Encode calls retried.
    EncodeRetries,
    /// Requests whose encode calls failed after the retries.
    EncodeFailures,
    /// Requests forwarded to PD after an encode failure (`fallback`).
    EncodeFallbacks,
    /// Requests with images whose time to first token was measured.
    TtftSamples,
    /// Of those, the ones over their SLO.
    SloMisses,
    /// Images shrunk by the transcode service (`transcode: "offload"`).
    TranscodeOffloads,
    /// Images the filter shrank itself after the service failed.
    TranscodeFallbacks,
    /// Prefill calls dispatched (retries included).
    PrefillCalls,
    /// Prefill calls retried.
    PrefillRetries,
    /// Requests whose prefill call failed after the retries.
    PrefillFailures,
    /// Requests sent to decode as plain requests after a prefill failure
    /// (`fallback`).
    PrefillFallbacks,
    /// Audio parts (`audio_url`, `input_audio`) of inspected requests.
    AudioParts,
    /// Video parts (`video_url`) of inspected requests.
    VideoParts,
}

impl Counter {
    pub const ALL: [Counter; 20] = [
        Counter::Requests,
        Counter::ImagesResized,
        Counter::ImagesPassed,
        Counter::VisualTokensBefore,
        Counter::VisualTokensAfter,
        Counter::FailOpen,
        Counter::EncodeCalls,
        Counter::EncodeRetries,
        Counter::EncodeFailures,
        Counter::EncodeFallbacks,
        Counter::TtftSamples,
        Counter::SloMisses,
        Counter::TranscodeOffloads,
        Counter::TranscodeFallbacks,
        Counter::PrefillCalls,
        Counter::PrefillRetries,
        Counter::PrefillFailures,
        Counter::PrefillFallbacks,
        Counter::AudioParts,
        Counter::VideoParts,
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
            Self::EncodeCalls => "vlm_budget_encode_calls_total",
            Self::EncodeRetries => "vlm_budget_encode_retries_total",
            Self::EncodeFailures => "vlm_budget_encode_failures_total",
            Self::EncodeFallbacks => "vlm_budget_encode_fallbacks_total",
            Self::TtftSamples => "vlm_budget_ttft_samples_total",
            Self::SloMisses => "vlm_budget_slo_misses_total",
            Self::TranscodeOffloads => "vlm_budget_transcode_offloads_total",
            Self::TranscodeFallbacks => "vlm_budget_transcode_fallbacks_total",
            Self::PrefillCalls => "vlm_budget_prefill_calls_total",
            Self::PrefillRetries => "vlm_budget_prefill_retries_total",
            Self::PrefillFailures => "vlm_budget_prefill_failures_total",
            Self::PrefillFallbacks => "vlm_budget_prefill_fallbacks_total",
            Self::AudioParts => "vlm_budget_audio_parts_total",
            Self::VideoParts => "vlm_budget_video_parts_total",
        }
    }
}

/// Name of the transcode-time histogram (milliseconds per request).
pub const TRANSCODE_HISTOGRAM: &str = "vlm_budget_transcode_ms";

/// Name of the encode-phase histogram (milliseconds per request).
pub const ENCODE_HISTOGRAM: &str = "vlm_budget_encode_ms";

/// Name of the time-to-first-token histogram (ms, requests with images,
/// arrival at the filter to the first token from prefill/decode).
pub const TTFT_HISTOGRAM: &str = "vlm_budget_ttft_ms";

/// Observed minus predicted TTFT, when the prediction was low (ms).
pub const TTFT_ERROR_HISTOGRAM: &str = "vlm_budget_ttft_error_ms";

/// Predicted minus observed TTFT, when the prediction was high (ms;
/// Envoy's histograms hold no negative values).
pub const TTFT_OVERESTIMATE_HISTOGRAM: &str = "vlm_budget_ttft_overestimate_ms";

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
    fn encode_ms(&self, ms: u64);
    /// One measured TTFT, and observed minus predicted when predicted.
    fn ttft_ms(&self, observed_ms: f64, error_ms: Option<f64>);
    /// The learned margin now in force.
    fn margin(&self, margin: Margin);
}

/// The traffic state shared by all workers (proxy-wasm shared data).
pub trait Traffic {
    /// The current state.
    fn state(&self) -> TrafficState;
    /// The last encode-cluster reading, fresh or not.
    fn cluster(&self) -> Option<ClusterSignal>;
    /// The last prefill/decode-cluster reading, fresh or not.
    fn pd_cluster(&self) -> Option<ClusterSignal>;
    /// The TTFT residuals learned so far.
    fn residuals(&self) -> ResidualHistogram;
    /// Applies `op` to the residuals atomically and returns what it wrote.
    fn update_residuals(&self, op: &mut dyn FnMut(&mut ResidualHistogram)) -> ResidualHistogram;
    /// Applies `op` atomically (compare-and-swap, retried) and returns the
    /// state it wrote.
    fn update(&self, op: &mut dyn FnMut(&mut TrafficState)) -> TrafficState;
}

/// Which gauges of the shared traffic state an update changed (each gauge
/// is a host call: only the changed ones are published per request; the
/// root context's tick republishes them all).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GaugeSet(u8);

impl GaugeSet {
    pub const PD: Self = Self(1);
    pub const ENCODE: Self = Self(2);
    pub const RATES: Self = Self(4);
    pub const CALIBRATION: Self = Self(8);
    pub const ALL: Self = Self(15);

    pub const fn with(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }

    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }
}

/// Everything a request's filter reports to or reads from its VM.
pub trait Services: Metrics + Traffic {
    /// Publishes the `changed` gauges of the shared state.
    fn publish(&self, state: &TrafficState, changed: GaugeSet);
    /// Whether request headers may be held (`hold_headers`) in this VM: not
    /// once it found that the host stops the body along with them.
    fn may_hold_headers(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::RequestHeaders;

    #[test]
    fn counters_are_listed_in_declaration_order() {
        // The shell indexes its metric ids by `Counter as usize`.
        for (i, c) in super::Counter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i, "{c:?}");
        }
    }

    #[test]
    fn header_values_that_are_not_utf8_read_as_absent() {
        let h = RequestHeaders::new(vec![
            ("x-slo-ttft-ms".into(), b"\xff\xfe".to_vec()),
            ("x-request-id".into(), b"abc".to_vec()),
            ("x-request-id".into(), b"second".to_vec()),
        ]);
        assert_eq!(h.get("x-slo-ttft-ms"), None);
        assert_eq!(h.get("x-request-id"), Some("abc"));
        assert_eq!(h.get("missing"), None);
        assert_eq!(RequestHeaders::default().get(":path"), None);
    }

    #[test]
    fn content_encodings_other_than_identity_are_reported() {
        let h = |v: &[u8]| RequestHeaders::new(vec![("content-encoding".into(), v.to_vec())]);
        for plain in [&b"identity"[..], b"Identity", b"", b" identity , identity"] {
            assert_eq!(h(plain).content_encoding(), None, "{plain:?}");
        }
        assert_eq!(h(b"gzip").content_encoding().as_deref(), Some("gzip"));
        assert_eq!(
            h(b"identity, br").content_encoding().as_deref(),
            Some("identity, br")
        );
        assert!(h(b"\xff").content_encoding().is_some());
        assert_eq!(RequestHeaders::default().content_encoding(), None);
    }
}
