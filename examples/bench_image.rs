//! Native benchmark of the filter's image job, for `make bench-image`.
//!
//! For each image file: wrap it in a chat request as a base64 data URL, run
//! the same core the Envoy filter runs (`pipeline::process`) with a static
//! per-image budget, and report the median wall time of the whole request
//! and of its image work (base64 decode to base64 encode, as the filter's
//! `x-vlm-transcode-ms` header counts it), the output size, and the peak heap
//! the request allocated (a counting global allocator). With
//! `--stages` it also times the stages (base64 decode, image decode, resize,
//! encode) one by one.
//!
//! ```text
//! cargo run --release --example bench_image -- [--budget N] [--quality Q]
//!     [--reps N] [--stages] [--out-dir DIR] [--serve] FILE...
//! ```
//!
//! With `--text-only N` it first times N runs of a chat request without
//! images (the filter's cost on text traffic). With `--check-scaled` it also
//! reports, for JPEGs, the PSNR of the DCT-scaled decode + resize against a
//! full-size decode + resize of the same picture.
//!
//! Prints one JSON object per file on stdout. With `--serve` it then reads
//! file paths from stdin, one a line, and answers each the same way (so a
//! driver can interleave these runs with other programs' runs).

use std::alloc::{GlobalAlloc, Layout, System};
use std::error::Error;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;
use vlm_budget::core::base64buf::{Base64Payload, ENCODER};
use vlm_budget::core::config::Config;
use vlm_budget::core::pipeline::{process, ImageAction, RequestContext};
use vlm_budget::core::policy::from_config;
use vlm_budget::core::probe::{probe, ImageFormat};
use vlm_budget::core::request::scan;
use vlm_budget::core::transcode::{decode, decode_scaled, encode, resize};

/// Counts live heap bytes and their high-water mark.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(n: usize) {
    let live = LIVE.fetch_add(n, Ordering::Relaxed) + n;
    PEAK.fetch_max(live, Ordering::Relaxed);
}

// SAFETY: every call is forwarded to `System` unchanged; only counters are added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                grew(new_size - layout.size());
            } else {
                LIVE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Starts a peak measurement: the peak is counted from the live bytes now.
fn reset_peak() -> usize {
    let live = LIVE.load(Ordering::Relaxed);
    PEAK.store(live, Ordering::Relaxed);
    live
}

struct Args {
    budget: u64,
    quality: u64,
    reps: usize,
    stages: bool,
    serve: bool,
    text_only: usize,
    check_scaled: bool,
    out_dir: Option<PathBuf>,
    files: Vec<PathBuf>,
}

fn parse_args() -> Result<Args, Box<dyn Error>> {
    let mut a = Args {
        budget: 1024,
        quality: 90,
        reps: 5,
        stages: false,
        serve: false,
        text_only: 0,
        check_scaled: false,
        out_dir: None,
        files: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--budget" => a.budget = value("--budget")?.parse()?,
            "--quality" => a.quality = value("--quality")?.parse()?,
            "--reps" => a.reps = value("--reps")?.parse()?,
            "--stages" => a.stages = true,
            "--serve" => a.serve = true,
            "--text-only" => a.text_only = value("--text-only")?.parse()?,
            "--check-scaled" => a.check_scaled = true,
            "--out-dir" => a.out_dir = Some(value("--out-dir")?.into()),
            "-h" | "--help" => {
                println!(
                    "bench_image [--budget N] [--quality Q] [--reps N] [--stages] [--out-dir DIR] FILE..."
                );
                std::process::exit(0);
            }
            _ if arg.starts_with("--") => return Err(format!("unknown option {arg}").into()),
            _ => a.files.push(arg.into()),
        }
    }
    if a.files.is_empty() && !a.serve && a.text_only == 0 {
        return Err("no image files given".into());
    }
    a.reps = a.reps.max(1);
    Ok(a)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

fn mime_of(bytes: &[u8]) -> &'static str {
    if bytes.starts_with(b"\x89PNG") {
        "image/png"
    } else {
        "image/jpeg"
    }
}

fn chat_body(image: &[u8]) -> Vec<u8> {
    let mut body = br#"{"model":"Qwen/Qwen2.5-VL-3B-Instruct","messages":[{"role":"user","content":[{"type":"text","text":"Describe the image."},{"type":"image_url","image_url":{"url":"data:"#.to_vec();
    body.extend_from_slice(mime_of(image).as_bytes());
    body.extend_from_slice(b";base64,");
    vlm_budget::core::base64buf::encode_into(image, &mut body);
    body.extend_from_slice(br#""}}]}]}"#);
    body
}

/// The first image URL's decoded bytes in a (rewritten) body.
fn image_in(body: &[u8]) -> Result<Vec<u8>, Box<dyn Error>> {
    let v: serde_json::Value = serde_json::from_slice(body)?;
    let url = v["messages"][0]["content"][1]["image_url"]["url"]
        .as_str()
        .ok_or("no image url in the output")?;
    let (_, payload) = url.split_once(',').ok_or("no comma in the data URL")?;
    Ok(Base64Payload::new(payload.as_bytes())
        .map_err(|e| e.to_string())?
        .decode()
        .map_err(|e| e.to_string())?)
}

fn bench_file(path: &Path, args: &Args, cfg: &Config) -> Result<serde_json::Value, Box<dyn Error>> {
    let image = std::fs::read(path)?;
    let header = probe(image.as_slice()).map_err(|e| e.to_string())?;
    let body = chat_body(&image);
    let policy = from_config(cfg);
    let epoch = Instant::now();
    let clock = || u64::try_from(epoch.elapsed().as_micros()).unwrap_or(u64::MAX);
    let mut times = Vec::with_capacity(args.reps);
    let mut image_times = Vec::with_capacity(args.reps);
    let mut peak = 0usize;
    let mut out_body = None;
    for _ in 0..args.reps {
        let base = reset_peak();
        let t = Instant::now();
        let outcome = process(&body, cfg, policy.as_ref(), &RequestContext::default(), &clock)
            .map_err(|e| e.to_string())?;
        times.push(ms_since(t));
        image_times.push(outcome.transcode_micros() as f64 / 1000.0);
        peak = peak.max(PEAK.load(Ordering::Relaxed).saturating_sub(base));
        out_body = Some(outcome);
    }
    let outcome = out_body.ok_or("no run")?;
    // Reading the body's JSON: the filter's reader (validate, then locate the
    // images) against one plain `serde_json` pass over the same bytes.
    let mut scan_times = Vec::with_capacity(args.reps);
    let mut serde_times = Vec::with_capacity(args.reps);
    for _ in 0..args.reps.max(3) {
        let t = Instant::now();
        let found = scan(&body).map_err(|e| e.to_string())?.images.len();
        scan_times.push(ms_since(t));
        let t = Instant::now();
        let raw: &serde_json::value::RawValue = serde_json::from_slice(&body)?;
        serde_times.push(ms_since(t));
        if found != 1 || raw.get().is_empty() {
            return Err("the body did not read as one image".into());
        }
    }
    let (to, resized) = match outcome.images.first().map(|i| &i.action) {
        Some(ImageAction::Resized { to, .. }) => (*to, true),
        _ => (
            vlm_budget::core::sizing::Dims::new(header.width, header.height),
            false,
        ),
    };
    let out_image = match &outcome.body {
        Some(b) => image_in(b)?,
        None => image.clone(),
    };
    if let Some(dir) = &args.out_dir {
        let name = path.file_name().ok_or("file has no name")?;
        std::fs::write(dir.join(name), &out_image)?;
    }
    let mut row = serde_json::json!({
        "file": path.to_string_lossy(),
        "format": header.format.name(),
        "width": header.width,
        "height": header.height,
        "in_bytes": image.len(),
        "body_bytes": body.len(),
        "resized": resized,
        "out_width": to.width,
        "out_height": to.height,
        "out_bytes": out_image.len(),
        "tokens_after": outcome.tokens_after(),
        "median_ms": median(&mut times.clone()),
        "ms": times,
        "image_median_ms": median(&mut image_times),
        "scan_median_ms": median(&mut scan_times),
        "serde_json_pass_median_ms": median(&mut serde_times),
        "peak_heap_bytes": peak,
    });
    if args.stages && resized {
        row["stages_ms"] = stages(&body, &image, to, args, cfg)?;
    }
    if args.check_scaled && resized && header.format == ImageFormat::Jpeg {
        row["psnr_scaled_vs_full_db"] = scaled_vs_full_psnr(&image, to, cfg)?.into();
    }
    Ok(row)
}

/// PSNR, in dB over every sample, of the fast path (DCT-scaled decode, then
/// resize) against decoding at full size and resizing.
fn scaled_vs_full_psnr(
    image: &[u8],
    to: vlm_budget::core::sizing::Dims,
    cfg: &Config,
) -> Result<f64, Box<dyn Error>> {
    let opts = cfg.transcode_options();
    let header = probe(image).map_err(|e| e.to_string())?;
    let scaled = decode_scaled(image, &header, Some(to), opts.max_pixels).map_err(|e| e.to_string())?;
    let fast = resize(scaled, to, opts.filter).map_err(|e| e.to_string())?;
    let full = decode(image, &header, None, opts.max_pixels).map_err(|e| e.to_string())?;
    let reference = resize(full, to, opts.filter).map_err(|e| e.to_string())?;
    if fast.data.len() != reference.data.len() || fast.data.is_empty() {
        return Err("fast and reference paths differ in size".into());
    }
    let se: f64 = fast
        .data
        .iter()
        .zip(&reference.data)
        .map(|(&a, &b)| (f64::from(a) - f64::from(b)).powi(2))
        .sum();
    let mse = se / fast.data.len() as f64;
    Ok(if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (255.0 * 255.0 / mse).log10()
    })
}

/// Median time of each stage of the job, run one after the other.
fn stages(
    body: &[u8],
    image: &[u8],
    to: vlm_budget::core::sizing::Dims,
    args: &Args,
    cfg: &Config,
) -> Result<serde_json::Value, Box<dyn Error>> {
    let opts = cfg.transcode_options();
    let header = probe(image).map_err(|e| e.to_string())?;
    let text = body;
    let (mut b64, mut dec, mut rsz, mut enc, mut b64out) = (vec![], vec![], vec![], vec![], vec![]);
    for _ in 0..args.reps {
        let t = Instant::now();
        let start = text
            .windows(7)
            .position(|w| w == b"base64,")
            .ok_or("no payload")?
            + 7;
        let end = start + text[start..].iter().position(|&b| b == b'"').ok_or("no end")?;
        let bytes = Base64Payload::new(&text[start..end])
            .map_err(|e| e.to_string())?
            .decode()
            .map_err(|e| e.to_string())?;
        b64.push(ms_since(t));
        let t = Instant::now();
        let px = decode_scaled(&bytes, &header, Some(to), opts.max_pixels).map_err(|e| e.to_string())?;
        dec.push(ms_since(t));
        let t = Instant::now();
        let px = resize(px, to, opts.filter).map_err(|e| e.to_string())?;
        rsz.push(ms_since(t));
        let t = Instant::now();
        let out = encode(&px, header.format, opts.jpeg_quality).map_err(|e| e.to_string())?;
        enc.push(ms_since(t));
        let t = Instant::now();
        let s = base64::Engine::encode(&ENCODER, &out);
        b64out.push(ms_since(t));
        drop(s);
    }
    Ok(serde_json::json!({
        "base64_decode": median(&mut b64),
        "decode": median(&mut dec),
        "resize": median(&mut rsz),
        "encode": median(&mut enc),
        "base64_encode": median(&mut b64out),
    }))
}

/// Median time of the whole job on a chat request without images.
fn text_only(runs: usize, cfg: &Config) -> Result<serde_json::Value, Box<dyn Error>> {
    let body = br#"{"model":"Qwen/Qwen2.5-VL-3B-Instruct","messages":[{"role":"system","content":"You are a helpful assistant."},{"role":"user","content":[{"type":"text","text":"Describe the images."}]}],"temperature":0.70,"max_tokens":256}"#;
    let policy = from_config(cfg);
    let clock = || 0u64;
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        let outcome = process(body, cfg, policy.as_ref(), &RequestContext::default(), &clock)
            .map_err(|e| e.to_string())?;
        times.push(t.elapsed().as_secs_f64() * 1e6);
        if outcome.body.is_some() {
            return Err("a text-only request was rewritten".into());
        }
    }
    Ok(serde_json::json!({"text_only_body_bytes": body.len(), "text_only_median_us": median(&mut times)}))
}

fn main() -> Result<(), Box<dyn Error>> {
    let args = parse_args()?;
    let cfg = Config::from_json(
        serde_json::json!({
            "policy": "static",
            "static_budget_tokens": args.budget,
            "min_tokens_per_image": args.budget.min(256),
            "jpeg_quality": args.quality,
        })
        .to_string()
        .as_bytes(),
    )?;
    if let Some(dir) = &args.out_dir {
        std::fs::create_dir_all(dir)?;
    }
    if args.text_only > 0 {
        println!("{}", text_only(args.text_only, &cfg)?);
    }
    for file in &args.files {
        let row = bench_file(file, &args, &cfg)?;
        println!("{row}");
    }
    if args.serve {
        let mut out = std::io::stdout().lock();
        for line in std::io::stdin().lines() {
            let line = line?;
            let path = line.trim();
            if path.is_empty() {
                continue;
            }
            let row = bench_file(Path::new(path), &args, &cfg)?;
            writeln!(out, "{row}")?;
            out.flush()?;
        }
    }
    Ok(())
}
