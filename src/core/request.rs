//! Finding the images in an OpenAI chat-completions body without
//! re-serialising it.
//!
//! The body is parsed with `serde_json` into borrowed raw values, so the
//! byte span of every image URL in the original body is known. Rewriting
//! splices new URL strings into those spans: every other byte (unknown
//! fields, number spelling, key order, whitespace) goes upstream unchanged.

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::fmt;
use std::ops::Range;

/// Why a body is not a chat-completions request the filter can read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestError {
    /// Not valid JSON (also: invalid UTF-8, nesting too deep).
    Json(String),
    /// Valid JSON that breaks the chat-completions schema.
    Schema(String),
}

impl fmt::Display for RequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Json(e) => write!(f, "request body is not valid JSON: {e}"),
            Self::Schema(e) => f.write_str(e),
        }
    }
}

/// One `image_url` content part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSite<'a> {
    /// Byte range of the URL's JSON string literal (quotes included).
    pub span: Range<usize>,
    /// The URL, unescaped.
    pub url: Cow<'a, str>,
}

/// What the filter needs to know about a chat request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChatRequest<'a> {
    /// Image parts in document order; an image's index is its position here.
    pub images: Vec<ImageSite<'a>>,
    /// Bytes of text content (an input to the latency model).
    pub text_bytes: usize,
    /// Top-level members in order: key and the byte range of its raw value.
    pub members: Vec<(Cow<'a, str>, Range<usize>)>,
}

/// A JSON object's members in order, values left raw. Duplicate keys are
/// kept; lookups take the last one, as Python's `json` (and so vLLM) does.
struct Members<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'a> Members<'a> {
    fn get(&self, key: &str) -> Option<&'a RawValue> {
        self.0.iter().rev().find(|(k, _)| k == key).map(|(_, v)| *v)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Members<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Members<'a>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
                let mut out = Vec::new();
                while let Some(k) = map.next_key::<Key<'de>>()? {
                    out.push((k.0, map.next_value::<&'de RawValue>()?));
                }
                Ok(Members(out))
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

/// An object key, borrowed unless it has escapes.
struct Key<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Key<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Key<'a>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
        }
        d.deserialize_str(V(std::marker::PhantomData))
    }
}

fn kind_of(raw: &RawValue) -> &'static str {
    match raw.get().as_bytes().first() {
        Some(b'{') => "object",
        Some(b'[') => "array",
        Some(b'"') => "string",
        Some(b'n') => "null",
        Some(b't' | b'f') => "boolean",
        _ => "number",
    }
}

fn schema(msg: String) -> RequestError {
    RequestError::Schema(msg)
}

fn object<'a>(raw: &'a RawValue, what: &dyn Fn() -> String) -> Result<Members<'a>, RequestError> {
    if kind_of(raw) != "object" {
        return Err(schema(format!(
            "{} must be an object, not {}",
            what(),
            kind_of(raw)
        )));
    }
    serde_json::from_str(raw.get()).map_err(|e| RequestError::Json(e.to_string()))
}

fn array<'a>(raw: &'a RawValue, what: &dyn Fn() -> String) -> Result<Vec<&'a RawValue>, RequestError> {
    if kind_of(raw) != "array" {
        return Err(schema(format!(
            "{} must be an array, not {}",
            what(),
            kind_of(raw)
        )));
    }
    serde_json::from_str(raw.get()).map_err(|e| RequestError::Json(e.to_string()))
}

fn string<'a>(raw: &'a RawValue, what: &dyn Fn() -> String) -> Result<Cow<'a, str>, RequestError> {
    let text = raw.get();
    if kind_of(raw) != "string" {
        return Err(schema(format!(
            "{} must be a string, not {}",
            what(),
            kind_of(raw)
        )));
    }
    let inner = &text[1..text.len() - 1];
    if inner.contains('\\') {
        serde_json::from_str::<String>(text)
            .map(Cow::Owned)
            .map_err(|e| RequestError::Json(e.to_string()))
    } else {
        Ok(Cow::Borrowed(inner))
    }
}

/// Byte range of `raw` inside `body` (raw values borrow from the body).
fn span_in(body: &str, raw: &RawValue) -> Range<usize> {
    let start = raw.get().as_ptr() as usize - body.as_ptr() as usize;
    start..start + raw.get().len()
}

/// Parses a chat-completions body and locates its image URLs.
pub fn scan(body: &[u8]) -> Result<ChatRequest<'_>, RequestError> {
    let text = std::str::from_utf8(body).map_err(|e| RequestError::Json(format!("invalid UTF-8: {e}")))?;
    let top: &RawValue = serde_json::from_str(text).map_err(|e| RequestError::Json(e.to_string()))?;
    let top = object(top, &|| "the request body".into())?;
    let members = top.0.iter().map(|(k, v)| (k.clone(), span_in(text, v))).collect();
    let messages = top
        .get("messages")
        .ok_or_else(|| schema("`messages` is required".into()))?;
    let messages = array(messages, &|| "`messages`".into())?;
    let mut req = ChatRequest {
        members,
        ..ChatRequest::default()
    };
    for (m, message) in messages.iter().enumerate() {
        let message = object(message, &|| format!("messages[{m}]"))?;
        let Some(content) = message.get("content") else {
            continue;
        };
        match kind_of(content) {
            "string" => req.text_bytes += content.get().len().saturating_sub(2),
            "null" => {}
            "array" => {
                for (p, part) in array(content, &|| String::new())?.iter().enumerate() {
                    scan_part(text, part, m, p, &mut req)?;
                }
            }
            other => {
                return Err(schema(format!(
                    "messages[{m}].content must be a string or an array, not {other}"
                )))
            }
        }
    }
    Ok(req)
}

fn scan_part<'a>(
    body: &'a str,
    part: &'a RawValue,
    m: usize,
    p: usize,
    req: &mut ChatRequest<'a>,
) -> Result<(), RequestError> {
    let where_ = || format!("messages[{m}].content[{p}]");
    let part = object(part, &where_)?;
    let kind = match part.get("type") {
        Some(t) => string(t, &|| format!("{}.type", where_()))?,
        None => return Err(schema(format!("{}.type is required", where_()))),
    };
    match kind.as_ref() {
        "image_url" => {
            let iu = part
                .get("image_url")
                .ok_or_else(|| schema(format!("{}.image_url is required", where_())))?;
            // Object form {"url": ..., "detail": ...} or the bare-string form.
            let url_raw = if kind_of(iu) == "object" {
                object(iu, &where_)?
                    .get("url")
                    .ok_or_else(|| schema(format!("{}.image_url.url is required", where_())))?
            } else {
                iu
            };
            let url = string(url_raw, &|| format!("{}.image_url.url", where_()))?;
            req.images.push(ImageSite {
                span: span_in(body, url_raw),
                url,
            });
        }
        "text" => {
            if let Some(t) = part.get("text") {
                req.text_bytes += t.get().len().saturating_sub(2);
            }
        }
        _ => {}
    }
    Ok(())
}

/// Writes `body` with each span replaced, in one pass into one buffer.
/// `edits` must be sorted by span start and not overlap.
pub fn splice(body: &[u8], edits: &[(Range<usize>, Vec<u8>)]) -> Vec<u8> {
    let removed: usize = edits.iter().map(|(r, _)| r.len()).sum();
    let added: usize = edits.iter().map(|(_, b)| b.len()).sum();
    let mut out = Vec::with_capacity(body.len() - removed + added);
    let mut at = 0;
    for (range, bytes) in edits {
        out.extend_from_slice(&body[at..range.start]);
        out.extend_from_slice(bytes);
        at = range.end;
    }
    out.extend_from_slice(&body[at..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const BODY: &str = r#"{"model":"qwen","messages":[{"role":"system","content":"be brief"},
      {"role":"user","content":[{"type":"text","text":"what?"},
        {"type":"image_url","image_url":{"detail":"high","url":"data:image/png;base64,AAAA","x":1e400}},
        {"type":"image_url","image_url":"https:\/\/example.com\/a.jpg"}]}],
      "temperature":0.70,"max_tokens":10,"zzz_unknown":{"a":[1,2,3]},"seed":12345678901234567890}"#;

    #[test]
    fn finds_both_forms_in_order() {
        let req = scan(BODY.as_bytes()).expect("scan");
        assert_eq!(req.images.len(), 2);
        assert_eq!(req.images[0].url, "data:image/png;base64,AAAA");
        assert_eq!(
            &BODY[req.images[0].span.clone()],
            "\"data:image/png;base64,AAAA\""
        );
        assert_eq!(req.images[1].url, "https://example.com/a.jpg");
        assert_eq!(req.text_bytes, "be brief".len() + "what?".len());
    }

    #[test]
    fn splice_keeps_every_other_byte() {
        let req = scan(BODY.as_bytes()).expect("scan");
        let edits = vec![(
            req.images[0].span.clone(),
            b"\"data:image/png;base64,BBBB\"".to_vec(),
        )];
        let out = splice(BODY.as_bytes(), &edits);
        assert_eq!(
            String::from_utf8(out).expect("utf8"),
            BODY.replace("AAAA", "BBBB")
        );
    }

    #[test]
    fn schema_errors_name_the_place() {
        let cases = [
            (r#"[1]"#, "the request body must be an object, not array"),
            (r#"{"model":"x"}"#, "`messages` is required"),
            (
                r#"{"messages":{"a":1}}"#,
                "`messages` must be an array, not object",
            ),
            (
                r#"{"messages":[{"content":[{"type":"image_url"}]}]}"#,
                "messages[0].content[0].image_url is required",
            ),
            (
                r#"{"messages":[{"content":[{"type":"image_url","image_url":{"url":5}}]}]}"#,
                "messages[0].content[0].image_url.url must be a string, not number",
            ),
            (
                r#"{"messages":[{"content":7}]}"#,
                "messages[0].content must be a string or an array, not number",
            ),
        ];
        for (body, want) in cases {
            assert_eq!(
                scan(body.as_bytes()),
                Err(RequestError::Schema(want.into())),
                "{body}"
            );
        }
    }

    #[test]
    fn json_errors() {
        assert!(matches!(scan(b"{\"messages\": [}"), Err(RequestError::Json(_))));
        assert!(matches!(
            scan(b"{\"messages\": [\"\xff\"]}"),
            Err(RequestError::Json(_))
        ));
        // Deep nesting is skipped over without recursion: no stack overflow.
        let deep = format!("{{\"messages\":{}{}}}", "[".repeat(10_000), "]".repeat(10_000));
        assert_eq!(
            scan(deep.as_bytes()),
            Err(RequestError::Schema(
                "messages[0] must be an object, not array".into()
            ))
        );
        let deep = format!(
            "{{\"messages\":[{{\"x\":{}1{}}}]}}",
            "{\"a\":".repeat(10_000),
            "}".repeat(10_000)
        );
        assert_eq!(scan(deep.as_bytes()).map(|r| r.images.len()), Ok(0));
    }

    #[test]
    fn duplicate_keys_take_the_last_like_python() {
        let body = r#"{"messages":[1],"messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"data:a","url":"data:b"}}]}]}"#;
        let req = scan(body.as_bytes()).expect("scan");
        assert_eq!(req.images.len(), 1);
        assert_eq!(req.images[0].url, "data:b");
    }
}
