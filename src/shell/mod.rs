//! proxy-wasm bindings: the only code that calls the host.
//!
//! Host calls go through `proxy_wasm::hostcalls` and return `Result`s that
//! are logged, never unwrapped; each is made only from the callback where
//! the host accepts it (request headers are changed only in the request
//! headers callback, response headers only in the response headers one).
//!
//! - `root`: configuration, the metrics poll of the encode cluster.
//! - `http`: one request (the [`crate::filter::RequestFilter`] over hostcalls).
//! - `metrics`: metric definitions.
//! - `shared`: the traffic state in shared data.
//! - `hold`: holding request headers until the body is decided, safely.

mod hold;
mod http;
mod metrics;
mod root;
mod shared;

use proxy_wasm::traits::RootContext;
use proxy_wasm::types::LogLevel;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(root::Root::default()) });
}}

/// Microseconds since the epoch by the host's clock (0 if unavailable).
fn now_micros() -> u64 {
    proxy_wasm::hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// Logs a failed host call; returns its value when it succeeded.
fn warn_err<T>(what: &str, r: Result<T, proxy_wasm::types::Status>) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(e) => {
            log::warn!("vlm-budget: {what} failed: {e:?}");
            None
        }
    }
}
