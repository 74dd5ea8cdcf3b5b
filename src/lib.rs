//! vlm-budget: a proxy-wasm filter for Envoy that shrinks the images of
//! OpenAI-style chat requests to a visual-token budget.
//!
//! - [`core`]: the pure logic (parsing, sizing, policies, imaging, config).
//! - [`filter`]: the per-request state machine, over small host traits.
//! - `shell` (wasm32 only): the proxy-wasm bindings.

pub mod core;
pub mod filter;
#[cfg(target_arch = "wasm32")]
mod shell;
