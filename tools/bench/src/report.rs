//! From raw results to the report.
//!
//! Per run (one trace under one policy and seed): TTFT percentiles, SLO
//! attainment, TPOT, e2e, throughput, token retention, errors, where the time
//! went, the CPU used, and the dynamic policy's prediction error. Pooled per
//! (trace, policy) over the seeds: the same figures over all the runs'
//! requests together, with the spread between the runs. A Markdown file and
//! one TTFT CDF plot per trace (the policies overlaid, pooled over seeds).

use crate::error::{BenchError, Result};
use crate::plot::{self, Curve};
use crate::prediction::{self, Component, PredictionSummary};
use crate::results::{RequestRecord, Results, Run};
use crate::stats::{self, Dist, Retention, Spread};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// The figures of a set of requests: one run's, or several runs' pooled.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Figures {
    pub requests: usize,
    pub ok: usize,
    pub errors: usize,
    /// TTFT percentiles over the successful requests.
    pub ttft_p50_ms: Option<f64>,
    pub ttft_p90_ms: Option<f64>,
    pub ttft_p99_ms: Option<f64>,
    /// Share of all requests (failures count as misses) with TTFT ≤ SLO.
    pub slo_attainment: Option<f64>,
    pub tokens_original_per_image: Option<f64>,
    pub tokens_kept_per_image: Option<f64>,
    /// Visual tokens kept / sent, over the successful requests.
    pub retention: Option<f64>,
    /// The dynamic policy's prediction against the observed TTFT.
    pub prediction: PredictionSummary,
}

/// The figures of `reqs` against `slo_ms`.
pub fn figures(reqs: &[&RequestRecord], slo_ms: f64) -> Figures {
    let ok: Vec<&RequestRecord> = reqs.iter().copied().filter(|r| r.ok()).collect();
    let ttft: Vec<f64> = ok.iter().filter_map(|r| r.ttft_ms).collect();
    let all_ttft: Vec<Option<f64>> = reqs
        .iter()
        .map(|r| if r.ok() { r.ttft_ms } else { None })
        .collect();
    let mut retention = Retention::default();
    for r in &ok {
        let (i, b, a) = r.tokens();
        retention.add(i, b, a);
    }
    Figures {
        requests: reqs.len(),
        ok: ok.len(),
        errors: reqs.len() - ok.len(),
        ttft_p50_ms: stats::percentile(&ttft, 50.0),
        ttft_p90_ms: stats::percentile(&ttft, 90.0),
        ttft_p99_ms: stats::percentile(&ttft, 99.0),
        slo_attainment: stats::slo_attainment(&all_ttft, slo_ms),
        tokens_original_per_image: retention.original_per_image(),
        tokens_kept_per_image: retention.kept_per_image(),
        retention: retention.ratio(),
        prediction: prediction::summarise(reqs.iter().copied()),
    }
}

/// The figures of one run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    pub trace: String,
    pub policy: String,
    pub seed: Option<u64>,
    pub peak_rps: Option<f64>,
    /// Index of the run in the results.
    pub run: usize,
    #[serde(flatten)]
    pub figures: Figures,
    pub tpot_mean_ms: Option<f64>,
    pub e2e_p50_ms: Option<f64>,
    pub e2e_p99_ms: Option<f64>,
    /// Completed requests per second, first send to last completion.
    pub throughput_rps: Option<f64>,
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

/// Summarises one run against `slo_ms` (`run` index 0).
pub fn summarise(run: &Run, slo_ms: f64) -> Summary {
    let reqs = &run.requests;
    let all: Vec<&RequestRecord> = reqs.iter().collect();
    let ok: Vec<_> = reqs.iter().filter(|r| r.ok()).collect();
    let e2e: Vec<f64> = ok.iter().filter_map(|r| r.e2e_ms).collect();
    let tpot: Vec<f64> = ok.iter().filter_map(|r| r.tpot_ms).collect();
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
        seed: run.seed,
        peak_rps: run.shape.map(|s| s.peak_rps),
        run: 0,
        figures: figures(&all, slo_ms),
        tpot_mean_ms: stats::mean(&tpot),
        e2e_p50_ms: stats::percentile(&e2e, 50.0),
        e2e_p99_ms: stats::percentile(&e2e, 99.0),
        throughput_rps: throughput,
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

/// The runs of one (trace, policy) pooled over their seeds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Pooled {
    pub trace: String,
    pub policy: String,
    pub peak_rps: Option<f64>,
    /// Seeds of the pooled runs in order (None: a run without a seed).
    pub seeds: Vec<Option<u64>>,
    /// Over all the runs' requests together.
    #[serde(flatten)]
    pub figures: Figures,
    /// Lowest and highest SLO attainment of the runs.
    pub slo_attainment_spread: Option<Spread>,
    /// Lowest and highest TTFT p99 of the runs.
    pub ttft_p99_spread: Option<Spread>,
}

/// Whole ms; never `-0`.
fn ms(v: Option<f64>) -> String {
    v.map_or_else(|| "–".into(), |v| format!("{:.0}", v.round() + 0.0))
}

fn pct(v: Option<f64>) -> String {
    v.map_or_else(|| "–".into(), |v| format!("{:.1}%", v * 100.0))
}

fn num(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "–".into(), |v| format!("{v:.digits$}"))
}

/// A signed whole number of ms: `+125`, `-40`, `0`.
fn signed(v: f64) -> String {
    let r = v.round();
    if r == 0.0 {
        "0".into()
    } else {
        format!("{r:+.0}")
    }
}

/// `min–max` of a spread, formatted by `f`; one value when they are equal.
fn range(s: Option<Spread>, f: fn(Option<f64>) -> String) -> String {
    match s {
        None => "–".into(),
        Some(s) if f(Some(s.min)) == f(Some(s.max)) => f(Some(s.min)),
        Some(s) => format!("{}–{}", f(Some(s.min)), f(Some(s.max))),
    }
}

fn seed_cell(seed: Option<u64>) -> String {
    seed.map_or_else(|| "–".into(), |s| s.to_string())
}

fn seeds_cell(seeds: &[Option<u64>]) -> String {
    seeds.iter().map(|s| seed_cell(*s)).collect::<Vec<_>>().join(", ")
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

/// Summaries of every run in report order: by trace, policy, then seed.
pub fn summaries(results: &Results, slo_ms: f64) -> Vec<Summary> {
    let order = trace_order(&results.runs);
    let mut s: Vec<Summary> = results
        .runs
        .iter()
        .enumerate()
        .map(|(i, r)| Summary {
            run: i,
            ..summarise(r, slo_ms)
        })
        .collect();
    s.sort_by_key(|x| {
        (
            order.iter().position(|t| *t == x.trace),
            policy_rank(&x.policy),
            x.policy.clone(),
            x.seed,
            x.run,
        )
    });
    s
}

/// The runs of `s` (in report order, from `summaries`) pooled per (trace,
/// policy): percentiles, attainment and retention over all their requests,
/// and the spread of the runs' own attainment and p99.
pub fn pool(results: &Results, s: &[Summary], slo_ms: f64) -> Vec<Pooled> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < s.len() {
        let same = |x: &Summary| x.trace == s[i].trace && x.policy == s[i].policy;
        let group = &s[i..i + s[i..].iter().take_while(|x| same(x)).count()];
        let reqs: Vec<&RequestRecord> = group
            .iter()
            .filter_map(|x| results.runs.get(x.run))
            .flat_map(|r| &r.requests)
            .collect();
        out.push(Pooled {
            trace: s[i].trace.clone(),
            policy: s[i].policy.clone(),
            peak_rps: s[i].peak_rps,
            seeds: group.iter().map(|x| x.seed).collect(),
            figures: figures(&reqs, slo_ms),
            slo_attainment_spread: stats::spread(group.iter().map(|x| x.figures.slo_attainment)),
            ttft_p99_spread: stats::spread(group.iter().map(|x| x.figures.ttft_p99_ms)),
        });
        i += group.len();
    }
    out
}

/// The main table: per (trace, policy), pooled over the seeds, with the
/// spread between them.
pub fn pooled_table(p: &[Pooled], slo_ms: f64) -> String {
    let mut out = format!(
        "| trace | policy | requests | errors | TTFT p50 (ms) | TTFT p90 (ms) | TTFT p99 (ms) | TTFT ≤ {slo_ms:.0} ms | TTFT ≤ {slo_ms:.0} ms per seed (min–max) | TTFT p99 per seed (min–max, ms) | visual tokens kept / image | token retention | seeds |\n"
    );
    out.push_str("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|\n");
    for x in p {
        let f = &x.figures;
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} of {} | {} | {} |",
            x.trace,
            x.policy,
            f.requests,
            f.errors,
            ms(f.ttft_p50_ms),
            ms(f.ttft_p90_ms),
            ms(f.ttft_p99_ms),
            pct(f.slo_attainment),
            range(x.slo_attainment_spread, pct),
            range(x.ttft_p99_spread, ms),
            ms(f.tokens_kept_per_image),
            ms(f.tokens_original_per_image),
            pct(f.retention),
            seeds_cell(&x.seeds),
        );
    }
    out
}

/// One row per run.
pub fn run_table(s: &[Summary], slo_ms: f64) -> String {
    let mut out = format!(
        "| trace | seed | policy | requests | errors | TTFT p50 (ms) | TTFT p90 (ms) | TTFT p99 (ms) | TTFT ≤ {slo_ms:.0} ms | TPOT mean (ms) | e2e p50 (ms) | e2e p99 (ms) | throughput (req/s) | visual tokens kept / image | token retention |\n"
    );
    out.push_str("|---|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n");
    for x in s {
        let f = &x.figures;
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} of {} | {} |",
            x.trace,
            seed_cell(x.seed),
            x.policy,
            f.requests,
            f.errors,
            ms(f.ttft_p50_ms),
            ms(f.ttft_p90_ms),
            ms(f.ttft_p99_ms),
            pct(f.slo_attainment),
            num(x.tpot_mean_ms, 1),
            ms(x.e2e_p50_ms),
            ms(x.e2e_p99_ms),
            num(x.throughput_rps, 2),
            ms(f.tokens_kept_per_image),
            ms(f.tokens_original_per_image),
            pct(f.retention),
        );
    }
    out
}

/// Where the time went, and the CPU, per run.
pub fn breakdown(results: &Results, s: &[Summary]) -> String {
    let mut out = String::from(
        "| trace | seed | policy | filter transcode | encode wait | PD preprocess | PD queue | prefill | max send lag | machine CPU busy | other processes' cores | Envoy cores | backend cores | load generator cores | dynamic budget reasons |\n",
    );
    out.push_str("|---|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|\n");
    for x in s {
        let cpu = results.runs.get(x.run).and_then(|r| r.cpu.as_ref());
        let core = |name: &str| num(cpu.and_then(|c| c.processes.get(name).copied()), 2);
        let others = cpu.and_then(|c| {
            let busy = c.machine_busy * c.cores as f64;
            busy.is_finite()
                .then(|| (busy - c.processes.values().sum::<f64>()).max(0.0))
        });
        let reasons: Vec<String> = x.budget_reasons.iter().map(|(k, v)| format!("{k} {v}")).collect();
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            x.trace,
            seed_cell(x.seed),
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

/// A row of the prediction tables: trace, policy, seed(s), figures.
pub struct PredictionRow<'a> {
    pub trace: &'a str,
    pub policy: &'a str,
    pub seeds: String,
    pub prediction: &'a PredictionSummary,
}

/// Rows for the pooled groups, then rows for the runs, of the groups and
/// runs that have predictions.
pub fn prediction_rows<'a>(
    p: &'a [Pooled],
    s: &'a [Summary],
) -> (Vec<PredictionRow<'a>>, Vec<PredictionRow<'a>>) {
    let has = |x: &PredictionSummary| x.requests > 0 || x.with_terms > 0;
    let pooled = p
        .iter()
        .filter(|x| has(&x.figures.prediction))
        .map(|x| PredictionRow {
            trace: &x.trace,
            policy: &x.policy,
            seeds: seeds_cell(&x.seeds),
            prediction: &x.figures.prediction,
        })
        .collect();
    let runs = s
        .iter()
        .filter(|x| has(&x.figures.prediction))
        .map(|x| PredictionRow {
            trace: &x.trace,
            policy: &x.policy,
            seeds: seed_cell(x.seed),
            prediction: &x.figures.prediction,
        })
        .collect();
    (pooled, runs)
}

fn dist_cells(d: &Dist) -> String {
    let f = |v: Option<f64>| v.map_or_else(|| "–".into(), signed);
    format!(
        "{} | {} | {} | {} | {}",
        f(d.p10),
        f(d.p50),
        f(d.p90),
        f(d.p99),
        f(d.mean)
    )
}

/// Observed − predicted TTFT, before and after the learned correction.
pub fn prediction_table(rows: &[PredictionRow]) -> String {
    let mut out = String::from(
        "| trace | policy | seed | requests with a prediction | before: p10 | p50 | p90 | p99 | mean | requests with a margin | margin mean | after: p10 | p50 | p90 | p99 | mean |\n",
    );
    out.push_str("|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n");
    for r in rows {
        let p = r.prediction;
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            r.trace,
            r.policy,
            r.seeds,
            p.requests,
            dist_cells(&p.before),
            p.after.n,
            p.margin.mean.map_or_else(|| "–".into(), signed),
            dist_cells(&p.after),
        );
    }
    out
}

/// `predicted → observed (observed − predicted)`; a component of several
/// terms shows each: `45 + 150 → 320 (+125)`.
fn component_cell(c: Option<&Component>) -> String {
    let Some(c) = c else {
        return "–".into();
    };
    let predicted = if c.terms.len() > 1 {
        c.terms
            .iter()
            .map(|(_, v)| ms(Some(*v)))
            .collect::<Vec<_>>()
            .join(" + ")
    } else {
        ms(c.predicted_ms)
    };
    match (c.observed_ms, c.error_ms) {
        (Some(o), Some(e)) => format!("{predicted} → {} ({})", ms(Some(o)), signed(e)),
        _ => format!("{predicted} → –"),
    }
}

/// The prediction's terms beside what the responses show (means, ms).
pub fn terms_table(rows: &[PredictionRow]) -> String {
    let others: BTreeSet<&str> = rows
        .iter()
        .flat_map(|r| &r.prediction.components)
        .map(|c| c.name.as_str())
        .filter(|n| !prediction::COMPONENTS.contains(n))
        .collect();
    let mut out = String::from(
        "| trace | policy | seed | requests with terms | elapsed | transcode | encode (encode_wait + encode) | PD queue (pd_wait) | prefill | rest | TTFT |",
    );
    for o in &others {
        let _ = write!(out, " {o} |");
    }
    out.push_str("\n|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|");
    for _ in &others {
        out.push_str("--:|");
    }
    out.push('\n');
    for r in rows.iter().filter(|r| r.prediction.with_terms > 0) {
        let find = |name: &str| r.prediction.components.iter().find(|c| c.name == name);
        let _ = write!(
            out,
            "| {} | {} | {} | {} |",
            r.trace, r.policy, r.seeds, r.prediction.with_terms
        );
        for name in prediction::COMPONENTS
            .iter()
            .copied()
            .chain(others.iter().copied())
        {
            let _ = write!(out, " {} |", component_cell(find(name)));
        }
        out.push('\n');
    }
    out
}

/// The CDF curves of one trace, one per policy over all its runs (seeds
/// pooled; failures absent: a curve ends at the success share).
pub fn curves(results: &Results, trace: &str) -> Vec<Curve> {
    let runs: Vec<&Run> = results.runs.iter().filter(|r| r.trace == trace).collect();
    let mut policies: Vec<&str> = Vec::new();
    for r in &runs {
        if !policies.contains(&r.policy.as_str()) {
            policies.push(&r.policy);
        }
    }
    policies.sort_by_key(|p| (policy_rank(p), p.to_string()));
    policies
        .into_iter()
        .map(|p| {
            let mine: Vec<&&Run> = runs.iter().filter(|r| r.policy == p).collect();
            let ttft: Vec<f64> = mine
                .iter()
                .flat_map(|r| &r.requests)
                .filter(|q| q.ok())
                .filter_map(|q| q.ttft_ms)
                .collect();
            let n: usize = mine.iter().map(|r| r.requests.len()).sum();
            let seeds: BTreeSet<u64> = mine.iter().filter_map(|r| r.seed).collect();
            let label = match mine.len() {
                1 => p.to_string(),
                k if seeds.len() == k => format!("{p} ({k} seeds)"),
                k => format!("{p} ({k} runs)"),
            };
            Curve {
                label,
                color: plot::policy_color(p),
                points: stats::cdf(&ttft, n),
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
    pub pooled: Vec<Pooled>,
}

/// Writes `report.md` and the plots into `out`. `slo_ms` defaults to the results'.
pub fn write(results: &Results, out: &Path, slo_ms: Option<f64>, font: &Path) -> Result<Written> {
    std::fs::create_dir_all(out).map_err(|e| BenchError::io(out, e))?;
    let slo = slo_ms.unwrap_or(results.slo_ms);
    let s = summaries(results, slo);
    let pooled = pool(results, &s, slo);
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
    md.push_str("\n## Results (pooled over seeds)\n\n");
    md.push_str(&pooled_table(&pooled, slo));
    md.push_str("\nEach row pools the runs of one trace and policy, one per seed: requests and errors are summed, TTFT percentiles are over all their successful requests, SLO attainment over all their requests, token retention over all their images. Per seed (min–max): the lowest and highest of the runs' own SLO attainment and TTFT p99. visual tokens kept / image: mean over the images of successful requests, forwarded of original (Qwen2.5-VL rule); token retention = forwarded / original tokens.\n");
    md.push_str("\n## Results per seed\n\n");
    md.push_str(&run_table(&s, slo));
    md.push_str(
        "\n## Where the time went (means over successful requests, ms) and CPU (average over the run)\n\n",
    );
    md.push_str(&breakdown(results, &s));
    md.push_str("\nfilter transcode = `x-vlm-transcode-ms` (decode, resize, re-encode in Envoy's Wasm VM); encode wait = `x-vlm-encode-ms` (the filter waiting for the encode cluster); PD preprocess / queue / prefill = the PD instance's `x-emulator-*` headers (emulator only; preprocess includes its real image decoding when that is slower than the model). max send lag = how late the load generator sent a request after its scheduled arrival. CPU: cores used on average over the run; machine CPU busy counts every process on the machine, and other processes' cores is the part not used by Envoy, the backends or the load generator (other work sharing the machine).\n");
    md.push_str("\n## TTFT prediction error (dynamic policy)\n\n");
    let (p_rows, r_rows) = prediction_rows(&pooled, &s);
    if p_rows.is_empty() {
        md.push_str("No successful request carried `x-vlm-predicted-ttft-ms` or `x-vlm-ttft-terms`.\n");
    } else {
        md.push_str("Observed − predicted TTFT per successful request with a prediction, ms (positive: slower than predicted). Pooled over seeds:\n\n");
        md.push_str(&prediction_table(&p_rows));
        md.push_str("\nPer seed:\n\n");
        md.push_str(&prediction_table(&r_rows));
        md.push_str("\nObserved = TTFT at the client. before = observed − `x-vlm-predicted-ttft-ms` (the model's prediction for the forwarded request, before the learned correction); after = observed − (`x-vlm-predicted-ttft-ms` + `x-vlm-ttft-margin-ms`), over the requests that carried the correction the budget planned with (– where none did: filter builds that do not send it). margin mean = mean of that correction.\n");
        md.push_str("\n### Prediction terms beside observations (means, ms: predicted → observed (observed − predicted))\n\n");
        if p_rows.iter().all(|r| r.prediction.with_terms == 0) {
            md.push_str("No successful request carried `x-vlm-ttft-terms`.\n");
        } else {
            md.push_str("Pooled over seeds:\n\n");
            md.push_str(&terms_table(&p_rows));
            md.push_str("\nPer seed:\n\n");
            md.push_str(&terms_table(&r_rows));
            md.push_str("\nOver successful requests with `x-vlm-ttft-terms`. elapsed: `elapsed`, the time from the request's arrival to the budget decision, measured by the filter (so observed as predicted). transcode: `transcode` → `x-vlm-transcode-ms`. encode: `encode_wait` + `encode` (shown each) → `x-vlm-encode-ms`, the filter's wait for the encode cluster. PD queue: `pd_wait` → `x-emulator-queue-ms`. prefill: `prefill` → `x-emulator-prefill-ms` + `x-emulator-preprocess-ms` + `x-emulator-encode-ms` (the PD instance's image preprocessing, and its own encoding on an encoder-cache miss). rest: the prediction minus all its terms → the client's TTFT minus the observed parts before it (HTTP, Envoy, the first decode step and whatever no term covers; negative where observed parts overlapped in time instead of following each other). TTFT: `x-vlm-predicted-ttft-ms` → the client's TTFT. Over the same requests the parts' differences add up to the TTFT's (plus what terms of other names predicted). `margin` in the terms header is the correction (as `x-vlm-ttft-margin-ms`), not a term; terms of other names are shown as predicted only. Each mean is over the requests with both the term and its observation; → – where no response shows it (the `x-emulator-*` headers come from the emulator only).\n");
        }
    }
    md.push_str("\n## TTFT CDF plots (pooled over seeds)\n\n");
    let mut plots = Vec::new();
    let mut plot_error = None;
    for trace in trace_order(&results.runs) {
        let name = plot_name(results, &trace);
        let path = out.join(&name);
        let seeds: Vec<String> = results
            .runs
            .iter()
            .filter(|r| r.trace == trace)
            .filter_map(|r| r.seed)
            .collect::<BTreeSet<u64>>()
            .iter()
            .map(u64::to_string)
            .collect();
        let seeds = match seeds.len() {
            0 => String::new(),
            1 => format!(", seed {}", seeds[0]),
            _ => format!(", seeds {} pooled", seeds.join(", ")),
        };
        let title = format!(
            "TTFT CDF, {trace}{seeds}{}",
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
    let errors: Vec<&Summary> = s.iter().filter(|x| x.figures.errors > 0).collect();
    if !errors.is_empty() {
        md.push_str("\n## Errors\n\n");
        for x in errors {
            let _ = writeln!(
                md,
                "- {}{} / {}: {} of {} failed; first: {}",
                x.trace,
                x.seed.map(|s| format!(" seed {s}")).unwrap_or_default(),
                x.policy,
                x.figures.errors,
                x.figures.requests,
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
        pooled,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prediction::{MARGIN, PREDICTED, TERMS};
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

    fn with(mut r: RequestRecord, headers: &[(&str, &str)]) -> RequestRecord {
        for (k, v) in headers {
            r.headers.insert(k.to_string(), v.to_string());
        }
        r
    }

    fn shape() -> Shape {
        Shape {
            base_rps: 1.0,
            peak_rps: 4.0,
            ramp_s: 1.0,
            hold_s: 1.0,
            decay_s: 1.0,
        }
    }

    fn run(policy: &str, seed: Option<u64>, reqs: Vec<RequestRecord>) -> Run {
        Run {
            policy: policy.into(),
            trace: "peak-4".into(),
            seed,
            shape: Some(shape()),
            plugin_config: None,
            started_unix_s: 0.0,
            wall_s: 4.0,
            cpu: None,
            requests: reqs,
        }
    }

    fn results(runs: Vec<Run>) -> Results {
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
            runs,
        }
    }

    /// One seedless run per policy, as files from before seeds hold them.
    fn single() -> Results {
        results(vec![
            run(
                "dynamic",
                None,
                vec![
                    rec(0, Some(300.0), 10_000, 4_000),
                    rec(1, Some(900.0), 2_000, 2_000),
                ],
            ),
            run(
                "vanilla",
                None,
                vec![
                    rec(0, Some(800.0), 10_000, 10_000),
                    rec(1, Some(2500.0), 2_000, 2_000),
                    rec(2, None, 100, 100),
                ],
            ),
        ])
    }

    #[test]
    fn summary_figures() {
        let r = single();
        let s = summaries(&r, 1000.0);
        assert_eq!(s[0].policy, "vanilla"); // report order
        let v = &s[0];
        assert_eq!(v.run, 1);
        let f = &v.figures;
        assert_eq!((f.requests, f.ok, f.errors), (3, 2, 1));
        assert_eq!(f.slo_attainment, Some(1.0 / 3.0));
        assert_eq!(f.ttft_p50_ms, Some(1650.0));
        assert_eq!(f.retention, Some(1.0));
        assert_eq!(v.first_error.as_deref(), Some("status 502"));
        let d = &s[1];
        assert_eq!(d.figures.slo_attainment, Some(1.0));
        assert_eq!(d.figures.tokens_kept_per_image, Some(3_000.0));
        assert_eq!(d.figures.tokens_original_per_image, Some(6_000.0));
        assert_eq!(d.figures.retention, Some(0.5));
        assert_eq!(d.transcode_ms, Some(10.0));
        assert_eq!(d.budget_reasons.get("slo"), Some(&1));
        // Two completions: first send at 0.001 s, last end at 1.001 + 1.4 s.
        assert!((d.throughput_rps.unwrap() - 2.0 / 2.4).abs() < 1e-9);
        let t = run_table(&s, 1000.0);
        assert!(t.contains("| peak-4 | – | dynamic | 2 | 0 | 600 |"), "{t}");
        assert!(t.contains("50.0%"), "{t}");
        // A seedless run pools alone: the pooled row is the run's.
        let p = pool(&r, &s, 1000.0);
        assert_eq!(p.len(), 2);
        assert_eq!(p[1].figures, d.figures);
        assert_eq!(p[1].seeds, vec![None]);
        let t = pooled_table(&p, 1000.0);
        assert!(t.contains("| peak-4 | dynamic | 2 | 0 | 600 |"), "{t}");
        assert!(t.contains("| 100.0% | 100.0% |"), "{t}");
        assert!(t.ends_with("| 50.0% | – |\n"), "{t}");
    }

    /// Three seeds of one trace under one policy, and one run of another.
    fn seeded() -> Results {
        results(vec![
            // Seed 2 first: report order sorts by seed.
            run(
                "dynamic",
                Some(2),
                vec![
                    rec(0, Some(400.0), 4_000, 1_000),
                    rec(1, Some(1200.0), 4_000, 1_000),
                    rec(2, None, 4_000, 4_000),
                ],
            ),
            run(
                "dynamic",
                Some(1),
                vec![
                    rec(0, Some(100.0), 4_000, 2_000),
                    rec(1, Some(200.0), 4_000, 2_000),
                ],
            ),
            run("static", Some(1), vec![rec(0, Some(700.0), 8_000, 4_000)]),
            run(
                "dynamic",
                Some(3),
                vec![
                    rec(0, Some(300.0), 2_000, 2_000),
                    rec(1, Some(600.0), 2_000, 2_000),
                    rec(2, Some(2000.0), 2_000, 2_000),
                    rec(3, Some(900.0), 2_000, 2_000),
                ],
            ),
        ])
    }

    #[test]
    fn pooling_and_spread_over_seeds() {
        let r = seeded();
        let s = summaries(&r, 1000.0);
        let order: Vec<(&str, Option<u64>)> = s.iter().map(|x| (x.policy.as_str(), x.seed)).collect();
        assert_eq!(
            order,
            [
                ("static", Some(1)),
                ("dynamic", Some(1)),
                ("dynamic", Some(2)),
                ("dynamic", Some(3))
            ]
        );
        let p = pool(&r, &s, 1000.0);
        assert_eq!(p.len(), 2);
        let d = &p[1];
        assert_eq!(
            (d.policy.as_str(), d.seeds.clone()),
            ("dynamic", vec![Some(1), Some(2), Some(3)])
        );
        let f = &d.figures;
        // 9 requests, one failed; 6 of them within 1000 ms (the failure is a miss).
        assert_eq!((f.requests, f.ok, f.errors), (9, 8, 1));
        assert_eq!(f.slo_attainment, Some(6.0 / 9.0));
        // Percentiles over the 8 pooled TTFTs: 100 200 300 400 600 900 1200 2000.
        assert_eq!(f.ttft_p50_ms, Some(500.0));
        assert!((f.ttft_p90_ms.unwrap() - 1440.0).abs() < 1e-9);
        assert!((f.ttft_p99_ms.unwrap() - 1944.0).abs() < 1e-9);
        // Retention is a ratio of the sums over successful requests:
        // (2·2000 + 2·1000 + 4·2000) / (2·4000 + 2·4000 + 4·2000).
        assert_eq!(f.retention, Some(14_000.0 / 24_000.0));
        assert_eq!(f.tokens_kept_per_image, Some(14_000.0 / 8.0));
        // Per-seed attainment: 1.0, 1/3, 0.75; per-seed p99: 199, 1192, 1967.
        let a = d.slo_attainment_spread.unwrap();
        assert_eq!((a.min, a.max, a.runs), (1.0 / 3.0, 1.0, 3));
        let q = d.ttft_p99_spread.unwrap();
        assert!(
            (q.min - 199.0).abs() < 1e-9 && (q.max - 1967.0).abs() < 1e-9,
            "{q:?}"
        );
        // The pooled figures are not the mean of the runs' figures.
        let mean_att: f64 = s[1..]
            .iter()
            .filter_map(|x| x.figures.slo_attainment)
            .sum::<f64>()
            / 3.0;
        assert!((mean_att - 6.0 / 9.0).abs() > 0.01);

        let t = pooled_table(&p, 1000.0);
        assert!(
            t.contains("| peak-4 | dynamic | 9 | 1 | 500 | 1440 | 1944 | 66.7% | 33.3%–100.0% | 199–1967 | 1750 of 3000 | 58.3% | 1, 2, 3 |"),
            "{t}"
        );
        // One run: its own value, not a range.
        assert!(t.contains("| peak-4 | static | 1 | 0 | 700 | 700 | 700 | 100.0% | 100.0% | 700 | 4000 of 8000 | 50.0% | 1 |"), "{t}");
        let t = run_table(&s, 1000.0);
        assert!(t.contains("| peak-4 | 2 | dynamic | 3 | 1 | 800 |"), "{t}");
        assert!(t.contains("| peak-4 | 3 | dynamic | 4 | 0 |"), "{t}");
    }

    #[test]
    fn curves_pool_seeds_and_names() {
        let r = single();
        let c = curves(&r, "peak-4");
        assert_eq!(
            c.iter().map(|c| c.label.as_str()).collect::<Vec<_>>(),
            ["vanilla", "dynamic"]
        );
        assert_eq!(c[0].points.last().map(|p| p.1), Some(2.0 / 3.0));
        assert_eq!(plot_name(&r, "peak-4"), "ttft-cdf-4.png");
        let r = seeded();
        let c = curves(&r, "peak-4");
        assert_eq!(
            c.iter().map(|c| c.label.as_str()).collect::<Vec<_>>(),
            ["static", "dynamic (3 seeds)"]
        );
        // All 9 dynamic requests: 8 points, ending at the success share.
        assert_eq!(c[1].points.len(), 8);
        assert_eq!(c[1].points.first(), Some(&(100.0, 1.0 / 9.0)));
        assert_eq!(c[1].points.last(), Some(&(2000.0, 8.0 / 9.0)));
        // The same seed twice (merged files): runs, not seeds.
        let mut twice = seeded();
        let again = twice.runs[2].clone();
        twice.runs.push(again);
        let c = curves(&twice, "peak-4");
        assert_eq!(c[0].label, "static (2 runs)");
    }

    #[test]
    fn prediction_tables() {
        let terms = "transcode=10,encode_wait=50,encode=150,pd_wait=20,prefill=80,kv=3";
        let obs = |r: RequestRecord, margin: Option<&str>| {
            let r = with(
                r,
                &[
                    (PREDICTED, "400"),
                    (TERMS, terms),
                    ("x-vlm-encode-ms", "250"),
                    ("x-emulator-queue-ms", "20"),
                    ("x-emulator-prefill-ms", "100"),
                ],
            );
            match margin {
                Some(m) => with(r, &[(MARGIN, m)]),
                None => r,
            }
        };
        let r = results(vec![
            run("vanilla", Some(1), vec![rec(0, Some(900.0), 4000, 4000)]),
            run(
                "dynamic",
                Some(1),
                vec![obs(rec(0, Some(500.0), 4000, 2000), None)],
            ),
            run(
                "dynamic",
                Some(2),
                vec![
                    obs(rec(0, Some(700.0), 4000, 2000), Some("100")),
                    obs(rec(1, None, 4000, 2000), Some("100")),
                ],
            ),
        ]);
        let s = summaries(&r, 1000.0);
        let p = pool(&r, &s, 1000.0);
        let (pooled, runs) = prediction_rows(&p, &s);
        // Only the dynamic runs have predictions.
        assert_eq!(pooled.len(), 1);
        assert_eq!(
            runs.iter().map(|x| x.seeds.as_str()).collect::<Vec<_>>(),
            ["1", "2"]
        );
        let pp = pooled[0].prediction;
        // Errors before: 100 and 300; after: 700 − 500 = 200 on seed 2 only.
        assert_eq!(
            (pp.requests, pp.before.p50, pp.after.n, pp.after.p50),
            (2, Some(200.0), 1, Some(200.0))
        );
        let t = prediction_table(&pooled);
        assert!(t.contains("| peak-4 | dynamic | 1, 2 | 2 | +120 | +200 | +280 | +298 | +200 | 1 | +100 | +200 | +200 | +200 | +200 | +200 |"), "{t}");
        let t = prediction_table(&runs);
        assert!(
            t.contains(
                "| peak-4 | dynamic | 1 | 1 | +100 | +100 | +100 | +100 | +100 | 0 | – | – | – | – | – | – |"
            ),
            "{t}"
        );
        let t = terms_table(&pooled);
        assert!(t.contains("| kv |"), "{t}");
        // transcode observed 10 (the fixture's header): 0 error; encode: 50 + 150 → 250.
        assert!(
            t.contains("| peak-4 | dynamic | 1, 2 | 2 | – | 10 → 10 (0) | 50 + 150 → 250 (+50) | 20 → 20 (0) | 80 → 100 (+20) | 87 → 220 (+133) | 400 → 600 (+200) | 3 → – |"),
            "{t}"
        );
    }

    #[test]
    fn numbers_are_formatted_without_negative_zero() {
        assert_eq!(ms(Some(-0.3)), "0");
        assert_eq!(ms(Some(1649.6)), "1650");
        assert_eq!(ms(None), "–");
        assert_eq!(signed(-0.4), "0");
        assert_eq!(signed(2.5), "+3");
        assert_eq!(signed(-40.2), "-40");
        let s = |min, max| Some(Spread { min, max, runs: 2 });
        assert_eq!(range(s(0.5, 0.75), pct), "50.0%–75.0%");
        assert_eq!(range(s(700.2, 699.8), ms), "700");
        assert_eq!(range(None, ms), "–");
    }

    #[test]
    fn report_without_predictions_says_so() {
        let r = single();
        let dir = std::env::temp_dir().join(format!("vlm-bench-report-{}", std::process::id()));
        // The plots need a font; the Markdown is written either way.
        let _ = write(&r, &dir, None, Path::new("/no/such/font.ttf"));
        let md = std::fs::read_to_string(dir.join("report.md")).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(md.contains("## Results (pooled over seeds)"), "{md}");
        assert!(md.contains("## Results per seed"), "{md}");
        assert!(md.contains("No successful request carried"), "{md}");
        assert!(md.contains("## TTFT CDF plots (pooled over seeds)"), "{md}");
        // Predictions without terms (filter builds before them): the error
        // table, and a line instead of the terms tables.
        let r = results(vec![run(
            "dynamic",
            None,
            vec![with(rec(0, Some(500.0), 4000, 2000), &[(PREDICTED, "450")])],
        )]);
        let _ = write(&r, &dir, None, Path::new("/no/such/font.ttf"));
        let md = std::fs::read_to_string(dir.join("report.md")).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(md.contains("| peak-4 | dynamic | – | 1 | +50 |"), "{md}");
        assert!(
            md.contains("No successful request carried `x-vlm-ttft-terms`."),
            "{md}"
        );
    }
}
