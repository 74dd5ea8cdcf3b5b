//! The per-request state machine. It talks to the host only through
//! [`host::HttpHost`] and [`host::Metrics`], so it is tested natively with
//! a fake host; `shell` binds those traits to proxy-wasm.

pub mod flow;
pub mod host;

pub use flow::{RequestFilter, Shared, Verdict};
pub use host::{
    Counter, EncodeCall, GaugeSet, HttpHost, Metrics, RequestHeaders, Services, Traffic, TranscodeCall,
};
