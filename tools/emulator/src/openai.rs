//! Chat-completion response bodies: JSON and server-sent-event chunks in
//! the shapes vLLM's OpenAI server produces.

use crate::metrics::FinishReason;
use crate::rng;
use serde_json::{json, Value};

/// Words the emulated model "generates".
const WORDS: &[&str] = &[
    "the",
    "image",
    "shows",
    "a",
    "scene",
    "with",
    "several",
    "objects",
    "in",
    "soft",
    "light",
    "near",
    "an",
    "open",
    "window",
    "and",
    "colour",
    "detail",
    "on",
    "left",
    "right",
    "side",
    "of",
    "frame",
    "text",
    "reads",
    "small",
    "large",
    "background",
    "foreground",
    "people",
    "table",
];

/// Token `i` of the text generated for a request (deterministic in
/// `seed` and `key`); every token but the first starts with a space.
pub fn token(seed: u64, key: u64, i: u64) -> String {
    let w = WORDS[(rng::draw(seed, key, i) % WORDS.len() as u64) as usize];
    if i == 0 {
        w.to_string()
    } else {
        format!(" {w}")
    }
}

/// The whole generated text of `n` tokens.
pub fn text(seed: u64, key: u64, n: u64) -> String {
    (0..n).map(|i| token(seed, key, i)).collect()
}

/// Token counts of a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

impl Usage {
    pub fn to_json(self) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "completion_tokens": self.completion_tokens,
            "prompt_tokens_details": null,
        })
    }
}

/// What every response of one request shares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    pub id: String,
    pub created: u64,
    pub model: String,
}

/// A non-streaming `chat.completion`.
pub fn completion(meta: &Meta, content: &str, finish: FinishReason, usage: Usage) -> Value {
    json!({
        "id": meta.id,
        "object": "chat.completion",
        "created": meta.created,
        "model": meta.model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": content, "tool_calls": []},
            "logprobs": null,
            "finish_reason": finish.as_str(),
            "stop_reason": null,
        }],
        "usage": usage.to_json(),
        "prompt_logprobs": null,
    })
}

fn chunk(meta: &Meta, choices: Value, usage: Option<Value>) -> Value {
    let mut v = json!({
        "id": meta.id,
        "object": "chat.completion.chunk",
        "created": meta.created,
        "model": meta.model,
        "choices": choices,
    });
    if let (Some(u), Some(obj)) = (usage, v.as_object_mut()) {
        obj.insert("usage".into(), u);
    }
    v
}

/// The first chunk: the assistant role, no content yet.
pub fn role_chunk(meta: &Meta, include_usage: bool) -> Value {
    chunk(
        meta,
        json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]),
        include_usage.then_some(Value::Null),
    )
}

/// A chunk with one token; the last token carries the finish reason.
pub fn token_chunk(meta: &Meta, content: &str, finish: Option<FinishReason>, include_usage: bool) -> Value {
    chunk(
        meta,
        json!([{
            "index": 0,
            "delta": {"content": content},
            "logprobs": null,
            "finish_reason": finish.map(FinishReason::as_str),
        }]),
        include_usage.then_some(Value::Null),
    )
}

/// The final usage chunk (`stream_options.include_usage`): no choices.
pub fn usage_chunk(meta: &Meta, usage: Usage) -> Value {
    chunk(meta, json!([]), Some(usage.to_json()))
}

/// One server-sent event: `data: <json>\n\n`.
pub fn sse(v: &Value) -> Vec<u8> {
    let mut out = b"data: ".to_vec();
    // Serialising a `Value` cannot fail.
    let _ = serde_json::to_writer(&mut out, v);
    out.extend_from_slice(b"\n\n");
    out
}

/// The stream terminator.
pub const SSE_DONE: &[u8] = b"data: [DONE]\n\n";

/// `GET /v1/models`.
pub fn models(model: &str, created: u64, max_model_len: u64) -> Value {
    json!({
        "object": "list",
        "data": [{
            "id": model,
            "object": "model",
            "created": created,
            "owned_by": "vllm",
            "root": model,
            "parent": null,
            "max_model_len": max_model_len,
            "permission": [],
        }],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> Meta {
        Meta {
            id: "chatcmpl-1".into(),
            created: 7,
            model: "m".into(),
        }
    }

    #[test]
    fn text_is_deterministic_and_tokenised() {
        assert_eq!(text(1, 2, 5), text(1, 2, 5));
        assert_ne!(text(1, 2, 5), text(1, 3, 5));
        let joined: String = (0..5).map(|i| token(1, 2, i)).collect();
        assert_eq!(joined, text(1, 2, 5));
        assert_eq!(text(1, 2, 5).split(' ').count(), 5);
    }

    #[test]
    fn shapes() {
        let u = Usage {
            prompt_tokens: 10,
            completion_tokens: 3,
        };
        let c = completion(&meta(), "a b c", FinishReason::Length, u);
        assert_eq!(c["object"], "chat.completion");
        assert_eq!(c["choices"][0]["message"]["content"], "a b c");
        assert_eq!(c["choices"][0]["finish_reason"], "length");
        assert_eq!(c["usage"]["total_tokens"], 13);
        let r = role_chunk(&meta(), false);
        assert!(r.get("usage").is_none());
        assert_eq!(r["choices"][0]["delta"]["role"], "assistant");
        let t = token_chunk(&meta(), " x", Some(FinishReason::Stop), true);
        assert!(t["usage"].is_null() && t.get("usage").is_some());
        assert_eq!(t["choices"][0]["finish_reason"], "stop");
        let f = usage_chunk(&meta(), u);
        assert_eq!(f["choices"].as_array().map(Vec::len), Some(0));
        assert_eq!(f["usage"]["completion_tokens"], 3);
        let e = sse(&f);
        assert!(e.starts_with(b"data: {") && e.ends_with(b"}\n\n"));
    }
}
