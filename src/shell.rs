//! proxy-wasm bindings: the only code that calls the host.
//!
//! Host calls go through `proxy_wasm::hostcalls` and return `Result`s that
//! are logged, never unwrapped; each is made only from the callback where
//! the host accepts it (request headers are changed only in the request
//! headers callback, response headers only in the response headers one).

use crate::core::config::Config;
use crate::core::error::FilterError;
use crate::filter::host::{error_metric_name, ENCODE_HISTOGRAM, TRANSCODE_HISTOGRAM, VM_MEMORY_GAUGE};
use crate::filter::{Counter, EncodeCall, HttpHost, Metrics, RequestFilter, Shared, Verdict};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, MetricType};
use std::cell::Cell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

/// Metric ids, defined once per VM.
#[derive(Default)]
struct HostMetrics {
    counters: HashMap<Counter, u32>,
    errors: HashMap<&'static str, u32>,
    transcode: Option<u32>,
    encode: Option<u32>,
    /// Gauge: this VM's linear memory in bytes (it never shrinks).
    memory: Option<u32>,
}

fn define(kind: MetricType, name: &str) -> Option<u32> {
    match hostcalls::define_metric(kind, name) {
        Ok(id) => Some(id),
        Err(e) => {
            log::warn!("vlm-budget: cannot define metric {name}: {e:?}");
            None
        }
    }
}

impl HostMetrics {
    fn define_all() -> Self {
        let counters = Counter::ALL
            .iter()
            .filter_map(|&c| define(MetricType::Counter, c.name()).map(|id| (c, id)))
            .collect();
        let errors = FilterError::CODES
            .iter()
            .filter_map(|&code| define(MetricType::Counter, &error_metric_name(code)).map(|id| (code, id)))
            .collect();
        Self {
            counters,
            errors,
            transcode: define(MetricType::Histogram, TRANSCODE_HISTOGRAM),
            encode: define(MetricType::Histogram, ENCODE_HISTOGRAM),
            memory: define(MetricType::Gauge, VM_MEMORY_GAUGE),
        }
    }

    fn increment(id: Option<&u32>, n: u64) {
        if let Some(&id) = id {
            if n > 0 {
                let _ = hostcalls::increment_metric(id, i64::try_from(n).unwrap_or(i64::MAX));
            }
        }
    }
}

impl Metrics for HostMetrics {
    fn add(&self, counter: Counter, n: u64) {
        Self::increment(self.counters.get(&counter), n);
    }
    fn error(&self, code: &'static str) {
        Self::increment(self.errors.get(code), 1);
    }
    fn transcode_ms(&self, ms: u64) {
        if let Some(id) = self.transcode {
            let _ = hostcalls::record_metric(id, ms);
        }
    }
    fn encode_ms(&self, ms: u64) {
        if let Some(id) = self.encode {
            let _ = hostcalls::record_metric(id, ms);
        }
    }
}

#[derive(Default)]
struct Root {
    shared: Option<Rc<Shared>>,
    metrics: Option<Rc<HostMetrics>>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes = match hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX) {
            Ok(b) => b.unwrap_or_default(),
            Err(e) => {
                log::error!("vlm-budget: cannot read plugin configuration: {e:?}");
                return false;
            }
        };
        match Config::from_json(&bytes) {
            Ok(config) => {
                log::info!(
                    "vlm-budget: configured: policy={} static_budget_tokens={} paths={:?} fail_open={}",
                    config.policy.name(),
                    config.static_budget_tokens,
                    config.paths,
                    config.fail_open
                );
                self.shared = Some(Rc::new(Shared::new(config)));
                if self.metrics.is_none() {
                    self.metrics = Some(Rc::new(HostMetrics::define_all()));
                }
                true
            }
            Err(e) => {
                log::error!("vlm-budget: {e}");
                false
            }
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        let shared = self.shared.clone()?;
        let metrics = self.metrics.clone().unwrap_or_default();
        Some(Box::new(Http {
            filter: RequestFilter::new(shared),
            metrics,
            host: ProxyHost { context_id },
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Http {
    filter: RequestFilter,
    metrics: Rc<HostMetrics>,
    host: ProxyHost,
}

impl Context for Http {
    fn on_http_call_response(&mut self, token: u32, _headers: usize, _body: usize, _trailers: usize) {
        let status = hostcalls::get_map_value(MapType::HttpCallResponseHeaders, ":status")
            .ok()
            .flatten()
            .and_then(|s| s.parse::<u32>().ok());
        self.filter
            .on_encode_response(&mut self.host, self.metrics.as_ref(), token, status);
    }
}

fn action(v: Verdict) -> Action {
    match v {
        Verdict::Continue => Action::Continue,
        Verdict::Pause => Action::Pause,
    }
}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _n: usize, end_of_stream: bool) -> Action {
        action(
            self.filter
                .on_request_headers(&mut self.host, self.metrics.as_ref(), end_of_stream),
        )
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let verdict =
            self.filter
                .on_request_body(&mut self.host, self.metrics.as_ref(), body_size, end_of_stream);
        if end_of_stream {
            if let Some(id) = self.metrics.memory {
                let pages = core::arch::wasm32::memory_size(0) as u64;
                let _ = hostcalls::record_metric(id, pages * 65_536);
            }
        }
        action(verdict)
    }

    fn on_http_response_headers(&mut self, _n: usize, _end_of_stream: bool) -> Action {
        action(self.filter.on_response_headers(&mut self.host))
    }
}

/// [`HttpHost`] over the current context's hostcalls.
struct ProxyHost {
    context_id: u32,
}

thread_local! {
    /// Per-VM sequence for generated request ids.
    static ID_SEQ: Cell<u64> = const { Cell::new(0) };
}

fn warn_err<T>(what: &str, r: Result<T, proxy_wasm::types::Status>) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(e) => {
            log::warn!("vlm-budget: {what} failed: {e:?}");
            None
        }
    }
}

impl HttpHost for ProxyHost {
    fn request_header(&self, name: &str) -> Option<String> {
        warn_err(
            "get header",
            hostcalls::get_map_value(MapType::HttpRequestHeaders, name),
        )
        .flatten()
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
        let headers = vec![
            (":method", "POST"),
            (":path", call.path),
            (":authority", call.authority),
            ("content-type", "application/json"),
            ("x-request-id", call.request_id),
        ];
        hostcalls::dispatch_http_call(
            call.cluster,
            headers,
            Some(call.body),
            vec![],
            Duration::from_millis(call.timeout_ms),
        )
        .map_err(|e| format!("{e:?}"))
    }
    fn resume_request(&mut self) {
        warn_err("resume", hostcalls::resume_http_request());
    }
    fn now_micros(&self) -> u64 {
        hostcalls::get_current_time()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
    }
}
