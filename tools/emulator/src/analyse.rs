//! Reading a chat request: parameters, text size, and every image decoded
//! for real with the filter's own core code.

use crate::error::ApiError;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use vlm_budget::core::base64buf::Base64Payload;
use vlm_budget::core::datauri::{self, DataUriError, ImageUrl};
use vlm_budget::core::error::ImageErrorKind;
use vlm_budget::core::probe::{probe, ProbeError};
use vlm_budget::core::request::{scan, RequestError};
use vlm_budget::core::sizing::SizingRule;
use vlm_budget::core::transcode::{decode, Layout, Pixels, TranscodeError};
use xxhash_rust::xxh3::{xxh3_64, Xxh3};

/// One decoded image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// SHA-256 of the image file bytes (after base64 decoding), lower-case hex.
    pub sha256: String,
    pub width: u32,
    pub height: u32,
    /// Visual tokens by the Qwen rule (`smart_resize` of the decoded size).
    pub visual_tokens: u64,
    /// Hash of the decoded pixels: the encoder-cache key.
    pub pixel_hash: u128,
    pub format: &'static str,
}

impl ImageInfo {
    pub fn pixels(&self) -> u64 {
        u64::from(self.width) * u64::from(self.height)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
struct StreamOptions {
    include_usage: Option<bool>,
}

/// The request fields the emulator honours (others are accepted and ignored).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct Params {
    pub model: Option<String>,
    pub max_tokens: Option<u64>,
    pub max_completion_tokens: Option<u64>,
    pub stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    /// vLLM's KV-transfer handshake (prefill/decode split).
    pub kv_transfer_params: Option<KvParams>,
}

/// The `kv_transfer_params` fields the emulator reads (others ignored).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct KvParams {
    /// Set by the proxy on the request for the prefill instance.
    pub do_remote_decode: Option<bool>,
    /// Set by the prefill instance on the params decode gets.
    pub do_remote_prefill: Option<bool>,
    /// The emulator's name of a KV transfer (its prefill answers with one).
    pub transfer_id: Option<String>,
}

impl Params {
    /// `max_completion_tokens`, else `max_tokens` (vLLM's precedence).
    pub fn requested_max_tokens(&self) -> Option<u64> {
        self.max_completion_tokens.or(self.max_tokens)
    }

    pub fn stream(&self) -> bool {
        self.stream.unwrap_or(false)
    }

    /// The request opens a KV transfer (to be prefilled for a remote decode).
    pub fn remote_decode(&self) -> bool {
        self.kv_transfer_params
            .as_ref()
            .and_then(|k| k.do_remote_decode)
            .unwrap_or(false)
    }

    /// The request brings a prefilled KV cache: the transfer it names.
    pub fn remote_prefill(&self) -> Option<Option<&str>> {
        let kv = self.kv_transfer_params.as_ref()?;
        kv.do_remote_prefill
            .unwrap_or(false)
            .then_some(kv.transfer_id.as_deref())
    }

    pub fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false)
    }
}

/// A chat request, read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Analysis {
    pub params: Params,
    pub images: Vec<ImageInfo>,
    /// Text tokens, estimated as text bytes / 4 (at least 1).
    pub text_tokens: u64,
    /// Hash of the whole body (seeds the generated text).
    pub body_hash: u64,
}

impl Analysis {
    pub fn visual_tokens(&self) -> u64 {
        self.images.iter().map(|i| i.visual_tokens).sum()
    }

    pub fn pixels(&self) -> u64 {
        self.images.iter().map(ImageInfo::pixels).sum()
    }

    /// Prompt tokens as vLLM counts them: text, visual tokens, and the two
    /// vision start/end tokens the chat template adds per image.
    pub fn prompt_tokens(&self) -> u64 {
        self.text_tokens + self.visual_tokens() + 2 * self.images.len() as u64
    }
}

/// Limits the analysis enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub rule: SizingRule,
    /// Largest decoded image, in pixels.
    pub max_image_pixels: u64,
}

/// Parses the body and decodes every image. CPU-bound: run it off the
/// async workers.
pub fn analyse(body: &[u8], limits: &Limits) -> Result<Analysis, ApiError> {
    let req = scan(body).map_err(|e| match e {
        RequestError::Json(_) => ApiError::bad_request("invalid_json", e.to_string()),
        RequestError::Schema(_) => ApiError::bad_request("invalid_request", e.to_string()),
    })?;
    let params: Params = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request("invalid_request", format!("invalid chat request: {e}")))?;
    if params.requested_max_tokens() == Some(0) {
        return Err(ApiError::bad_request(
            "invalid_request",
            "max_tokens must be at least 1, got 0.",
        ));
    }
    if params.stream_options.is_some() && !params.stream() {
        return Err(ApiError::bad_request(
            "invalid_request",
            "Stream options can only be defined when `stream=True`.",
        ));
    }
    let mut images = Vec::with_capacity(req.images.len());
    for (index, site) in req.images.iter().enumerate() {
        images.push(read_image(index, &site.url, limits)?);
    }
    Ok(Analysis {
        params,
        images,
        text_tokens: (req.text_bytes as u64 / 4).max(1),
        body_hash: xxh3_64(body),
    })
}

fn read_image(index: usize, url: &str, limits: &Limits) -> Result<ImageInfo, ApiError> {
    let err =
        |kind: ImageErrorKind, detail: &dyn std::fmt::Display| ApiError::image(index, kind.code(), detail);
    let uri = match datauri::parse(url) {
        Ok(ImageUrl::Data(d)) => d,
        Ok(ImageUrl::Remote) => {
            return Err(err(
                ImageErrorKind::InvalidDataUri,
                &"remote image URLs are not fetched by this server; send a data: URL",
            ))
        }
        Err(e @ DataUriError::Malformed(_)) => return Err(err(ImageErrorKind::InvalidDataUri, &e)),
        Err(e @ DataUriError::UnsupportedType(_)) => return Err(err(ImageErrorKind::UnsupportedType, &e)),
    };
    let bytes = Base64Payload::new(uri.payload.as_bytes())
        .and_then(|p| p.decode())
        .map_err(|e| err(ImageErrorKind::InvalidBase64, &e))?;
    let header = probe(bytes.as_slice()).map_err(|e| match e {
        ProbeError::Unsupported(_) => err(ImageErrorKind::UnsupportedType, &e),
        ProbeError::Unknown | ProbeError::Corrupt(_) => err(ImageErrorKind::Corrupt, &e),
    })?;
    let declared = u64::from(header.width) * u64::from(header.height);
    if declared > limits.max_image_pixels {
        return Err(err(
            ImageErrorKind::TooManyPixels,
            &format!(
                "{}x{} is more than {} pixels",
                header.width, header.height, limits.max_image_pixels
            ),
        ));
    }
    let px = decode(&bytes, &header, None, limits.max_image_pixels).map_err(|e| match e {
        TranscodeError::OutOfMemory(_) => err(ImageErrorKind::TooManyPixels, &e),
        TranscodeError::Decode(_) | TranscodeError::Encode(_) => err(ImageErrorKind::Corrupt, &e),
    })?;
    let visual_tokens = limits
        .rule
        .tokens(px.width, px.height)
        .map_err(|e| ApiError::image(index, "invalid_image_size", e))?;
    Ok(ImageInfo {
        sha256: hex(&Sha256::digest(&bytes)),
        width: px.width,
        height: px.height,
        visual_tokens,
        pixel_hash: pixel_hash(&px),
        format: header.format.name(),
    })
}

/// Hash of a decoded image: size, channel layout and every sample byte.
pub fn pixel_hash(px: &Pixels) -> u128 {
    let layout: u8 = match px.layout {
        Layout::L8 => 1,
        Layout::La8 => 2,
        Layout::Rgb8 => 3,
        Layout::Rgba8 => 4,
    };
    let mut h = Xxh3::new();
    h.update(&px.width.to_le_bytes());
    h.update(&px.height.to_le_bytes());
    h.update(&[layout]);
    h.update(&px.data);
    h.digest128()
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use vlm_budget::core::base64buf::encode_into;
    use vlm_budget::core::probe::ImageFormat;
    use vlm_budget::core::transcode::encode;

    fn image(w: u32, h: u32, format: ImageFormat, salt: u8) -> Vec<u8> {
        let data = (0..w * h * 3).map(|i| (i % 251) as u8 ^ salt).collect();
        let px = Pixels {
            width: w,
            height: h,
            layout: Layout::Rgb8,
            data,
        };
        encode(&px, format, 90).expect("encode")
    }

    fn body(urls: &[String], extra: &str) -> Vec<u8> {
        let parts: Vec<String> = urls
            .iter()
            .map(|u| format!(r#"{{"type":"image_url","image_url":{{"url":"{u}"}}}}"#))
            .collect();
        format!(
            r#"{{"model":"m","messages":[{{"role":"user","content":[{{"type":"text","text":"describe these images please"}},{}]}}]{extra}}}"#,
            parts.join(",")
        )
        .into_bytes()
    }

    fn data_url(mime: &str, bytes: &[u8]) -> String {
        let mut out = format!("data:{mime};base64,").into_bytes();
        encode_into(bytes, &mut out);
        String::from_utf8(out).unwrap_or_default()
    }

    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in bytes {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    /// The PNG with a tEXt chunk inserted before IEND: other file bytes,
    /// same pixels.
    fn with_text_chunk(png: &[u8]) -> Vec<u8> {
        let (head, iend) = png.split_at(png.len() - 12);
        let mut chunk = b"tEXtComment\0another file".to_vec();
        let crc = crc32(&chunk);
        let mut out = head.to_vec();
        out.extend_from_slice(&((chunk.len() - 4) as u32).to_be_bytes());
        out.append(&mut chunk);
        out.extend_from_slice(&crc.to_be_bytes());
        out.extend_from_slice(iend);
        out
    }

    fn limits() -> Limits {
        Limits {
            rule: SizingRule::QWEN2_5_VL,
            max_image_pixels: 1 << 26,
        }
    }

    #[test]
    fn counts_tokens_by_the_qwen_rule_and_hashes_file_bytes() {
        let png = image(640, 480, ImageFormat::Png, 0);
        let jpg = image(1000, 1000, ImageFormat::Jpeg, 0);
        let a = analyse(
            &body(
                &[data_url("image/png", &png), data_url("image/jpeg", &jpg)],
                r#","max_tokens":7"#,
            ),
            &limits(),
        )
        .expect("analyse");
        // 640x480 -> 644x476 (23x17 tokens); 1000x1000 -> 1008x1008 (36x36).
        assert_eq!(a.images[0].visual_tokens, 23 * 17);
        assert_eq!(a.images[1].visual_tokens, 36 * 36);
        assert_eq!((a.images[1].width, a.images[1].height), (1000, 1000));
        assert_eq!(a.images[0].sha256, hex(&Sha256::digest(&png)));
        assert_eq!(a.images[0].format, "png");
        assert_eq!(a.text_tokens, "describe these images please".len() as u64 / 4);
        assert_eq!(a.prompt_tokens(), a.text_tokens + 23 * 17 + 36 * 36 + 4);
        assert_eq!(a.params.requested_max_tokens(), Some(7));
        assert_ne!(a.images[0].pixel_hash, a.images[1].pixel_hash);
    }

    #[test]
    fn same_pixels_same_key_whatever_the_file() {
        // Two different PNG files with the same pixels: same cache key,
        // different file hash.
        let px = Pixels {
            width: 56,
            height: 56,
            layout: Layout::Rgb8,
            data: (0..56 * 56 * 3).map(|i| (i % 7) as u8).collect(),
        };
        let a = encode(&px, ImageFormat::Png, 90).expect("png");
        let b = with_text_chunk(&a);
        assert_ne!(a, b);
        let x = analyse(&body(&[data_url("image/png", &a)], ""), &limits()).expect("a");
        let y = analyse(&body(&[data_url("image/png", &b)], ""), &limits()).expect("b");
        assert_eq!(x.images[0].pixel_hash, y.images[0].pixel_hash);
        assert_ne!(x.images[0].sha256, y.images[0].sha256);
        assert_eq!(x.images[0].pixel_hash, pixel_hash(&px));
        let other = Pixels {
            data: (0..56 * 56 * 3).map(|i| (i % 5) as u8).collect(),
            ..px
        };
        assert_ne!(x.images[0].pixel_hash, pixel_hash(&other));
    }

    #[test]
    fn refuses_what_vllm_refuses_with_codes() {
        let png = image(64, 64, ImageFormat::Png, 0);
        let cases: Vec<(String, &str)> = vec![
            ("https://example.com/a.png".into(), "invalid_image_url"),
            ("data:image/png;base64,ab$d".into(), "invalid_base64"),
            ("data:image/webp;base64,AAAA".into(), "unsupported_image_type"),
            (data_url("image/png", b"hello world"), "corrupt_image"),
            (data_url("image/png", &png[..png.len() / 2]), "corrupt_image"),
            (
                data_url("image/png", &image(20, 20, ImageFormat::Png, 0)),
                "invalid_image_size",
            ),
        ];
        for (url, code) in cases {
            let e = analyse(&body(std::slice::from_ref(&url), ""), &limits()).expect_err(&url);
            assert_eq!((e.status, e.code), (400, code), "{url}: {e}");
            assert!(e.message.starts_with("image 0: "), "{}", e.message);
        }
        let small = Limits {
            max_image_pixels: 1000,
            ..limits()
        };
        let e = analyse(&body(&[data_url("image/png", &png)], ""), &small).expect_err("too big");
        assert_eq!(e.code, "image_too_large");
        for (b, code) in [
            (&b"{"[..], "invalid_json"),
            (br#"{"model":"m"}"#, "invalid_request"),
            (br#"{"messages":[],"max_tokens":-1}"#, "invalid_request"),
            (br#"{"messages":[],"max_tokens":0}"#, "invalid_request"),
            (
                br#"{"messages":[],"stream_options":{"include_usage":true}}"#,
                "invalid_request",
            ),
        ] {
            assert_eq!(analyse(b, &limits()).map_err(|e| e.code), Err(code));
        }
    }

    #[test]
    fn text_only_and_precedence() {
        let a = analyse(
            br#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":5,"max_completion_tokens":9,
                 "stream":true,"stream_options":{"include_usage":true}}"#,
            &limits(),
        )
        .expect("text");
        assert_eq!(a.text_tokens, 1);
        assert_eq!(a.prompt_tokens(), 1);
        assert_eq!(a.params.requested_max_tokens(), Some(9));
        assert!(a.params.stream() && a.params.include_usage());
    }
}
