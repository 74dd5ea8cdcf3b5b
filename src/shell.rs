//! proxy-wasm bindings: the only code that calls the host.
//!
//! Host calls go through `proxy_wasm::hostcalls` and return `Result`s that
//! are logged, never unwrapped; each is made only from the callback where
//! the host accepts it (request headers are changed only in the request
//! headers callback, response headers only in the response headers one).

use crate::core::config::Config;
use crate::core::error::FilterError;
use crate::filter::host::{error_metric_name, TRANSCODE_HISTOGRAM, VM_MEMORY_GAUGE};
use crate::filter::{Counter, HttpHost, Metrics, RequestFilter, Shared, Verdict};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, MetricType};
use std::collections::HashMap;
use std::rc::Rc;
use std::time::UNIX_EPOCH;

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

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        let shared = self.shared.clone()?;
        let metrics = self.metrics.clone().unwrap_or_default();
        Some(Box::new(Http {
            filter: RequestFilter::new(shared),
            metrics,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Http {
    filter: RequestFilter,
    metrics: Rc<HostMetrics>,
}

impl Context for Http {}

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
                .on_request_headers(&mut ProxyHost, self.metrics.as_ref(), end_of_stream),
        )
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let verdict =
            self.filter
                .on_request_body(&mut ProxyHost, self.metrics.as_ref(), body_size, end_of_stream);
        if end_of_stream {
            if let Some(id) = self.metrics.memory {
                let pages = core::arch::wasm32::memory_size(0) as u64;
                let _ = hostcalls::record_metric(id, pages * 65_536);
            }
        }
        action(verdict)
    }

    fn on_http_response_headers(&mut self, _n: usize, _end_of_stream: bool) -> Action {
        action(self.filter.on_response_headers(&mut ProxyHost))
    }
}

/// [`HttpHost`] over the current context's hostcalls.
struct ProxyHost;

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
    fn now_micros(&self) -> u64 {
        hostcalls::get_current_time()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
    }
}
