//! The whole experiment: traces, images, and for every (trace, policy) a
//! fresh Envoy with the filter configured for the policy in front of the
//! backends (restarted for cold encoder caches), an open-loop replay, then the
//! report.

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
    pub seed: u64,
    pub slo_ms: f64,
    pub static_budget: u64,
    pub plugin_overrides: Vec<(String, Value)>,
    pub photos: PathBuf,
    pub pool_dir: PathBuf,
    pub sizes: Vec<u32>,
    pub jpeg_quality: u8,
    /// Use these image files (chosen by seed) instead of building a pool.
    pub images: Option<PathBuf>,
    pub prompt: String,
    pub max_tokens: u64,
    pub model: String,
    pub envoy: PathBuf,
    pub wasm: PathBuf,
    pub envoy_concurrency: usize,
    pub backends: BackendMode,
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

/// The generated and user traces, with images assigned.
pub fn build_traces(o: &BenchOptions) -> Result<(Vec<Trace>, Value)> {
    let mut traces = Vec::new();
    let mut arrivals = Vec::new();
    for &peak in &o.peaks {
        let s = shape(o, peak);
        arrivals.push((
            s,
            trace::arrivals(&s, derive(o.seed, (peak * 1000.0).round() as u64))?,
        ));
    }
    let needed: usize = arrivals.iter().map(|(_, a)| a.len()).sum();
    let image_info;
    let mut pick: Box<dyn Iterator<Item = PathBuf>> = match &o.images {
        Some(dir) => {
            let mut files = images::list_images(dir)?;
            Rng::new(derive(o.seed, 77)).shuffle(&mut files);
            image_info = json!(format!(
                "{} image files from {} (seeded order{})",
                files.len(),
                dir.display(),
                if files.len() < needed {
                    ", repeated: the encoder cache will hit on repeats"
                } else {
                    ""
                }
            ));
            Box::new(files.into_iter().cycle().take(needed))
        }
        None if needed == 0 => {
            image_info = Value::Null;
            Box::new(std::iter::empty())
        }
        None => {
            let pool = images::build_pool(
                &o.photos,
                &o.pool_dir,
                needed,
                &o.sizes,
                o.seed,
                o.jpeg_quality,
                o.threads,
            )?;
            image_info = pool_description(o, &pool);
            let dir = o.pool_dir.clone();
            Box::new(
                pool.into_iter()
                    .map(move |p| dir.join(p.file))
                    .collect::<Vec<_>>()
                    .into_iter(),
            )
        }
    };
    for (s, a) in arrivals {
        let requests = trace::with_images(&a, &mut pick, &o.prompt, o.max_tokens)?;
        traces.push(Trace {
            name: format!("peak-{}", report::fmt_rate(s.peak_rps)),
            shape: Some(s),
            requests,
        });
    }
    for path in &o.traces {
        let requests = trace::read_jsonl(path)?;
        let name = path
            .file_stem()
            .map_or_else(|| "trace".into(), |s| s.to_string_lossy().into_owned());
        traces.push(Trace {
            name,
            shape: None,
            requests,
        });
    }
    let mut names: Vec<&str> = traces.iter().map(|t| t.name.as_str()).collect();
    names.sort_unstable();
    if names.windows(2).any(|w| w[0] == w[1]) {
        return Err(BenchError::Usage("two traces have the same name".into()));
    }
    Ok((traces, image_info))
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
            let mut all = vec![
                "--role".into(),
                "both".into(),
                "--encode-port".into(),
                ep.to_string(),
                "--pd-port".into(),
                pp.to_string(),
            ];
            all.extend(args.iter().cloned());
            let log = o.log_dir.join(format!("emulator-{tag}.log"));
            let p = Proc::spawn("emulator", binary, &all, &log)?;
            Backend {
                proc: Some(p),
                encode: Url::parse(&format!("http://127.0.0.1:{ep}"))?,
                pd: Url::parse(&format!("http://127.0.0.1:{pp}"))?,
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
            }
        }
    };
    for url in [&b.encode, &b.pd] {
        if let Err(e) = http::wait_ok(url, "/health", o.ready_timeout).await {
            let tail = b.proc.as_ref().map(|p| p.log_tail(2000)).unwrap_or_default();
            return Err(BenchError::Process(format!("backends not ready: {e}\n{tail}")));
        }
    }
    Ok(b)
}

async fn start_envoy(o: &BenchOptions, b: &Backend, plugin: &Value, tag: &str) -> Result<(Proc, Url)> {
    let (listen, admin) = (procs::free_port()?, procs::free_port()?);
    let cfg = envoy::config(listen, admin, &o.wasm, plugin, &b.pd, &b.encode);
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
        envoy::plugin_config(p, o.slo_ms, o.static_budget, &o.plugin_overrides)?;
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
        // Image paths relative to the trace file, as `trace::read_jsonl` resolves them.
        let portable: Vec<trace::TraceRequest> = t
            .requests
            .iter()
            .map(|r| trace::TraceRequest {
                images: r.images.iter().map(|p| relative_to(p, &trace_dir)).collect(),
                ..r.clone()
            })
            .collect();
        trace::write_jsonl(&trace_dir.join(format!("{}.jsonl", t.name)), &portable)?;
        let s = trace::summarise(&t.requests);
        let shape = t.shape.map_or_else(|| "user trace".to_string(), |s| s.describe());
        described.push(json!(format!(
            "{}: {shape}; {} requests, {} images, {} output tokens max, last arrival {:.1} s, busiest second {} arrivals (traces/{}.jsonl)",
            t.name,
            s.requests,
            s.images,
            t.requests.first().map_or(0, |r| r.max_tokens),
            s.duration_s,
            s.peak_1s,
            t.name
        )));
    }
    setup.insert("traces".into(), Value::Array(described));
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
                "`{}` (one process: an encode instance and a prefill/decode instance on 127.0.0.1, one emulated H100 each; restarted {})",
                std::iter::once(binary.display().to_string()).chain(args.iter().cloned()).collect::<Vec<_>>().join(" "),
                if o.restart == Restart::PerRun { "before every run" } else { "before each policy" }
            ),
            encode_url: None,
            pd_url: None,
        },
        BackendMode::External { encode, pd, cmd } => Backends {
            emulated: false,
            description: format!(
                "encode {encode}, prefill/decode {pd}{}",
                cmd.as_ref().map(|c| format!(", started with `{c}`")).unwrap_or_default()
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
    // under the same background load); policy-major otherwise.
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
        let tag = format!("{}-{policy}", t.name);
        let restart = o.restart == Restart::PerRun || last_policy != Some(policy);
        if restart || backend.is_none() {
            drop(backend.take());
            backend = Some(start_backends(o, &tag).await?);
        }
        last_policy = Some(policy);
        let b = backend
            .as_ref()
            .ok_or_else(|| BenchError::Process("no backends".into()))?;
        let plugin = envoy::plugin_config(policy, o.slo_ms, o.static_budget, &o.plugin_overrides)?;
        let (mut envoy_proc, url) = start_envoy(o, b, &plugin, &tag).await?;
        if o.progress {
            eprintln!(
                "run {}/{}: {} under {policy} ({} requests)",
                k + 1,
                plan.len(),
                t.name,
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
            shape: t.shape,
            plugin_config: Some(plugin),
            started_unix_s: started,
            wall_s: wall,
            cpu: Some(cpu),
            requests: records,
        };
        if o.progress {
            let s = report::summarise(&run, o.slo_ms);
            let f = |v: Option<f64>| v.map_or_else(|| "–".into(), |v| format!("{v:.0}"));
            eprintln!(
                "  {}: {} requests, {} errors, TTFT p50 {} p90 {} p99 {} ms, TTFT ≤ SLO {:.1}%, retention {:.1}%",
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
