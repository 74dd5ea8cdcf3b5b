//! The request log (`/debug/requests`) and fault injection (`/debug/faults`).

use crate::lock;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::sync::Mutex;

/// One image of a logged request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LogImage {
    /// SHA-256 of the image file bytes, lower-case hex.
    pub sha256: String,
    pub width: u32,
    pub height: u32,
    pub visual_tokens: u64,
    /// `hit` or `miss` in the encoder cache.
    pub cache: &'static str,
}

/// One chat request served.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LogEntry {
    pub role: &'static str,
    /// The `x-request-id` header, if sent.
    pub request_id: Option<String>,
    /// Wall-clock milliseconds from the emulator's start to the request's arrival.
    pub arrival_ms: f64,
    pub images: Vec<LogImage>,
    /// `max_completion_tokens`, else `max_tokens`, as requested.
    pub max_tokens: Option<u64>,
    pub stream: bool,
    pub status: u16,
    /// Error code of a refused request.
    pub error: Option<&'static str>,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Emulated milliseconds to the first token (successful requests).
    pub ttft_ms: Option<f64>,
    /// Emulated milliseconds to the last byte (successful requests).
    pub e2e_ms: Option<f64>,
    /// The KV transfer a split's prefill instance opened for the request,
    /// or the one its decode instance took.
    pub kv_transfer: Option<String>,
}

/// The log, bounded (oldest entries dropped first).
#[derive(Debug)]
pub struct DebugLog {
    entries: Mutex<VecDeque<LogEntry>>,
    capacity: usize,
}

impl DebugLog {
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: Mutex::new(VecDeque::new()),
            capacity: capacity.max(1),
        }
    }

    pub fn push(&self, e: LogEntry) {
        let mut entries = lock(&self.entries);
        while entries.len() >= self.capacity {
            entries.pop_front();
        }
        entries.push_back(e);
    }

    /// The log as a JSON array, oldest first.
    pub fn to_json(&self) -> Vec<u8> {
        let entries = lock(&self.entries);
        serde_json::to_vec(&*entries).unwrap_or_else(|_| b"[]".to_vec())
    }

    /// Empties the log; returns how many entries it held.
    pub fn clear(&self) -> usize {
        let mut entries = lock(&self.entries);
        let n = entries.len();
        entries.clear();
        n
    }

    pub fn len(&self) -> usize {
        lock(&self.entries).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Injected faults of one instance.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Faults {
    /// Wall-clock milliseconds added before every chat response.
    #[serde(default)]
    pub extra_delay_ms: u64,
    /// Status for the next `fail_count` chat requests; `null` for none.
    #[serde(default)]
    pub fail_status: Option<u16>,
    #[serde(default)]
    pub fail_count: u64,
}

impl Faults {
    /// Parses and checks a `POST /debug/faults` body.
    pub fn parse(body: &[u8]) -> Result<Self, String> {
        let f: Self = serde_json::from_slice(body).map_err(|e| format!("invalid faults: {e}"))?;
        if let Some(s) = f.fail_status {
            if !(400..=599).contains(&s) {
                return Err(format!("fail_status {s} is not an HTTP error status (400..=599)"));
            }
        }
        Ok(f)
    }
}

/// The fault state: read and consumed per request.
#[derive(Debug, Default)]
pub struct FaultState(Mutex<Faults>);

impl FaultState {
    pub fn set(&self, f: Faults) {
        *lock(&self.0) = f;
    }

    pub fn get(&self) -> Faults {
        *lock(&self.0)
    }

    /// The delay for this request and, while failures remain, the status
    /// to fail it with.
    pub fn take(&self) -> (u64, Option<u16>) {
        let mut f = lock(&self.0);
        let fail = match f.fail_status {
            Some(s) if f.fail_count > 0 => {
                f.fail_count -= 1;
                Some(s)
            }
            _ => None,
        };
        (f.extra_delay_ms, fail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(n: u64) -> LogEntry {
        LogEntry {
            role: "pd",
            request_id: Some(format!("r{n}")),
            arrival_ms: n as f64,
            images: vec![LogImage {
                sha256: "ab".into(),
                width: 28,
                height: 56,
                visual_tokens: 2,
                cache: "miss",
            }],
            max_tokens: None,
            stream: false,
            status: 200,
            error: None,
            prompt_tokens: 5,
            completion_tokens: 3,
            ttft_ms: Some(1.5),
            e2e_ms: Some(2.5),
            kv_transfer: None,
        }
    }

    #[test]
    fn log_is_bounded_and_serialises() {
        let log = DebugLog::new(2);
        for n in 0..3 {
            log.push(entry(n));
        }
        let v: serde_json::Value = serde_json::from_slice(&log.to_json()).expect("json");
        let a = v.as_array().cloned().unwrap_or_default();
        assert_eq!(a.len(), 2);
        assert_eq!(a[0]["request_id"], "r1");
        assert_eq!(a[1]["images"][0]["cache"], "miss");
        assert!(a[1]["max_tokens"].is_null());
        assert_eq!(log.clear(), 2);
        assert!(log.is_empty());
    }

    #[test]
    fn faults_are_consumed() {
        let s = FaultState::default();
        assert_eq!(s.take(), (0, None));
        s.set(Faults::parse(br#"{"extra_delay_ms":5,"fail_status":503,"fail_count":2}"#).expect("parse"));
        assert_eq!(s.take(), (5, Some(503)));
        assert_eq!(s.take(), (5, Some(503)));
        assert_eq!(s.take(), (5, None));
        assert_eq!(s.get().fail_count, 0);
        assert_eq!(Faults::parse(b"{}"), Ok(Faults::default()));
        assert!(Faults::parse(br#"{"fail_status":99}"#).is_err());
        assert!(Faults::parse(br#"{"fail_status":200}"#).is_err());
        assert!(Faults::parse(br#"{"delay":1}"#).is_err());
    }
}
