//! vlm-bench: the TTFT experiment for vlm-budget — seeded bursty traces, an
//! open-loop streaming load generator, an encoder/prefill profiler, reports
//! (Markdown, JSON, CDF plots) and the orchestration of Envoy with the filter
//! in front of encode and prefill/decode backends.
//!
//! The library holds everything testable; `main.rs` only parses flags.

pub mod bench;
pub mod cli;
pub mod envoy;
pub mod error;
pub mod fit;
pub mod http;
pub mod images;
pub mod plot;
pub mod prediction;
pub mod procs;
pub mod profile;
pub mod replay;
pub mod report;
pub mod results;
pub mod rng;
pub mod sse;
pub mod stats;
pub mod trace;
