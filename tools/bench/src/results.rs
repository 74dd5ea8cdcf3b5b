//! The raw results file: every request of every run, with the setup.

use crate::error::{BenchError, Result};
use crate::procs::CpuUsage;
use crate::trace::Shape;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

/// One request as the load generator saw it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestRecord {
    pub index: usize,
    pub request_id: String,
    /// Scheduled arrival, s from the start of the run.
    pub arrival_s: f64,
    /// When sending began, s from the start of the run.
    pub sent_s: f64,
    /// Image file names.
    pub images: Vec<String>,
    /// Visual tokens of the images as sent (Qwen rule, from their headers).
    pub image_tokens: u64,
    pub body_bytes: usize,
    pub status: Option<u16>,
    pub error: Option<String>,
    /// Send start to the first non-empty content token.
    pub ttft_ms: Option<f64>,
    /// Mean time between output tokens after the first.
    pub tpot_ms: Option<f64>,
    /// Send start to the end of the stream.
    pub e2e_ms: Option<f64>,
    pub output_tokens: u64,
    /// The filter's `x-vlm-*` and the emulator's `x-emulator-*` response headers.
    pub headers: BTreeMap<String, String>,
}

impl RequestRecord {
    pub fn ok(&self) -> bool {
        self.error.is_none() && self.status == Some(200) && self.ttft_ms.is_some()
    }

    pub fn header_f64(&self, name: &str) -> Option<f64> {
        self.headers.get(name).and_then(|v| v.trim().parse().ok())
    }

    /// Visual tokens before and after the filter, and the image count.
    pub fn tokens(&self) -> (u64, u64, u64) {
        let images = self.images.len() as u64;
        let before = self
            .header_f64("x-vlm-visual-tokens-before")
            .map_or(self.image_tokens, |v| v as u64);
        let after = self
            .header_f64("x-vlm-visual-tokens-after")
            .or_else(|| self.header_f64("x-emulator-visual-tokens"))
            .map_or(before, |v| v as u64);
        (images, before, after)
    }
}

/// One replay of one trace under one policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Run {
    pub policy: String,
    pub trace: String,
    #[serde(default)]
    pub shape: Option<Shape>,
    #[serde(default)]
    pub plugin_config: Option<Value>,
    pub started_unix_s: f64,
    /// From the first send to the last response.
    pub wall_s: f64,
    #[serde(default)]
    pub cpu: Option<CpuUsage>,
    pub requests: Vec<RequestRecord>,
}

/// Where the backends came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Backends {
    /// True when the numbers come from the backend emulator, not GPUs.
    pub emulated: bool,
    pub description: String,
    #[serde(default)]
    pub encode_url: Option<String>,
    #[serde(default)]
    pub pd_url: Option<String>,
}

/// A results file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Results {
    pub tool: String,
    pub command: Vec<String>,
    pub created_unix_s: f64,
    pub slo_ms: f64,
    pub backends: Backends,
    /// Free-form facts about the setup (machine, image set, traces).
    #[serde(default)]
    pub setup: BTreeMap<String, Value>,
    pub runs: Vec<Run>,
}

impl Results {
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read(path).map_err(|e| BenchError::io(path, e))?;
        serde_json::from_slice(&text).map_err(|e| BenchError::json(path.display().to_string(), e))
    }

    pub fn write(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_vec(self).map_err(|e| BenchError::json("results", e))?;
        std::fs::write(path, text).map_err(|e| BenchError::io(path, e))
    }

    /// Several files as one: runs concatenated, the first file's setup.
    pub fn merge(mut all: Vec<Self>) -> Result<Self> {
        if all.is_empty() {
            return Err(BenchError::Usage("no results to merge".into()));
        }
        let mut first = all.remove(0);
        for r in all {
            first.backends.emulated |= r.backends.emulated;
            first.runs.extend(r.runs);
        }
        Ok(first)
    }
}

pub fn now_unix_s() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}
