//! One request body in, the rewritten body (if any) and a report out.
//!
//! Steps: parse and locate the images; for each `data:` image validate the
//! base64 and read the size from the header alone (refusing pixel bombs);
//! ask the policy for budgets; transcode only the images over budget to a
//! fixed point of the backend's sizing rule; splice the new URLs in.

use super::base64buf::{encode_into, Base64Payload};
use super::config::Config;
use super::datauri::{self, DataUriError, ImageUrl};
use super::error::{FilterError, ImageErrorKind};
use super::policy::{BudgetPolicy, PolicyInput, PolicyKind, Prediction};
use super::probe::{probe, ImageFormat, ImageHeader, ProbeError};
use super::request::{may_have_images, scan, splice, MediaCount, RequestError};
use super::sizing::Dims;
use super::traffic::TrafficSnapshot;
use super::transcode::{transcode, TranscodeError, TranscodeOptions};
use std::ops::Range;

/// What happened to one image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageAction {
    /// Shrunk from the original size to `to`.
    Resized {
        format: ImageFormat,
        from: Dims,
        to: Dims,
        micros: u64,
    },
    /// Within budget (or no budget): forwarded byte for byte, not decoded.
    Passed { format: ImageFormat, size: Dims },
    /// A remote URL: left alone, never fetched.
    Remote,
    /// A size the backend's rule rejects: forwarded unchanged.
    Unsized { format: ImageFormat, size: Dims },
}

/// Per-image report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageReport {
    pub action: ImageAction,
    /// Visual tokens by the backend's rule before and after (0 when unknown).
    pub tokens_before: u64,
    pub tokens_after: u64,
}

/// The result for one request.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// The new body, when any image was rewritten.
    pub body: Option<Vec<u8>>,
    pub images: Vec<ImageReport>,
    pub policy: PolicyKind,
    /// The per-image budget the policy reported.
    pub budget_tokens: u64,
    /// Why the budget is what it is (dynamic policy).
    pub reason: Option<&'static str>,
    /// The predicted TTFT (dynamic policy).
    pub prediction: Option<Prediction>,
    /// Bytes of text in the request (0 when it was not parsed).
    pub text_bytes: usize,
    /// Audio and video parts (sent to the encoder, forwarded unchanged).
    pub media: MediaCount,
}

/// What the request's surroundings tell the policy.
#[derive(Clone, Copy)]
pub struct RequestContext<'a> {
    /// The traffic as this request sees it. Reading it costs the filter host
    /// calls, so it is read only for a request with images, and only when
    /// the policy uses it.
    pub traffic: &'a dyn Fn() -> TrafficSnapshot,
    /// SLO from `x-slo-ttft-ms`, already bounded.
    pub slo_ms: Option<f64>,
    /// Time since the request arrived, ms.
    pub elapsed_ms: f64,
    /// Told the predicted encoder work (ms) of a dynamic budget as soon as
    /// it is decided, before any image is transcoded: requests deciding on
    /// other workers meanwhile see it in the encoder's backlog.
    pub decided: &'a dyn Fn(f64),
}

impl Default for RequestContext<'static> {
    /// No traffic, the policy's own SLO.
    fn default() -> Self {
        Self {
            traffic: &TrafficSnapshot::idle,
            slo_ms: None,
            elapsed_ms: 0.0,
            decided: &|_| {},
        }
    }
}

impl Outcome {
    /// A request without images, forwarded as is.
    pub fn text_only(policy: PolicyKind) -> Self {
        Self {
            body: None,
            images: Vec::new(),
            policy,
            budget_tokens: 0,
            reason: None,
            prediction: None,
            text_bytes: 0,
            media: MediaCount::default(),
        }
    }

    pub fn tokens_before(&self) -> u64 {
        self.images.iter().map(|i| i.tokens_before).sum()
    }
    pub fn tokens_after(&self) -> u64 {
        self.images.iter().map(|i| i.tokens_after).sum()
    }
    pub fn resized(&self) -> usize {
        self.images
            .iter()
            .filter(|i| matches!(i.action, ImageAction::Resized { .. }))
            .count()
    }
    /// Megapixels of the images that were shrunk, as sent.
    pub fn resized_mpixels(&self) -> f64 {
        self.images
            .iter()
            .map(|i| match i.action {
                ImageAction::Resized { from, .. } => from.width as f64 * from.height as f64 / 1e6,
                _ => 0.0,
            })
            .sum()
    }

    pub fn transcode_micros(&self) -> u64 {
        self.images
            .iter()
            .map(|i| match i.action {
                ImageAction::Resized { micros, .. } => micros,
                _ => 0,
            })
            .sum()
    }
}

/// An image located and sized, before the policy decides.
struct Located<'a> {
    span: Range<usize>,
    data: Option<(Base64Payload<'a>, ImageHeader)>,
    tokens: Option<u64>,
}

fn image_err(index: usize, kind: ImageErrorKind, detail: impl ToString) -> FilterError {
    FilterError::Image {
        index,
        kind,
        detail: detail.to_string(),
    }
}

/// An image the policy shrinks, and to what size.
#[derive(Debug, Clone, PartialEq)]
pub struct Job<P> {
    /// Document index of the image (0-based).
    pub index: usize,
    /// Byte span of its URL string (quotes included) in the body.
    pub span: Range<usize>,
    pub header: ImageHeader,
    pub to: Dims,
    /// The image: its base64 payload, or its bytes once decoded.
    pub payload: P,
}

impl<P> Job<P> {
    /// Decodes, resizes and re-encodes `bytes` (this job's image) in place,
    /// with the request's error for each failure.
    pub fn transcode(&self, bytes: &[u8], opts: &TranscodeOptions) -> Result<Vec<u8>, FilterError> {
        transcode(bytes, &self.header, self.to, opts).map_err(|e| match e {
            TranscodeError::Decode(_) => image_err(self.index, ImageErrorKind::Corrupt, e),
            _ => image_err(self.index, ImageErrorKind::ProcessingFailed, e),
        })
    }

    /// The JSON string (quotes included) that replaces the URL: the
    /// resized image `out` as a data URL of the input's format.
    pub fn url(&self, out: &[u8]) -> Vec<u8> {
        let mut url = Vec::with_capacity(out.len() / 3 * 4 + 40);
        url.extend_from_slice(b"\"data:");
        url.extend_from_slice(self.header.format.mime().as_bytes());
        url.extend_from_slice(b";base64,");
        encode_into(out, &mut url);
        url.push(b'"');
        url
    }
}

/// A request located, sized and budgeted, before any image is transcoded:
/// what [`process`] does next in place, or the filter hands to the offload
/// service.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan<P> {
    /// The images to shrink, in document order.
    pub jobs: Vec<Job<P>>,
    /// The outcome without a body; the jobs' images are reported resized,
    /// their time not yet known.
    outcome: Outcome,
}

impl<'a> Plan<Base64Payload<'a>> {
    /// The same plan with each image's bytes decoded (owned, so the plan
    /// can outlive the body it was read from).
    pub fn decoded(self) -> Result<Plan<Vec<u8>>, FilterError> {
        let mut jobs = Vec::with_capacity(self.jobs.len());
        for j in self.jobs {
            let bytes = j
                .payload
                .decode()
                .map_err(|e| image_err(j.index, ImageErrorKind::InvalidBase64, e))?;
            jobs.push(Job {
                index: j.index,
                span: j.span,
                header: j.header,
                to: j.to,
                payload: bytes,
            });
        }
        Ok(Plan {
            jobs,
            outcome: self.outcome,
        })
    }
}

impl<P> Plan<P> {
    /// Splices the jobs' new URLs (`done[i]`: job i's [`Job::url`] and the
    /// microseconds it took) into `body`.
    pub fn finish(self, body: &[u8], done: Vec<(Vec<u8>, u64)>) -> Outcome {
        let mut outcome = self.outcome;
        let mut edits = Vec::with_capacity(done.len());
        for (job, (url, took)) in self.jobs.into_iter().zip(done) {
            if let Some(ImageReport {
                action: ImageAction::Resized { micros, .. },
                ..
            }) = outcome.images.get_mut(job.index)
            {
                *micros = took;
            }
            edits.push((job.span, url));
        }
        outcome.body = (!edits.is_empty()).then(|| splice(body, &edits));
        outcome
    }
}

/// Processes one chat-completions body. `clock` returns microseconds.
pub fn process(
    body: &[u8],
    cfg: &Config,
    policy: &dyn BudgetPolicy,
    ctx: &RequestContext,
    clock: &dyn Fn() -> u64,
) -> Result<Outcome, FilterError> {
    with_plan(body, cfg, policy, ctx, |plan| {
        let opts = cfg.transcode_options();
        let mut done = Vec::with_capacity(plan.jobs.len());
        for job in &plan.jobs {
            let started = clock();
            let bytes = job
                .payload
                .decode()
                .map_err(|e| image_err(job.index, ImageErrorKind::InvalidBase64, e))?;
            let out = job.transcode(&bytes, &opts)?;
            drop(bytes);
            let url = job.url(&out);
            done.push((url, clock().saturating_sub(started)));
        }
        Ok(plan.finish(body, done))
    })
}

/// Every check of [`process`] but the transcodes: the plan, with each
/// image to shrink decoded (owned, for the offload service).
pub fn plan(
    body: &[u8],
    cfg: &Config,
    policy: &dyn BudgetPolicy,
    ctx: &RequestContext,
) -> Result<Plan<Vec<u8>>, FilterError> {
    with_plan(body, cfg, policy, ctx, |p| p.decoded())
}

/// Parses, locates, sizes and budgets one body, and hands the plan (its
/// payloads borrowed from the parsed request) to `then`.
fn with_plan<R>(
    body: &[u8],
    cfg: &Config,
    policy: &dyn BudgetPolicy,
    ctx: &RequestContext,
    then: impl FnOnce(Plan<Base64Payload<'_>>) -> Result<R, FilterError>,
) -> Result<R, FilterError> {
    let text_only = || Plan {
        jobs: Vec::new(),
        outcome: Outcome::text_only(policy.kind()),
    };
    if body.len() as u64 > cfg.max_body_bytes {
        return Err(FilterError::BodyTooLarge {
            limit: cfg.max_body_bytes,
        });
    }
    if !cfg.validate_text_only && !may_have_images(body) {
        // No image part can be in it: forwarded as sent, unparsed.
        return then(text_only());
    }
    let req = scan(body).map_err(|e| match e {
        RequestError::Json(e) => FilterError::InvalidJson(e),
        RequestError::Schema(e) => FilterError::InvalidRequest(e),
    })?;
    if req.images.len() as u64 > cfg.max_images_per_request {
        return Err(FilterError::TooManyImages {
            count: req.images.len(),
            limit: cfg.max_images_per_request,
        });
    }
    let media = MediaCount::of(&req.media);
    if req.images.is_empty() {
        // Nothing to size: the policy is not consulted and the body is
        // forwarded as is (audio and video parts still go to the encoder).
        return then(Plan {
            jobs: Vec::new(),
            outcome: Outcome {
                media,
                ..Outcome::text_only(policy.kind())
            },
        });
    }
    let rule = cfg.sizing_rule();
    let mut located = Vec::with_capacity(req.images.len());
    for (index, site) in req.images.iter().enumerate() {
        located.push(locate(index, site.span.clone(), &site.url, cfg)?);
    }
    let tokens: Vec<Option<u64>> = located.iter().map(|l| l.tokens).collect();
    let traffic = if policy.uses_traffic() {
        (ctx.traffic)()
    } else {
        TrafficSnapshot::idle()
    };
    let mpixels = located
        .iter()
        .filter(|l| l.tokens.is_some())
        .filter_map(|l| l.data.as_ref())
        .map(|(_, h)| f64::from(h.width) * f64::from(h.height) / 1e6)
        .sum();
    let budgets = policy.budgets(&PolicyInput {
        image_tokens: &tokens,
        text_bytes: req.text_bytes,
        traffic: &traffic,
        slo_ms: ctx.slo_ms,
        mpixels,
        elapsed_ms: ctx.elapsed_ms,
    });
    if let Some(p) = &budgets.prediction {
        (ctx.decided)(p.terms.encode);
    }
    let mut jobs = Vec::new();
    let mut images = Vec::with_capacity(located.len());
    for (index, loc) in located.into_iter().enumerate() {
        let Some((payload, header)) = loc.data else {
            images.push(ImageReport {
                action: ImageAction::Remote,
                tokens_before: 0,
                tokens_after: 0,
            });
            continue;
        };
        let size = Dims::new(header.width, header.height);
        let Some(before) = loc.tokens else {
            images.push(ImageReport {
                action: ImageAction::Unsized {
                    format: header.format,
                    size,
                },
                tokens_before: 0,
                tokens_after: 0,
            });
            continue;
        };
        let budget = budgets
            .per_image
            .get(index)
            .copied()
            .flatten()
            .map(|b| b.max(cfg.min_tokens_per_image));
        let target = match budget {
            Some(b) => rule.fit_to_budget(header.width, header.height, b).ok().flatten(),
            None => None,
        };
        let Some(to) = target else {
            images.push(ImageReport {
                action: ImageAction::Passed {
                    format: header.format,
                    size,
                },
                tokens_before: before,
                tokens_after: before,
            });
            continue;
        };
        images.push(ImageReport {
            action: ImageAction::Resized {
                format: header.format,
                from: size,
                to,
                micros: 0,
            },
            tokens_before: before,
            tokens_after: rule.tokens_of(to),
        });
        jobs.push(Job {
            index,
            span: loc.span,
            header,
            to,
            payload,
        });
    }
    then(Plan {
        jobs,
        outcome: Outcome {
            body: None,
            images,
            policy: policy.kind(),
            budget_tokens: budgets.reported,
            reason: budgets.reason,
            prediction: budgets.prediction,
            text_bytes: req.text_bytes,
            media,
        },
    })
}

fn locate<'a>(
    index: usize,
    span: Range<usize>,
    url: &'a str,
    cfg: &Config,
) -> Result<Located<'a>, FilterError> {
    let uri = match datauri::parse(url) {
        Ok(ImageUrl::Remote) => {
            return Ok(Located {
                span,
                data: None,
                tokens: None,
            })
        }
        Ok(ImageUrl::Data(d)) => d,
        Err(e @ DataUriError::UnsupportedType(_)) => {
            return Err(image_err(index, ImageErrorKind::UnsupportedType, e))
        }
        Err(e) => return Err(image_err(index, ImageErrorKind::InvalidDataUri, e)),
    };
    let payload = Base64Payload::new(uri.payload.as_bytes())
        .map_err(|e| image_err(index, ImageErrorKind::InvalidBase64, e))?;
    let header = probe(&payload).map_err(|e| match e {
        ProbeError::Unsupported(_) | ProbeError::Unknown => {
            image_err(index, ImageErrorKind::UnsupportedType, e)
        }
        ProbeError::Corrupt(_) => image_err(index, ImageErrorKind::Corrupt, e),
    })?;
    let pixels = u64::from(header.width) * u64::from(header.height);
    if pixels > cfg.max_image_pixels {
        return Err(image_err(
            index,
            ImageErrorKind::TooManyPixels,
            format!(
                "{}x{} is {pixels} pixels, above the {}-pixel limit",
                header.width, header.height, cfg.max_image_pixels
            ),
        ));
    }
    let tokens = cfg.sizing_rule().tokens(header.width, header.height).ok();
    Ok(Located {
        span,
        data: Some((payload, header)),
        tokens,
    })
}

#[cfg(test)]
mod tests {
    use super::super::policy::{from_config, Static};
    use super::super::transcode::{encode, Layout, Pixels};
    use super::*;
    use base64::Engine;

    fn image(w: u32, h: u32, format: ImageFormat) -> Vec<u8> {
        let data = (0..w * h * 3).map(|i| (i % 251) as u8).collect();
        encode(
            &Pixels {
                width: w,
                height: h,
                layout: Layout::Rgb8,
                data,
            },
            format,
            90,
        )
        .expect("encode")
    }

    fn data_url(bytes: &[u8], mime: &str) -> String {
        format!(
            "data:{mime};base64,{}",
            base64::engine::general_purpose::STANDARD.encode(bytes)
        )
    }

    fn body(urls: &[String]) -> String {
        let parts: Vec<String> = urls
            .iter()
            .map(|u| format!(r#"{{"type":"image_url","image_url":{{"url":"{u}","detail":"high"}}}}"#))
            .collect();
        format!(
            r#"{{"model":"m","messages":[{{"role":"user","content":[{{"type":"text","text":"hi"}},{}]}}],"temperature":0.10,"extra":[1.0e2,{{"k":null}}]}}"#,
            parts.join(",")
        )
    }

    fn run(body: &str, cfg: &Config) -> Result<Outcome, FilterError> {
        process(
            body.as_bytes(),
            cfg,
            from_config(cfg).as_ref(),
            &RequestContext::default(),
            &|| 0,
        )
    }

    #[test]
    fn resizes_over_budget_and_passes_the_rest() {
        let cfg = Config {
            static_budget_tokens: 256,
            ..Config::default()
        };
        let big = data_url(&image(1000, 600, ImageFormat::Png), "image/png");
        let small = data_url(&image(200, 200, ImageFormat::Jpeg), "image/jpeg");
        let b = body(&[big.clone(), small.clone(), "https://example.com/x.png".into()]);
        let out = run(&b, &cfg).expect("process");
        assert_eq!(out.resized(), 1);
        let new = String::from_utf8(out.body.clone().expect("rewritten")).expect("utf8");
        // The small image and every other byte are untouched.
        assert!(new.contains(&small));
        assert_eq!(
            new.replace(
                &new[new.find("data:image/png").unwrap_or(0)..new.find("\",\"detail\"").unwrap_or(0)],
                "X"
            ),
            b.replace(&big, "X")
        );
        let v: serde_json::Value = serde_json::from_str(&new).expect("json");
        let url = v["messages"][0]["content"][1]["image_url"]["url"]
            .as_str()
            .unwrap_or_default();
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(url.trim_start_matches("data:image/png;base64,"))
            .expect("b64");
        let h = probe(bytes.as_slice()).expect("png");
        let rule = cfg.sizing_rule();
        assert_eq!(
            Some(Dims::new(h.width, h.height)),
            rule.fit_to_budget(1000, 600, 256).ok().flatten()
        );
        assert!(rule.tokens(h.width, h.height).unwrap_or(0) <= 256);
        assert_eq!(
            out.images[0].tokens_after,
            rule.tokens(h.width, h.height).unwrap_or(0)
        );
        assert_eq!(out.images[2].action, ImageAction::Remote);
        assert_eq!(
            out.tokens_before(),
            rule.tokens(1000, 600).unwrap_or(0) + rule.tokens(200, 200).unwrap_or(0)
        );
    }

    #[test]
    fn a_dynamic_budget_is_announced_before_any_transcode() {
        let cfg = Config {
            policy: PolicyKind::Dynamic,
            encode_cluster: Some("encode".into()),
            ..Config::default()
        };
        let policy = from_config(&cfg);
        // A backlog that forces a resize.
        let busy = TrafficSnapshot {
            encode_outstanding_ms: 850.0,
            ..TrafficSnapshot::idle()
        };
        let events = std::cell::RefCell::new(Vec::new());
        let decided = |ms: f64| events.borrow_mut().push(format!("decided {ms:.1}"));
        let clock = || {
            events.borrow_mut().push("clock".to_string());
            0
        };
        let ctx = RequestContext {
            traffic: &|| busy,
            slo_ms: None,
            elapsed_ms: 0.0,
            decided: &decided,
        };
        let b = body(&[data_url(&image(2000, 1500, ImageFormat::Jpeg), "image/jpeg")]);
        let out = process(b.as_bytes(), &cfg, policy.as_ref(), &ctx, &clock).expect("processed");
        assert_eq!(out.resized(), 1);
        let encode = out.prediction.map(|p| p.terms.encode).unwrap_or(f64::NAN);
        let events = events.into_inner();
        assert_eq!(
            events.first(),
            Some(&format!("decided {encode:.1}")),
            "{events:?}"
        );
        assert_eq!(events.iter().filter(|e| e.starts_with("decided")).count(), 1);
        assert!(events[1..].iter().all(|e| e == "clock"), "{events:?}");
        // Policies without a prediction announce nothing.
        let events = std::cell::RefCell::new(Vec::<f64>::new());
        let ctx = RequestContext {
            decided: &|ms| events.borrow_mut().push(ms),
            ..RequestContext::default()
        };
        let fixed = Config {
            static_budget_tokens: 256,
            ..Config::default()
        };
        let out = process(
            b.as_bytes(),
            &fixed,
            &Static {
                tokens_per_image: 256,
            },
            &ctx,
            &|| 0,
        )
        .expect("processed");
        assert_eq!(out.resized(), 1);
        assert!(events.into_inner().is_empty());
    }

    #[test]
    fn vanilla_reports_but_never_rewrites() {
        let cfg = Config {
            policy: PolicyKind::Vanilla,
            ..Config::default()
        };
        let big = data_url(&image(3000, 2000, ImageFormat::Jpeg), "image/jpeg");
        let out = run(&body(&[big]), &cfg).expect("process");
        assert_eq!(out.body, None);
        assert_eq!(out.tokens_before(), out.tokens_after());
        assert_eq!(
            out.tokens_before(),
            cfg.sizing_rule().tokens(3000, 2000).unwrap_or(0)
        );
    }

    #[test]
    fn bad_inputs_name_the_image() {
        let cfg = Config {
            static_budget_tokens: 256,
            max_image_pixels: 5_000_000,
            ..Config::default()
        };
        let png = image(1000, 600, ImageFormat::Png);
        let good = data_url(&png, "image/png");
        let b64 = base64::engine::general_purpose::STANDARD.encode(&png);
        let truncated_png = data_url(&png[..png.len() / 2], "image/png");
        let mut huge = png[..33].to_vec();
        huge[16..24].copy_from_slice(&[0, 1, 0x86, 0xA0, 0, 1, 0x86, 0xA0]);
        let cases: Vec<(String, &str)> = vec![
            (
                format!("data:image/png;base64,{}", &b64[..b64.len() - 1]),
                "invalid_base64",
            ),
            ("data:image/png;base64,@@@@".into(), "invalid_base64"),
            ("data:image/webp;base64,AAAA".into(), "unsupported_image_type"),
            (
                data_url(b"GIF89a\x01\x00\x01\x00", "image/png"),
                "unsupported_image_type",
            ),
            (truncated_png, "corrupt_image"),
            (data_url(&huge, "image/png"), "image_too_large"),
            ("data:image/png,notbase64".into(), "invalid_image_url"),
        ];
        for (bad, code) in cases {
            let e = run(&body(&[good.clone(), bad.clone()]), &cfg).expect_err(code);
            assert_eq!(e.code(), code, "{e}");
            assert!(e.to_string().starts_with("image 1: "), "{e}");
        }
        // A body that cannot hold an image is checked only on request.
        assert!(run("{\"messages\":", &cfg).is_ok_and(|o| o.images.is_empty() && o.body.is_none()));
        let strict = Config {
            validate_text_only: true,
            ..cfg.clone()
        };
        let e = run("{\"messages\":", &strict).expect_err("json");
        assert_eq!(e.code(), "invalid_json");
        let e = run("{\"messages\":[{\"content\":[{\"type\":\"image_url\"}", &cfg).expect_err("json");
        assert_eq!(e.code(), "invalid_json");
        let many: Vec<String> = (0..65).map(|_| "https://x/y.png".to_string()).collect();
        assert_eq!(
            run(&body(&many), &cfg).expect_err("many").code(),
            "too_many_images"
        );
        let small = Config {
            max_body_bytes: 10,
            ..cfg
        };
        assert_eq!(run(&body(&[]), &small).expect_err("big").code(), "body_too_large");
    }

    #[test]
    fn min_tokens_clamp_applies() {
        let cfg = Config {
            min_tokens_per_image: 512,
            static_budget_tokens: 512,
            ..Config::default()
        };
        let big = data_url(&image(2000, 2000, ImageFormat::Jpeg), "image/jpeg");
        let out = process(
            body(&[big]).as_bytes(),
            &cfg,
            &Static { tokens_per_image: 10 },
            &RequestContext::default(),
            &|| 0,
        )
        .expect("ok");
        assert!(out.images[0].tokens_after > 400 && out.images[0].tokens_after <= 512);
    }
}
