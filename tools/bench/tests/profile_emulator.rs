//! `profile` against the backend emulator started in-process: the fitted
//! curves must match the emulator's own latency model within 5% at every
//! measured size.

use std::time::Duration;
use vlm_bench::http::Url;
use vlm_bench::profile::{self, ProfileOptions, Timing};
use vlm_emulator::cli::Config;
use vlm_emulator::latency::LatencyModel;
use vlm_emulator::server;

#[test]
fn profile_recovers_the_emulator_latency_model() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let config = Config {
            encode_port: 0,
            pd_port: 0,
            jitter_sigma: 0.0,
            preprocess_ms_per_mpixel: 0.0,
            time_scale: 0.02,
            ..Config::default()
        };
        let running = server::start(config).await.unwrap();
        let url = |a: Option<std::net::SocketAddr>| Url::parse(&format!("http://{}", a.unwrap())).unwrap();
        let opts = ProfileOptions {
            encode: url(running.encode_addr),
            pd: Some(url(running.pd_addr)),
            path: "/v1/chat/completions".into(),
            model: "m".into(),
            // Small images keep the debug build quick; the release binary is
            // checked over the whole range by tests/integration/test_bench.py.
            tokens: vec![1024, 1600, 2304, 3136],
            prefill_tokens: vec![2048, 4096, 8192, 16384],
            reps: 2,
            warmup: 0,
            timing: Timing::Header("x-emulator-encode-ms".into()),
            prefill_timing: Timing::Header("x-emulator-prefill-ms".into()),
            encode_replicas: 1,
            seed: 3,
            request_timeout: Duration::from_secs(60),
            jpeg_quality: 85,
            progress: false,
        };
        let p = profile::run(&opts).await.unwrap();
        let model = LatencyModel::builtin("batched_sdpa").unwrap();
        for pt in &p.encode.points {
            let n = pt.tokens as f64;
            let want = model.encoder.ms(n);
            // Every repetition really reached the encoder (no cache hit: distinct images).
            assert!(
                pt.samples_ms.iter().all(|&s| (s - want).abs() / want < 0.01),
                "{pt:?} vs {want}"
            );
            let got = p.encode.fit.at(n);
            assert!(
                (got - want).abs() / want < 0.05,
                "encoder at {n}: fit {got}, model {want}"
            );
        }
        let prefill = p.prefill.as_ref().unwrap();
        assert_eq!(prefill.points.len(), 4);
        for (pt, asked) in prefill.points.iter().zip(&opts.prefill_tokens) {
            let n = pt.tokens as f64;
            // n is the server's count of a prompt of about `asked` tokens.
            assert!((n - *asked as f64).abs() / (*asked as f64) < 0.02, "{pt:?}");
            let want = model.prefill.ms(n);
            let got = prefill.fit.at(n);
            assert!(
                (got - want).abs() / want < 0.05,
                "prefill at {n}: fit {got}, model {want}"
            );
        }
        // The section is a valid plugin profile.
        let cfg = serde_json::json!({"policy": "dynamic", "profile": p.section()});
        vlm_budget::core::config::Config::from_json(cfg.to_string().as_bytes()).unwrap();
        drop(running);
    });
}
