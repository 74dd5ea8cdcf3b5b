//! Finding the images in an OpenAI chat-completions body without
//! re-serialising it.
//!
//! The body is read with [`super::json`], which gives the byte span of
//! every value, so the span of every image URL in the original body is
//! known. Rewriting
//! splices new URL strings into those spans: every other byte (unknown
//! fields, number spelling, key order, whitespace) goes upstream unchanged.

use super::json::{clean_words, has_byte, Doc, JsonError, Kind, Member};
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

/// Which encoder input an audio or video part is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MediaKind {
    /// `audio_url` or `input_audio`.
    Audio,
    /// `video_url`.
    Video,
}

/// One audio or video content part: sent to the encoder like an image,
/// forwarded unchanged (only images are resized).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaSite {
    pub kind: MediaKind,
    /// Byte range of the whole part object.
    pub span: Range<usize>,
}

/// Audio and video parts of a request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MediaCount {
    pub audio: usize,
    pub video: usize,
}

impl MediaCount {
    pub fn of(sites: &[MediaSite]) -> Self {
        let audio = sites.iter().filter(|s| s.kind == MediaKind::Audio).count();
        Self {
            audio,
            video: sites.len() - audio,
        }
    }

    pub fn any(self) -> bool {
        self.audio + self.video > 0
    }
}

/// What the filter needs to know about a chat request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChatRequest<'a> {
    /// Image parts in document order; an image's index is its position here.
    pub images: Vec<ImageSite<'a>>,
    /// Audio and video parts in document order.
    pub media: Vec<MediaSite>,
    /// Bytes of text content (an input to the latency model).
    pub text_bytes: usize,
    /// Top-level members in order: key and the byte range of its raw value
    /// (listed only when the request has images, audio or video: the
    /// encode requests need them).
    pub members: Vec<Member<'a>>,
}

fn schema(msg: String) -> RequestError {
    RequestError::Schema(msg)
}

fn json(e: JsonError) -> RequestError {
    RequestError::Json(e.to_string())
}

fn expect_kind(
    doc: &Doc<'_>,
    v: &Range<usize>,
    kind: Kind,
    what: &dyn Fn() -> String,
) -> Result<(), RequestError> {
    let got = doc.kind(v);
    if got == kind {
        return Ok(());
    }
    let article = if matches!(kind, Kind::Object | Kind::Array) {
        "an"
    } else {
        "a"
    };
    Err(schema(format!(
        "{} must be {article} {}, not {}",
        what(),
        kind.name(),
        got.name()
    )))
}

fn string<'a>(
    doc: &Doc<'a>,
    v: &Range<usize>,
    what: &dyn Fn() -> String,
) -> Result<Cow<'a, str>, RequestError> {
    expect_kind(doc, v, Kind::String, what)?;
    doc.string(v).map_err(json)
}

/// The UTF-8 byte-order mark. Python servers (vLLM's included) read a body
/// that starts with one as JSON, so it is accepted, and kept.
pub const BOM: &[u8] = b"\xEF\xBB\xBF";

/// Parses a chat-completions body and locates its image URLs. A leading
/// UTF-8 byte-order mark is skipped; spans are into `body`, mark included.
pub fn scan(body: &[u8]) -> Result<ChatRequest<'_>, RequestError> {
    let skip = if body.starts_with(BOM) { BOM.len() } else { 0 };
    let mut req = scan_json(&body[skip..])?;
    if skip > 0 {
        for site in &mut req.images {
            site.span = site.span.start + skip..site.span.end + skip;
        }
        for (_, range) in &mut req.members {
            *range = range.start + skip..range.end + skip;
        }
        for site in &mut req.media {
            site.span = site.span.start + skip..site.span.end + skip;
        }
    }
    Ok(req)
}

fn scan_json(body: &[u8]) -> Result<ChatRequest<'_>, RequestError> {
    let text = std::str::from_utf8(body).map_err(|e| RequestError::Json(format!("invalid UTF-8: {e}")))?;
    let (doc, top) = Doc::parse(text).map_err(json)?;
    expect_kind(&doc, &top, Kind::Object, &|| "the request body".into())?;
    let [messages] = doc.pick(&top, ["messages"]).map_err(json)?;
    let messages = messages.ok_or_else(|| schema("`messages` is required".into()))?;
    expect_kind(&doc, &messages, Kind::Array, &|| "`messages`".into())?;
    let mut req = ChatRequest::default();
    for (m, message) in doc.item_iter(&messages).enumerate() {
        let message = message.map_err(json)?;
        expect_kind(&doc, &message, Kind::Object, &|| format!("messages[{m}]"))?;
        let [content] = doc.pick(&message, ["content"]).map_err(json)?;
        let Some(content) = content else {
            continue;
        };
        match doc.kind(&content) {
            Kind::String => req.text_bytes += content.len().saturating_sub(2),
            Kind::Null => {}
            Kind::Array => {
                for (p, part) in doc.item_iter(&content).enumerate() {
                    scan_part(&doc, &part.map_err(json)?, m, p, &mut req)?;
                }
            }
            other => {
                return Err(schema(format!(
                    "messages[{m}].content must be a string or an array, not {}",
                    other.name()
                )))
            }
        }
    }
    // Only a request with images (or audio, video) is rewritten or sent to
    // the encoder.
    if !req.images.is_empty() || !req.media.is_empty() {
        req.members = doc.members(&top).map_err(json)?;
    }
    Ok(req)
}

fn scan_part<'a>(
    doc: &Doc<'a>,
    part: &Range<usize>,
    m: usize,
    p: usize,
    req: &mut ChatRequest<'a>,
) -> Result<(), RequestError> {
    let where_ = || format!("messages[{m}].content[{p}]");
    expect_kind(doc, part, Kind::Object, &where_)?;
    let [kind, image_url, text] = doc.pick(part, ["type", "image_url", "text"]).map_err(json)?;
    let kind = kind.ok_or_else(|| schema(format!("{}.type is required", where_())))?;
    let kind = string(doc, &kind, &|| format!("{}.type", where_()))?;
    match kind.as_ref() {
        "image_url" => {
            let iu = image_url.ok_or_else(|| schema(format!("{}.image_url is required", where_())))?;
            // Object form {"url": ..., "detail": ...} or the bare-string form.
            let url_span = if doc.kind(&iu) == Kind::Object {
                let [url] = doc.pick(&iu, ["url"]).map_err(json)?;
                url.ok_or_else(|| schema(format!("{}.image_url.url is required", where_())))?
            } else {
                iu
            };
            let url = string(doc, &url_span, &|| format!("{}.image_url.url", where_()))?;
            req.images.push(ImageSite { span: url_span, url });
        }
        "text" => {
            if let Some(t) = text {
                req.text_bytes += t.len().saturating_sub(2);
            }
        }
        "audio_url" | "input_audio" => req.media.push(MediaSite {
            kind: MediaKind::Audio,
            span: part.clone(),
        }),
        "video_url" => req.media.push(MediaSite {
            kind: MediaKind::Video,
            span: part.clone(),
        }),
        _ => {}
    }
    Ok(())
}

/// Whether `body` could hold an image, audio or video part: it has the
/// bytes `image_url`, `audio_url`, `video_url` or `input_audio`, or a `\u`
/// escape (which could spell them). A body without any has no part of those
/// types under any JSON reading, so [`scan`] would find no image and no
/// media in it. One pass, eight bytes at a time.
pub fn may_have_images(body: &[u8]) -> bool {
    let mut i = 0;
    while i < body.len() {
        // Skip to the next `_` or `\`.
        i += clean_words(&body[i..], |v| has_byte(v, b'_') | has_byte(v, b'\\'));
        let Some(off) = body[i..].iter().position(|&c| c == b'_' || c == b'\\') else {
            return false;
        };
        i += off;
        let hit = if body[i] == b'\\' {
            body.get(i + 1) == Some(&b'u')
        } else {
            i >= 5
                && match body.get(i - 5..i + 4) {
                    Some(b"image_url" | b"audio_url" | b"video_url") => true,
                    _ => body.get(i - 5..i + 6) == Some(&b"input_audio"[..]),
                }
        };
        if hit {
            return true;
        }
        i += 1;
    }
    false
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
    fn a_byte_order_mark_is_skipped_and_spans_count_it() {
        let mut body = BOM.to_vec();
        body.extend_from_slice(BODY.as_bytes());
        let req = scan(&body).expect("scan");
        let plain = scan(BODY.as_bytes()).expect("scan");
        assert_eq!(req.images.len(), 2);
        for (a, b) in req.images.iter().zip(&plain.images) {
            assert_eq!(a.span, b.span.start + 3..b.span.end + 3);
            assert_eq!(&body[a.span.clone()], &BODY.as_bytes()[b.span.clone()]);
        }
        assert_eq!(req.members.len(), plain.members.len());
        // Only one mark, and only in front.
        let mut twice = BOM.to_vec();
        twice.extend_from_slice(&body);
        assert!(matches!(scan(&twice), Err(RequestError::Json(_))));
        let mut inside = b"{".to_vec();
        inside.extend_from_slice(BOM);
        inside.extend_from_slice(b"\"messages\":[]}");
        assert!(matches!(scan(&inside), Err(RequestError::Json(_))));
    }

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
    fn may_have_images_is_a_sound_shortcut() {
        assert!(may_have_images(BODY.as_bytes()));
        assert!(!may_have_images(b""));
        assert!(!may_have_images(
            br#"{"messages":[{"role":"user","content":"an image_ur l, image-url"}]}"#
        ));
        // Escapes could spell the type; the search says "maybe".
        assert!(may_have_images(
            br#"{"messages":[{"content":[{"type":"image\u005furl"}]}]}"#
        ));
        // At every offset and alignment.
        for pad in 0..20 {
            let mut b = vec![b'_'; pad];
            b.extend_from_slice(b"image_url");
            assert!(may_have_images(&b), "{pad}");
            b.truncate(b.len() - 1);
            assert!(!may_have_images(&b), "{pad}");
            let mut b = vec![b'x'; pad];
            b.extend_from_slice(b"\\u");
            assert!(may_have_images(&b), "{pad}");
        }
        let text = br#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}]}"#;
        assert!(!may_have_images(text) && scan(text).expect("scan").images.is_empty());
    }

    #[test]
    fn audio_and_video_parts_are_located_whole() {
        let body = br#"{"messages":[{"role":"user","content":[{"type":"text","text":"hi"},
            {"type":"input_audio","input_audio":{"data":"UklGRg==","format":"wav"}},
            {"type":"video_url","video_url":{"url":"data:video/mp4;base64,AAAA"}},
            {"type":"audio_url","audio_url":{"url":"https://x/a.mp3"}}]}],"model":"m"}"#;
        let req = scan(body).expect("scan");
        assert!(req.images.is_empty());
        let kinds: Vec<_> = req.media.iter().map(|m| m.kind).collect();
        assert_eq!(kinds, [MediaKind::Audio, MediaKind::Video, MediaKind::Audio]);
        assert_eq!(
            &body[req.media[1].span.clone()],
            br#"{"type":"video_url","video_url":{"url":"data:video/mp4;base64,AAAA"}}"#
        );
        assert_eq!(MediaCount::of(&req.media), MediaCount { audio: 2, video: 1 });
        assert_eq!(req.members.len(), 2, "members listed for the encoder");
        let mut bom = BOM.to_vec();
        bom.extend_from_slice(body);
        let shifted = scan(&bom).expect("scan");
        assert_eq!(
            &bom[shifted.media[0].span.clone()],
            &body[req.media[0].span.clone()]
        );
        for ty in ["audio_url", "video_url", "input_audio"] {
            let b = format!(r#"{{"messages":[{{"content":[{{"type":"{ty}"}}]}}]}}"#);
            assert!(may_have_images(b.as_bytes()), "{ty}");
            assert_eq!(scan(b.as_bytes()).expect("scan").media.len(), 1);
        }
        assert!(!may_have_images(b"{\"x\":\"input_audi\"}"));
        assert!(!MediaCount::default().any());
    }

    #[test]
    fn duplicate_keys_take_the_last_like_python() {
        let body = r#"{"messages":[1],"messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"data:a","url":"data:b"}}]}]}"#;
        let req = scan(body.as_bytes()).expect("scan");
        assert_eq!(req.images.len(), 1);
        assert_eq!(req.images[0].url, "data:b");
    }
}
