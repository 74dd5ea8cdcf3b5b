//! From raw results to the report: per policy and trace TTFT percentiles,
//! SLO attainment, TPOT, e2e, throughput, token retention and errors; where
//! the time went and the CPU used; a Markdown file and one CDF plot per trace.

use crate::error::{BenchError, Result};
use crate::plot::{self, Curve};
use crate::results::{Results, Run};
use crate::stats::{self, Retention};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// The figures of one run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    pub trace: String,
    pub policy: String,
    pub peak_rps: Option<f64>,
    pub requests: usize,
    pub ok: usize,
    pub errors: usize,
    pub ttft_p50_ms: Option<f64>,
    pub ttft_p90_ms: Option<f64>,
    pub ttft_p99_ms: Option<f64>,
    /// Share of all requests (failures count as misses) with TTFT ≤ SLO.
    pub slo_attainment: Option<f64>,
    pub tpot_mean_ms: Option<f64>,
    pub e2e_p50_ms: Option<f64>,
    pub e2e_p99_ms: Option<f64>,
    /// Completed requests per second, first send to last completion.
    pub throughput_rps: Option<f64>,
    pub tokens_original_per_image: Option<f64>,
    pub tokens_kept_per_image: Option<f64>,
    pub retention: Option<f64>,
    /// Means over successful requests of the filter's and the emulator's timings.
    pub transcode_ms: Option<f64>,
    pub encode_wait_ms: Option<f64>,
    pub pd_preprocess_ms: Option<f64>,
    pub pd_queue_ms: Option<f64>,
    pub prefill_ms: Option<f64>,
    pub send_lag_max_ms: Option<f64>,
    pub budget_reasons: BTreeMap<String, usize>,
    pub first_error: Option<String>,
}

fn header_mean(run: &Run, name: &str) -> Option<f64> {
    let v: Vec<f64> = run
        .requests
        .iter()
        .filter(|r| r.ok())
        .filter_map(|r| r.header_f64(name))
        .collect();
    stats::mean(&v)
}

/// Summarises one run against `slo_ms`.
pub fn summarise(run: &Run, slo_ms: f64) -> Summary {
    let reqs = &run.requests;
    let ok: Vec<_> = reqs.iter().filter(|r| r.ok()).collect();
    let ttft: Vec<f64> = ok.iter().filter_map(|r| r.ttft_ms).collect();
    let e2e: Vec<f64> = ok.iter().filter_map(|r| r.e2e_ms).collect();
    let tpot: Vec<f64> = ok.iter().filter_map(|r| r.tpot_ms).collect();
    let all_ttft: Vec<Option<f64>> = reqs
        .iter()
        .map(|r| if r.ok() { r.ttft_ms } else { None })
        .collect();
    let mut retention = Retention::default();
    for r in &ok {
        let (i, b, a) = r.tokens();
        retention.add(i, b, a);
    }
    let first = reqs.iter().map(|r| r.sent_s).fold(f64::INFINITY, f64::min);
    let last = ok
        .iter()
        .filter_map(|r| Some(r.sent_s + r.e2e_ms? / 1000.0))
        .fold(f64::NEG_INFINITY, f64::max);
    let throughput = (last > first && !ok.is_empty()).then(|| ok.len() as f64 / (last - first));
    let lag: Vec<f64> = reqs.iter().map(|r| (r.sent_s - r.arrival_s) * 1000.0).collect();
    let mut reasons = BTreeMap::new();
    for r in &ok {
        if let Some(v) = r.headers.get("x-vlm-budget-reason") {
            *reasons.entry(v.clone()).or_insert(0) += 1;
        }
    }
    Summary {
        trace: run.trace.clone(),
        policy: run.policy.clone(),
        peak_rps: run.shape.map(|s| s.peak_rps),
        requests: reqs.len(),
        ok: ok.len(),
        errors: reqs.len() - ok.len(),
        ttft_p50_ms: stats::percentile(&ttft, 50.0),
        ttft_p90_ms: stats::percentile(&ttft, 90.0),
        ttft_p99_ms: stats::percentile(&ttft, 99.0),
        slo_attainment: stats::slo_attainment(&all_ttft, slo_ms),
        tpot_mean_ms: stats::mean(&tpot),
        e2e_p50_ms: stats::percentile(&e2e, 50.0),
        e2e_p99_ms: stats::percentile(&e2e, 99.0),
        throughput_rps: throughput,
        tokens_original_per_image: retention.original_per_image(),
        tokens_kept_per_image: retention.kept_per_image(),
        retention: retention.ratio(),
        transcode_ms: header_mean(run, "x-vlm-transcode-ms"),
        encode_wait_ms: header_mean(run, "x-vlm-encode-ms"),
        pd_preprocess_ms: header_mean(run, "x-emulator-preprocess-ms"),
        pd_queue_ms: header_mean(run, "x-emulator-queue-ms"),
        prefill_ms: header_mean(run, "x-emulator-prefill-ms"),
        send_lag_max_ms: lag.iter().copied().reduce(f64::max),
        budget_reasons: reasons,
        first_error: reqs.iter().find_map(|r| r.error.clone()),
    }
}

fn ms(v: Option<f64>) -> String {
    v.map_or_else(|| "–".into(), |v| format!("{v:.0}"))
}

fn pct(v: Option<f64>) -> String {
    v.map_or_else(|| "–".into(), |v| format!("{:.1}%", v * 100.0))
}

fn num(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "–".into(), |v| format!("{v:.digits$}"))
}

/// Traces in report order: generated ones by peak, then the others by name.
pub fn trace_order(runs: &[Run]) -> Vec<String> {
    let mut names: Vec<(f64, String)> = Vec::new();
    for r in runs {
        if !names.iter().any(|(_, n)| *n == r.trace) {
            names.push((r.shape.map_or(f64::INFINITY, |s| s.peak_rps), r.trace.clone()));
        }
    }
    names.sort_by(|a, b| a.0.total_cmp(&b.0).then_with(|| a.1.cmp(&b.1)));
    names.into_iter().map(|(_, n)| n).collect()
}

fn policy_rank(p: &str) -> usize {
    ["vanilla", "static", "dynamic"]
        .iter()
        .position(|x| *x == p)
        .unwrap_or(3)
}

/// Summaries in report order.
pub fn summaries(results: &Results, slo_ms: f64) -> Vec<Summary> {
    let order = trace_order(&results.runs);
    let mut s: Vec<Summary> = results.runs.iter().map(|r| summarise(r, slo_ms)).collect();
    s.sort_by_key(|x| {
        (
            order.iter().position(|t| *t == x.trace),
            policy_rank(&x.policy),
            x.policy.clone(),
        )
    });
    s
}

/// The main table.
pub fn table(s: &[Summary], slo_ms: f64) -> String {
    let mut out = format!(
        "| trace | policy | requests | errors | TTFT p50 (ms) | TTFT p90 (ms) | TTFT p99 (ms) | TTFT ≤ {slo_ms:.0} ms | TPOT mean (ms) | e2e p50 (ms) | e2e p99 (ms) | throughput (req/s) | visual tokens kept / image | token retention |\n"
    );
    out.push_str("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n");
    for x in s {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} of {} | {} |",
            x.trace,
            x.policy,
            x.requests,
            x.errors,
            ms(x.ttft_p50_ms),
            ms(x.ttft_p90_ms),
            ms(x.ttft_p99_ms),
            pct(x.slo_attainment),
            num(x.tpot_mean_ms, 1),
            ms(x.e2e_p50_ms),
            ms(x.e2e_p99_ms),
            num(x.throughput_rps, 2),
            ms(x.tokens_kept_per_image),
            ms(x.tokens_original_per_image),
            pct(x.retention),
        );
    }
    out
}

/// Where the time went, and the CPU.
pub fn breakdown(results: &Results, s: &[Summary]) -> String {
    let mut out = String::from(
        "| trace | policy | filter transcode | encode wait | PD preprocess | PD queue | prefill | max send lag | machine CPU busy | other processes' cores | Envoy cores | backend cores | load generator cores | dynamic budget reasons |\n",
    );
    out.push_str("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|\n");
    for x in s {
        let cpu = results
            .runs
            .iter()
            .find(|r| r.trace == x.trace && r.policy == x.policy)
            .and_then(|r| r.cpu.as_ref());
        let core = |name: &str| num(cpu.and_then(|c| c.processes.get(name).copied()), 2);
        let others = cpu.and_then(|c| {
            let busy = c.machine_busy * c.cores as f64;
            busy.is_finite()
                .then(|| (busy - c.processes.values().sum::<f64>()).max(0.0))
        });
        let reasons: Vec<String> = x.budget_reasons.iter().map(|(k, v)| format!("{k} {v}")).collect();
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            x.trace,
            x.policy,
            ms(x.transcode_ms),
            ms(x.encode_wait_ms),
            ms(x.pd_preprocess_ms),
            ms(x.pd_queue_ms),
            ms(x.prefill_ms),
            ms(x.send_lag_max_ms),
            pct(cpu.map(|c| c.machine_busy).filter(|v| v.is_finite())),
            num(others, 2),
            core("envoy"),
            core("backends"),
            core("vlm-bench"),
            if x.policy == "dynamic" {
                reasons.join(", ")
            } else {
                String::new()
            },
        );
    }
    out
}

/// The CDF curves of one trace, one per policy (failures absent: the curve
/// ends at the success share).
pub fn curves(results: &Results, trace: &str) -> Vec<Curve> {
    let mut runs: Vec<&Run> = results.runs.iter().filter(|r| r.trace == trace).collect();
    runs.sort_by_key(|r| (policy_rank(&r.policy), r.policy.clone()));
    runs.iter()
        .map(|r| {
            let ttft: Vec<f64> = r
                .requests
                .iter()
                .filter(|q| q.ok())
                .filter_map(|q| q.ttft_ms)
                .collect();
            Curve {
                label: r.policy.clone(),
                color: plot::policy_color(&r.policy),
                points: stats::cdf(&ttft, r.requests.len()),
            }
        })
        .collect()
}

/// File name of a trace's plot: `ttft-cdf-<peak>.png` for generated traces.
pub fn plot_name(results: &Results, trace: &str) -> String {
    let peak = results
        .runs
        .iter()
        .find(|r| r.trace == trace)
        .and_then(|r| r.shape)
        .map(|s| s.peak_rps);
    match peak {
        Some(p) => format!("ttft-cdf-{}.png", fmt_rate(p)),
        None => {
            let safe: String = trace
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '-' {
                        c
                    } else {
                        '_'
                    }
                })
                .collect();
            format!("ttft-cdf-{safe}.png")
        }
    }
}

pub fn fmt_rate(p: f64) -> String {
    if p.fract() == 0.0 {
        format!("{p:.0}")
    } else {
        format!("{p}")
    }
}

/// What `write` produced.
#[derive(Debug, Clone)]
pub struct Written {
    pub report: PathBuf,
    pub plots: Vec<PathBuf>,
    pub summaries: Vec<Summary>,
}

/// Writes `report.md` and the plots into `out`. `slo_ms` defaults to the results'.
pub fn write(results: &Results, out: &Path, slo_ms: Option<f64>, font: &Path) -> Result<Written> {
    std::fs::create_dir_all(out).map_err(|e| BenchError::io(out, e))?;
    let slo = slo_ms.unwrap_or(results.slo_ms);
    let s = summaries(results, slo);
    let mut md = String::new();
    let label = if results.backends.emulated {
        "EMULATED backends (the project's backend emulator on this machine's CPUs, timed from H100 measurements; not GPU results)"
    } else {
        "external backends"
    };
    let _ = writeln!(
        md,
        "# vlm-bench report\n\n**{label}**: {}\n",
        results.backends.description
    );
    let _ = writeln!(md, "- command: `{}`", results.command.join(" "));
    let _ = writeln!(md, "- TTFT SLO: {slo:.0} ms; percentiles over successful requests; SLO attainment over all requests (a failed request is a miss)");
    for (k, v) in &results.setup {
        let text = |v: &serde_json::Value| v.as_str().map_or_else(|| v.to_string(), str::to_owned);
        match v.as_array() {
            Some(items) => {
                let _ = writeln!(md, "- {k}:");
                for item in items {
                    let _ = writeln!(md, "  - {}", text(item));
                }
            }
            None => {
                let _ = writeln!(md, "- {k}: {}", text(v));
            }
        }
    }
    md.push_str("\n## Results\n\n");
    md.push_str(&table(&s, slo));
    md.push_str("\nvisual tokens kept / image: mean over the images of successful requests, forwarded of original (Qwen2.5-VL rule); token retention = forwarded / original tokens.\n");
    md.push_str(
        "\n## Where the time went (means over successful requests, ms) and CPU (average over the run)\n\n",
    );
    md.push_str(&breakdown(results, &s));
    md.push_str("\nfilter transcode = `x-vlm-transcode-ms` (decode, resize, re-encode in Envoy's Wasm VM); encode wait = `x-vlm-encode-ms` (the filter waiting for the encode cluster); PD preprocess / queue / prefill = the PD instance's `x-emulator-*` headers (emulator only; preprocess includes its real image decoding when that is slower than the model). max send lag = how late the load generator sent a request after its scheduled arrival. CPU: cores used on average over the run; machine CPU busy counts every process on the machine, and other processes' cores is the part not used by Envoy, the backends or the load generator (other work sharing the machine).\n");
    md.push_str("\n## TTFT CDF plots\n\n");
    let mut plots = Vec::new();
    let mut plot_error = None;
    for trace in trace_order(&results.runs) {
        let name = plot_name(results, &trace);
        let path = out.join(&name);
        let title = format!(
            "TTFT CDF, {trace}{}",
            if results.backends.emulated {
                " (EMULATED backends)"
            } else {
                ""
            }
        );
        match plot::cdf_png(&path, &title, &curves(results, &trace), slo, font) {
            Ok(()) => {
                let _ = writeln!(md, "- {trace}: `{name}`");
                plots.push(path);
            }
            Err(e) => {
                let _ = writeln!(md, "- {trace}: no plot ({e})");
                plot_error.get_or_insert(e);
            }
        }
    }
    let errors: Vec<&Summary> = s.iter().filter(|x| x.errors > 0).collect();
    if !errors.is_empty() {
        md.push_str("\n## Errors\n\n");
        for x in errors {
            let _ = writeln!(
                md,
                "- {} / {}: {} of {} failed; first: {}",
                x.trace,
                x.policy,
                x.errors,
                x.requests,
                x.first_error.as_deref().unwrap_or("–")
            );
        }
    }
    let report = out.join("report.md");
    std::fs::write(&report, md).map_err(|e| BenchError::io(&report, e))?;
    if let Some(e) = plot_error {
        return Err(e);
    }
    Ok(Written {
        report,
        plots,
        summaries: s,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::results::{Backends, RequestRecord};
    use crate::trace::Shape;

    fn rec(i: usize, ttft: Option<f64>, before: u64, after: u64) -> RequestRecord {
        let mut headers = BTreeMap::new();
        headers.insert("x-vlm-visual-tokens-before".into(), before.to_string());
        headers.insert("x-vlm-visual-tokens-after".into(), after.to_string());
        headers.insert("x-vlm-transcode-ms".into(), "10".into());
        headers.insert(
            "x-vlm-budget-reason".into(),
            if after < before { "slo" } else { "unconstrained" }.into(),
        );
        RequestRecord {
            index: i,
            request_id: format!("r{i}"),
            arrival_s: i as f64,
            sent_s: i as f64 + 0.001,
            images: vec![format!("img-{i}.jpg")],
            image_tokens: before,
            body_bytes: 100,
            status: Some(if ttft.is_some() { 200 } else { 502 }),
            error: ttft.is_none().then(|| "status 502".to_string()),
            ttft_ms: ttft,
            tpot_ms: ttft.map(|_| 8.0),
            e2e_ms: ttft.map(|t| t + 500.0),
            output_tokens: 64,
            headers,
        }
    }

    fn results() -> Results {
        let shape = Shape {
            base_rps: 1.0,
            peak_rps: 4.0,
            ramp_s: 1.0,
            hold_s: 1.0,
            decay_s: 1.0,
        };
        let run = |policy: &str, reqs: Vec<RequestRecord>| Run {
            policy: policy.into(),
            trace: "peak-4".into(),
            shape: Some(shape),
            plugin_config: None,
            started_unix_s: 0.0,
            wall_s: 4.0,
            cpu: None,
            requests: reqs,
        };
        Results {
            tool: "t".into(),
            command: vec!["vlm-bench".into()],
            created_unix_s: 0.0,
            slo_ms: 1000.0,
            backends: Backends {
                emulated: true,
                description: "emulator".into(),
                encode_url: None,
                pd_url: None,
            },
            setup: BTreeMap::new(),
            runs: vec![
                run(
                    "dynamic",
                    vec![
                        rec(0, Some(300.0), 10_000, 4_000),
                        rec(1, Some(900.0), 2_000, 2_000),
                    ],
                ),
                run(
                    "vanilla",
                    vec![
                        rec(0, Some(800.0), 10_000, 10_000),
                        rec(1, Some(2500.0), 2_000, 2_000),
                        rec(2, None, 100, 100),
                    ],
                ),
            ],
        }
    }

    #[test]
    fn summary_figures() {
        let r = results();
        let s = summaries(&r, 1000.0);
        assert_eq!(s[0].policy, "vanilla"); // report order
        let v = &s[0];
        assert_eq!((v.requests, v.ok, v.errors), (3, 2, 1));
        assert_eq!(v.slo_attainment, Some(1.0 / 3.0));
        assert_eq!(v.ttft_p50_ms, Some(1650.0));
        assert_eq!(v.retention, Some(1.0));
        assert_eq!(v.first_error.as_deref(), Some("status 502"));
        let d = &s[1];
        assert_eq!(d.slo_attainment, Some(1.0));
        assert_eq!(d.tokens_kept_per_image, Some(3_000.0));
        assert_eq!(d.tokens_original_per_image, Some(6_000.0));
        assert_eq!(d.retention, Some(0.5));
        assert_eq!(d.transcode_ms, Some(10.0));
        assert_eq!(d.budget_reasons.get("slo"), Some(&1));
        // Two completions: first send at 0.001 s, last end at 1.001 + 1.4 s.
        assert!((d.throughput_rps.unwrap() - 2.0 / 2.4).abs() < 1e-9);
        let t = table(&s, 1000.0);
        assert!(t.contains("| peak-4 | dynamic | 2 | 0 | 600 |"), "{t}");
        assert!(t.contains("50.0%"), "{t}");
    }

    #[test]
    fn curves_and_names() {
        let r = results();
        let c = curves(&r, "peak-4");
        assert_eq!(
            c.iter().map(|c| c.label.as_str()).collect::<Vec<_>>(),
            ["vanilla", "dynamic"]
        );
        assert_eq!(c[0].points.last().map(|p| p.1), Some(2.0 / 3.0));
        assert_eq!(plot_name(&r, "peak-4"), "ttft-cdf-4.png");
    }
}
