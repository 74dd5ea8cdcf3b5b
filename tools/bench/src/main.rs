//! `vlm-bench`: see `vlm-bench --help` and tools/bench/README.md.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use vlm_bench::bench::{self, BackendMode, BenchOptions, Restart};
use vlm_bench::cli::{self, many, opt, switch, Args, Flag, Parsed};
use vlm_bench::error::{BenchError, Result};
use vlm_bench::http::Url;
use vlm_bench::plot::DEFAULT_FONT;
use vlm_bench::profile::{self, ProfileOptions, Timing};
use vlm_bench::results::{now_unix_s, Backends, Results, Run};
use vlm_bench::trace::{self, Shape};
use vlm_bench::{envoy, images, replay, report};

const USAGE: &str = "\
vlm-bench: TTFT benchmark of vlm-budget's policies under bursty traces.

USAGE: vlm-bench <COMMAND> [FLAGS]     (vlm-bench <COMMAND> --help for its flags)

Commands:
  bench     the whole experiment: traces x policies through Envoy + the filter,
            backends restarted per run, then the report (make bench)
  trace     generate a seeded bursty trace (JSONL), or check a user trace
  images    build the pool of distinct photographs the generated traces use
  run       replay one trace open-loop against an OpenAI endpoint (raw JSON)
  report    Markdown table, CDF plots from raw results
  profile   measure an encode (and PD) endpoint, print the filter's `profile`
";

const MODEL: &str = "Qwen/Qwen2.5-VL-3B-Instruct";
const PROMPT: &str = "Describe this image in detail.";
const SIZES: &str = "512,768,1024,1536,2048,2560,3072,3840";
const PHOTOS: &str = ".cache/testdata/usr/share/backgrounds";
const POOL: &str = ".cache/bench/pool";

const SHAPE_FLAGS: [Flag; 4] = [
    opt(
        "base-rps",
        "RPS",
        Some("1"),
        "rate at the start and end of a generated trace",
    ),
    opt(
        "ramp-s",
        "S",
        Some("10"),
        "seconds to ramp from the base rate to the peak",
    ),
    opt("hold-s", "S", Some("30"), "seconds at the peak"),
    opt(
        "decay-s",
        "S",
        Some("10"),
        "seconds to decay back to the base rate",
    ),
];

const TRACE_FLAGS: [Flag; 7] = [
    opt("peak", "RPS", None, "peak rate of the generated trace"),
    opt(
        "seed",
        "N",
        Some("1"),
        "seed of the arrivals and of the image order",
    ),
    opt(
        "images",
        "DIR",
        None,
        "images to assign (each used once, in seeded order, until they run out)",
    ),
    opt("prompt", "TEXT", Some(PROMPT), "prompt of every request"),
    opt(
        "max-tokens",
        "N",
        Some("64"),
        "max output tokens of every request",
    ),
    opt("out", "FILE", None, "write the trace here (JSONL)"),
    opt(
        "check",
        "FILE",
        None,
        "instead: validate a JSONL trace and print its summary",
    ),
];

const IMAGES_FLAGS: [Flag; 7] = [
    opt("photos", "DIR", Some(PHOTOS), "source photographs (.jpg/.png)"),
    opt(
        "out",
        "DIR",
        Some(POOL),
        "pool folder (reused when its manifest matches)",
    ),
    opt("count", "N", Some("1200"), "images to make"),
    opt("sizes", "LIST", Some(SIZES), "long-side classes, px"),
    opt("seed", "N", Some("1"), "seed"),
    opt("jpeg-quality", "Q", Some("90"), "JPEG quality"),
    opt("threads", "N", Some("2"), "worker threads"),
];

const RUN_FLAGS: [Flag; 11] = [
    opt("trace", "FILE", None, "JSONL trace to replay"),
    opt(
        "url",
        "URL",
        Some("http://127.0.0.1:10000"),
        "OpenAI endpoint (Envoy with the filter, or any server)",
    ),
    opt("path", "PATH", Some("/v1/chat/completions"), "request path"),
    opt("out", "FILE", None, "raw results (JSON)"),
    opt(
        "policy",
        "NAME",
        Some("unknown"),
        "policy label recorded with the run",
    ),
    opt("name", "NAME", None, "trace label [the file's stem]"),
    opt("model", "NAME", Some(MODEL), "model field of the requests"),
    opt("slo-ms", "MS", Some("1000"), "TTFT SLO recorded with the results"),
    opt(
        "request-timeout-s",
        "S",
        Some("120"),
        "give up on a request after this long",
    ),
    many("header", "NAME:VALUE", "extra request header"),
    switch(
        "ignore-eos",
        "add vLLM's ignore_eos: every answer has max_tokens tokens",
    ),
];

const REPORT_FLAGS: [Flag; 4] = [
    many(
        "results",
        "FILE",
        "raw results (from run or bench); several are merged",
    ),
    opt("out", "DIR", None, "where report.md and the plots go"),
    opt("slo-ms", "MS", None, "TTFT SLO [the results' own]"),
    opt(
        "font",
        "TTF",
        Some(DEFAULT_FONT),
        "font of the plots (Debian fonts-dejavu-core)",
    ),
];

const PROFILE_FLAGS: [Flag; 17] = [
    opt(
        "encode-url",
        "URL",
        None,
        "encode endpoint (vLLM encode instance, or the emulator)",
    ),
    opt(
        "pd-url",
        "URL",
        None,
        "prefill/decode endpoint: also fit prefill_ms from text prompts",
    ),
    opt("path", "PATH", Some("/v1/chat/completions"), "request path"),
    opt("model", "NAME", Some(MODEL), "model field of the requests"),
    opt(
        "tokens",
        "LIST",
        Some("1024,2304,4096,6400,9216,12544,16384"),
        "visual-token sizes of the encoder sweep",
    ),
    opt(
        "prefill-tokens",
        "LIST",
        Some("2048,4096,8192,12288,16384"),
        "prompt sizes of the prefill sweep",
    ),
    opt("reps", "N", Some("5"), "measured requests per size"),
    opt("warmup", "N", Some("1"), "unmeasured requests per size first"),
    opt(
        "timing",
        "wall|header:NAME",
        Some("wall"),
        "encoder time: client wall time or a response header in ms",
    ),
    opt(
        "prefill-timing",
        "wall|header:NAME",
        Some("wall"),
        "prefill time, likewise",
    ),
    opt(
        "encode-replicas",
        "N",
        Some("1"),
        "encode_replicas written into the profile",
    ),
    opt("seed", "N", Some("1"), "seed of the test images and prompts"),
    opt("jpeg-quality", "Q", Some("90"), "quality of the test images"),
    opt("request-timeout-s", "S", Some("120"), "per-request timeout"),
    opt("out", "FILE", None, "write the profile section here [stdout]"),
    opt(
        "details",
        "FILE",
        None,
        "write every sample, median and fitted value here (JSON)",
    ),
    switch("quiet", "no progress on stderr"),
];

const BENCH_FLAGS: [Flag; 40] = [
    opt(
        "out",
        "DIR",
        Some("bench/results/emulated"),
        "results.json, report.md, ttft-cdf-*.png, traces/",
    ),
    opt(
        "policies",
        "LIST",
        Some("vanilla,static,dynamic"),
        "policies to compare",
    ),
    opt(
        "peaks",
        "LIST",
        Some("4,5,7,10"),
        "peak rates of the generated traces (empty: none)",
    ),
    many("trace", "FILE", "also replay this JSONL trace"),
    SHAPE_FLAGS[0],
    SHAPE_FLAGS[1],
    SHAPE_FLAGS[2],
    SHAPE_FLAGS[3],
    opt(
        "seeds",
        "LIST",
        Some("1,2,3"),
        "seeds: every peak runs once per seed, with the seed's own arrivals and images",
    ),
    opt("seed", "N", None, "one seed only (short for --seeds N)"),
    opt(
        "slo-ms",
        "MS",
        Some("1000"),
        "TTFT SLO (the dynamic policy's ttft_slo_ms, and the report's)",
    ),
    opt(
        "static-budget",
        "TOKENS",
        Some("4096"),
        "static policy's per-image budget",
    ),
    many(
        "plugin-set",
        "KEY=JSON",
        "override a plugin config field for every policy (dots for nesting)",
    ),
    opt(
        "photos",
        "DIR",
        Some(PHOTOS),
        "photographs the image pool is cut from",
    ),
    opt("pool-dir", "DIR", Some(POOL), "image pool cache"),
    opt("sizes", "LIST", Some(SIZES), "long-side classes of the pool, px"),
    opt("jpeg-quality", "Q", Some("90"), "JPEG quality of the pool"),
    opt("images", "DIR", None, "use these image files instead of a pool"),
    opt(
        "prompt",
        "TEXT",
        Some(PROMPT),
        "prompt of every generated request",
    ),
    opt(
        "max-tokens",
        "N",
        Some("64"),
        "max output tokens of every generated request",
    ),
    opt("model", "NAME", Some(MODEL), "model field of the requests"),
    opt("envoy", "PATH", Some(".venv/bin/envoy"), "Envoy binary"),
    opt(
        "wasm",
        "PATH",
        Some("target/wasm32-wasip1/release/vlm_budget.wasm"),
        "the filter module",
    ),
    opt("envoy-concurrency", "N", Some("2"), "Envoy worker threads"),
    opt(
        "emulator",
        "PATH",
        Some("target/release/vlm-emulator"),
        "backend emulator binary",
    ),
    many(
        "emulator-arg",
        "ARG",
        "extra emulator flag, e.g. --emulator-arg=--jitter-sigma=0",
    ),
    switch(
        "split",
        "1E1P1D: the emulator's encode, prefill and decode roles, the filter's prefill_cluster",
    ),
    switch(
        "no-start-backends",
        "use running backends at --encode-url and --pd-url",
    ),
    opt("encode-url", "URL", None, "external encode endpoint"),
    opt("pd-url", "URL", None, "external prefill/decode endpoint"),
    opt(
        "backend-cmd",
        "CMD",
        None,
        "shell command that starts the external backends (restarted like the emulator)",
    ),
    opt(
        "restart",
        "per-run|per-policy",
        Some("per-run"),
        "when backends are restarted",
    ),
    opt(
        "ready-timeout-s",
        "S",
        Some("120"),
        "wait this long for backends' /health",
    ),
    opt(
        "request-timeout-s",
        "S",
        Some("120"),
        "give up on a request after this long",
    ),
    opt("cooldown-s", "S", Some("2"), "pause between runs"),
    opt(
        "log-dir",
        "DIR",
        Some(".cache/bench/logs"),
        "Envoy and backend logs and configs",
    ),
    opt("font", "TTF", Some(DEFAULT_FONT), "font of the plots"),
    opt("threads", "N", Some("2"), "threads building the image pool"),
    switch("ignore-eos", "add vLLM's ignore_eos to every request"),
    switch("quiet", "no progress on stderr"),
];

fn shape_from(a: &Args, peak: f64) -> Result<Shape> {
    let s = Shape {
        base_rps: a.f64("base-rps")?.min(peak),
        peak_rps: peak,
        ramp_s: a.f64("ramp-s")?,
        hold_s: a.f64("hold-s")?,
        decay_s: a.f64("decay-s")?,
    };
    s.validate()?;
    Ok(s)
}

fn secs(a: &Args, name: &str) -> Result<Duration> {
    let v = a.f64(name)?;
    if v < 0.0 {
        return Err(BenchError::Usage(format!("--{name} must be >= 0")));
    }
    Ok(Duration::from_secs_f64(v))
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| BenchError::Process(format!("cannot start the runtime: {e}")))
}

fn cmd_trace(a: &Args) -> Result<()> {
    if let Some(check) = a.get("check") {
        let reqs = trace::read_jsonl(check.as_ref())?;
        let missing: Vec<String> = reqs
            .iter()
            .flat_map(|r| &r.images)
            .filter(|p| !p.is_file())
            .map(|p| p.display().to_string())
            .collect();
        let s = trace::summarise(&reqs);
        println!(
            "{}",
            serde_json::to_string_pretty(&s).map_err(|e| BenchError::json("summary", e))?
        );
        if !missing.is_empty() {
            return Err(BenchError::Usage(format!(
                "{} image files missing, e.g. {}",
                missing.len(),
                missing[0]
            )));
        }
        return Ok(());
    }
    let peak = a.f64("peak")?;
    let s = shape_from(a, peak)?;
    let seed: u64 = a.num("seed")?;
    let arrivals = trace::arrivals(&s, seed)?;
    let dir = a.path("images")?;
    let mut files = images::list_images(&dir)?;
    vlm_bench::rng::Rng::new(vlm_bench::rng::derive(seed, 77)).shuffle(&mut files);
    if files.len() < arrivals.len() {
        eprintln!(
            "vlm-bench: {} requests but {} images: images repeat (an encoder cache will hit on repeats)",
            arrivals.len(),
            files.len()
        );
    }
    let mut it = files.into_iter().cycle();
    let reqs = trace::with_images(&arrivals, &mut it, a.required("prompt")?, a.num("max-tokens")?)?;
    let out = a.path("out")?;
    trace::write_jsonl(&out, &reqs)?;
    let sum = trace::summarise(&reqs);
    eprintln!(
        "{}: {}; {} requests (expected {:.0}), busiest second {}",
        out.display(),
        s.describe(),
        sum.requests,
        s.cumulative(s.duration_s()),
        sum.peak_1s
    );
    Ok(())
}

fn cmd_images(a: &Args) -> Result<()> {
    let out = a.path("out")?;
    let pool = images::build_pool(
        &a.path("photos")?,
        &out,
        a.num("count")?,
        &a.list("sizes")?,
        a.num("seed")?,
        a.num("jpeg-quality")?,
        a.num("threads")?,
    )?;
    let tokens: u64 = pool.iter().map(|p| p.tokens).sum();
    eprintln!(
        "{}: {} images, mean {:.0} visual tokens",
        out.display(),
        pool.len(),
        tokens as f64 / pool.len().max(1) as f64
    );
    Ok(())
}

fn cmd_run(a: &Args, command: Vec<String>) -> Result<()> {
    let path = a.path("trace")?;
    let reqs = trace::read_jsonl(&path)?;
    let name = match a.get("name") {
        Some(n) => n.to_string(),
        None => path
            .file_stem()
            .map_or_else(|| "trace".into(), |s| s.to_string_lossy().into_owned()),
    };
    let policy = a.required("policy")?.to_string();
    let mut headers = Vec::new();
    for h in a.all("header") {
        let (k, v) = h
            .split_once(':')
            .ok_or_else(|| BenchError::Usage(format!("--header wants NAME:VALUE, got `{h}`")))?;
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    let opts = replay::ReplayOptions {
        url: Url::parse(a.required("url")?)?,
        path: a.required("path")?.to_string(),
        model: a.required("model")?.to_string(),
        request_timeout: secs(a, "request-timeout-s")?,
        label: format!("{name}-{policy}"),
        headers,
        ignore_eos: a.switch("ignore-eos"),
        progress: true,
    };
    let started = now_unix_s();
    let (records, wall) = runtime()?.block_on(replay::replay(&reqs, &opts))?;
    let slo: f64 = a.f64("slo-ms")?;
    let results = Results {
        tool: format!("vlm-bench {}", env!("CARGO_PKG_VERSION")),
        command,
        created_unix_s: started,
        slo_ms: slo,
        backends: Backends {
            emulated: false,
            description: format!("{} (not started by vlm-bench)", opts.url),
            encode_url: None,
            pd_url: None,
        },
        setup: Default::default(),
        runs: vec![Run {
            policy,
            trace: name,
            seed: None,
            shape: None,
            plugin_config: None,
            started_unix_s: started,
            wall_s: wall,
            cpu: None,
            requests: records,
        }],
    };
    let out = a.path("out")?;
    results.write(&out)?;
    let s = report::summarise(&results.runs[0], slo).figures;
    eprintln!(
        "{}: {} requests, {} errors, TTFT p50 {:.0} ms, p99 {:.0} ms",
        out.display(),
        s.requests,
        s.errors,
        s.ttft_p50_ms.unwrap_or(f64::NAN),
        s.ttft_p99_ms.unwrap_or(f64::NAN)
    );
    Ok(())
}

fn cmd_report(a: &Args) -> Result<()> {
    let files = a.all("results");
    if files.is_empty() {
        return Err(BenchError::Usage("--results is required".into()));
    }
    let all = files
        .iter()
        .map(|f| Results::read(f.as_ref()))
        .collect::<Result<Vec<_>>>()?;
    let merged = Results::merge(all)?;
    let slo = if a.given("slo-ms") {
        Some(a.f64("slo-ms")?)
    } else {
        None
    };
    let w = report::write(&merged, &a.path("out")?, slo, &a.path("font")?)?;
    eprintln!("{} and {} plots", w.report.display(), w.plots.len());
    Ok(())
}

fn cmd_profile(a: &Args) -> Result<()> {
    let opts = ProfileOptions {
        encode: Url::parse(a.required("encode-url")?)?,
        pd: a.get("pd-url").map(Url::parse).transpose()?,
        path: a.required("path")?.to_string(),
        model: a.required("model")?.to_string(),
        tokens: a.list("tokens")?,
        prefill_tokens: a.list("prefill-tokens")?,
        reps: a.num("reps")?,
        warmup: a.num("warmup")?,
        timing: Timing::parse(a.required("timing")?)?,
        prefill_timing: Timing::parse(a.required("prefill-timing")?)?,
        encode_replicas: a.num("encode-replicas")?,
        seed: a.num("seed")?,
        request_timeout: secs(a, "request-timeout-s")?,
        jpeg_quality: a.num("jpeg-quality")?,
        progress: !a.switch("quiet"),
    };
    if opts.encode_replicas == 0 {
        return Err(BenchError::Usage("--encode-replicas must be >= 1".into()));
    }
    let p = runtime()?.block_on(profile::run(&opts))?;
    let section = serde_json::to_string_pretty(&p.section()).map_err(|e| BenchError::json("profile", e))?;
    match a.get("out") {
        Some(f) => std::fs::write(f, format!("{section}\n")).map_err(|e| BenchError::io(f, e))?,
        None => println!("{section}"),
    }
    if let Some(f) = a.get("details") {
        let text = serde_json::to_string_pretty(&p).map_err(|e| BenchError::json("details", e))?;
        std::fs::write(f, text).map_err(|e| BenchError::io(f, e))?;
    }
    if !a.switch("quiet") {
        eprintln!(
            "encode_ms = {:.4} + {:.6}·n + {:.4e}·n² (max deviation from the medians {:.1}%)",
            p.encode.fit.a,
            p.encode.fit.b,
            p.encode.fit.c,
            p.encode.max_rel_err * 100.0
        );
        if let Some(s) = &p.prefill {
            eprintln!(
                "prefill_ms = {:.4} + {:.6}·n + {:.4e}·n² (max deviation {:.1}%)",
                s.fit.a,
                s.fit.b,
                s.fit.c,
                s.max_rel_err * 100.0
            );
        }
    }
    Ok(())
}

fn cmd_bench(a: &Args, command: Vec<String>) -> Result<()> {
    let policies: Vec<String> = a.list("policies")?;
    for p in &policies {
        if !envoy::POLICIES.contains(&p.as_str()) {
            return Err(BenchError::Usage(format!("unknown policy `{p}`")));
        }
    }
    let traces: Vec<PathBuf> = a.all("trace").into_iter().map(PathBuf::from).collect();
    let peaks: Vec<f64> = if a.given("peaks") || traces.is_empty() {
        a.list("peaks")?
    } else {
        Vec::new()
    };
    for &p in &peaks {
        shape_from(a, p)?;
    }
    let seeds: Vec<u64> = match (a.given("seed"), a.given("seeds")) {
        (true, true) => {
            return Err(BenchError::Usage(
                "--seed and --seeds: give one (--seed N is --seeds N)".into(),
            ))
        }
        (true, false) => vec![a.num("seed")?],
        _ => a.list("seeds")?,
    };
    if !peaks.is_empty() {
        bench::check_seeds(&seeds)?;
    }
    let external = a.switch("no-start-backends") || a.given("backend-cmd");
    let backends = if external {
        BackendMode::External {
            encode: Url::parse(a.get("encode-url").ok_or_else(|| {
                BenchError::Usage("--encode-url is required with --no-start-backends or --backend-cmd".into())
            })?)?,
            pd: Url::parse(a.get("pd-url").ok_or_else(|| {
                BenchError::Usage("--pd-url is required with --no-start-backends or --backend-cmd".into())
            })?)?,
            cmd: a.get("backend-cmd").map(str::to_string),
        }
    } else {
        if a.given("encode-url") || a.given("pd-url") {
            return Err(BenchError::Usage(
                "--encode-url/--pd-url need --no-start-backends or --backend-cmd".into(),
            ));
        }
        BackendMode::Emulator {
            binary: a.path("emulator")?,
            args: a.all("emulator-arg"),
        }
    };
    let restart = match a.required("restart")? {
        "per-run" => Restart::PerRun,
        "per-policy" => Restart::PerPolicy,
        other => {
            return Err(BenchError::Usage(format!(
                "--restart: `{other}` (per-run or per-policy)"
            )))
        }
    };
    let o = BenchOptions {
        out: a.path("out")?,
        policies,
        peaks,
        traces,
        base_rps: a.f64("base-rps")?,
        ramp_s: a.f64("ramp-s")?,
        hold_s: a.f64("hold-s")?,
        decay_s: a.f64("decay-s")?,
        seeds,
        slo_ms: a.f64("slo-ms")?,
        static_budget: a.num("static-budget")?,
        plugin_overrides: a
            .all("plugin-set")
            .iter()
            .map(|s| envoy::parse_override(s))
            .collect::<Result<_>>()?,
        photos: a.path("photos")?,
        pool_dir: a.path("pool-dir")?,
        sizes: a.list("sizes")?,
        jpeg_quality: a.num("jpeg-quality")?,
        images: a.get("images").map(PathBuf::from),
        prompt: a.required("prompt")?.to_string(),
        max_tokens: a.num("max-tokens")?,
        model: a.required("model")?.to_string(),
        envoy: a.path("envoy")?,
        wasm: a.path("wasm")?,
        envoy_concurrency: a.num("envoy-concurrency")?,
        backends,
        split: a.switch("split"),
        restart,
        ready_timeout: secs(a, "ready-timeout-s")?,
        request_timeout: secs(a, "request-timeout-s")?,
        log_dir: a.path("log-dir")?,
        font: a.path("font")?,
        cooldown: secs(a, "cooldown-s")?,
        ignore_eos: a.switch("ignore-eos"),
        threads: a.num("threads")?,
        progress: !a.switch("quiet"),
        command,
    };
    let w = runtime()?.block_on(bench::run(&o))?;
    eprintln!("{}", w.report.display());
    print!("{}", report::pooled_table(&w.pooled, o.slo_ms));
    Ok(())
}

fn main() -> ExitCode {
    let argv: Vec<OsString> = std::env::args_os().collect();
    let command: Vec<String> = argv.iter().map(|s| s.to_string_lossy().into_owned()).collect();
    let Some(sub) = argv.get(1).map(|s| s.to_string_lossy().into_owned()) else {
        eprint!("{USAGE}");
        return ExitCode::from(2);
    };
    let rest: Vec<OsString> = argv.iter().skip(2).cloned().collect();
    let (flags, about): (&[Flag], &str) = match sub.as_str() {
        "bench" => (&BENCH_FLAGS, "Run the whole experiment and write the report."),
        "trace" => (
            &TRACE_FLAGS_ALL,
            "Generate a seeded bursty trace (Poisson, rate ramp/hold/decay), or check one.",
        ),
        "images" => (
            &IMAGES_FLAGS,
            "Build the pool of distinct photographs for generated traces.",
        ),
        "run" => (
            &RUN_FLAGS,
            "Replay one trace open-loop, streaming every answer; write raw results.",
        ),
        "report" => (
            &REPORT_FLAGS,
            "Write report.md and TTFT CDF plots from raw results.",
        ),
        "profile" => (
            &PROFILE_FLAGS,
            "Measure an encode (and PD) endpoint and fit the filter's latency profile.",
        ),
        "-h" | "--help" | "help" => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        "-V" | "--version" => {
            println!("vlm-bench {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        other => {
            eprintln!("vlm-bench: unknown command `{other}`\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let args = match cli::parse(flags, rest) {
        Ok(Parsed::Args(a)) => a,
        Ok(Parsed::Help) => {
            print!("{}", cli::usage(&sub, about, flags));
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("vlm-bench {sub}: {e}");
            return ExitCode::from(2);
        }
    };
    let r = match sub.as_str() {
        "bench" => cmd_bench(&args, command),
        "trace" => cmd_trace(&args),
        "images" => cmd_images(&args),
        "run" => cmd_run(&args, command),
        "report" => cmd_report(&args),
        _ => cmd_profile(&args),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e @ BenchError::Usage(_)) => {
            eprintln!("vlm-bench {sub}: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("vlm-bench {sub}: {e}");
            ExitCode::FAILURE
        }
    }
}

const TRACE_FLAGS_ALL: [Flag; 11] = [
    TRACE_FLAGS[0],
    SHAPE_FLAGS[0],
    SHAPE_FLAGS[1],
    SHAPE_FLAGS[2],
    SHAPE_FLAGS[3],
    TRACE_FLAGS[1],
    TRACE_FLAGS[2],
    TRACE_FLAGS[3],
    TRACE_FLAGS[4],
    TRACE_FLAGS[5],
    TRACE_FLAGS[6],
];
