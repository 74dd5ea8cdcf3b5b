//! The raw results file: every request of every run, with the setup.
//!
//! Files written before a field existed still read: a run without `seed` has
//! none (one run per trace and policy), and a request without the filter's
//! newer headers simply lacks them.

use crate::error::{BenchError, Result};
use crate::prediction::{self, Terms};
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
    /// The filter's `x-vlm-*` and the emulator's `x-emulator-*` response
    /// headers, among them the dynamic policy's prediction
    /// (`x-vlm-predicted-ttft-ms`, `x-vlm-ttft-margin-ms`, `x-vlm-ttft-terms`).
    pub headers: BTreeMap<String, String>,
}

impl RequestRecord {
    pub fn ok(&self) -> bool {
        self.error.is_none() && self.status == Some(200) && self.ttft_ms.is_some()
    }

    /// A header as a finite number; None when absent or not a number.
    pub fn header_f64(&self, name: &str) -> Option<f64> {
        self.headers
            .get(name)
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|v| v.is_finite())
    }

    /// The filter's TTFT prediction before the learned correction, ms.
    pub fn predicted_ttft_ms(&self) -> Option<f64> {
        self.header_f64(prediction::PREDICTED)
    }

    /// The learned correction the budget planned with, ms (absent on builds
    /// that do not send it).
    pub fn ttft_margin_ms(&self) -> Option<f64> {
        self.header_f64(prediction::MARGIN)
    }

    /// The prediction's terms, ms.
    pub fn ttft_terms(&self) -> Option<Terms> {
        self.headers.get(prediction::TERMS).and_then(|v| Terms::parse(v))
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
    /// The trace's name; runs of one generated trace shape under different
    /// seeds share it (`peak-4`) and differ in `seed`.
    pub trace: String,
    /// Seed of a generated trace's arrivals and images; None for user traces
    /// and for files from before seeds were recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A run as files written before seeds and the newer prediction headers
    /// existed hold it.
    const OLD_RUN: &str = r#"{"policy":"dynamic","trace":"peak-4","shape":{"base_rps":1.0,"peak_rps":4.0,"ramp_s":10.0,"hold_s":30.0,"decay_s":10.0},"plugin_config":null,"started_unix_s":1.0,"wall_s":50.0,"cpu":null,"requests":[{"index":0,"request_id":"peak-4-dynamic-0","arrival_s":0.5,"sent_s":0.501,"images":["img-00000.jpg"],"image_tokens":4000,"body_bytes":100,"status":200,"error":null,"ttft_ms":420.0,"tpot_ms":8.0,"e2e_ms":930.0,"output_tokens":64,"headers":{"x-vlm-predicted-ttft-ms":"380","x-vlm-visual-tokens-before":"4000","x-vlm-visual-tokens-after":"3000"}}]}"#;

    #[test]
    fn older_runs_read_without_the_newer_fields() {
        let run: Run = serde_json::from_str(OLD_RUN).unwrap();
        assert_eq!(run.seed, None);
        let r = &run.requests[0];
        assert_eq!(r.predicted_ttft_ms(), Some(380.0));
        assert_eq!((r.ttft_margin_ms(), r.ttft_terms()), (None, None));
        assert_eq!(r.tokens(), (1, 4000, 3000));
        // Written back without a seed, and read again the same.
        let text = serde_json::to_string(&run).unwrap();
        assert!(!text.contains("\"seed\""));
        assert_eq!(serde_json::from_str::<Run>(&text).unwrap(), run);
        let seeded = Run { seed: Some(2), ..run };
        let text = serde_json::to_string(&seeded).unwrap();
        assert!(text.contains("\"seed\":2"));
        assert_eq!(serde_json::from_str::<Run>(&text).unwrap().seed, Some(2));
    }
}
