//! The dynamic policy's TTFT prediction against what was observed.
//!
//! On requests with images the filter's dynamic policy answers with its
//! prediction for the forwarded request before the learned correction
//! (`x-vlm-predicted-ttft-ms`), the correction the budget planned with
//! (`x-vlm-ttft-margin-ms`) and the prediction's terms
//! (`x-vlm-ttft-terms: elapsed=3.0,transcode=12.3,encode_wait=45.0,...`, ms).
//! Builds without the last two simply do not send them; they are then absent,
//! never 0.
//!
//! Per request the error is observed − predicted TTFT (the client's TTFT),
//! before the correction and after it (observed − (predicted + margin)). Terms
//! are set beside the response headers that measure the same stretch of time:
//!
//! | component | predicted terms | observed |
//! |---|---|---|
//! | elapsed | `elapsed` | the same (measured by the filter before it decides) |
//! | transcode | `transcode` | `x-vlm-transcode-ms` |
//! | encode | `encode_wait` + `encode` | `x-vlm-encode-ms` |
//! | PD queue | `pd_wait` | `x-emulator-queue-ms` |
//! | prefill | `prefill` | `x-emulator-prefill-ms` + `x-emulator-preprocess-ms` + `x-emulator-encode-ms` |
//! | rest | prediction − all terms | TTFT − the observed components above |
//!
//! `margin` in the terms header is the correction again, not a term of the
//! prediction. Terms of other names are kept by name, predicted only.

use crate::results::RequestRecord;
use crate::stats::{self, Dist};
use serde::Serialize;
use std::collections::BTreeSet;

/// The model's TTFT prediction before the learned correction, ms.
pub const PREDICTED: &str = "x-vlm-predicted-ttft-ms";
/// The learned correction the budget planned with, ms.
pub const MARGIN: &str = "x-vlm-ttft-margin-ms";
/// The prediction's terms, `key=ms` separated by commas.
pub const TERMS: &str = "x-vlm-ttft-terms";

/// The terms of one prediction, in the order they were sent.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Terms(pub Vec<(String, f64)>);

impl Terms {
    /// Parses `transcode=12.3,encode_wait=45.0`. Space around items, keys and
    /// values is ignored, and so is an `ms` after a value. An item that is not
    /// `key=finite number` is skipped; a repeated key keeps its last value in
    /// its first place. None when no item parses.
    pub fn parse(text: &str) -> Option<Self> {
        let mut out: Vec<(String, f64)> = Vec::new();
        for item in text.split(',') {
            let Some((k, v)) = item.split_once('=') else {
                continue;
            };
            let k = k.trim();
            let v = v.trim();
            let v = v.strip_suffix("ms").unwrap_or(v).trim_end();
            let Ok(v) = v.parse::<f64>() else {
                continue;
            };
            if k.is_empty() || !v.is_finite() {
                continue;
            }
            match out.iter_mut().find(|(name, _)| name == k) {
                Some(slot) => slot.1 = v,
                None => out.push((k.to_string(), v)),
            }
        }
        (!out.is_empty()).then_some(Self(out))
    }

    pub fn get(&self, key: &str) -> Option<f64> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| *v)
    }

    /// Sum of the terms named in `keys` that are present; None if none is.
    pub fn sum_of(&self, keys: &[&str]) -> Option<f64> {
        let present: Vec<f64> = keys.iter().filter_map(|k| self.get(k)).collect();
        (!present.is_empty()).then(|| present.iter().sum())
    }

    /// Sum of the prediction's terms (`margin`, the correction, left out).
    pub fn total(&self) -> f64 {
        self.0
            .iter()
            .filter(|(k, _)| !NOT_TERMS.contains(&k.as_str()))
            .map(|(_, v)| v)
            .sum()
    }
}

/// Keys of the terms header that are not terms of the prediction.
const NOT_TERMS: [&str; 1] = ["margin"];

/// How a part of the request's time is observed.
enum Seen {
    /// Response headers: the first must be present, the others add to it
    /// when they are.
    Headers(&'static [&'static str]),
    /// The term is itself a measurement (the time before the decision).
    Measured,
}

/// A stretch of the request's time that the prediction has terms for.
struct Part {
    name: &'static str,
    terms: &'static [&'static str],
    seen: Seen,
}

const PARTS: [Part; 5] = [
    Part {
        name: "elapsed",
        terms: &["elapsed"],
        seen: Seen::Measured,
    },
    Part {
        name: "transcode",
        terms: &["transcode"],
        seen: Seen::Headers(&["x-vlm-transcode-ms"]),
    },
    Part {
        name: "encode",
        terms: &["encode_wait", "encode"],
        seen: Seen::Headers(&["x-vlm-encode-ms"]),
    },
    Part {
        name: "PD queue",
        terms: &["pd_wait"],
        seen: Seen::Headers(&["x-emulator-queue-ms"]),
    },
    Part {
        name: "prefill",
        terms: &["prefill"],
        seen: Seen::Headers(&[
            "x-emulator-prefill-ms",
            "x-emulator-preprocess-ms",
            "x-emulator-encode-ms",
        ]),
    },
];

/// Names of the components in report order (the terms of other names follow).
pub const COMPONENTS: [&str; 7] = [
    "elapsed",
    "transcode",
    "encode",
    "PD queue",
    "prefill",
    "rest",
    "TTFT",
];

fn known_term(key: &str) -> bool {
    NOT_TERMS.contains(&key) || PARTS.iter().any(|p| p.terms.contains(&key))
}

/// What `r` shows of `part`; None when its response does not show it.
fn observed(r: &RequestRecord, t: &Terms, part: &Part) -> Option<f64> {
    match part.seen {
        Seen::Measured => t.sum_of(part.terms),
        Seen::Headers(h) => {
            let (first, more) = h.split_first()?;
            let base = r.header_f64(first)?;
            Some(base + more.iter().filter_map(|h| r.header_f64(h)).sum::<f64>())
        }
    }
}

/// The client's TTFT less every observed part: what no term covers (HTTP,
/// Envoy, the first decode step). None unless every part the responses show
/// is there (a measured part counts when the terms have it).
fn rest_observed(r: &RequestRecord, t: &Terms) -> Option<f64> {
    let mut left = r.ttft_ms?;
    for p in &PARTS {
        match (&p.seen, observed(r, t, p)) {
            (_, Some(v)) => left -= v,
            (Seen::Measured, None) => {}
            (Seen::Headers(_), None) => return None,
        }
    }
    Some(left)
}

/// Observed − predicted TTFT of one successful request with a prediction:
/// before the correction, and after it (None without a margin).
pub fn errors(r: &RequestRecord) -> Option<(f64, Option<f64>)> {
    if !r.ok() {
        return None;
    }
    let seen = r.ttft_ms?;
    let predicted = r.predicted_ttft_ms()?;
    Some((
        seen - predicted,
        r.ttft_margin_ms().map(|m| seen - (predicted + m)),
    ))
}

/// One component of the prediction beside its observation (means, ms).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Component {
    pub name: String,
    /// Mean of each predicted term of the component, in its order.
    pub terms: Vec<(String, f64)>,
    pub predicted_ms: Option<f64>,
    pub observed_ms: Option<f64>,
    /// Mean of observed − predicted over the requests with both.
    pub error_ms: Option<f64>,
    /// Requests the means are over: those with the term and the observation,
    /// or, where no response shows it, those with the term.
    pub requests: usize,
}

/// Prediction figures of a set of requests (a run, or pooled runs).
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct PredictionSummary {
    /// Successful requests with a prediction.
    pub requests: usize,
    /// Observed − predicted TTFT, ms.
    pub before: Dist,
    /// Observed − (predicted + margin), over the requests with a margin, ms.
    pub after: Dist,
    /// The margins the budget planned with, ms.
    pub margin: Dist,
    /// Successful requests with terms.
    pub with_terms: usize,
    /// Components in report order, then terms of other names by name.
    pub components: Vec<Component>,
}

/// Means over `rows` of (predicted, observed), with the per-term means of
/// `keys`: over the rows with an observation when there are any.
fn component(name: &str, keys: &[String], rows: &[(&Terms, f64, Option<f64>)]) -> Option<Component> {
    if rows.is_empty() {
        return None;
    }
    let both: Vec<&(&Terms, f64, Option<f64>)> = rows.iter().filter(|r| r.2.is_some()).collect();
    let used: Vec<&(&Terms, f64, Option<f64>)> = if both.is_empty() {
        rows.iter().collect()
    } else {
        both
    };
    let predicted: Vec<f64> = used.iter().map(|r| r.1).collect();
    let seen: Vec<f64> = used.iter().filter_map(|r| r.2).collect();
    let diff: Vec<f64> = used.iter().filter_map(|r| Some(r.2? - r.1)).collect();
    let terms = keys
        .iter()
        .filter_map(|k| {
            let v: Vec<f64> = used.iter().filter_map(|r| r.0.get(k)).collect();
            stats::mean(&v).map(|m| (k.clone(), m))
        })
        .collect();
    Some(Component {
        name: name.to_string(),
        terms,
        predicted_ms: stats::mean(&predicted),
        observed_ms: stats::mean(&seen),
        error_ms: stats::mean(&diff),
        requests: used.len(),
    })
}

/// Summarises the predictions of `reqs` (failed requests are left out: they
/// have no observed TTFT).
pub fn summarise<'a>(reqs: impl IntoIterator<Item = &'a RequestRecord>) -> PredictionSummary {
    let ok: Vec<&RequestRecord> = reqs.into_iter().filter(|r| r.ok()).collect();
    let errs: Vec<(f64, Option<f64>)> = ok.iter().filter_map(|r| errors(r)).collect();
    let before: Vec<f64> = errs.iter().map(|e| e.0).collect();
    let after: Vec<f64> = errs.iter().filter_map(|e| e.1).collect();
    let margins: Vec<f64> = ok
        .iter()
        .filter(|r| r.predicted_ttft_ms().is_some())
        .filter_map(|r| r.ttft_margin_ms())
        .collect();
    let with_terms: Vec<(&RequestRecord, Terms)> = ok
        .iter()
        .filter_map(|r| r.ttft_terms().map(|t| (*r, t)))
        .collect();
    let mut components = Vec::new();
    for part in &PARTS {
        let rows: Vec<(&Terms, f64, Option<f64>)> = with_terms
            .iter()
            .filter_map(|(r, t)| Some((t, t.sum_of(part.terms)?, observed(r, t, part))))
            .collect();
        let keys: Vec<String> = part.terms.iter().map(|k| k.to_string()).collect();
        components.extend(component(part.name, &keys, &rows));
    }
    // What the terms leave out: the prediction minus all its terms, against the
    // client's TTFT minus the observed parts.
    let rest: Vec<(&Terms, f64, Option<f64>)> = with_terms
        .iter()
        .filter_map(|(r, t)| Some((t, r.predicted_ttft_ms()? - t.total(), rest_observed(r, t))))
        .collect();
    components.extend(component("rest", &[], &rest));
    let whole: Vec<(&Terms, f64, Option<f64>)> = with_terms
        .iter()
        .filter_map(|(r, t)| Some((t, r.predicted_ttft_ms()?, r.ttft_ms)))
        .collect();
    components.extend(component("TTFT", &[], &whole));
    let others: BTreeSet<&str> = with_terms
        .iter()
        .flat_map(|(_, t)| t.0.iter().map(|(k, _)| k.as_str()))
        .filter(|k| !known_term(k))
        .collect();
    for key in others {
        let rows: Vec<(&Terms, f64, Option<f64>)> = with_terms
            .iter()
            .filter_map(|(_, t)| Some((t, t.get(key)?, None)))
            .collect();
        components.extend(component(key, &[key.to_string()], &rows));
    }
    PredictionSummary {
        requests: errs.len(),
        before: Dist::of(&before),
        after: Dist::of(&after),
        margin: Dist::of(&margins),
        with_terms: with_terms.len(),
        components,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn rec(ttft: Option<f64>, headers: &[(&str, &str)]) -> RequestRecord {
        RequestRecord {
            index: 0,
            request_id: "r".into(),
            arrival_s: 0.0,
            sent_s: 0.0,
            images: vec!["a.jpg".into()],
            image_tokens: 1000,
            body_bytes: 10,
            status: Some(if ttft.is_some() { 200 } else { 502 }),
            error: ttft.is_none().then(|| "status 502".into()),
            ttft_ms: ttft,
            tpot_ms: None,
            e2e_ms: ttft,
            output_tokens: 1,
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
        }
    }

    #[test]
    fn terms_parse_generically() {
        let t =
            Terms::parse("transcode=12.3,encode_wait=45.0,encode=150.2,pd_wait=30.0,prefill=80.1").unwrap();
        assert_eq!(
            t.0.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
            ["transcode", "encode_wait", "encode", "pd_wait", "prefill"]
        );
        assert_eq!(t.get("encode"), Some(150.2));
        assert_eq!(t.sum_of(&["encode_wait", "encode"]), Some(195.2));
        assert_eq!(t.sum_of(&["nothing"]), None);
        assert!((t.total() - 317.6).abs() < 1e-9);
        // Unknown keys are kept by name; space and `ms` are tolerated.
        let t = Terms::parse(" decode_first = 7ms , transcode=1 ").unwrap();
        assert_eq!(
            t.0,
            vec![("decode_first".to_string(), 7.0), ("transcode".to_string(), 1.0)]
        );
        // Bad items are skipped, a repeated key keeps its last value.
        let t = Terms::parse("a=1,junk,=3,b=x,c=inf,a=2,d=-4").unwrap();
        assert_eq!(t.0, vec![("a".to_string(), 2.0), ("d".to_string(), -4.0)]);
        for none in ["", " ", "junk", "a=", "a=b,c"] {
            assert_eq!(Terms::parse(none), None, "{none:?}");
        }
    }

    #[test]
    fn headers_absent_are_absent_not_zero() {
        let r = rec(Some(500.0), &[(PREDICTED, "400")]);
        assert_eq!(r.predicted_ttft_ms(), Some(400.0));
        assert_eq!(r.ttft_margin_ms(), None);
        assert_eq!(r.ttft_terms(), None);
        assert_eq!(errors(&r), Some((100.0, None)));
        let r = rec(
            Some(500.0),
            &[(PREDICTED, " 400 "), (MARGIN, "-50"), (TERMS, "x=1")],
        );
        assert_eq!(r.ttft_margin_ms(), Some(-50.0));
        assert_eq!(errors(&r), Some((100.0, Some(150.0))));
        assert_eq!(r.ttft_terms().map(|t| t.total()), Some(1.0));
        // Unparseable numbers count as absent; a failed request has no error.
        let r = rec(Some(500.0), &[(PREDICTED, "soon"), (MARGIN, "nan")]);
        assert_eq!(
            (r.predicted_ttft_ms(), r.ttft_margin_ms(), errors(&r)),
            (None, None, None)
        );
        assert_eq!(errors(&rec(None, &[(PREDICTED, "400")])), None);
    }

    #[test]
    fn error_distributions_before_and_after_the_margin() {
        // Observed − predicted: 100, 200, 300, 400; margins 50 on the last two only.
        let reqs = [
            rec(Some(600.0), &[(PREDICTED, "500")]),
            rec(Some(700.0), &[(PREDICTED, "500")]),
            rec(Some(800.0), &[(PREDICTED, "500"), (MARGIN, "50")]),
            rec(Some(900.0), &[(PREDICTED, "500"), (MARGIN, "50")]),
            rec(Some(300.0), &[]),            // no prediction (e.g. text only)
            rec(None, &[(PREDICTED, "500")]), // failed: no observation
        ];
        let s = summarise(&reqs);
        assert_eq!(s.requests, 4);
        assert_eq!(s.before.n, 4);
        assert_eq!(s.before.p50, Some(250.0));
        assert_eq!(s.before.mean, Some(250.0));
        assert!((s.before.p10.unwrap() - 130.0).abs() < 1e-9);
        assert!((s.before.p90.unwrap() - 370.0).abs() < 1e-9);
        assert!((s.before.p99.unwrap() - 397.0).abs() < 1e-9);
        assert_eq!(s.after.n, 2);
        assert_eq!((s.after.p50, s.after.mean), (Some(300.0), Some(300.0)));
        assert_eq!((s.margin.n, s.margin.mean), (2, Some(50.0)));
        assert_eq!((s.with_terms, s.components.len()), (0, 0));
        let none = summarise(&reqs[4..]);
        assert_eq!((none.requests, none.before.p50, none.after.n), (0, None, 0));
    }

    #[test]
    fn terms_beside_observations() {
        let full = |ttft: f64, terms: &str, obs: [&str; 6]| {
            rec(
                Some(ttft),
                &[
                    (PREDICTED, "400"),
                    (TERMS, terms),
                    ("x-vlm-transcode-ms", obs[0]),
                    ("x-vlm-encode-ms", obs[1]),
                    ("x-emulator-queue-ms", obs[2]),
                    ("x-emulator-prefill-ms", obs[3]),
                    ("x-emulator-preprocess-ms", obs[4]),
                    ("x-emulator-encode-ms", obs[5]),
                ],
            )
        };
        let t = "elapsed=20,transcode=10,encode_wait=50,encode=150,pd_wait=20,prefill=80,other=5,margin=100";
        let reqs = [
            // Observed parts 20 + 30 + 300 + 40 + (90 + 20 + 0) = 500; TTFT 600.
            full(600.0, t, ["30", "300", "40", "90", "20", "0"]),
            // Parts 20 + 10 + 200 + 0 + (70 + 10 + 100) = 410; TTFT 450.
            full(450.0, t, ["10", "200", "0", "70", "10", "100"]),
            // Terms but no prediction: counted in the parts, not in rest/TTFT.
            rec(Some(100.0), &[(TERMS, "transcode=4")]),
        ];
        let s = summarise(&reqs);
        assert_eq!((s.requests, s.with_terms), (2, 3));
        let c = |name: &str| s.components.iter().find(|c| c.name == name).cloned().unwrap();
        let names: Vec<&str> = s.components.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "elapsed",
                "transcode",
                "encode",
                "PD queue",
                "prefill",
                "rest",
                "TTFT",
                "other"
            ]
        );
        // elapsed is measured: observed as predicted.
        let el = c("elapsed");
        assert_eq!(
            (el.predicted_ms, el.observed_ms, el.error_ms, el.requests),
            (Some(20.0), Some(20.0), Some(0.0), 2)
        );
        // transcode: the third request has no observation, so the means are
        // over the two that have both.
        let tr = c("transcode");
        assert_eq!(
            (tr.predicted_ms, tr.observed_ms, tr.error_ms, tr.requests),
            (Some(10.0), Some(20.0), Some(10.0), 2)
        );
        let en = c("encode");
        assert_eq!(
            en.terms,
            vec![("encode_wait".to_string(), 50.0), ("encode".to_string(), 150.0)]
        );
        assert_eq!(
            (en.predicted_ms, en.observed_ms, en.error_ms),
            (Some(200.0), Some(250.0), Some(50.0))
        );
        assert_eq!(c("PD queue").error_ms, Some(0.0));
        let pf = c("prefill");
        assert_eq!((pf.predicted_ms, pf.observed_ms), (Some(80.0), Some(145.0)));
        // rest: predicted 400 − 335 (the terms without the margin) = 65;
        // observed 600 − 500 = 100 and 450 − 410 = 40.
        let rest = c("rest");
        assert_eq!(
            (rest.predicted_ms, rest.observed_ms, rest.error_ms),
            (Some(65.0), Some(70.0), Some(5.0))
        );
        let all = c("TTFT");
        assert_eq!(
            (all.predicted_ms, all.observed_ms, all.error_ms),
            (Some(400.0), Some(525.0), Some(125.0))
        );
        // A term of another name: predicted only; `margin` is not a term.
        let o = c("other");
        assert_eq!(
            (o.predicted_ms, o.observed_ms, o.error_ms, o.requests),
            (Some(5.0), None, None, 2)
        );
        // Over the same requests the parts' errors add up to the TTFT error,
        // plus what the unobserved term predicted (it is inside rest's observation).
        let parts: f64 = ["elapsed", "transcode", "encode", "PD queue", "prefill", "rest"]
            .iter()
            .filter_map(|n| c(n).error_ms)
            .sum();
        assert_eq!(parts, 125.0 + 5.0);
    }

    #[test]
    fn terms_without_observations_are_predicted_only() {
        // External backends: no emulator headers, so the PD parts and rest
        // have no observation; their predicted means are over every request.
        let reqs = [
            rec(
                Some(500.0),
                &[
                    (PREDICTED, "300"),
                    (TERMS, "pd_wait=10,prefill=60"),
                    ("x-vlm-transcode-ms", "9"),
                ],
            ),
            rec(
                Some(700.0),
                &[(PREDICTED, "300"), (TERMS, "pd_wait=30,prefill=60")],
            ),
        ];
        let s = summarise(&reqs);
        let names: Vec<&str> = s.components.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["PD queue", "prefill", "rest", "TTFT"]);
        let q = &s.components[0];
        assert_eq!((q.predicted_ms, q.observed_ms, q.requests), (Some(20.0), None, 2));
        assert_eq!(
            (s.components[2].predicted_ms, s.components[2].observed_ms),
            (Some(220.0), None)
        );
        assert_eq!(s.components[3].error_ms, Some(300.0));
    }
}
