//! The PD GPUs on Tokio's paused clock: virtual time advances only when
//! every task waits on a timer, so the schedule is exact and immune to the
//! machine's load. With a time scale of 1000 an emulated millisecond lasts a
//! virtual second, and the timer's millisecond rounding stays below 0.001
//! emulated ms per sleep.

use super::*;
use crate::cli::DecodeModel;
use crate::latency::LatencyModel;
use tokio::time::Instant;

const SCALE: f64 = 1000.0;
/// A few timer roundings, in emulated ms.
const EPS: f64 = 0.02;

fn time() -> Arc<TimeModel> {
    Arc::new(TimeModel {
        latency: LatencyModel::builtin("batched_sdpa").expect("data"),
        speed_factor: 1.0,
        encode_preprocess_ms_per_mpixel: 28.0,
        pd_preprocess_ms_per_mpixel: 18.0,
        jitter_sigma: 0.0,
        seed: 1,
        time_scale: SCALE,
        decode_model: DecodeModel::Queued,
        decode_step_ms: 6.0,
        decode_step_ms_per_request: 0.37,
        decode_ms_per_token: 8.0,
    })
}

fn on_paused_clock(test: impl std::future::Future<Output = ()>) {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("runtime")
        .block_on(test);
}

fn pool(gpus: usize, time: &Arc<TimeModel>) -> (PrefillPool, Vec<JoinHandle<()>>) {
    PrefillPool::spawn(gpus, time.clone(), Arc::new(EcCache::memory()))
}

/// When a request was submitted, started prefilling, got its first token
/// and each later token.
#[derive(Debug)]
struct Timeline {
    submitted: Instant,
    started: Instant,
    first: Instant,
    tokens: Vec<Instant>,
}

/// Submits a text-only request of `prompt` tokens and `output` tokens; the
/// client reads at most `read` tokens after the first, then goes away.
fn submit(pool: &PrefillPool, prompt: u64, output: u64, read: usize) -> JoinHandle<Timeline> {
    let (started_tx, started_rx) = oneshot::channel();
    let (done_tx, done_rx) = oneshot::channel();
    let (decoder, rx) = match output > 1 {
        true => {
            let (d, rx) = Decoder::new(output - 1);
            (Some(d), Some(rx))
        }
        false => (None, None),
    };
    pool.submit(PrefillJob {
        images: Vec::new(),
        prompt_tokens: prompt,
        remote_kv: false,
        decoder,
        started: Some(started_tx),
        done: done_tx,
    });
    let submitted = Instant::now();
    tokio::spawn(async move {
        started_rx.await.expect("started");
        let started = Instant::now();
        done_rx.await.expect("prefilled");
        let first = Instant::now();
        let mut tokens = Vec::new();
        if let Some(mut rx) = rx {
            while tokens.len() < read && rx.recv().await.is_some() {
                tokens.push(Instant::now());
            }
        }
        Timeline {
            submitted,
            started,
            first,
            tokens,
        }
    })
}

async fn all(handles: Vec<JoinHandle<Timeline>>) -> Vec<Timeline> {
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.expect("client"));
    }
    out
}

/// Emulated ms from `a` to `b`.
fn ms(time: &TimeModel, a: Instant, b: Instant) -> f64 {
    time.emulated_ms(b - a)
}

/// Emulated gaps between the first token and each later one.
fn gaps(time: &TimeModel, t: &Timeline) -> Vec<f64> {
    let mut prev = t.first;
    t.tokens
        .iter()
        .map(|&at| {
            let g = ms(time, prev, at);
            prev = at;
            g
        })
        .collect()
}

fn assert_close(got: f64, want: f64, what: &str) {
    assert!((got - want).abs() < EPS, "{what}: {got} ms, want {want}");
}

#[test]
fn tokens_come_from_decode_steps_whose_cost_grows_with_the_running_requests() {
    on_paused_clock(async {
        let t = time();
        let (pool, _tasks) = pool(1, &t);
        let step = |n: usize| t.decode_step_ms(n, 0);
        let prefill = t.prefill_ms(1024, 0);

        // Alone: its first token at the end of its prefill, then one step of
        // one running request per token.
        let alone = submit(&pool, 1024, 5, usize::MAX).await.expect("client");
        assert_eq!(alone.started, alone.submitted);
        assert_close(ms(&t, alone.started, alone.first), prefill, "TTFT");
        assert_eq!(alone.tokens.len(), 4);
        for g in gaps(&t, &alone) {
            assert_close(g, step(1), "TPOT alone");
        }

        // Eight at once: prefilled back to back (a waiting prefill goes
        // before any decode step), then every step serves all eight.
        let eight = all((0..8).map(|_| submit(&pool, 1024, 5, usize::MAX)).collect()).await;
        for w in eight.windows(2) {
            assert_eq!(w[1].started, w[0].first, "no decode step between prefills");
            assert_close(ms(&t, w[0].first, w[1].first), prefill, "prefill");
        }
        let last_first = eight[7].first;
        for r in &eight {
            assert_eq!(r.tokens.len(), 4);
            // All eight get each token from the same step.
            assert_eq!(r.tokens, eight[0].tokens);
            assert_close(ms(&t, last_first, r.tokens[0]), step(8), "first step");
            for g in &gaps(&t, r)[1..] {
                assert_close(*g, step(8), "TPOT of eight");
            }
        }
        assert!(step(8) > step(1));
        assert_close(step(8) - step(1), 7.0 * 0.37, "per running request");
    });
}

#[test]
fn a_prefill_waits_at_most_for_the_step_in_flight_and_tokens_wait_behind_it() {
    on_paused_clock(async {
        let t = time();
        let (pool, _tasks) = pool(1, &t);
        let step8 = t.decode_step_ms(8, 0);
        let decoding = all((0..8).map(|_| submit(&pool, 1024, 40, 12)).collect::<Vec<_>>());
        let start = Instant::now();
        let decoding = tokio::spawn(decoding);
        // Eight prefills, then two and a half steps of eight running.
        let decode_from = 8.0 * t.prefill_ms(1024, 0);
        tokio::time::sleep_until(start + t.wall(decode_from + 2.5 * step8)).await;
        let late = submit(&pool, 4096, 3, usize::MAX).await.expect("client");
        let decoding = decoding.await.expect("clients");

        // It waited for the rest of the step in flight, no more.
        let waited = ms(&t, late.submitted, late.started);
        assert!(waited > 0.0 && waited <= step8 + EPS, "waited {waited} ms");
        assert_close(waited, 0.5 * step8, "rest of the step");
        assert_close(
            ms(&t, late.started, late.first),
            t.prefill_ms(4096, 0),
            "its prefill",
        );
        // Its later tokens come from steps of nine.
        for g in gaps(&t, &late) {
            assert_close(g, t.decode_step_ms(9, 0), "TPOT of nine");
        }
        // The running requests' next token waited behind that prefill.
        for r in &decoding {
            let g = gaps(&t, r);
            assert_close(g[2], step8, "before");
            assert_eq!(r.tokens[2], late.started, "the step in flight ended");
            assert_close(
                g[3],
                t.prefill_ms(4096, 0) + t.decode_step_ms(9, 0),
                "token behind the prefill",
            );
        }
    });
}

#[test]
fn each_gpu_decodes_the_requests_it_prefilled() {
    on_paused_clock(async {
        let t = time();
        let (pool, _tasks) = pool(2, &t);
        let two = all(vec![
            submit(&pool, 1024, 6, usize::MAX),
            submit(&pool, 1024, 6, usize::MAX),
        ])
        .await;
        for r in &two {
            // Both GPUs started at once, and each decodes one request.
            assert_eq!(r.started, r.submitted);
            assert_eq!(r.tokens.len(), 5);
            for g in gaps(&t, r) {
                assert_close(g, t.decode_step_ms(1, 0), "one running per GPU");
            }
        }
    });
}

#[test]
fn a_request_whose_client_went_away_leaves_the_batch() {
    on_paused_clock(async {
        let t = time();
        let (pool, _tasks) = pool(1, &t);
        let stays = submit(&pool, 1024, 10, usize::MAX);
        let leaves = submit(&pool, 1024, 10, 2);
        let (stays, leaves) = (stays.await.expect("client"), leaves.await.expect("client"));
        assert_eq!(leaves.tokens.len(), 2);
        let g = gaps(&t, &stays);
        assert_eq!(g.len(), 9);
        // Its first later token waited for the other's prefill; then steps
        // of two until the step that finds the other client gone, then one.
        let later = &g[1..];
        let of_two = later
            .iter()
            .take_while(|&&x| (x - t.decode_step_ms(2, 0)).abs() < EPS)
            .count();
        assert!((1..=3).contains(&of_two), "{g:?}");
        for x in &later[of_two..] {
            assert_close(*x, t.decode_step_ms(1, 0), "alone again");
        }
    });
}

#[test]
fn a_job_without_a_decoder_is_only_prefilled() {
    on_paused_clock(async {
        let t = time();
        let (pool, _tasks) = pool(1, &t);
        // One output token (or the free decode model): no decode steps, so
        // the next prefill starts at once.
        let one = submit(&pool, 1024, 1, usize::MAX).await.expect("client");
        assert!(one.tokens.is_empty());
        let next = submit(&pool, 1024, 1, usize::MAX).await.expect("client");
        assert_eq!(next.started, next.submitted);
        assert_close(ms(&t, one.first, next.first), t.prefill_ms(1024, 0), "prefill");
    });
}
