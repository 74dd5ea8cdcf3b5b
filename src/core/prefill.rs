//! Prefill/decode split (1E1P1D): the request for the prefill instance,
//! the reading of its answer, and the decode request that carries the
//! answer's `kv_transfer_params` — vLLM's KV-transfer handshake (NIXL
//! connector), as its disaggregation proxies speak it.
//!
//! The prefill request is the body with one token asked for, no streaming
//! and the handshake's opening `kv_transfer_params`; the decode request is
//! the body as it was, with the prefill's `kv_transfer_params` spliced in:
//! every other byte unchanged.

use super::json::{Doc, Kind, Member};
use super::request::{RequestError, BOM};
use serde::Deserialize;
use std::fmt;
use std::ops::Range;

/// What happens when the prefill instance cannot be reached after the
/// retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum PrefillFailure {
    /// Answer 502 with an OpenAI-style error.
    #[default]
    Fail,
    /// Send the request to decode as a plain request (it prefills itself).
    Fallback,
}

/// The member every request's `kv_transfer_params` is named by.
pub const KV_KEY: &str = "kv_transfer_params";

/// The `kv_transfer_params` that opens the handshake: the prefill instance
/// is to keep the KV cache for a remote decode.
pub const KV_OPEN: &[u8] = br#"{"do_remote_decode":true,"do_remote_prefill":false,"remote_engine_id":null,"remote_block_ids":null,"remote_host":null,"remote_port":null}"#;

/// Top-level fields replaced in the prefill request.
const REPLACED: &[&str] = &[
    "max_tokens",
    "max_completion_tokens",
    "stream",
    "stream_options",
    KV_KEY,
];

/// Why a prefill answer cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AnswerError {
    /// Not valid JSON (or not UTF-8).
    Json(String),
    /// Valid JSON of the wrong shape.
    Shape(&'static str),
}

impl fmt::Display for AnswerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Json(e) => write!(f, "prefill answer is not valid JSON: {e}"),
            Self::Shape(e) => write!(f, "prefill answer: {e}"),
        }
    }
}

/// The top-level object of a body (a leading byte-order mark skipped):
/// its members, spans into `body`, and the span of the object itself.
fn top_level(body: &[u8]) -> Result<(Vec<Member<'_>>, Range<usize>), RequestError> {
    let skip = if body.starts_with(BOM) { BOM.len() } else { 0 };
    let text =
        std::str::from_utf8(&body[skip..]).map_err(|e| RequestError::Json(format!("invalid UTF-8: {e}")))?;
    let (doc, top) = Doc::parse(text).map_err(|e| RequestError::Json(e.to_string()))?;
    if doc.kind(&top) != Kind::Object {
        return Err(RequestError::Schema(format!(
            "the request body must be an object, not {}",
            doc.kind(&top).name()
        )));
    }
    let members = doc
        .members(&top)
        .map_err(|e| RequestError::Json(e.to_string()))?
        .into_iter()
        .map(|(k, r)| (k, r.start + skip..r.end + skip))
        .collect();
    Ok((members, top.start + skip..top.end + skip))
}

fn push_member(out: &mut Vec<u8>, first: &mut bool, key: &str, raw: &[u8]) {
    if !*first {
        out.push(b',');
    }
    *first = false;
    // Keys came from valid JSON, so re-encoding them cannot fail.
    out.extend_from_slice(serde_json::to_string(key).unwrap_or_default().as_bytes());
    out.push(b':');
    out.extend_from_slice(raw);
}

/// The prefill request for `body` (the body decode will get): every member
/// as sent but `max_tokens`/`max_completion_tokens` 1, `stream` false,
/// `stream_options` dropped and the opening `kv_transfer_params`.
pub fn prefill_request(body: &[u8]) -> Result<Vec<u8>, RequestError> {
    let (members, _) = top_level(body)?;
    let mut out = Vec::with_capacity(body.len() + KV_OPEN.len() + 64);
    out.push(b'{');
    let mut first = true;
    let mut had_mct = false;
    for (key, range) in &members {
        had_mct |= key == "max_completion_tokens";
        if !REPLACED.contains(&key.as_ref()) {
            push_member(&mut out, &mut first, key, &body[range.clone()]);
        }
    }
    push_member(&mut out, &mut first, "max_tokens", b"1");
    if had_mct {
        push_member(&mut out, &mut first, "max_completion_tokens", b"1");
    }
    push_member(&mut out, &mut first, "stream", b"false");
    push_member(&mut out, &mut first, KV_KEY, KV_OPEN);
    out.push(b'}');
    Ok(out)
}

/// The `kv_transfer_params` of a prefill answer, as its raw JSON text:
/// `None` when the answer has none (or `null`). The answer must be a JSON
/// object; its `kv_transfer_params`, when present, an object.
pub fn answer_kv_params(answer: &[u8]) -> Result<Option<&[u8]>, AnswerError> {
    let skip = if answer.starts_with(BOM) { BOM.len() } else { 0 };
    let text =
        std::str::from_utf8(&answer[skip..]).map_err(|e| AnswerError::Json(format!("invalid UTF-8: {e}")))?;
    let (doc, top) = Doc::parse(text).map_err(|e| AnswerError::Json(e.to_string()))?;
    if doc.kind(&top) != Kind::Object {
        return Err(AnswerError::Shape("not a JSON object"));
    }
    let [kv] = doc
        .pick(&top, [KV_KEY])
        .map_err(|e| AnswerError::Json(e.to_string()))?;
    let Some(kv) = kv else {
        return Ok(None);
    };
    match doc.kind(&kv) {
        Kind::Null => Ok(None),
        Kind::Object => Ok(Some(&answer[kv.start + skip..kv.end + skip])),
        _ => Err(AnswerError::Shape("kv_transfer_params is not an object")),
    }
}

/// The decode request: `body` with `kv` as its `kv_transfer_params` (the
/// value of a member already there replaced, the last one if repeated;
/// else a member added after the last one). Every other byte unchanged.
pub fn decode_request(body: &[u8], kv: &[u8]) -> Result<Vec<u8>, RequestError> {
    let (members, top) = top_level(body)?;
    let mut out = Vec::with_capacity(body.len() + kv.len() + 32);
    if let Some((_, at)) = members.iter().rev().find(|(k, _)| k == KV_KEY) {
        out.extend_from_slice(&body[..at.start]);
        out.extend_from_slice(kv);
        out.extend_from_slice(&body[at.end..]);
        return Ok(out);
    }
    let (at, comma) = match members.last() {
        Some((_, last)) => (last.end, true),
        // `{` then the new member.
        None => (top.start + 1, false),
    };
    out.extend_from_slice(&body[..at]);
    if comma {
        out.push(b',');
    }
    push_member(&mut out, &mut true, KV_KEY, kv);
    out.extend_from_slice(&body[at..]);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    const BODY: &str = r#"{"model":"qwen","messages":[{"role":"user","content":[{"type":"text","text":"what?"},
        {"type":"image_url","image_url":{"url":"data:image/png;base64,AAAA"}}]}],
      "stream":true,"stream_options":{"include_usage":true},"max_completion_tokens":300,
      "temperature":0.70,"big":1e400 }"#;

    fn parse(b: &[u8]) -> Value {
        let text = String::from_utf8_lossy(b).replace("1e400", "1");
        serde_json::from_str(&text).unwrap_or(Value::Null)
    }

    #[test]
    fn the_prefill_request_asks_for_one_token_and_opens_the_handshake() {
        let out = prefill_request(BODY.as_bytes()).expect("ok");
        let text = String::from_utf8(out.clone()).expect("utf8");
        assert!(text.contains(r#""temperature":0.70"#) && text.contains(r#""big":1e400"#));
        assert!(text.contains("data:image/png;base64,AAAA"));
        assert!(!text.contains("stream_options"));
        let v = parse(&out);
        assert_eq!(
            (&v["max_tokens"], &v["max_completion_tokens"], &v["stream"]),
            (&json!(1), &json!(1), &json!(false))
        );
        assert_eq!(
            v[KV_KEY],
            json!({"do_remote_decode": true, "do_remote_prefill": false, "remote_engine_id": null,
                "remote_block_ids": null, "remote_host": null, "remote_port": null})
        );
        assert_eq!(v["messages"][0]["content"][0]["text"], "what?");
        // A client's own kv_transfer_params is replaced, max_completion_tokens
        // only appears when the client sent it.
        let out =
            prefill_request(br#"{"messages":[],"kv_transfer_params":{"x":1},"max_tokens":9}"#).expect("ok");
        let v = parse(&out);
        assert_eq!(v[KV_KEY]["do_remote_decode"], true);
        assert!(v.get("max_completion_tokens").is_none());
        assert_eq!(v["max_tokens"], 1);
        assert_eq!(String::from_utf8_lossy(&out).matches(KV_KEY).count(), 1);
    }

    #[test]
    fn bad_bodies_are_refused() {
        for bad in [&b"{oops"[..], b"[1]", b"\xff", b""] {
            assert!(prefill_request(bad).is_err(), "{bad:?}");
            assert!(decode_request(bad, b"{}").is_err(), "{bad:?}");
        }
    }

    #[test]
    fn answers_give_their_params_raw() {
        let a = br#"{"id":"x","choices":[],"kv_transfer_params":{"remote_engine_id":"e1","remote_block_ids":[1,2],"remote_port":5600}}"#;
        assert_eq!(
            answer_kv_params(a),
            Ok(Some(
                &br#"{"remote_engine_id":"e1","remote_block_ids":[1,2],"remote_port":5600}"#[..]
            ))
        );
        assert_eq!(answer_kv_params(br#"{"id":"x"}"#), Ok(None));
        assert_eq!(answer_kv_params(br#"{"kv_transfer_params":null}"#), Ok(None));
        assert_eq!(
            answer_kv_params(b"\xEF\xBB\xBF{\"kv_transfer_params\":{}}"),
            Ok(Some(&b"{}"[..]))
        );
        assert!(matches!(
            answer_kv_params(b"upstream connect error"),
            Err(AnswerError::Json(_))
        ));
        assert!(matches!(answer_kv_params(b"[]"), Err(AnswerError::Shape(_))));
        assert!(matches!(
            answer_kv_params(br#"{"kv_transfer_params":"id"}"#),
            Err(AnswerError::Shape(_))
        ));
    }

    #[test]
    fn the_decode_request_changes_only_the_params() {
        let kv = br#"{"remote_engine_id":"e1"}"#;
        let out = decode_request(BODY.as_bytes(), kv).expect("ok");
        let text = String::from_utf8(out.clone()).expect("utf8");
        let trimmed = BODY.trim_end().strip_suffix('}').expect("object");
        assert_eq!(
            text,
            format!(
                "{},\"kv_transfer_params\":{{\"remote_engine_id\":\"e1\"}}{}",
                trimmed.trim_end(),
                &BODY[trimmed.trim_end().len()..]
            )
        );
        assert_eq!(parse(&out)[KV_KEY]["remote_engine_id"], "e1");
        // An existing member's value is replaced in place.
        let body = br#"{"kv_transfer_params": {"old":1} ,"messages":[]}"#;
        let out = decode_request(body, kv).expect("ok");
        assert_eq!(
            out,
            br#"{"kv_transfer_params": {"remote_engine_id":"e1"} ,"messages":[]}"#
        );
        // An empty object, and a byte-order mark kept in front.
        assert_eq!(
            decode_request(b" { } ", b"{}").expect("ok"),
            br#" {"kv_transfer_params":{} } "#
        );
        let out = decode_request(b"\xEF\xBB\xBF{\"a\":1}", b"{}").expect("ok");
        assert_eq!(out, b"\xEF\xBB\xBF{\"a\":1,\"kv_transfer_params\":{}}");
    }
}
