//! `vlm-emulator`: see `--help` and README.md.

use std::process::ExitCode;
use std::time::Instant;
use vlm_emulator::cli::{self, Command, Role};
use vlm_emulator::server;

fn main() -> ExitCode {
    let t0 = Instant::now();
    let config = match cli::parse(std::env::args_os().skip(1)) {
        Ok(Command::Run(c)) => *c,
        Ok(Command::Help) => {
            print!("{}", cli::USAGE);
            return ExitCode::SUCCESS;
        }
        Ok(Command::Version) => {
            println!("vlm-emulator {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("vlm-emulator: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("vlm-emulator: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let summary = format!(
            "model {}, encoder {}, encode GPUs {}, pd GPUs {}, time-scale {}, seed {}",
            config.model,
            config.encoder_variant,
            config.encode_gpus,
            config.pd_gpus,
            config.time_scale,
            config.seed
        );
        let cache = match &config.ec_cache_dir {
            Some(d) => format!("encoder cache dir {}", d.display()),
            None if config.role == Role::Both => "encoder cache in memory (shared by both roles)".into(),
            None => "encoder cache in memory".into(),
        };
        let running = match server::start(config).await {
            Ok(r) => r,
            Err(e) => {
                eprintln!("vlm-emulator: {e}");
                return ExitCode::FAILURE;
            }
        };
        let url = |a: Option<std::net::SocketAddr>| a.map_or("-".to_string(), |a| format!("http://{a}"));
        let prefill = match running.prefill_addr {
            Some(a) => format!(" prefill http://{a}"),
            None => String::new(),
        };
        println!(
            "vlm-emulator listening: encode {} pd {}{prefill} ({summary}; {cache}; ready in {:.1} ms)",
            url(running.encode_addr),
            url(running.pd_addr),
            t0.elapsed().as_secs_f64() * 1000.0
        );
        // Serve until the process is signalled.
        std::future::pending::<()>().await;
        drop(running);
        ExitCode::SUCCESS
    })
}
