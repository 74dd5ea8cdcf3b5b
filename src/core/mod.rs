//! The pure core: no proxy-wasm, unit-tested natively.

pub mod base64buf;
pub mod config;
pub mod datauri;
pub mod dynamic;
pub mod encode;
pub mod error;
pub mod exif;
pub mod json;
pub mod latency;
pub mod offload;
pub mod pipeline;
pub mod policy;
pub mod prefill;
pub mod probe;
pub mod prometheus;
pub mod request;
pub mod residual;
pub mod sizing;
pub mod sse;
pub mod traffic;
pub mod transcode;
