//! vlm-emulator: an OpenAI-compatible stand-in for vLLM's disaggregated
//! encoder (encode / prefill-decode) deployment of Qwen2.5-VL-3B.
//!
//! It decodes every image with the filter's core code, counts visual tokens
//! by the Qwen rule, keeps an encoder cache shared between the roles, and
//! answers after emulated GPU times built from H100 measurements, spent as
//! real wall-clock sleeps behind real queues. Its numbers are a model, never
//! GPU results.

pub mod analyse;
pub mod cache;
pub mod cli;
pub mod debug;
pub mod error;
pub mod latency;
pub mod metrics;
pub mod openai;
pub mod pd;
pub mod rng;
pub mod sched;
pub mod server;

#[cfg(test)]
#[path = "../tests/support/exposition.rs"]
pub(crate) mod exposition;

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks a mutex, recovering the data if a holder panicked (every critical
/// section here leaves the data consistent).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
