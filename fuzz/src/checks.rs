//! Properties checked on arbitrary input, one function per fuzz target.
//!
//! Each function must never panic except through a failed assertion, which
//! marks a bug. Shared by the cargo-fuzz targets (`fuzz/fuzz_targets/`) and
//! by the root crate's `tests/fuzz_regressions.rs`, which replays the
//! committed inputs of `tests/data/fuzz-regressions/<target>/`.

use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine;
use serde_json::Value;
use std::ops::Range;
use std::sync::OnceLock;
use vlm_budget::core::base64buf::{encode_into, Base64Error, Base64Payload, ENCODER};
use vlm_budget::core::config::Config;
use vlm_budget::core::datauri::{self, ImageUrl};
use vlm_budget::core::encode::{self as epd, EncodeFanout};
use vlm_budget::core::json::Doc;
use vlm_budget::core::offload::{check_answer, Target};
use vlm_budget::core::pipeline::Job;
use vlm_budget::core::pipeline::{process, ImageAction, Outcome, RequestContext};
use vlm_budget::core::policy::{self, PolicyKind};
use vlm_budget::core::prefill::{answer_kv_params, decode_request, prefill_request, KV_KEY, KV_OPEN};
use vlm_budget::core::probe::{probe, ImageFormat};
use vlm_budget::core::prometheus::{samples, sum_of};
use vlm_budget::core::request::{may_have_images, scan, splice, ChatRequest, RequestError};
use vlm_budget::core::residual::Margin;
use vlm_budget::core::sizing::Dims;
use vlm_budget::core::traffic::{ClusterSignal, TrafficSnapshot, TrafficState};
use vlm_budget::core::transcode::{self, Layout, Pixels, ResizeFilter};

/// A property check over one input.
pub type Check = fn(&[u8]);

/// Every target, by name (the directory names under `fuzz/corpus/` and
/// `tests/data/fuzz-regressions/`).
pub const TARGETS: [(&str, Check); 9] = [
    ("request", request),
    ("pipeline", pipeline),
    ("datauri_base64", datauri_base64),
    ("probe_decode", probe_decode),
    ("config", config),
    ("prometheus", prometheus),
    ("encode_requests", encode_requests),
    ("prefill", prefill),
    ("offload_answer", offload_answer),
];

// ------------------------------------------------------------- helpers

/// The image URLs of a chat body by an independent reading (serde_json's
/// `Value`, last duplicate key wins), with the filter's schema rules;
/// `None` when the body breaks the schema.
fn walk(v: &Value) -> Option<Vec<String>> {
    let messages = v.as_object()?.get("messages")?.as_array()?;
    let mut urls = Vec::new();
    for m in messages {
        match m.as_object()?.get("content") {
            None | Some(Value::Null | Value::String(_)) => {}
            Some(Value::Array(parts)) => {
                for p in parts {
                    let p = p.as_object()?;
                    if p.get("type")?.as_str()? == "image_url" {
                        let url = match p.get("image_url")? {
                            Value::Object(o) => o.get("url")?,
                            other => other,
                        };
                        urls.push(url.as_str()?.to_string());
                    }
                }
            }
            Some(_) => return None,
        }
    }
    Some(urls)
}

fn urls(req: &ChatRequest<'_>) -> Vec<String> {
    req.images.iter().map(|i| i.url.to_string()).collect()
}

/// The gaps between `spans` in `body` (everything a rewrite must keep).
fn gaps<'b>(body: &'b [u8], spans: &[Range<usize>]) -> Vec<&'b [u8]> {
    let mut out = Vec::with_capacity(spans.len() + 1);
    let mut at = 0;
    for s in spans {
        assert!(
            at <= s.start && s.start <= s.end && s.end <= body.len(),
            "span {s:?} out of order"
        );
        out.push(&body[at..s.start]);
        at = s.end;
    }
    out.push(&body[at..]);
    out
}

/// The base64 engine the filter documents: standard alphabet, padding
/// optional, trailing bits tolerated.
const REFERENCE: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_allow_trailing_bits(true)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

fn le_u16(data: &[u8], at: usize) -> usize {
    usize::from(u16::from_le_bytes([
        data.get(at).copied().unwrap_or(0),
        data.get(at + 1).copied().unwrap_or(0),
    ]))
}

// ------------------------------------------------- chat request parser

/// `request::scan` agrees with serde_json; every span is the JSON string
/// literal of its URL; `splice` with new URLs changes those and nothing else.
pub fn request(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let ours = Doc::parse(text).map(|(_, v)| v);
        let theirs = serde_json::from_str::<&serde_json::value::RawValue>(text);
        assert_eq!(
            ours.is_ok(),
            theirs.is_ok(),
            "JSON validity differs: {ours:?} vs {theirs:?}"
        );
    }
    let scanned = scan(data);
    if !may_have_images(data) {
        // The shortcut that skips parsing is sound: no image is missed.
        assert!(
            scanned.as_ref().map_or(true, |r| r.images.is_empty()),
            "may_have_images missed an image"
        );
    }
    if let Ok(v) = serde_json::from_slice::<Value>(data) {
        match (&scanned, walk(&v)) {
            (Ok(req), Some(want)) => assert_eq!(urls(req), want, "scan and serde_json disagree"),
            (Err(RequestError::Schema(_)), None) => {}
            (got, want) => panic!("scan gave {got:?}, serde_json reading gave {want:?}"),
        }
    }
    let Ok(req) = scanned else { return };
    for site in &req.images {
        let literal = &data[site.span.clone()];
        let unescaped: String = serde_json::from_slice(literal).expect("a span is a JSON string");
        assert_eq!(unescaped, site.url, "span and URL differ");
    }
    for (key, range) in &req.members {
        assert!(
            range.end <= data.len() && range.start < range.end,
            "member {key} out of bounds"
        );
    }
    // New URLs of varied length, some needing escapes.
    let new: Vec<String> = (0..req.images.len())
        .map(|i| match i % 3 {
            0 => format!("data:image/png;base64,{}", "QUJD".repeat(i)),
            1 => "https://example.com/\"quoted\"/\u{e9}\\x".to_string(),
            _ => String::new(),
        })
        .collect();
    let edits: Vec<(Range<usize>, Vec<u8>)> = req
        .images
        .iter()
        .zip(&new)
        .map(|(site, url)| (site.span.clone(), serde_json::to_vec(url).unwrap_or_default()))
        .collect();
    let out = splice(data, &edits);
    let again = scan(&out).expect("a spliced body scans");
    assert_eq!(urls(&again), new, "spliced URLs");
    assert_eq!(again.text_bytes, req.text_bytes);
    let old_spans: Vec<_> = req.images.iter().map(|s| s.span.clone()).collect();
    let new_spans: Vec<_> = again.images.iter().map(|s| s.span.clone()).collect();
    assert_eq!(
        gaps(data, &old_spans),
        gaps(&out, &new_spans),
        "bytes outside the URLs changed"
    );
}

// ---------------------------------------------------- encode requests

/// `encode::encode_requests` sends exactly the body's image URLs (one per
/// call, or all in one), asks for one non-streamed token, and writes valid
/// JSON whenever the body was valid JSON.
pub fn encode_requests(data: &[u8]) {
    let Ok(req) = scan(data) else {
        for fanout in [EncodeFanout::PerImage, EncodeFanout::PerRequest] {
            assert!(epd::encode_requests(data, fanout).is_err());
        }
        return;
    };
    let valid_json = serde_json::from_slice::<Value>(data).is_ok();
    let want = urls(&req);
    for fanout in [EncodeFanout::PerImage, EncodeFanout::PerRequest] {
        let out = epd::encode_requests(data, fanout).expect("the body scanned");
        if want.is_empty() && req.media.is_empty() {
            assert!(out.is_empty(), "no image, audio or video: no encode call");
            continue;
        }
        // Per item: each image alone, then each audio or video part alone.
        let expected: Vec<Vec<String>> = match fanout {
            EncodeFanout::PerImage => want
                .iter()
                .map(|u| vec![u.clone()])
                .chain(req.media.iter().map(|_| Vec::new()))
                .collect(),
            EncodeFanout::PerRequest => vec![want.clone()],
        };
        assert_eq!(out.len(), expected.len());
        for (body, want) in out.iter().zip(expected) {
            let got = scan(body).expect("an encode request scans");
            assert_eq!(urls(&got), want, "encode request carries other images");
            if valid_json {
                let v: Value = serde_json::from_slice(body).expect("valid JSON in, valid JSON out");
                assert_eq!(walk(&v), Some(want));
                assert_eq!(v["max_tokens"], 1);
                assert_eq!(v["stream"], false);
                assert!(v.get("stream_options").is_none());
            }
        }
    }
}

// ------------------------------------------------------------- prefill

/// The prefill/decode split: a prefill answer's `kv_transfer_params` agree
/// with an independent reading (serde_json); the prefill request asks for
/// one token and opens the handshake; the decode request is the body with
/// only the params added or replaced.
pub fn prefill(data: &[u8]) {
    let reference = serde_json::from_slice::<Value>(data).ok();
    match answer_kv_params(data) {
        Ok(Some(raw)) => {
            assert!(raw.first() == Some(&b'{') && raw.last() == Some(&b'}'));
            if let Some(v) = &reference {
                let got: Value = serde_json::from_slice(raw).expect("the params are JSON");
                assert_eq!(Some(&got), v.get(KV_KEY), "not the answer's params");
            }
        }
        Ok(None) => {
            if let Some(v) = &reference {
                assert!(v.is_object());
                assert!(v.get(KV_KEY).is_none_or(Value::is_null), "params missed");
            }
        }
        Err(_) => {
            if let Some(v) = &reference {
                let shaped = v.get(KV_KEY).is_none_or(|p| p.is_object() || p.is_null());
                assert!(!v.is_object() || !shaped, "a well-formed answer refused");
            }
        }
    }
    let Ok(pre) = prefill_request(data) else {
        assert!(decode_request(data, b"{}").is_err(), "bodies are read alike");
        return;
    };
    let kv = br#"{"transfer_id":"t"}"#;
    let dec = decode_request(data, kv).expect("the body read for prefill");
    if let Some(Value::Object(body)) = &reference {
        let v: Value = serde_json::from_slice(&pre).expect("valid JSON in, valid JSON out");
        let open: Value = serde_json::from_slice(KV_OPEN).expect("KV_OPEN");
        assert_eq!(
            (&v["max_tokens"], &v["stream"], &v[KV_KEY]),
            (&Value::from(1), &Value::from(false), &open)
        );
        assert!(v.get("stream_options").is_none());
        let d: Value = serde_json::from_slice(&dec).expect("valid JSON in, valid JSON out");
        let mut want = body.clone();
        want.insert(KV_KEY.into(), serde_json::json!({"transfer_id": "t"}));
        assert_eq!(d, Value::Object(want), "decode changed more than the params");
    }
    // Without params already there, the decode request only adds bytes.
    if !data.windows(KV_KEY.len()).any(|w| w == KV_KEY.as_bytes()) {
        let added = dec.len() - data.len();
        assert!(added == KV_KEY.len() + 3 + kv.len() || added == KV_KEY.len() + 4 + kv.len());
        let at = dec
            .iter()
            .zip(data)
            .position(|(a, b)| a != b)
            .unwrap_or(data.len());
        assert_eq!(&dec[..at], &data[..at]);
        assert_eq!(&dec[at + added..], &data[at..], "bytes after the params changed");
    }
}

// ------------------------------------------------- data URI and base64

/// `datauri::parse` classifies consistently; a payload `Base64Payload`
/// accepts decodes, agrees with the reference decoder, and reads the same
/// bytes at random offsets as the full decode.
pub fn datauri_base64(data: &[u8]) {
    base64_payload(data);
    let Ok(url) = std::str::from_utf8(data) else {
        return;
    };
    match datauri::parse(url) {
        Ok(ImageUrl::Remote) => {
            assert!(!url.get(..5).is_some_and(|p| p.eq_ignore_ascii_case("data:")));
        }
        Ok(ImageUrl::Data(d)) => {
            assert!(url.ends_with(d.payload));
            assert!(matches!(
                d.mime.as_str(),
                "image/png" | "image/jpeg" | "image/jpg" | "image/pjpeg"
            ));
            base64_payload(d.payload.as_bytes());
        }
        Err(_) => assert!(url.get(..5).is_some_and(|p| p.eq_ignore_ascii_case("data:"))),
    }
}

fn base64_payload(text: &[u8]) {
    let compact: Vec<u8> = text
        .iter()
        .copied()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    let reference = REFERENCE.decode(&compact);
    let p = match Base64Payload::new(text) {
        Ok(p) => p,
        Err(e) => {
            // The reference also takes partial padding (`QQ=`), which the
            // filter refuses as Python's `b64decode` does.
            let partial_padding = e == Base64Error::InvalidPadding && compact.len() % 4 != 0;
            assert!(
                reference.is_err() || partial_padding,
                "refused ({e}) what the decoder accepts"
            );
            return;
        }
    };
    let full = p.decode().expect("a validated payload decodes");
    assert_eq!(full.len(), p.decoded_len());
    assert_eq!(p.text_len(), compact.len());
    assert_eq!(
        reference.ok().as_ref(),
        Some(&full),
        "differs from the reference decoder"
    );
    let n = full.len();
    let probes = [
        (0, 0),
        (0, 1),
        (0, 33),
        (1, 2),
        (2, 5),
        (n / 2, 7),
        (n.saturating_sub(1), 3),
        (n, 1),
        (n + 5, 2),
        (usize::MAX, 2),
        (3, usize::MAX),
        (le_u16(text, 0) % (n + 1), le_u16(text, 2) % 64),
    ];
    for (off, len) in probes {
        let lo = off.min(n);
        let hi = off.saturating_add(len).min(n);
        assert_eq!(
            p.read_at(off, len),
            &full[lo..hi.max(lo)],
            "read_at({off}, {len})"
        );
    }
    assert_eq!(probe(&p), probe(full.as_slice()), "probe via base64 view");
    let mut again = Vec::new();
    encode_into(&full, &mut again);
    let round = Base64Payload::new(&again).expect("encode_into writes valid base64");
    assert_eq!(round.decode().ok(), Some(full));
}

// ------------------------------------------------ header probe, decode

/// Largest decode the targets allow: 2^18 pixels (1 MiB of RGBA).
const SMALL_PIXELS: u64 = 1 << 18;

/// `probe` reads the same header from raw bytes and from their base64
/// (padded, unpadded, line-wrapped); images within a small pixel limit
/// decode, resize and re-encode to exactly the asked size, and a decode
/// under a limit smaller than the image must not allocate for it (the
/// fuzzer runs with a malloc limit).
pub fn probe_decode(data: &[u8]) {
    let raw = probe(data);
    let text = ENCODER.encode(data);
    let views = [
        text.clone(),
        text.trim_end_matches('=').to_string(),
        text.as_bytes()
            .chunks(76)
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect::<Vec<_>>()
            .join("\r\n"),
    ];
    for view in &views {
        let p = Base64Payload::new(view.as_bytes()).expect("encoder output is valid");
        assert_eq!(probe(&p), raw, "probe through base64 differs");
    }
    let Ok(header) = raw else { return };
    assert!(header.width > 0 && header.height > 0);
    let pixels = u64::from(header.width) * u64::from(header.height);
    if pixels > SMALL_PIXELS {
        // Refused by the pipeline before decoding; the decoder must still
        // hold its own limit, before allocating for the image.
        let result = transcode::decode(data, &header, None, SMALL_PIXELS);
        if header.format == ImageFormat::Png {
            assert!(result.is_err(), "a PNG above the pixel limit decoded");
        }
        return;
    }
    let first = data.first().copied().unwrap_or(0);
    let to = Dims::new(
        1 + u32::from(first % 32).min(header.width.saturating_sub(1)),
        1 + u32::from(first / 8 % 32).min(header.height.saturating_sub(1)),
    );
    let filter = if first & 1 == 0 {
        ResizeFilter::CatmullRom
    } else {
        ResizeFilter::Lanczos3
    };
    for target in [None, Some(to)] {
        let Ok(decoded) = transcode::decode(data, &header, target, SMALL_PIXELS) else {
            continue;
        };
        let px = transcode::resize(decoded, to, filter).expect("a decoded image resizes");
        check_pixels(&px, to);
        if header.format == ImageFormat::Jpeg && matches!(px.layout, Layout::La8 | Layout::Rgba8) {
            panic!("JPEG decoded with alpha");
        }
        let out = transcode::encode(&px, header.format, 80).expect("a resized image encodes");
        let h = probe(out.as_slice()).expect("our own output probes");
        assert_eq!(
            (h.format, h.width, h.height),
            (header.format, to.width, to.height)
        );
        let back = transcode::decode(&out, &h, None, SMALL_PIXELS).expect("our own output decodes");
        check_pixels(&transcode::resize(back, to, filter).expect("resize"), to);
    }
}

fn check_pixels(px: &Pixels, to: Dims) {
    assert_eq!((px.width, px.height), (to.width, to.height));
    assert_eq!(px.data.len(), to.pixels() as usize * px.layout.channels());
}

// ------------------------------------------------------- whole pipeline

/// A small image of each kind, as a chat body: the fixed workload of the
/// `config` target.
fn sample_body() -> &'static [u8] {
    static BODY: OnceLock<Vec<u8>> = OnceLock::new();
    BODY.get_or_init(|| {
        let gradient = |w: u32, h: u32, layout: Layout| Pixels {
            width: w,
            height: h,
            layout,
            data: (0..w * h * layout.channels() as u32)
                .map(|i| (i % 251) as u8)
                .collect(),
        };
        let png =
            transcode::encode(&gradient(300, 200, Layout::Rgba8), ImageFormat::Png, 90).unwrap_or_default();
        let jpeg =
            transcode::encode(&gradient(400, 150, Layout::Rgb8), ImageFormat::Jpeg, 90).unwrap_or_default();
        format!(
            r#"{{"model":"m","messages":[{{"role":"user","content":[{{"type":"text","text":"hi"}},
            {{"type":"image_url","image_url":{{"url":"data:image/png;base64,{}"}}}},
            {{"type":"image_url","image_url":"data:image/jpeg;base64,{}"}},
            {{"type":"image_url","image_url":{{"url":"https://example.com/a.png"}}}}]}}]}}"#,
            ENCODER.encode(png),
            ENCODER.encode(jpeg)
        )
        .into_bytes()
    })
}

/// Traffic from 8 bytes of input: idle, busy, or a decoded shared-data
/// record (what another VM may have written).
fn traffic(seed: &[u8]) -> TrafficSnapshot {
    let b = |i: usize| f64::from(seed.get(i).copied().unwrap_or(0));
    match seed.first().copied().unwrap_or(0) % 3 {
        0 => TrafficSnapshot::idle(),
        1 => TrafficSnapshot {
            encode_outstanding_ms: b(1) * 10.0,
            request_rate: b(2),
            image_rate: b(3),
            token_rate: b(4) * 1000.0,
            cluster: Some(ClusterSignal {
                waiting: b(5),
                running: b(6),
                updated_us: 0,
            }),
            calibration: 0.5 + b(7) / 64.0,
            ..TrafficSnapshot::idle()
        },
        _ => {
            let mut record = [0u8; vlm_budget::core::traffic::STATE_BYTES];
            for (i, r) in record.iter_mut().enumerate() {
                *r = seed
                    .get(i % seed.len().max(1))
                    .copied()
                    .unwrap_or(0)
                    .wrapping_mul(i as u8 | 1);
            }
            let margin = Margin {
                base_ms: f64::from(seed.first().copied().unwrap_or(0)) * 8.0 - 500.0,
                per_token_ms: f64::from(seed.get(1).copied().unwrap_or(0)) / 500.0,
            };
            TrafficSnapshot::of(
                &TrafficState::decode(&record),
                (None, None),
                margin,
                1_000_000,
                10.0,
            )
        }
    }
}

/// Checks an outcome against the body it came from.
fn check_outcome(body: &[u8], cfg: &Config, out: &Outcome) {
    if !cfg.validate_text_only && !may_have_images(body) {
        // Forwarded unparsed (malformed or not): no image, nothing rewritten.
        assert!(
            out.images.is_empty() && out.body.is_none(),
            "a body without images changed"
        );
        return;
    }
    let req = scan(body).expect("process accepted the body");
    assert_eq!(out.images.len(), req.images.len());
    let rule = cfg.sizing_rule();
    let Some(new) = &out.body else {
        assert_eq!(out.resized(), 0, "resized but not rewritten");
        return;
    };
    assert!(out.resized() > 0, "rewritten without a resize");
    let again = scan(new).expect("a rewritten body scans");
    assert_eq!(again.images.len(), req.images.len());
    let old_spans: Vec<_> = req.images.iter().map(|s| s.span.clone()).collect();
    let new_spans: Vec<_> = again.images.iter().map(|s| s.span.clone()).collect();
    assert_eq!(
        gaps(body, &old_spans),
        gaps(new, &new_spans),
        "bytes outside the URLs changed"
    );
    for ((report, before), after) in out.images.iter().zip(&req.images).zip(&again.images) {
        let ImageAction::Resized { format, from, to, .. } = report.action else {
            assert_eq!(before.url, after.url, "an image not resized was changed");
            continue;
        };
        assert!(rule.is_fixed_point(to), "{to:?} is not a fixed point");
        let f = rule.factor();
        let floor = |side: u32| u64::from((side / f).max(1) * f);
        if floor(from.width) * floor(from.height) >= rule.min_pixels {
            // Only an image itself below the backend's minimum grows a side.
            assert!(
                to.width <= from.width && to.height <= from.height,
                "{from:?} upscaled to {to:?}"
            );
        }
        assert_eq!(report.tokens_after, rule.tokens_of(to));
        assert!(
            report.tokens_after < report.tokens_before,
            "resizing did not save tokens"
        );
        let payload = after
            .url
            .strip_prefix(&format!("data:{};base64,", format.mime()))
            .expect("relabelled with the image's own type");
        let p = Base64Payload::new(payload.as_bytes()).expect("valid base64 written");
        let h = probe(&p).expect("the new image probes");
        assert_eq!((h.format, h.width, h.height), (format, to.width, to.height));
        if cfg.policy == PolicyKind::Static {
            assert!(report.tokens_after <= cfg.static_budget_tokens.max(rule.min_tokens()));
        }
    }
}

fn small_config(selector: u8) -> Config {
    let cfg = Config {
        policy: match selector % 3 {
            0 => PolicyKind::Static,
            1 => PolicyKind::Dynamic,
            _ => PolicyKind::Vanilla,
        },
        static_budget_tokens: 16,
        min_tokens_per_image: 4,
        max_image_pixels: SMALL_PIXELS,
        max_body_bytes: 1 << 20,
        max_images_per_request: 8,
        resize_filter: if selector & 8 == 0 {
            ResizeFilter::CatmullRom
        } else {
            ResizeFilter::Lanczos3
        },
        validate_text_only: selector & 16 != 0,
        ..Config::default()
    };
    cfg.validated().unwrap_or_default()
}

/// `pipeline::process` on a raw body (first byte even) or on a body built
/// around the input as an image (first byte odd): it never panics, and a
/// rewritten body is the original with only resized images changed.
pub fn pipeline(data: &[u8]) {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let cfg = small_config(selector >> 1);
    let owned;
    let body: &[u8] = if selector & 1 == 0 {
        rest
    } else {
        owned = format!(
            r#"{{"messages":[{{"role":"user","content":[{{"type":"image_url","image_url":{{"url":"data:image/jpeg;base64,{}"}}}},{{"type":"image_url","image_url":"http://127.0.0.1:1/x.png"}}]}}]}}"#,
            ENCODER.encode(rest)
        )
        .into_bytes();
        &owned
    };
    let policy = policy::from_config(&cfg);
    let seen = traffic(rest.get(..8).unwrap_or_default());
    let ctx = RequestContext {
        traffic: &|| seen,
        slo_ms: None,
        elapsed_ms: 0.0,
        decided: &|ms| assert!(ms.is_finite() && ms >= 0.0, "decided work {ms}"),
    };
    if let Ok(out) = process(body, &cfg, policy.as_ref(), &ctx, &|| 0) {
        check_outcome(body, &cfg, &out);
    }
}

// -------------------------------------------------------- configuration

/// `Config::from_json` either refuses or yields a configuration that
/// re-validates, whose policy runs a fixed request with small images.
pub fn config(data: &[u8]) {
    let Ok(cfg) = Config::from_json(data) else { return };
    if !data.iter().all(u8::is_ascii_whitespace) {
        // serde can fill a struct from an array by position: a section
        // given as an array must be refused, not defaulted.
        let v: Value = serde_json::from_slice(data).expect("a loaded configuration is JSON");
        assert!(v.is_object(), "a configuration that is not an object loaded");
        for section in [
            "/sizing",
            "/profile",
            "/calibration",
            "/profile/encode_ms",
            "/profile/prefill_ms",
        ] {
            assert!(
                v.pointer(section).is_none_or(Value::is_object),
                "{section} loaded from a non-object"
            );
        }
    }
    assert_eq!(
        cfg.clone().validated().as_ref(),
        Ok(&cfg),
        "a loaded config re-validates"
    );
    let _ = cfg.transcode_options();
    let _ = cfg.slo_for(std::str::from_utf8(data).ok());
    let _ = cfg.matches_path("/v1/chat/completions?x=1");
    let policy = policy::from_config(&cfg);
    let body = sample_body();
    for seed in [&[0u8][..], &[1, 200, 3, 1, 40, 3, 2, 90], data] {
        let seen = traffic(seed);
        let ctx = RequestContext {
            traffic: &|| seen,
            slo_ms: Some(cfg.slo_for(Some("250"))),
            elapsed_ms: 0.0,
            decided: &|ms| assert!(ms.is_finite() && ms >= 0.0, "decided work {ms}"),
        };
        if let Ok(out) = process(body, &cfg, policy.as_ref(), &ctx, &|| 0) {
            check_outcome(body, &cfg, &out);
        }
    }
}

// ------------------------------------------------------------ prometheus

/// Every sample has a well-formed name; `sum_of` is the sum of a metric's
/// finite samples and `None` without any.
pub fn prometheus(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let all: Vec<_> = samples(&text).take(64).collect();
    let mut names: Vec<&str> = Vec::new();
    for s in &all {
        assert!(!s.name.is_empty());
        assert!(s
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'));
        if !names.contains(&s.name) && names.len() < 8 {
            names.push(s.name);
        }
    }
    if all.len() == 64 {
        return; // sums would include samples past the first 64
    }
    for name in names {
        let finite: Vec<f64> = all
            .iter()
            .filter(|s| s.name == name && s.value.is_finite())
            .map(|s| s.value)
            .collect();
        let want = (!finite.is_empty()).then(|| finite.iter().sum::<f64>());
        let got = sum_of(&text, name);
        assert!(
            got == want || got.zip(want).is_some_and(|(a, b)| a.is_nan() && b.is_nan()),
            "sum_of({name}) = {got:?}, want {want:?}"
        );
    }
    assert_eq!(sum_of(&text, "vllm:surely_absent_metric_name"), None);
}

/// `transcode: "offload"`: the filter's reading of a transcode answer and of
/// target headers. Input: status selector, format, target width and height
/// (u16 each), then the answer's body (also read as `name: value` lines).
///
/// An answer is used only when it is a 200 whose body is an image of the
/// asked format and size, and then byte for byte; the new URL the filter
/// splices in is a JSON string holding exactly those bytes. Any header
/// values give a target or an error, and a target round-trips through its
/// headers.
pub fn offload_answer(data: &[u8]) {
    let [sel, fmt, w0, w1, h0, h1, body @ ..] = data else {
        return;
    };
    let status = match sel % 4 {
        0 => None,
        1 | 2 => Some(200),
        _ => Some(100 + u32::from(*sel)),
    };
    let format = if fmt % 2 == 0 {
        ImageFormat::Png
    } else {
        ImageFormat::Jpeg
    };
    let to = Dims::new(
        u32::from(u16::from_le_bytes([*w0, *w1])),
        u32::from(u16::from_le_bytes([*h0, *h1])),
    );
    let limit = 1 << 20;
    let got = check_answer(status, Some(body.to_vec()), format, to, limit);
    if let Ok(bytes) = &got {
        assert_eq!(status, Some(200));
        assert_eq!(bytes.as_slice(), body, "an answer is used byte for byte");
        assert!(bytes.len() <= limit);
        let h = probe(bytes.as_slice()).expect("a used answer is an image");
        assert_eq!((h.format, h.width, h.height), (format, to.width, to.height));
        let job = Job {
            index: 0,
            span: 0..0,
            header: h,
            to,
            payload: (),
        };
        let url = job.url(bytes);
        let text: String = serde_json::from_slice(&url).expect("the new URL is a JSON string");
        let b64 = text
            .strip_prefix(&format!("data:{};base64,", format.mime()))
            .expect("a data URL of the input's format");
        assert_eq!(ENCODER.decode(b64).ok().as_deref(), Some(body));
    } else if status == Some(200) && body.len() <= limit {
        // Refused only when it is not that image.
        let ok = probe(body).is_ok_and(|h| (h.format, h.width, h.height) == (format, to.width, to.height));
        assert!(!ok, "a good answer was refused: {got:?}");
    }
    let text = String::from_utf8_lossy(body);
    let pairs: Vec<(&str, &str)> = text
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim(), v))
        .collect();
    let get = |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| *v);
    if let Ok(t) = Target::from_headers(get) {
        assert!(t.to.width >= 1 && t.to.height >= 1 && (1..=100).contains(&t.jpeg_quality));
        let headers = t.headers();
        let back = Target::from_headers(|k| headers.iter().find(|(n, _)| *n == k).map(|(_, v)| v.as_str()));
        assert_eq!(back, Ok(t));
    }
}
