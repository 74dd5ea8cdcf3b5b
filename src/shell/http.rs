//! One request: the [`RequestFilter`] state machine over hostcalls.

use super::metrics::HostMetrics;
use super::{hold, now_micros, shared, warn_err};
use crate::core::residual::{Margin, ResidualHistogram};
use crate::core::traffic::{ClusterSignal, TrafficState};
use crate::filter::{
    Counter, EncodeCall, GaugeSet, HttpHost, Metrics, RequestFilter, RequestHeaders, Services, Shared,
    Traffic, TranscodeCall, Verdict,
};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, BufferType, MapType};
use std::cell::Cell;
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

/// A VM's metrics and shared traffic state, as the state machine sees them.
pub struct VmServices {
    pub metrics: Rc<HostMetrics>,
    pub window_s: f64,
}

impl Metrics for VmServices {
    fn add(&self, counter: Counter, n: u64) {
        self.metrics.add(counter, n);
    }
    fn error(&self, code: &'static str) {
        self.metrics.error(code);
    }
    fn transcode_ms(&self, ms: u64) {
        self.metrics.transcode_ms(ms);
    }
    fn encode_ms(&self, ms: u64) {
        self.metrics.encode_ms(ms);
    }
    fn ttft_ms(&self, observed_ms: f64, error_ms: Option<f64>) {
        self.metrics.ttft_ms(observed_ms, error_ms);
    }
    fn margin(&self, margin: Margin) {
        self.metrics.margin(margin);
    }
}

impl Traffic for VmServices {
    fn state(&self) -> TrafficState {
        shared::traffic()
    }
    fn cluster(&self) -> Option<ClusterSignal> {
        shared::cluster(shared::CLUSTER_KEY)
    }
    fn pd_cluster(&self) -> Option<ClusterSignal> {
        shared::cluster(shared::PD_CLUSTER_KEY)
    }
    fn residuals(&self) -> ResidualHistogram {
        shared::residuals()
    }
    fn update_residuals(&self, op: &mut dyn FnMut(&mut ResidualHistogram)) -> ResidualHistogram {
        shared::update_residuals(op)
    }
    fn update(&self, op: &mut dyn FnMut(&mut TrafficState)) -> TrafficState {
        shared::update_traffic(op)
    }
}

impl Services for VmServices {
    fn publish(&self, state: &TrafficState, changed: GaugeSet) {
        self.metrics.publish(state, changed, now_micros(), self.window_s);
    }
    fn may_hold_headers(&self) -> bool {
        hold::may_hold()
    }
}

pub struct Http {
    filter: RequestFilter,
    services: Rc<VmServices>,
    host: ProxyHost,
}

impl Http {
    pub fn new(shared: Rc<Shared>, services: Rc<VmServices>, context_id: u32) -> Self {
        Self {
            filter: RequestFilter::new(shared),
            services,
            host: ProxyHost { context_id },
        }
    }
}

impl Context for Http {
    fn on_http_call_response(&mut self, token: u32, _headers: usize, body: usize, _trailers: usize) {
        let status = hostcalls::get_map_value_bytes(MapType::HttpCallResponseHeaders, ":status")
            .ok()
            .flatten()
            .and_then(|s| std::str::from_utf8(&s).ok()?.parse::<u32>().ok());
        self.filter
            .on_call_response(&mut self.host, self.services.as_ref(), token, status, body);
    }

    fn on_done(&mut self) -> bool {
        hold::done(self.host.context_id);
        self.filter.on_done(self.services.as_ref());
        true
    }
}

/// POSTs `body` to `cluster` with the given pseudo-headers, content type and
/// extra headers; the call's token, or why the host refused it.
fn post(
    cluster: &str,
    path: &str,
    authority: &str,
    content_type: &str,
    extra: &[(&str, &str)],
    body: &[u8],
    timeout_ms: u64,
) -> Result<u32, String> {
    let mut headers = vec![
        (":method", "POST"),
        (":path", path),
        (":authority", authority),
        ("content-type", content_type),
    ];
    headers.extend_from_slice(extra);
    hostcalls::dispatch_http_call(
        cluster,
        headers,
        Some(body),
        vec![],
        Duration::from_millis(timeout_ms),
    )
    .map_err(|e| format!("{e:?}"))
}

fn action(v: Verdict) -> Action {
    match v {
        Verdict::Continue => Action::Continue,
        Verdict::Pause => Action::Pause,
    }
}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _n: usize, end_of_stream: bool) -> Action {
        let verdict = self
            .filter
            .on_request_headers(&mut self.host, self.services.as_ref(), end_of_stream);
        if verdict == Verdict::Pause && self.filter.awaiting_body() {
            hold::paused(self.host.context_id, now_micros());
        }
        action(verdict)
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        hold::body_seen(self.host.context_id);
        let services = self.services.as_ref();
        let verdict = self
            .filter
            .on_request_body(&mut self.host, services, body_size, end_of_stream);
        if end_of_stream {
            // Linear memory only grows: report it when it has.
            let pages = core::arch::wasm32::memory_size(0) as u64;
            if pages != MEMORY_PAGES.with(|m| m.replace(pages)) {
                if let Some(id) = services.metrics.memory {
                    let _ = hostcalls::record_metric(id, pages * 65_536);
                }
            }
        }
        action(verdict)
    }

    fn on_http_request_trailers(&mut self, _n: usize) -> Action {
        action(
            self.filter
                .on_request_trailers(&mut self.host, self.services.as_ref()),
        )
    }

    fn on_http_response_headers(&mut self, _n: usize, _end_of_stream: bool) -> Action {
        action(
            self.filter
                .on_response_headers(&mut self.host, self.services.as_ref()),
        )
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        action(
            self.filter
                .on_response_body(&mut self.host, self.services.as_ref(), body_size, end_of_stream),
        )
    }

    fn on_log(&mut self) {
        hold::done(self.host.context_id);
        self.filter.on_done(self.services.as_ref());
    }
}

/// [`HttpHost`] over the current context's hostcalls.
struct ProxyHost {
    context_id: u32,
}

thread_local! {
    /// Per-VM sequence for generated request ids.
    static ID_SEQ: Cell<u64> = const { Cell::new(0) };
    /// This VM's linear memory (pages) when last reported.
    static MEMORY_PAGES: Cell<u64> = const { Cell::new(0) };
}

impl HttpHost for ProxyHost {
    fn request_headers(&self) -> RequestHeaders {
        RequestHeaders::new(
            warn_err(
                "get headers",
                hostcalls::get_map_bytes(MapType::HttpRequestHeaders),
            )
            .unwrap_or_default(),
        )
    }
    fn remove_request_header(&mut self, name: &str) {
        warn_err(
            "remove header",
            hostcalls::remove_map_value(MapType::HttpRequestHeaders, name),
        );
    }
    fn request_body(&self, size: usize) -> Option<Vec<u8>> {
        warn_err(
            "get body",
            hostcalls::get_buffer(BufferType::HttpRequestBody, 0, size),
        )
        .flatten()
    }
    fn replace_request_body(&mut self, size: usize, body: &[u8]) {
        warn_err(
            "set body",
            hostcalls::set_buffer(BufferType::HttpRequestBody, 0, size, body),
        );
    }
    fn add_response_header(&mut self, name: &str, value: &str) {
        warn_err(
            "add header",
            hostcalls::add_map_value(MapType::HttpResponseHeaders, name, value),
        );
    }
    fn response_headers(&self) -> RequestHeaders {
        RequestHeaders::new(
            warn_err(
                "get response headers",
                hostcalls::get_map_bytes(MapType::HttpResponseHeaders),
            )
            .unwrap_or_default(),
        )
    }
    fn response_body(&self, size: usize) -> Option<Vec<u8>> {
        warn_err(
            "get response body",
            hostcalls::get_buffer(BufferType::HttpResponseBody, 0, size),
        )
        .flatten()
    }
    fn send_local_reply(&mut self, status: u32, headers: &[(&str, &str)], body: &[u8]) {
        warn_err(
            "local reply",
            hostcalls::send_http_response(status, headers.to_vec(), Some(body)),
        );
    }
    fn set_request_header(&mut self, name: &str, value: &str) {
        warn_err(
            "set header",
            hostcalls::set_map_value(MapType::HttpRequestHeaders, name, Some(value)),
        );
    }
    fn new_request_id(&mut self) -> String {
        let seq = ID_SEQ.with(|c| {
            c.set(c.get().wrapping_add(1));
            c.get()
        });
        let nanos = hostcalls::get_current_time()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos() as u64);
        format!("vlmb-{nanos:016x}-{:08x}-{seq:x}", self.context_id)
    }
    fn dispatch(&mut self, call: &EncodeCall<'_>) -> Result<u32, String> {
        let extra = [("x-request-id", call.request_id)];
        post(
            call.cluster,
            call.path,
            call.authority,
            "application/json",
            &extra,
            call.body,
            call.timeout_ms,
        )
    }
    fn dispatch_transcode(&mut self, call: &TranscodeCall<'_>) -> Result<u32, String> {
        let extra: Vec<(&str, &str)> = call.headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        post(
            call.cluster,
            call.path,
            call.authority,
            call.content_type,
            &extra,
            call.body,
            call.timeout_ms,
        )
    }
    fn call_response_body(&self, size: usize) -> Option<Vec<u8>> {
        warn_err(
            "get call answer",
            hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, size),
        )
        .flatten()
    }
    fn resume_request(&mut self) {
        warn_err("resume", hostcalls::resume_http_request());
    }
    fn now_micros(&self) -> u64 {
        now_micros()
    }
}
