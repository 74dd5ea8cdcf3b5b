//! Requests for the encode cluster of a disaggregated-encoder (EPD)
//! deployment: the encoder must see exactly the image bytes that
//! prefill/decode will see (its cache is keyed by the image), answer with
//! one token, and not stream.

use super::request::{scan, ChatRequest, RequestError};
use serde::Deserialize;

/// How a request's images are sent to the encoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum EncodeFanout {
    /// One encode request per image, text removed, all in flight at once.
    #[default]
    PerImage,
    /// One encode request with the whole body.
    PerRequest,
}

/// What happens when the encoder cannot be reached after the retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum EncodeFailure {
    /// Forward to prefill/decode anyway: it encodes the images itself.
    #[default]
    Fallback,
    /// Answer 502 with an OpenAI-style error.
    Fail,
}

/// Top-level fields dropped from every encode request (replaced or
/// meaningless for a one-token, non-streaming call).
const REPLACED: &[&str] = &["max_tokens", "max_completion_tokens", "stream", "stream_options"];

/// Top-level fields an encode request of a single image keeps: the model,
/// and what vLLM folds into the encoder-cache key.
const PER_IMAGE_KEEP: &[&str] = &["model", "mm_processor_kwargs"];

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

fn push_one_token(out: &mut Vec<u8>, first: &mut bool, had_max_completion: bool) {
    push_member(out, first, "max_tokens", b"1");
    if had_max_completion {
        push_member(out, first, "max_completion_tokens", b"1");
    }
    push_member(out, first, "stream", b"false");
    out.push(b'}');
}

/// The encode request carrying the whole body.
fn whole(body: &[u8], req: &ChatRequest<'_>) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 64);
    out.push(b'{');
    let mut first = true;
    let mut had_mct = false;
    for (key, range) in &req.members {
        had_mct |= key == "max_completion_tokens";
        if !REPLACED.contains(&key.as_ref()) {
            push_member(&mut out, &mut first, key, &body[range.clone()]);
        }
    }
    push_one_token(&mut out, &mut first, had_mct);
    out
}

/// One encode request per image, audio or video part: the item alone in
/// a user message (an image as its URL, an audio or video part whole, as
/// sent).
fn per_image(body: &[u8], req: &ChatRequest<'_>) -> Vec<Vec<u8>> {
    let had_mct = req.members.iter().any(|(k, _)| k == "max_completion_tokens");
    let one = |part: &[&[u8]]| {
        let mut out = Vec::with_capacity(part.iter().map(|p| p.len()).sum::<usize>() + 256);
        out.push(b'{');
        let mut first = true;
        for (key, range) in &req.members {
            if PER_IMAGE_KEEP.contains(&key.as_ref()) {
                push_member(&mut out, &mut first, key, &body[range.clone()]);
            }
        }
        let mut msg = b"[{\"role\":\"user\",\"content\":[".to_vec();
        for p in part {
            msg.extend_from_slice(p);
        }
        msg.extend_from_slice(b"]}]");
        push_member(&mut out, &mut first, "messages", &msg);
        push_one_token(&mut out, &mut first, had_mct);
        out
    };
    let images = req.images.iter().map(|site| {
        one(&[
            b"{\"type\":\"image_url\",\"image_url\":{\"url\":",
            &body[site.span.clone()],
            b"}}",
        ])
    });
    let media = req.media.iter().map(|site| one(&[&body[site.span.clone()]]));
    images.chain(media).collect()
}

/// Encode requests for `body` (the body prefill/decode will get). Empty
/// when the request has no image, audio or video part.
pub fn encode_requests(body: &[u8], fanout: EncodeFanout) -> Result<Vec<Vec<u8>>, RequestError> {
    let req = scan(body)?;
    if req.images.is_empty() && req.media.is_empty() {
        return Ok(Vec::new());
    }
    Ok(match fanout {
        EncodeFanout::PerRequest => vec![whole(body, &req)],
        EncodeFanout::PerImage => per_image(body, &req),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    const BODY: &str = r#"{"model":"qwen","messages":[{"role":"system","content":"be brief"},
      {"role":"user","content":[{"type":"text","text":"what?"},
        {"type":"image_url","image_url":{"url":"data:image/png;base64,AAAA","detail":"low"}},
        {"type":"image_url","image_url":"data:image/jpeg;base64,BBBB"}]}],
      "stream":true,"stream_options":{"include_usage":true},"max_completion_tokens":300,
      "temperature":0.70,"mm_processor_kwargs":{"max_pixels":1003520},"big":1e400}"#;

    fn parse(b: &[u8]) -> Value {
        serde_json::from_slice(b).unwrap_or(Value::Null)
    }

    #[test]
    fn per_request_keeps_the_body_but_asks_for_one_token() {
        let out = encode_requests(BODY.as_bytes(), EncodeFanout::PerRequest).expect("ok");
        assert_eq!(out.len(), 1);
        let text = String::from_utf8(out[0].clone()).expect("utf8");
        // Numbers as sent (1e400 is not even representable), images as sent.
        assert!(
            text.contains(r#""temperature":0.70"#) && text.contains(r#""big":1e400"#),
            "{text}"
        );
        assert!(text.contains("data:image/png;base64,AAAA") && text.contains("data:image/jpeg;base64,BBBB"));
        assert!(!text.contains("stream_options"));
        let v: Value = serde_json::from_str(&text.replace("1e400", "1")).expect("json");
        assert_eq!(v["max_tokens"], 1);
        assert_eq!(v["max_completion_tokens"], 1);
        assert_eq!(v["stream"], false);
        assert_eq!(v["messages"][1]["content"][0]["text"], "what?");
    }

    #[test]
    fn per_image_sends_each_image_alone() {
        let out = encode_requests(BODY.as_bytes(), EncodeFanout::PerImage).expect("ok");
        assert_eq!(out.len(), 2);
        for (b, url) in out
            .iter()
            .zip(["data:image/png;base64,AAAA", "data:image/jpeg;base64,BBBB"])
        {
            let v = parse(b);
            assert_eq!(
                v,
                json!({"model": "qwen", "mm_processor_kwargs": {"max_pixels": 1003520},
                    "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}],
                    "max_tokens": 1, "max_completion_tokens": 1, "stream": false})
            );
        }
    }

    #[test]
    fn audio_and_video_parts_go_to_the_encoder_as_sent() {
        let body = br#"{"model":"m","messages":[{"role":"user","content":[
            {"type":"input_audio","input_audio":{"data":"UklGRg==","format":"wav"}},
            {"type":"video_url","video_url":{"url":"data:video/mp4;base64,AAAA"}}]}],"stream":true}"#;
        let out = encode_requests(body, EncodeFanout::PerImage).expect("ok");
        assert_eq!(out.len(), 2);
        assert_eq!(
            parse(&out[0]),
            json!({"model": "m", "messages": [{"role": "user", "content": [
                {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}]}],
                "max_tokens": 1, "stream": false})
        );
        assert_eq!(
            parse(&out[1])["messages"][0]["content"][0]["video_url"]["url"],
            "data:video/mp4;base64,AAAA"
        );
        let whole = encode_requests(body, EncodeFanout::PerRequest).expect("ok");
        assert_eq!(whole.len(), 1);
        assert_eq!(
            parse(&whole[0])["messages"][0]["content"]
                .as_array()
                .map(Vec::len),
            Some(2)
        );
        // Images first, then the other parts.
        let mixed = br#"{"messages":[{"role":"user","content":[
            {"type":"audio_url","audio_url":{"url":"https://x/a.mp3"}},
            {"type":"image_url","image_url":"data:image/png;base64,AAAA"}]}]}"#;
        let out = encode_requests(mixed, EncodeFanout::PerImage).expect("ok");
        assert_eq!(parse(&out[0])["messages"][0]["content"][0]["type"], "image_url");
        assert_eq!(parse(&out[1])["messages"][0]["content"][0]["type"], "audio_url");
    }

    #[test]
    fn text_only_needs_no_encoder() {
        let body = br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
        assert_eq!(encode_requests(body, EncodeFanout::PerImage), Ok(vec![]));
    }
}
