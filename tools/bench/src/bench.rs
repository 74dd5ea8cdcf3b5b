//! The whole experiment: traces (one per peak and seed, plus user traces),
//! images, and for every (trace, policy) a fresh Envoy with the filter
//! configured for the policy in front of the backends (restarted for cold
//! encoder caches), an open-loop replay, then the report.

use crate::envoy;
use crate::error::{BenchError, Result};
use crate::http::{self, Url};
use crate::images;
use crate::procs::{self, CpuMeter, Proc};
use crate::replay::{self, ReplayOptions};
use crate::report;
use crate::results::{now_unix_s, Backends, Results, Run};
use crate::rng::{derive, Rng};
use crate::trace::{self, Shape, Trace};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where the backends come from.
#[derive(Debug, Clone)]
pub enum BackendMode {
    /// The project's emulator, started by the bench on free local ports.
    Emulator { binary: PathBuf, args: Vec<String> },
    /// Backends at fixed URLs, optionally started by a shell command.
    External {
        encode: Url,
        pd: Url,
        cmd: Option<String>,
    },
}

/// When the backends are restarted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restart {
    /// Before every (trace, policy) run: cold caches and empty queues for each.
    PerRun,
    /// Before each policy's runs (for backends that are slow to start).
    PerPolicy,
}

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub out: PathBuf,
    pub policies: Vec<String>,
    pub peaks: Vec<f64>,
    pub traces: Vec<PathBuf>,
    pub base_rps: f64,
    pub ramp_s: f64,
    pub hold_s: f64,
    pub decay_s: f64,
    /// Every peak is run once per seed: its own arrivals and its own images.
    pub seeds: Vec<u64>,
    pub slo_ms: f64,
    pub static_budget: u64,
    pub plugin_overrides: Vec<(String, Value)>,
    pub photos: PathBuf,
    pub pool_dir: PathBuf,
    pub sizes: Vec<u32>,
    pub jpeg_quality: u8,
    /// Use these image files (in an order per seed) instead of building pools.
    pub images: Option<PathBuf>,
    pub prompt: String,
    pub max_tokens: u64,
    pub model: String,
    pub envoy: PathBuf,
    pub wasm: PathBuf,
    pub envoy_concurrency: usize,
    pub backends: BackendMode,
    /// 1E1P1D: the emulator's split roles (encode, prefill, decode) and the
    /// filter's prefill cluster.
    pub split: bool,
    pub restart: Restart,
    pub ready_timeout: Duration,
    pub request_timeout: Duration,
    pub log_dir: PathBuf,
    pub font: PathBuf,
    pub cooldown: Duration,
    pub ignore_eos: bool,
    pub threads: usize,
    pub progress: bool,
    pub command: Vec<String>,
}

/// Running backends.
struct Backend {
    proc: Option<Proc>,
    encode: Url,
    pd: Url,
    /// The prefill instance of a 1E1P1D run.
    prefill: Option<Url>,
}

/// The plugin configuration of `policy` in this run.
fn plugin_for(o: &BenchOptions, policy: &str) -> Result<Value> {
    let mut overrides = if o.split {
        envoy::split_overrides()
    } else {
        Vec::new()
    };
    overrides.extend(o.plugin_overrides.iter().cloned());
    envoy::plugin_config(policy, o.slo_ms, o.static_budget, &overrides)
}

fn shape(o: &BenchOptions, peak: f64) -> Shape {
    Shape {
        base_rps: o.base_rps.min(peak),
        peak_rps: peak,
        ramp_s: o.ramp_s,
        hold_s: o.hold_s,
        decay_s: o.decay_s,
    }
}

/// Checks a seed list: not empty, no seed twice.
pub fn check_seeds(seeds: &[u64]) -> Result<()> {
    if seeds.is_empty() {
        return Err(BenchError::Usage("--seeds: no seed given".into()));
    }
    let mut sorted = seeds.to_vec();
    sorted.sort_unstable();
    if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
        return Err(BenchError::Usage(format!("--seeds: seed {} given twice", w[0])));
    }
    Ok(())
}

/// The arrivals of the trace of `peak` under `seed`.
pub fn seeded_arrivals(s: &Shape, seed: u64) -> Result<Vec<f64>> {
    trace::arrivals(s, derive(seed, (s.peak_rps * 1000.0).round() as u64))
}

/// Where the pool of `seed` is cached.
pub fn pool_dir(o: &BenchOptions, seed: u64) -> PathBuf {
    o.pool_dir.join(format!("seed-{seed}"))
}

/// The images of one seed's traces, in order: the seed's own pool (`needed`
/// distinct images), or the files of `--images` in the seed's order.
fn seed_images(o: &BenchOptions, seed: u64, needed: usize) -> Result<(Vec<PathBuf>, Option<Value>)> {
    if needed == 0 {
        return Ok((Vec::new(), None));
    }
    match &o.images {
        Some(dir) => {
            let mut files = images::list_images(dir)?;
            Rng::new(derive(seed, 77)).shuffle(&mut files);
            let n = files.len();
            let note = (n < needed).then(|| {
                json!(format!(
                    "seed {seed}: {needed} requests but {n} image files: repeated, the encoder cache will hit on repeats"
                ))
            });
            Ok((files.into_iter().cycle().take(needed).collect(), note))
        }
        None => {
            let dir = pool_dir(o, seed);
            let pool =
                images::build_pool(&o.photos, &dir, needed, &o.sizes, seed, o.jpeg_quality, o.threads)?;
            let info = json!(format!("seed {seed}: {}", pool_description(o, &pool)));
            Ok((pool.into_iter().map(|p| dir.join(p.file)).collect(), Some(info)))
        }
    }
}

/// The generated traces (seed by seed, peak by peak) and the user traces,
/// with images assigned, and a description of the images.
pub fn build_traces(o: &BenchOptions) -> Result<(Vec<Trace>, Value)> {
    let mut traces = Vec::new();
    let mut image_info = Vec::new();
    let seeds: &[u64] = if o.peaks.is_empty() {
        &[]
    } else {
        check_seeds(&o.seeds)?;
        &o.seeds
    };
    for &seed in seeds {
        let mut arrivals = Vec::new();
        for &peak in &o.peaks {
            let s = shape(o, peak);
            arrivals.push((s, seeded_arrivals(&s, seed)?));
        }
        let needed: usize = arrivals.iter().map(|(_, a)| a.len()).sum();
        let (files, info) = seed_images(o, seed, needed)?;
        image_info.extend(info);
        let mut pick = files.into_iter();
        for (s, a) in arrivals {
            let requests = trace::with_images(&a, &mut pick, &o.prompt, o.max_tokens)?;
            traces.push(Trace {
                name: format!("peak-{}", report::fmt_rate(s.peak_rps)),
                seed: Some(seed),
                shape: Some(s),
                requests,
            });
        }
    }
    if let (Some(dir), false) = (&o.images, traces.is_empty()) {
        image_info.insert(
            0,
            json!(format!(
                "image files from {} in a seeded order per seed",
                dir.display()
            )),
        );
    }
    for path in &o.traces {
        let requests = trace::read_jsonl(path)?;
        let name = path
            .file_stem()
            .map_or_else(|| "trace".into(), |s| s.to_string_lossy().into_owned());
        traces.push(Trace {
            name,
            seed: None,
            shape: None,
            requests,
        });
    }
    // Runs of one name are pooled: a user trace may not share a generated one's.
    let generated: Vec<&str> = traces
        .iter()
        .filter(|t| t.seed.is_some())
        .map(|t| t.name.as_str())
        .collect();
    let mut labels: Vec<String> = traces.iter().map(Trace::label).collect();
    labels.sort_unstable();
    if labels.windows(2).any(|w| w[0] == w[1])
        || traces
            .iter()
            .any(|t| t.seed.is_none() && generated.contains(&t.name.as_str()))
    {
        return Err(BenchError::Usage("two traces have the same name".into()));
    }
    let info = match image_info.len() {
        0 => Value::Null,
        1 => image_info.remove(0),
        _ => Value::Array(image_info),
    };
    Ok((traces, info))
}

fn pool_description(o: &BenchOptions, pool: &[images::PoolImage]) -> Value {
    let n = pool.len().max(1) as f64;
    let tokens: u64 = pool.iter().map(|p| p.tokens).sum();
    let big = pool.iter().filter(|p| p.tokens > o.static_budget).count();
    json!(format!(
        "{} distinct JPEGs (quality {}) cut from the {} photographs in {}: a seeded crop of 90-100% of each side, mirrored half the time, long side one of {:?} px (never upscaled); mean {:.0} visual tokens per image, {:.0}% above the static budget of {}, mean {:.2} MB",
        pool.len(),
        o.jpeg_quality,
        pool.iter().map(|p| p.source.as_str()).collect::<std::collections::BTreeSet<_>>().len(),
        o.photos.display(),
        o.sizes,
        tokens as f64 / n,
        big as f64 * 100.0 / n,
        o.static_budget,
        pool.iter().map(|p| p.bytes).sum::<u64>() as f64 / n / 1e6,
    ))
}

async fn start_backends(o: &BenchOptions, tag: &str) -> Result<Backend> {
    let b = match &o.backends {
        BackendMode::Emulator { binary, args } => {
            let (ep, pp) = (procs::free_port()?, procs::free_port()?);
            let role = if o.split { "split" } else { "both" };
            let mut all = vec![
                "--role".into(),
                role.into(),
                "--encode-port".into(),
                ep.to_string(),
                "--pd-port".into(),
                pp.to_string(),
            ];
            let prefill = if o.split {
                let port = procs::free_port()?;
                all.extend(["--prefill-port".into(), port.to_string()]);
                Some(Url::parse(&format!("http://127.0.0.1:{port}"))?)
            } else {
                None
            };
            all.extend(args.iter().cloned());
            let log = o.log_dir.join(format!("emulator-{tag}.log"));
            let p = Proc::spawn("emulator", binary, &all, &log)?;
            Backend {
                proc: Some(p),
                encode: Url::parse(&format!("http://127.0.0.1:{ep}"))?,
                pd: Url::parse(&format!("http://127.0.0.1:{pp}"))?,
                prefill,
            }
        }
        BackendMode::External { encode, pd, cmd } => {
            let proc = match cmd {
                Some(c) => Some(Proc::shell(
                    "backends",
                    c,
                    &o.log_dir.join(format!("backends-{tag}.log")),
                )?),
                None => None,
            };
            Backend {
                proc,
                encode: encode.clone(),
                pd: pd.clone(),
                prefill: None,
            }
        }
    };
    for url in [Some(&b.encode), Some(&b.pd), b.prefill.as_ref()]
        .into_iter()
        .flatten()
    {
        if let Err(e) = http::wait_ok(url, "/health", o.ready_timeout).await {
            let tail = b.proc.as_ref().map(|p| p.log_tail(2000)).unwrap_or_default();
            return Err(BenchError::Process(format!("backends not ready: {e}\n{tail}")));
        }
    }
    Ok(b)
}

async fn start_envoy(o: &BenchOptions, b: &Backend, plugin: &Value, tag: &str) -> Result<(Proc, Url)> {
    let (listen, admin) = (procs::free_port()?, procs::free_port()?);
    let cfg = envoy::config(
        listen,
        admin,
        &o.wasm,
        plugin,
        &b.pd,
        &b.encode,
        b.prefill.as_ref(),
    );
    let path = o.log_dir.join(format!("envoy-{tag}.json"));
    std::fs::write(&path, cfg.to_string()).map_err(|e| BenchError::io(&path, e))?;
    let args: Vec<String> = vec![
        "-c".into(),
        path.display().to_string(),
        "--concurrency".into(),
        o.envoy_concurrency.to_string(),
        "--base-id".into(),
        listen.to_string(),
        "--log-level".into(),
        "warn".into(),
        "--component-log-level".into(),
        "wasm:warn".into(),
    ];
    let mut p = Proc::spawn(
        "envoy",
        &o.envoy,
        &args,
        &o.log_dir.join(format!("envoy-{tag}.log")),
    )?;
    let admin_url = Url::parse(&format!("http://127.0.0.1:{admin}"))?;
    if let Err(e) = http::wait_ok(&admin_url, "/ready", Duration::from_secs(60)).await {
        let why = p.exited().map(|s| format!(" (exited: {s})")).unwrap_or_default();
        return Err(BenchError::Process(format!(
            "envoy not ready{why}: {e}\n{}",
            p.log_tail(3000)
        )));
    }
    Ok((p, Url::parse(&format!("http://127.0.0.1:{listen}"))?))
}

/// `path` relative to the folder `base` (both made absolute); `path` itself
/// when that is not possible.
pub fn relative_to(path: &Path, base: &Path) -> PathBuf {
    let (Ok(p), Ok(b)) = (std::path::absolute(path), std::path::absolute(base)) else {
        return path.to_path_buf();
    };
    let (pc, bc): (Vec<_>, Vec<_>) = (p.components().collect(), b.components().collect());
    let common = pc.iter().zip(&bc).take_while(|(x, y)| x == y).count();
    if common == 0 {
        return path.to_path_buf();
    }
    let mut out = PathBuf::new();
    for _ in common..bc.len() {
        out.push("..");
    }
    for c in &pc[common..] {
        out.push(c);
    }
    out
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// Runs the experiment and writes `results.json`, `report.md` and the plots.
pub async fn run(o: &BenchOptions) -> Result<report::Written> {
    let t_start = Instant::now();
    for dir in [&o.out, &o.log_dir] {
        std::fs::create_dir_all(dir).map_err(|e| BenchError::io(dir, e))?;
    }
    for p in &o.policies {
        plugin_for(o, p)?;
    }
    if o.split && !matches!(o.backends, BackendMode::Emulator { .. }) {
        return Err(BenchError::Usage(
            "--split runs on the emulator's split roles (no external backends)".into(),
        ));
    }
    if !o.envoy.is_file() {
        return Err(BenchError::Usage(format!(
            "no Envoy binary at {} (make venv)",
            o.envoy.display()
        )));
    }
    if !o.wasm.is_file() {
        return Err(BenchError::Usage(format!(
            "no filter module at {} (make wasm)",
            o.wasm.display()
        )));
    }
    if let BackendMode::Emulator { binary, .. } = &o.backends {
        if !binary.is_file() {
            return Err(BenchError::Usage(format!(
                "no emulator at {} (make emulator)",
                binary.display()
            )));
        }
    }
    let (traces, image_info) = build_traces(o)?;
    if traces.is_empty() || o.policies.is_empty() {
        return Err(BenchError::Usage(
            "nothing to run: no traces or no policies".into(),
        ));
    }
    let trace_dir = o.out.join("traces");
    std::fs::create_dir_all(&trace_dir).map_err(|e| BenchError::io(&trace_dir, e))?;
    let mut setup: BTreeMap<String, Value> = BTreeMap::new();
    let mut described = Vec::new();
    for t in &traces {
        let label = t.label();
        // Image paths relative to the trace file, as `trace::read_jsonl` resolves them.
        let portable: Vec<trace::TraceRequest> = t
            .requests
            .iter()
            .map(|r| trace::TraceRequest {
                images: r.images.iter().map(|p| relative_to(p, &trace_dir)).collect(),
                ..r.clone()
            })
            .collect();
        trace::write_jsonl(&trace_dir.join(format!("{label}.jsonl")), &portable)?;
        let s = trace::summarise(&t.requests);
        let shape = t.shape.map_or_else(|| "user trace".to_string(), |s| s.describe());
        described.push(json!(format!(
            "{label}: {shape}; {} requests, {} images, {} output tokens max, last arrival {:.1} s, busiest second {} arrivals (traces/{label}.jsonl)",
            s.requests,
            s.images,
            t.requests.first().map_or(0, |r| r.max_tokens),
            s.duration_s,
            s.peak_1s,
        )));
    }
    setup.insert("traces".into(), Value::Array(described));
    let seeds: Vec<u64> = traces.iter().filter_map(|t| t.seed).fold(Vec::new(), |mut v, s| {
        if !v.contains(&s) {
            v.push(s);
        }
        v
    });
    if !seeds.is_empty() {
        setup.insert(
            "seeds".into(),
            json!(format!(
                "{} (each peak once per seed: arrivals and images from the seed; results pooled over seeds, with the spread between them)",
                seeds.iter().map(u64::to_string).collect::<Vec<_>>().join(", ")
            )),
        );
    }
    if !image_info.is_null() {
        setup.insert("images".into(), image_info);
    }
    setup.insert(
        "machine".into(),
        json!(format!(
            "{} CPUs ({}), shared with other work",
            procs::cpus(),
            cpu_model()
        )),
    );
    setup.insert(
        "envoy".into(),
        json!(format!(
            "{} --concurrency {}, filter {}",
            o.envoy.display(),
            o.envoy_concurrency,
            o.wasm.display()
        )),
    );
    let backends = match &o.backends {
        BackendMode::Emulator { binary, args } => Backends {
            emulated: true,
            description: format!(
                "`{}` (one process: {} on 127.0.0.1, one emulated H100 each; restarted {})",
                std::iter::once(binary.display().to_string())
                    .chain(args.iter().cloned())
                    .collect::<Vec<_>>()
                    .join(" "),
                if o.split {
                    "1E1P1D, an encode, a prefill and a decode instance (--role split, vLLM's KV-transfer handshake)"
                } else {
                    "an encode instance and a prefill/decode instance"
                },
                if o.restart == Restart::PerRun {
                    "before every run"
                } else {
                    "before each policy"
                }
            ),
            encode_url: None,
            pd_url: None,
        },
        BackendMode::External { encode, pd, cmd } => Backends {
            emulated: false,
            description: format!(
                "encode {encode}, prefill/decode {pd}{}",
                cmd.as_ref()
                    .map(|c| format!(", started with `{c}`"))
                    .unwrap_or_default()
            ),
            encode_url: Some(encode.to_string()),
            pd_url: Some(pd.to_string()),
        },
    };
    let mut results = Results {
        tool: format!("vlm-bench {}", env!("CARGO_PKG_VERSION")),
        command: o.command.clone(),
        created_unix_s: now_unix_s(),
        slo_ms: o.slo_ms,
        backends,
        setup,
        runs: Vec::new(),
    };
    // Trace-major with a restart per run (neighbouring runs compare policies
    // under the same background load; traces go seed by seed, so a partial
    // experiment has whole seeds); policy-major otherwise.
    let mut plan: Vec<(usize, &str)> = Vec::new();
    if o.restart == Restart::PerRun {
        for ti in 0..traces.len() {
            plan.extend(o.policies.iter().map(|p| (ti, p.as_str())));
        }
    } else {
        for p in &o.policies {
            plan.extend((0..traces.len()).map(|ti| (ti, p.as_str())));
        }
    }
    let mut backend: Option<Backend> = None;
    let mut last_policy: Option<&str> = None;
    let results_path = o.out.join("results.json");
    for (k, &(ti, policy)) in plan.iter().enumerate() {
        let t = &traces[ti];
        let tag = format!("{}-{policy}", t.label());
        let restart = o.restart == Restart::PerRun || last_policy != Some(policy);
        if restart || backend.is_none() {
            drop(backend.take());
            backend = Some(start_backends(o, &tag).await?);
        }
        last_policy = Some(policy);
        let b = backend
            .as_ref()
            .ok_or_else(|| BenchError::Process("no backends".into()))?;
        let plugin = plugin_for(o, policy)?;
        let (mut envoy_proc, url) = start_envoy(o, b, &plugin, &tag).await?;
        if o.progress {
            eprintln!(
                "run {}/{}: {} under {policy} ({} requests)",
                k + 1,
                plan.len(),
                t.label(),
                t.requests.len()
            );
        }
        let mut watched = vec![
            ("envoy".to_string(), envoy_proc.pid().to_string()),
            ("vlm-bench".into(), "self".into()),
        ];
        if let (BackendMode::Emulator { .. }, Some(p)) = (&o.backends, &b.proc) {
            watched.push(("backends".into(), p.pid().to_string()));
        }
        let meter = CpuMeter::start(&watched);
        let started = now_unix_s();
        let ropts = ReplayOptions {
            url,
            path: "/v1/chat/completions".into(),
            model: o.model.clone(),
            request_timeout: o.request_timeout,
            label: tag.clone(),
            headers: Vec::new(),
            ignore_eos: o.ignore_eos,
            progress: o.progress,
        };
        let replayed = replay::replay(&t.requests, &ropts).await;
        let cpu = meter.finish();
        envoy_proc.stop(Duration::from_secs(5));
        let (records, wall) = replayed?;
        let run = Run {
            policy: policy.to_string(),
            trace: t.name.clone(),
            seed: t.seed,
            shape: t.shape,
            plugin_config: Some(plugin),
            started_unix_s: started,
            wall_s: wall,
            cpu: Some(cpu),
            requests: records,
        };
        if o.progress {
            let s = report::summarise(&run, o.slo_ms).figures;
            let f = |v: Option<f64>| v.map_or_else(|| "–".into(), |v| format!("{v:.0}"));
            let p = &s.prediction;
            let predicted = if p.requests > 0 {
                format!(
                    ", observed − predicted TTFT p50 {} p90 {} ms",
                    f(p.before.p50),
                    f(p.before.p90)
                )
            } else {
                String::new()
            };
            eprintln!(
                "  {}: {} requests, {} errors, TTFT p50 {} p90 {} p99 {} ms, TTFT ≤ SLO {:.1}%, retention {:.1}%{predicted}",
                tag,
                s.requests,
                s.errors,
                f(s.ttft_p50_ms),
                f(s.ttft_p90_ms),
                f(s.ttft_p99_ms),
                s.slo_attainment.unwrap_or(0.0) * 100.0,
                s.retention.unwrap_or(0.0) * 100.0
            );
        }
        results.runs.push(run);
        results.write(&results_path)?;
        if k + 1 < plan.len() {
            tokio::time::sleep(o.cooldown).await;
        }
    }
    drop(backend);
    results.setup.insert(
        "bench wall time".into(),
        json!(format!("{:.0} s", t_start.elapsed().as_secs_f64())),
    );
    results.write(&results_path)?;
    report::write(&results, &o.out, None, &o.font)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(images: &Path, seeds: Vec<u64>, peaks: Vec<f64>) -> BenchOptions {
        BenchOptions {
            out: "out".into(),
            policies: vec!["vanilla".into()],
            peaks,
            traces: Vec::new(),
            base_rps: 1.0,
            ramp_s: 1.0,
            hold_s: 4.0,
            decay_s: 1.0,
            seeds,
            slo_ms: 1000.0,
            static_budget: 4096,
            plugin_overrides: Vec::new(),
            photos: "photos".into(),
            pool_dir: "pool".into(),
            sizes: vec![512],
            jpeg_quality: 90,
            images: Some(images.to_path_buf()),
            prompt: "p".into(),
            max_tokens: 8,
            model: "m".into(),
            envoy: "envoy".into(),
            wasm: "w.wasm".into(),
            envoy_concurrency: 1,
            backends: BackendMode::Emulator {
                binary: "emu".into(),
                args: Vec::new(),
            },
            split: false,
            restart: Restart::PerRun,
            ready_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(1),
            log_dir: "logs".into(),
            font: "font.ttf".into(),
            cooldown: Duration::ZERO,
            ignore_eos: false,
            threads: 1,
            progress: false,
            command: Vec::new(),
        }
    }

    #[test]
    fn one_trace_per_peak_and_seed() {
        let dir = std::env::temp_dir().join(format!("vlm-bench-seeds-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for i in 0..200 {
            std::fs::write(dir.join(format!("i{i:03}.jpg")), b"x").unwrap();
        }
        let o = options(&dir, vec![1, 2], vec![4.0, 5.0]);
        let (traces, info) = build_traces(&o).unwrap();
        let labels: Vec<String> = traces.iter().map(Trace::label).collect();
        assert_eq!(
            labels,
            ["peak-4-seed-1", "peak-5-seed-1", "peak-4-seed-2", "peak-5-seed-2"]
        );
        assert_eq!(traces[2].name, "peak-4");
        assert_eq!(traces[2].seed, Some(2));
        // Seed 1 draws the arrivals a single-seed experiment with seed 1 drew.
        let s4 = shape(&o, 4.0);
        let times = |t: &Trace| t.requests.iter().map(|r| r.arrival_s).collect::<Vec<_>>();
        assert_eq!(times(&traces[0]), trace::arrivals(&s4, derive(1, 4000)).unwrap());
        assert_eq!(times(&traces[0]), seeded_arrivals(&s4, 1).unwrap());
        // Another seed: other arrivals and another image order.
        assert_ne!(times(&traces[0]), times(&traces[2]));
        let imgs = |t: &Trace| {
            t.requests
                .iter()
                .flat_map(|r| r.images.clone())
                .collect::<Vec<_>>()
        };
        assert_ne!(imgs(&traces[0])[..5], imgs(&traces[2])[..5]);
        // Within a seed no image repeats across its traces.
        let seed1: Vec<PathBuf> = imgs(&traces[0]).into_iter().chain(imgs(&traces[1])).collect();
        let distinct: std::collections::BTreeSet<&PathBuf> = seed1.iter().collect();
        assert_eq!(distinct.len(), seed1.len());
        // The same options give the same traces.
        assert_eq!(build_traces(&o).unwrap().0, traces);
        assert!(
            info.as_str().is_some_and(|s| s.contains("order per seed")),
            "{info}"
        );
        // A single seed keeps working; seeds must be distinct and not empty.
        let one = build_traces(&options(&dir, vec![1], vec![4.0])).unwrap().0;
        assert_eq!(one.len(), 1);
        assert_eq!(one[0], traces[0]);
        assert!(build_traces(&options(&dir, vec![1, 2, 1], vec![4.0])).is_err());
        assert!(build_traces(&options(&dir, vec![], vec![4.0])).is_err());
        // Without peaks the seeds do not matter (user traces only).
        assert!(build_traces(&options(&dir, vec![], vec![])).unwrap().0.is_empty());
        // A user trace may not take a generated trace's name.
        let user = dir.join("peak-4.jsonl");
        std::fs::write(
            &user,
            "{\"arrival_s\": 0, \"prompt\": \"hi\", \"max_tokens\": 1}\n",
        )
        .unwrap();
        let mut with_user = options(&dir, vec![1], vec![5.0]);
        with_user.traces = vec![user];
        let t = build_traces(&with_user).unwrap().0;
        assert_eq!((t[1].label(), t[1].seed), ("peak-4".to_string(), None));
        with_user.peaks = vec![4.0];
        assert!(build_traces(&with_user).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(pool_dir(&o, 3), PathBuf::from("pool/seed-3"));
    }

    #[test]
    fn relative_paths_resolve_back() {
        let base = Path::new("/repo/bench/results/x/traces");
        let p = relative_to(Path::new("/repo/.cache/pool/img.jpg"), base);
        assert_eq!(p, PathBuf::from("../../../../.cache/pool/img.jpg"));
        assert_eq!(
            relative_to(Path::new("/repo/bench/results/x/traces/a.jpg"), base),
            PathBuf::from("a.jpg")
        );
        // A relative path is taken from the working directory, like the trace reader's base.
        let cwd = std::env::current_dir().unwrap();
        let r = relative_to(Path::new("img/a.jpg"), &cwd.join("out/traces"));
        assert_eq!(r, PathBuf::from("../../img/a.jpg"));
    }
}
