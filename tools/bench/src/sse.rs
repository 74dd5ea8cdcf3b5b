//! Server-sent events of an OpenAI streaming chat completion: an incremental
//! parser (bytes may split anywhere) and the timing of content tokens.

use serde_json::Value;

/// Incremental SSE parser: feed bytes as they arrive, get the `data` payload
/// of every completed event.
#[derive(Debug, Default)]
pub struct SseParser {
    line: Vec<u8>,
    data: Option<String>,
}

impl SseParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// Parses `bytes`; returns the events they complete.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        let mut out = Vec::new();
        for &b in bytes {
            if b == b'\n' {
                let mut line = std::mem::take(&mut self.line);
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                self.line_done(&line, &mut out);
            } else {
                self.line.push(b);
            }
        }
        out
    }

    /// End of stream: a last event without its blank line still counts.
    pub fn finish(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        if !self.line.is_empty() {
            let line = std::mem::take(&mut self.line);
            self.line_done(&line, &mut out);
        }
        if let Some(d) = self.data.take() {
            out.push(d);
        }
        out
    }

    fn line_done(&mut self, line: &[u8], out: &mut Vec<String>) {
        if line.is_empty() {
            if let Some(d) = self.data.take() {
                out.push(d);
            }
            return;
        }
        if line[0] == b':' {
            return; // comment
        }
        let (field, value) = match line.iter().position(|&c| c == b':') {
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &b""[..]),
        };
        if field == b"data" {
            let v = String::from_utf8_lossy(value);
            match &mut self.data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(&v);
                }
                None => self.data = Some(v.into_owned()),
            }
        }
    }
}

/// What one event of a chat stream carries.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ChunkInfo {
    /// `data: [DONE]`.
    pub done: bool,
    /// Non-empty text in a choice's delta (`content`, or `reasoning_content`).
    pub content: bool,
    /// `usage.completion_tokens`, when the chunk reports usage.
    pub completion_tokens: Option<u64>,
    /// An error object in the stream.
    pub error: Option<String>,
}

/// Classifies one event payload.
pub fn classify(data: &str) -> ChunkInfo {
    let data = data.trim();
    if data == "[DONE]" {
        return ChunkInfo {
            done: true,
            ..ChunkInfo::default()
        };
    }
    let v: Value = match serde_json::from_str(data) {
        Ok(v) => v,
        Err(e) => {
            return ChunkInfo {
                error: Some(format!("bad event: {e}")),
                ..ChunkInfo::default()
            }
        }
    };
    let mut info = ChunkInfo::default();
    if let Some(err) = v.get("error") {
        let msg = err
            .get("message")
            .and_then(Value::as_str)
            .map_or_else(|| err.to_string(), str::to_owned);
        info.error = Some(msg);
    }
    if let Some(choices) = v.get("choices").and_then(Value::as_array) {
        info.content = choices.iter().any(|c| {
            let delta = c.get("delta");
            ["content", "reasoning_content"].iter().any(|k| {
                delta
                    .and_then(|d| d.get(k))
                    .and_then(Value::as_str)
                    .is_some_and(|s| !s.is_empty())
            })
        });
    }
    info.completion_tokens = v
        .get("usage")
        .and_then(|u| u.get("completion_tokens"))
        .and_then(Value::as_u64);
    info
}

/// Token timing of one streamed response, in ms since the request was sent.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StreamTiming {
    pub first_content_ms: Option<f64>,
    pub last_content_ms: Option<f64>,
    pub content_chunks: u64,
    pub usage_completion_tokens: Option<u64>,
    pub done: bool,
    pub error: Option<String>,
}

impl StreamTiming {
    /// Records an event received at `at_ms`.
    pub fn observe(&mut self, data: &str, at_ms: f64) {
        let c = classify(data);
        if c.content {
            self.first_content_ms.get_or_insert(at_ms);
            self.last_content_ms = Some(at_ms);
            self.content_chunks += 1;
        }
        if let Some(n) = c.completion_tokens {
            self.usage_completion_tokens = Some(n);
        }
        self.done |= c.done;
        if self.error.is_none() {
            self.error = c.error;
        }
    }

    /// Output tokens: the usage report, else the content chunks.
    pub fn output_tokens(&self) -> u64 {
        self.usage_completion_tokens.unwrap_or(self.content_chunks)
    }

    /// Time per output token after the first.
    pub fn tpot_ms(&self) -> Option<f64> {
        let n = self.output_tokens();
        match (self.first_content_ms, self.last_content_ms) {
            (Some(a), Some(b)) if n > 1 => Some((b - a) / (n - 1) as f64),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STREAM: &str = concat!(
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n",
        ": keep-alive comment\n\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hello\"}}]}\r\n\r\n",
        "event: message\ndata: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\" world\"},\"finish_reason\":\"length\"}]}\n\n",
        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":2}}\n\n",
        "data: [DONE]\n\n",
    );

    #[test]
    fn parses_whole_and_split_streams_alike() {
        let whole = SseParser::new().push(STREAM.as_bytes());
        assert_eq!(whole.len(), 5);
        assert_eq!(whole[4], "[DONE]");
        // Any split into pieces, down to one byte at a time, gives the same events.
        for step in [1, 2, 3, 7, 64] {
            let mut p = SseParser::new();
            let mut got = Vec::new();
            for piece in STREAM.as_bytes().chunks(step) {
                got.extend(p.push(piece));
            }
            got.extend(p.finish());
            assert_eq!(got, whole, "step {step}");
        }
    }

    #[test]
    fn multi_line_data_and_unterminated_last_event() {
        let mut p = SseParser::new();
        let ev = p.push(b"data: a\ndata:b\n\ndata: tail");
        assert_eq!(ev, vec!["a\nb".to_string()]);
        assert_eq!(p.finish(), vec!["tail".to_string()]);
        assert!(p.finish().is_empty());
    }

    #[test]
    fn ttft_is_the_first_non_empty_content() {
        let mut t = StreamTiming::default();
        for (i, ev) in SseParser::new().push(STREAM.as_bytes()).iter().enumerate() {
            t.observe(ev, 100.0 * (i + 1) as f64);
        }
        // The role chunk (empty content) at 100 ms is not a token.
        assert_eq!(t.first_content_ms, Some(200.0));
        assert_eq!(t.last_content_ms, Some(300.0));
        assert_eq!(t.content_chunks, 2);
        assert_eq!(t.output_tokens(), 2);
        assert_eq!(t.tpot_ms(), Some(100.0));
        assert!(t.done);
        assert_eq!(t.error, None);
    }

    #[test]
    fn errors_and_reasoning_content() {
        let c = classify("{\"error\": {\"message\": \"boom\", \"code\": 500}}");
        assert_eq!(c.error.as_deref(), Some("boom"));
        assert!(classify("{not json").error.is_some());
        assert!(classify("{\"choices\":[{\"delta\":{\"reasoning_content\":\"hm\"}}]}").content);
        assert!(!classify("{\"choices\":[{\"delta\":{}}]}").content);
        let mut t = StreamTiming::default();
        t.observe("{\"choices\":[{\"delta\":{\"content\":\"x\"}}]}", 5.0);
        assert_eq!(t.tpot_ms(), None); // one token: no TPOT
    }
}
