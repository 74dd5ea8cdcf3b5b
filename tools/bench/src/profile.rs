//! Profiling a live OpenAI-compatible encode endpoint (and optionally a
//! prefill/decode endpoint) for the filter's `profile` configuration.
//!
//! Encoder: for each requested visual-token count n, a square image of side
//! round(√n)·28 px (a fixed point of the Qwen rule, so it costs exactly
//! round(√n)² tokens) is sent `warmup + reps` times as a non-streaming chat
//! request holding only that image, with `max_tokens: 1` — the request the
//! filter sends to the encode cluster. Every repetition is a different image
//! (seeded noise over a gradient, JPEG), so an encoder cache never answers
//! it. Requests go one at a time (no queueing).
//!
//! Prefill: text-only prompts of about n tokens (unique, so no prefix cache
//! hit) with `max_tokens: 1` to the PD endpoint; n is the server's
//! `usage.prompt_tokens`.
//!
//! The time of a request is its wall time (send to last byte: what the
//! filter waits for, serving overheads included) or a server-reported time in
//! a response header (e.g. the emulator's `x-emulator-encode-ms`). The medians
//! per size are fitted with `a + b·n + c·n²` (least squares, a, b, c ≥ 0).

use crate::error::{BenchError, Result};
use crate::fit::{self, Quadratic};
use crate::http::{self, Url};
use crate::rng::{derive, Rng};
use crate::stats;
use base64::Engine as _;
use bytes::Bytes;
use hyper::Method;
use serde::Serialize;
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use vlm_budget::core::probe::ImageFormat;
use vlm_budget::core::transcode::{self, Layout, Pixels};

/// Where a request's time comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Timing {
    /// Client wall time, send to the end of the response.
    Wall,
    /// A response header holding milliseconds.
    Header(String),
}

impl Timing {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "wall" => Ok(Self::Wall),
            _ => match s.strip_prefix("header:") {
                Some(h) if !h.is_empty() => Ok(Self::Header(h.to_ascii_lowercase())),
                _ => Err(BenchError::Usage(format!(
                    "timing must be `wall` or `header:NAME`, got `{s}`"
                ))),
            },
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Self::Wall => "client wall time (send to end of response)".into(),
            Self::Header(h) => format!("server-reported `{h}` header"),
        }
    }
}

/// What to profile.
#[derive(Debug, Clone)]
pub struct ProfileOptions {
    pub encode: Url,
    pub pd: Option<Url>,
    pub path: String,
    pub model: String,
    pub tokens: Vec<u64>,
    pub prefill_tokens: Vec<u64>,
    pub reps: usize,
    pub warmup: usize,
    pub timing: Timing,
    pub prefill_timing: Timing,
    pub encode_replicas: u64,
    pub seed: u64,
    pub request_timeout: Duration,
    pub jpeg_quality: u8,
    pub progress: bool,
}

/// One size's measurements.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Point {
    pub tokens: u64,
    pub samples_ms: Vec<f64>,
    pub median_ms: f64,
    pub fitted_ms: f64,
}

/// One sweep and its fit.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Sweep {
    pub timing: String,
    pub points: Vec<Point>,
    pub fit: Quadratic,
    /// Largest |fit − median| / median over the sizes.
    pub max_rel_err: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Profile {
    pub encode: Sweep,
    pub prefill: Option<Sweep>,
    pub encode_replicas: u64,
}

impl Profile {
    /// The plugin's `profile` section (prefill left to the filter's default when not measured).
    pub fn section(&self) -> Value {
        let q = |f: &Quadratic| json!({"a": f.a, "b": f.b, "c": f.c});
        let mut v = json!({"encode_ms": q(&self.encode.fit), "encode_replicas": self.encode_replicas});
        if let Some(p) = &self.prefill {
            v["prefill_ms"] = q(&p.fit);
        }
        v
    }
}

/// Side in pixels and exact visual tokens of the square image for about `n` tokens.
pub fn square_for(n: u64) -> (u32, u64) {
    let k = ((n as f64).sqrt().round() as u64).max(2);
    ((k * 28) as u32, k * k)
}

/// A photo-like test image: a colour gradient with seeded noise, as JPEG.
pub fn test_image(side: u32, seed: u64, quality: u8) -> Result<Vec<u8>> {
    let mut rng = Rng::new(seed);
    let (ox, oy) = (rng.below(256) as u32, rng.below(256) as u32);
    let n = side as usize * side as usize;
    let mut data = Vec::with_capacity(n * 3);
    for y in 0..side {
        for x in 0..side {
            let noise = rng.next_u64();
            let base = [
                ((x + ox) * 255 / side.max(1)) as i32,
                ((y + oy) * 255 / side.max(1)) as i32,
                (((x + y) / 2 + ox) * 255 / side.max(1)) as i32,
            ];
            for (c, b) in base.iter().enumerate() {
                let jitter = ((noise >> (c * 8)) & 0x1f) as i32 - 16;
                data.push((b + jitter).clamp(0, 255) as u8);
            }
        }
    }
    let px = Pixels {
        width: side,
        height: side,
        layout: Layout::Rgb8,
        data,
    };
    transcode::encode(&px, ImageFormat::Jpeg, quality)
        .map_err(|e| BenchError::Numeric(format!("test image: {e}")))
}

const WORDS: [&str; 32] = [
    "the", "image", "shows", "a", "river", "under", "bright", "morning", "light", "with", "trees", "along",
    "its", "banks", "and", "small", "boats", "moving", "slowly", "past", "old", "stone", "houses", "while",
    "people", "walk", "on", "narrow", "streets", "near", "market", "square",
];

/// About `n` tokens of unique text (≈ 4 bytes per token).
pub fn prompt_text(n: u64, seed: u64) -> String {
    let mut rng = Rng::new(seed);
    let mut s = format!("[{seed:016x}] ");
    let target = (n as usize).saturating_mul(4);
    while s.len() < target {
        s.push_str(WORDS[rng.below(WORDS.len() as u64) as usize]);
        s.push(' ');
    }
    s
}

async fn timed(
    url: &Url,
    path: &str,
    body: Bytes,
    timing: &Timing,
    timeout: Duration,
) -> Result<(f64, Value)> {
    let t0 = Instant::now();
    let w = http::exchange(url, Method::POST, path, body, &[], timeout).await?;
    let wall = t0.elapsed().as_secs_f64() * 1000.0;
    if w.status != 200 {
        let snippet: String = String::from_utf8_lossy(&w.body).chars().take(300).collect();
        return Err(BenchError::Http(format!(
            "{url}{path}: status {}: {snippet}",
            w.status
        )));
    }
    let v: Value = serde_json::from_slice(&w.body).map_err(|e| BenchError::json("response", e))?;
    let ms = match timing {
        Timing::Wall => wall,
        Timing::Header(h) => w
            .headers
            .get(h.as_str())
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<f64>().ok())
            .ok_or_else(|| BenchError::Http(format!("response has no numeric `{h}` header")))?,
    };
    Ok((ms, v))
}

fn sweep(timing: &Timing, measured: Vec<(u64, Vec<f64>)>) -> Result<Sweep> {
    let medians: Vec<(f64, f64)> = measured
        .iter()
        .map(|(n, s)| (*n as f64, stats::percentile(s, 50.0).unwrap_or(f64::NAN)))
        .collect();
    let fit = fit::fit_quadratic(&medians)?;
    let points = measured
        .into_iter()
        .zip(&medians)
        .map(|((tokens, samples_ms), &(_, median_ms))| Point {
            tokens,
            samples_ms,
            median_ms,
            fitted_ms: fit.at(tokens as f64),
        })
        .collect();
    Ok(Sweep {
        timing: timing.describe(),
        points,
        max_rel_err: fit::max_relative_error(&fit, &medians),
        fit,
    })
}

fn say(opts: &ProfileOptions, line: &str) {
    if opts.progress {
        eprintln!("{line}");
    }
}

/// Runs the sweeps.
pub async fn run(opts: &ProfileOptions) -> Result<Profile> {
    if opts.reps == 0 {
        return Err(BenchError::Usage("--reps must be >= 1".into()));
    }
    let mut measured = Vec::new();
    for (si, &n) in opts.tokens.iter().enumerate() {
        let (side, tokens) = square_for(n);
        let mut samples = Vec::new();
        for rep in 0..opts.warmup + opts.reps {
            let seed = derive(opts.seed, (si * 1_000 + rep) as u64);
            let q = opts.jpeg_quality;
            let jpeg = tokio::task::spawn_blocking(move || test_image(side, seed, q))
                .await
                .map_err(|e| BenchError::Process(format!("test image: {e}")))??;
            let url = format!(
                "data:image/jpeg;base64,{}",
                base64::engine::general_purpose::STANDARD.encode(&jpeg)
            );
            let body = json!({
                "model": opts.model,
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}],
                "max_tokens": 1,
                "stream": false,
            });
            let (ms, _) = timed(
                &opts.encode,
                &opts.path,
                Bytes::from(body.to_string()),
                &opts.timing,
                opts.request_timeout,
            )
            .await?;
            if rep >= opts.warmup {
                samples.push(ms);
            }
        }
        let med = stats::percentile(&samples, 50.0).unwrap_or(f64::NAN);
        say(
            opts,
            &format!(
                "encode {side}x{side} px = {tokens} tokens: median {med:.1} ms over {} reps",
                samples.len()
            ),
        );
        measured.push((tokens, samples));
    }
    let encode = sweep(&opts.timing, measured)?;
    let prefill = match &opts.pd {
        None => None,
        Some(pd) => {
            let mut measured: Vec<(u64, Vec<f64>)> = Vec::new();
            for (si, &n) in opts.prefill_tokens.iter().enumerate() {
                let mut samples = Vec::new();
                let mut counted = None;
                for rep in 0..opts.warmup + opts.reps {
                    let text = prompt_text(n, derive(opts.seed ^ 0x7072_6566, (si * 1_000 + rep) as u64));
                    let body = json!({
                        "model": opts.model,
                        "messages": [{"role": "user", "content": text}],
                        "max_tokens": 1,
                        "stream": false,
                    });
                    let (ms, v) = timed(
                        pd,
                        &opts.path,
                        Bytes::from(body.to_string()),
                        &opts.prefill_timing,
                        opts.request_timeout,
                    )
                    .await?;
                    let tokens = v
                        .get("usage")
                        .and_then(|u| u.get("prompt_tokens"))
                        .and_then(Value::as_u64)
                        .unwrap_or(n);
                    counted = Some(tokens);
                    if rep >= opts.warmup {
                        samples.push(ms);
                    }
                }
                let tokens = counted.unwrap_or(n);
                let med = stats::percentile(&samples, 50.0).unwrap_or(f64::NAN);
                say(
                    opts,
                    &format!(
                        "prefill {tokens} prompt tokens: median {med:.1} ms over {} reps",
                        samples.len()
                    ),
                );
                measured.push((tokens, samples));
            }
            Some(sweep(&opts.prefill_timing, measured)?)
        }
    };
    Ok(Profile {
        encode,
        prefill,
        encode_replicas: opts.encode_replicas,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vlm_budget::core::sizing::SizingRule;

    #[test]
    fn squares_are_fixed_points_with_exact_tokens() {
        for n in [1024, 2304, 4000, 16384] {
            let (side, tokens) = square_for(n);
            assert_eq!(side % 28, 0);
            assert_eq!(SizingRule::QWEN2_5_VL.tokens(side, side).unwrap(), tokens);
        }
        assert_eq!(square_for(4096), (1792, 4096));
    }

    #[test]
    fn test_images_differ_per_seed_and_decode() {
        let a = test_image(56, 1, 90).unwrap();
        let b = test_image(56, 2, 90).unwrap();
        assert_ne!(a, b);
        assert_eq!(a, test_image(56, 1, 90).unwrap());
        let h = vlm_budget::core::probe::probe(&a[..]).unwrap();
        assert_eq!((h.width, h.height), (56, 56));
    }

    #[test]
    fn prompts_are_unique_and_sized() {
        let a = prompt_text(1000, 1);
        assert!(a.len() >= 4000 && a.len() < 4020);
        assert_ne!(a, prompt_text(1000, 2));
        assert!(
            Timing::parse("header:X-Emulator-Encode-Ms").unwrap()
                == Timing::Header("x-emulator-encode-ms".into())
        );
        assert!(Timing::parse("header:").is_err());
        assert!(Timing::parse("cpu").is_err());
    }

    #[test]
    fn section_is_a_valid_plugin_profile() {
        let sweep = |a| Sweep {
            timing: "t".into(),
            points: vec![],
            fit: Quadratic { a, b: 0.03, c: 1e-6 },
            max_rel_err: 0.0,
        };
        let p = Profile {
            encode: sweep(14.0),
            prefill: Some(sweep(5.0)),
            encode_replicas: 2,
        };
        let cfg = json!({"policy": "dynamic", "profile": p.section()});
        vlm_budget::core::config::Config::from_json(cfg.to_string().as_bytes()).unwrap();
        assert_eq!(p.section()["encode_replicas"], 2);
        let no_prefill = Profile { prefill: None, ..p };
        assert!(no_prefill.section().get("prefill_ms").is_none());
    }
}
