//! `vlm-transcode`: see `--help` and the README's "Offloading the transcode".

use std::net::SocketAddr;
use std::process::ExitCode;
use vlm_transcode::server::{self, Service};
use vlm_transcode::Limits;

const USAGE: &str = "\
vlm-transcode: the vlm-budget filter's image shrink as an HTTP service

USAGE: vlm-transcode [OPTIONS]

  --listen ADDR           address to serve on (default 0.0.0.0:8090)
  --threads N             transcodes at once (default: the CPUs)
  --max-queue N           images waiting for a thread before 503 (default 256)
  --max-body-bytes N      largest image accepted (default 67108864)
  --max-pixels N          largest image header accepted, pixels (default 40000000)
  --help, --version

POST /v1/transcode: body the image (PNG or JPEG), headers x-vlm-target-width,
x-vlm-target-height, x-vlm-jpeg-quality, x-vlm-resize-filter; answers the
resized image or an OpenAI-style JSON error. GET /health, GET /metrics.
";

enum Command {
    Run(SocketAddr, Limits),
    Help,
    Version,
}

fn parse() -> Result<Command, lexopt::Error> {
    use lexopt::prelude::*;
    let mut addr: SocketAddr = SocketAddr::from(([0, 0, 0, 0], 8090));
    let mut limits = Limits::default();
    let mut parser = lexopt::Parser::from_env();
    while let Some(arg) = parser.next()? {
        match arg {
            Long("listen") => addr = parser.value()?.parse()?,
            Long("threads") => limits.threads = parser.value()?.parse::<usize>()?.max(1),
            Long("max-queue") => limits.max_queue = parser.value()?.parse()?,
            Long("max-body-bytes") => limits.max_body_bytes = parser.value()?.parse::<u64>()?.max(1),
            Long("max-pixels") => limits.max_pixels = parser.value()?.parse::<u64>()?.max(1),
            Long("help") | Short('h') => return Ok(Command::Help),
            Long("version") => return Ok(Command::Version),
            _ => return Err(arg.unexpected()),
        }
    }
    Ok(Command::Run(addr, limits))
}

fn main() -> ExitCode {
    let (addr, limits) = match parse() {
        Ok(Command::Run(a, l)) => (a, l),
        Ok(Command::Help) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Ok(Command::Version) => {
            println!("vlm-transcode {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("vlm-transcode: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    // Two threads take the connections; the transcodes run on the
    // blocking pool, `limits.threads` at once.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(limits.threads)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("vlm-transcode: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let listener = match server::bind(addr).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("vlm-transcode: cannot listen on {addr}: {e}");
                return ExitCode::FAILURE;
            }
        };
        let local = listener.local_addr().map_or(addr.to_string(), |a| a.to_string());
        println!(
            "vlm-transcode listening on http://{local} ({} threads, queue {}, max body {} bytes, max {} pixels)",
            limits.threads, limits.max_queue, limits.max_body_bytes, limits.max_pixels
        );
        server::serve(listener, Service::new(limits)).await;
        ExitCode::SUCCESS
    })
}
