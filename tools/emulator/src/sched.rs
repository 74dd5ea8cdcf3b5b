//! The time model and the GPU queues.
//!
//! Each role is a queue served by `N` GPU tasks. A GPU task takes work from
//! the shared FCFS queue and spends its emulated service time in
//! `tokio::time::sleep`, so the latency a client sees is real wall-clock
//! time: queueing behind other requests included.
//!
//! - Encode: a GPU takes queued images in arrival order while their visual
//!   tokens fit the batch budget (`--max-num-batched-tokens`; an image larger
//!   than the budget is taken alone). The vision tower attends within each
//!   image (windows and full-attention blocks are per image), so a batch
//!   costs the sum of its images' encoder times less the fixed per-call cost
//!   (the fit's `a`) of all but one: batching shares the launch, not the
//!   attention. Measured on the H100, four 1,344 px images in one call took
//!   312.6 ms; this model gives 304.5 ms (4 × 87.23 − 3 × 14.8).
//! - Prefill/decode: see [`crate::pd`].

use crate::cli::DecodeModel;
use crate::latency::LatencyModel;
use crate::{lock, rng};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{oneshot, Notify};
use tokio::task::JoinHandle;

const STREAM_ENCODE_BATCH: u64 = 1;
pub(crate) const STREAM_PD_ENCODER: u64 = 2;
const STREAM_PD_PREFILL: u64 = 3;
const STREAM_PD_DECODE: u64 = 4;

/// Which instance a server stands in for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoleKind {
    Encode,
    Pd,
    /// The prefill instance of a prefill/decode split.
    Prefill,
    /// The decode instance of a split.
    Decode,
}

impl RoleKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Encode => "encode",
            Self::Pd => "pd",
            Self::Prefill => "prefill",
            Self::Decode => "decode",
        }
    }
}

/// `t + d` as a Tokio deadline (a year ahead if that overflows).
pub fn after(t: std::time::Instant, d: Duration) -> tokio::time::Instant {
    let far = Duration::from_secs(365 * 24 * 3600);
    tokio::time::Instant::from_std(t.checked_add(d.min(far)).unwrap_or(t))
}

/// Service times, in emulated milliseconds, and their mapping to wall time.
#[derive(Debug, Clone, PartialEq)]
pub struct TimeModel {
    pub latency: LatencyModel,
    pub speed_factor: f64,
    pub encode_preprocess_ms_per_mpixel: f64,
    pub pd_preprocess_ms_per_mpixel: f64,
    pub jitter_sigma: f64,
    pub seed: u64,
    pub time_scale: f64,
    pub decode_model: DecodeModel,
    /// Fixed cost of a decode step (queued model).
    pub decode_step_ms: f64,
    /// Cost of a decode step per running request (queued model).
    pub decode_step_ms_per_request: f64,
    /// Time between output tokens (free model).
    pub decode_ms_per_token: f64,
}

impl TimeModel {
    fn jitter(&self, stream: u64, index: u64) -> f64 {
        rng::lognormal_factor(self.seed, stream, index, self.jitter_sigma)
    }

    /// Vision encoder time for `tokens` visual tokens in one forward pass.
    pub fn encoder_ms(&self, tokens: u64, stream: u64, index: u64) -> f64 {
        self.encoder_batch_ms(&[tokens], stream, index)
    }

    /// Vision-encoder time of one batch of images (`tokens` per image): the
    /// images' times summed, the fixed per-call cost paid once.
    pub fn encoder_batch_ms(&self, tokens: &[u64], stream: u64, index: u64) -> f64 {
        let times: Vec<f64> = tokens
            .iter()
            .filter(|&&n| n > 0)
            .map(|&n| self.latency.encoder.ms(n as f64))
            .collect();
        let Some(longest) = times.iter().copied().reduce(f64::max) else {
            return 0.0;
        };
        let shared = self.latency.encoder.fixed_ms() * (times.len() - 1) as f64;
        let ms = (times.iter().sum::<f64>() - shared).max(longest);
        ms * self.speed_factor * self.jitter(stream, index)
    }

    /// Language-model prefill time for `tokens` prompt tokens.
    pub fn prefill_ms(&self, tokens: u64, index: u64) -> f64 {
        if tokens == 0 {
            return 0.0;
        }
        self.latency.prefill.ms(tokens as f64) * self.speed_factor * self.jitter(STREAM_PD_PREFILL, index)
    }

    /// One decode step of a PD GPU serving `running` requests (step `index`).
    pub fn decode_step_ms(&self, running: usize, index: u64) -> f64 {
        (self.decode_step_ms + self.decode_step_ms_per_request * running as f64)
            * self.speed_factor
            * self.jitter(STREAM_PD_DECODE, index)
    }

    /// CPU preprocessing (body, base64, decode, resize, normalise) of
    /// `pixels` pixels on the `role` instance.
    pub fn preprocess_ms(&self, role: RoleKind, pixels: u64) -> f64 {
        let rate = match role {
            RoleKind::Encode => self.encode_preprocess_ms_per_mpixel,
            RoleKind::Pd | RoleKind::Prefill | RoleKind::Decode => self.pd_preprocess_ms_per_mpixel,
        };
        rate * pixels as f64 / 1e6
    }

    /// Wall time of `ms` emulated milliseconds (`ms * time_scale`).
    pub fn wall(&self, ms: f64) -> Duration {
        Duration::try_from_secs_f64(ms * self.time_scale / 1000.0).unwrap_or(if ms > 0.0 {
            Duration::MAX
        } else {
            Duration::ZERO
        })
    }

    /// Emulated milliseconds of a wall duration (`wall / time_scale`).
    pub fn emulated_ms(&self, d: Duration) -> f64 {
        d.as_secs_f64() * 1000.0 / self.time_scale
    }
}

/// Work a GPU can take from a queue.
pub trait Job {
    /// Tokens the job adds to a batch.
    fn tokens(&self) -> u64;
    /// Whether nobody waits for the result any more (client gone).
    fn cancelled(&self) -> bool;
}

/// Takes jobs from the front while their tokens fit `budget`; the first job
/// is always taken. Cancelled jobs are dropped first.
pub fn take_batch<J: Job>(queue: &mut VecDeque<J>, budget: u64) -> Vec<J> {
    queue.retain(|j| !j.cancelled());
    let mut batch = Vec::new();
    let mut used = 0u64;
    while let Some(job) = queue.front() {
        let t = job.tokens();
        if !batch.is_empty() && used.saturating_add(t) > budget {
            break;
        }
        used = used.saturating_add(t);
        batch.extend(queue.pop_front());
    }
    batch
}

/// A FCFS queue shared by the GPU tasks of one role.
#[derive(Debug)]
pub struct JobQueue<J> {
    jobs: Mutex<VecDeque<J>>,
    ready: Notify,
}

impl<J> Default for JobQueue<J> {
    fn default() -> Self {
        Self {
            jobs: Mutex::new(VecDeque::new()),
            ready: Notify::new(),
        }
    }
}

impl<J> JobQueue<J> {
    pub fn push_all(&self, jobs: impl IntoIterator<Item = J>) {
        lock(&self.jobs).extend(jobs);
        self.ready.notify_one();
    }

    pub fn len(&self) -> usize {
        lock(&self.jobs).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes work with `take` if there is any, without waiting.
    pub fn try_next(&self, take: impl FnOnce(&mut VecDeque<J>) -> Vec<J>) -> Vec<J> {
        let (batch, more) = {
            let mut q = lock(&self.jobs);
            let batch = take(&mut q);
            (batch, !q.is_empty())
        };
        if !batch.is_empty() && more {
            self.ready.notify_one();
        }
        batch
    }

    /// Waits for work and takes it with `take`.
    pub async fn next(&self, mut take: impl FnMut(&mut VecDeque<J>) -> Vec<J>) -> Vec<J> {
        loop {
            let (batch, more) = {
                let mut q = lock(&self.jobs);
                let batch = take(&mut q);
                (batch, !q.is_empty())
            };
            if !batch.is_empty() {
                if more {
                    // Hand the remaining work to another idle GPU.
                    self.ready.notify_one();
                }
                return batch;
            }
            self.ready.notified().await;
        }
    }
}

/// One image for the encode role's GPUs.
#[derive(Debug)]
pub struct EncodeJob {
    pub tokens: u64,
    /// Signalled when the job's batch starts.
    pub started: Option<oneshot::Sender<()>>,
    pub done: oneshot::Sender<EncodeDone>,
}

/// The batch an image was encoded in.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EncodeDone {
    /// Batch number (unique per role).
    pub batch: u64,
    pub batch_tokens: u64,
    /// Emulated service time of the batch.
    pub service_ms: f64,
}

impl Job for EncodeJob {
    fn tokens(&self) -> u64 {
        self.tokens
    }
    fn cancelled(&self) -> bool {
        self.done.is_closed()
    }
}

/// The encode role's GPUs.
#[derive(Debug, Clone)]
pub struct EncodePool {
    queue: Arc<JobQueue<EncodeJob>>,
}

impl EncodePool {
    /// Starts `gpus` GPU tasks.
    pub fn spawn(gpus: usize, budget: u64, time: Arc<TimeModel>) -> (Self, Vec<JoinHandle<()>>) {
        let queue: Arc<JobQueue<EncodeJob>> = Arc::new(JobQueue::default());
        let batches = Arc::new(AtomicU64::new(0));
        let tasks = (0..gpus)
            .map(|_| {
                let (queue, time, batches) = (queue.clone(), time.clone(), batches.clone());
                tokio::spawn(async move {
                    loop {
                        let batch = queue.next(|q| take_batch(q, budget)).await;
                        let id = batches.fetch_add(1, Ordering::Relaxed);
                        let per_image: Vec<u64> = batch.iter().map(|j| j.tokens).collect();
                        let tokens: u64 = per_image.iter().sum();
                        let ms = time.encoder_batch_ms(&per_image, STREAM_ENCODE_BATCH, id);
                        let mut waiters = Vec::with_capacity(batch.len());
                        for mut job in batch {
                            if let Some(s) = job.started.take() {
                                let _ = s.send(());
                            }
                            waiters.push(job.done);
                        }
                        tokio::time::sleep(time.wall(ms)).await;
                        for w in waiters {
                            let _ = w.send(EncodeDone {
                                batch: id,
                                batch_tokens: tokens,
                                service_ms: ms,
                            });
                        }
                    }
                })
            })
            .collect();
        (Self { queue }, tasks)
    }

    pub fn submit(&self, jobs: Vec<EncodeJob>) {
        self.queue.push_all(jobs);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct J(u64, bool);
    impl Job for J {
        fn tokens(&self) -> u64 {
            self.0
        }
        fn cancelled(&self) -> bool {
            self.1
        }
    }

    fn tokens(b: &[J]) -> Vec<u64> {
        b.iter().map(|j| j.0).collect()
    }

    #[test]
    fn batches_fill_the_budget_in_order() {
        let mut q: VecDeque<J> = [1000, 1000, 500, 3000, 20_000, 10]
            .into_iter()
            .map(|t| J(t, false))
            .collect();
        assert_eq!(tokens(&take_batch(&mut q, 2500)), [1000, 1000, 500]);
        // FCFS: a later small image does not jump the queue.
        assert_eq!(tokens(&take_batch(&mut q, 2500)), [3000]);
        // Larger than the budget: taken alone.
        assert_eq!(tokens(&take_batch(&mut q, 2500)), [20_000]);
        assert_eq!(tokens(&take_batch(&mut q, 2500)), [10]);
        assert!(take_batch(&mut q, 2500).is_empty());
    }

    #[test]
    fn cancelled_jobs_are_skipped() {
        let mut q: VecDeque<J> = [J(100, true), J(200, false), J(300, true), J(400, false)].into();
        assert_eq!(tokens(&take_batch(&mut q, 10_000)), [200, 400]);
    }

    fn model(scale: f64, sigma: f64) -> TimeModel {
        TimeModel {
            latency: LatencyModel::builtin("batched_sdpa").expect("data"),
            speed_factor: 2.0,
            encode_preprocess_ms_per_mpixel: 28.0,
            pd_preprocess_ms_per_mpixel: 18.0,
            jitter_sigma: sigma,
            seed: 3,
            time_scale: scale,
            decode_model: DecodeModel::Queued,
            decode_step_ms: 6.0,
            decode_step_ms_per_request: 0.37,
            decode_ms_per_token: 8.0,
        }
    }

    #[test]
    fn a_batch_shares_the_launch_not_the_attention() {
        let m = model(1.0, 0.0);
        // Four 1,344 px images (2,304 tokens each): measured 312.6 ms on the
        // H100 in one call; 4 x 87.23 - 3 x 14.8 = 304.5 ms, at speed 2.
        let batch = m.encoder_batch_ms(&[2304; 4], 1, 0);
        assert!((batch - 2.0 * (4.0 * 87.23 - 3.0 * 14.8)).abs() < 1e-9, "{batch}");
        // Cheaper than one image of the same total size (attention is per image),
        // never cheaper than its longest image.
        assert!(batch < m.encoder_ms(4 * 2304, 1, 0));
        assert!(m.encoder_batch_ms(&[16, 9216], 1, 0) >= m.encoder_ms(9216, 1, 0));
        assert_eq!(m.encoder_batch_ms(&[2304], 1, 0), m.encoder_ms(2304, 1, 0));
        assert_eq!(m.encoder_batch_ms(&[], 1, 0), 0.0);
    }

    #[test]
    fn time_model_scales_and_jitters_deterministically() {
        let m = model(0.5, 0.0);
        assert_eq!(m.encoder_ms(1024, 1, 0), 2.0 * 47.32);
        assert_eq!(m.prefill_ms(4096, 0), 2.0 * 61.1);
        assert_eq!(m.encoder_ms(0, 1, 0), 0.0);
        assert_eq!(m.preprocess_ms(RoleKind::Encode, 2_000_000), 56.0);
        assert_eq!(m.preprocess_ms(RoleKind::Pd, 2_000_000), 36.0);
        assert_eq!(m.wall(100.0), Duration::from_millis(50));
        assert!((m.emulated_ms(Duration::from_millis(50)) - 100.0).abs() < 1e-9);
        assert_eq!(m.wall(f64::INFINITY), Duration::MAX);
        let j = model(1.0, 0.05);
        let a = j.encoder_ms(1024, 1, 5);
        assert_eq!(a, j.encoder_ms(1024, 1, 5));
        assert_ne!(a, j.encoder_ms(1024, 1, 6));
        assert!((a / (2.0 * 47.32) - 1.0).abs() < 0.3);
    }

    #[test]
    fn a_decode_step_costs_a_base_plus_a_share_per_running_request() {
        let m = model(1.0, 0.0);
        // (6 + 0.37 x running) at speed factor 2.
        assert!((m.decode_step_ms(1, 0) - 2.0 * 6.37).abs() < 1e-9);
        assert!((m.decode_step_ms(8, 0) - 2.0 * (6.0 + 8.0 * 0.37)).abs() < 1e-9);
        assert!(m.decode_step_ms(9, 0) > m.decode_step_ms(8, 0));
        // Jittered like the other GPU times, deterministically per step.
        let j = model(1.0, 0.05);
        assert_eq!(j.decode_step_ms(4, 7), j.decode_step_ms(4, 7));
        assert_ne!(j.decode_step_ms(4, 7), j.decode_step_ms(4, 8));
        assert!((j.decode_step_ms(4, 7) / m.decode_step_ms(4, 7) - 1.0).abs() < 0.3);
    }

    #[test]
    fn gpus_serve_the_queue_in_order_with_real_sleeps() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let time = Arc::new(model(0.1, 0.0));
            // Budget 1500: two 1024-token images go in separate batches.
            let (pool, tasks) = EncodePool::spawn(1, 1500, time.clone());
            let mut rxs = Vec::new();
            let start = tokio::time::Instant::now();
            let jobs = (0..2)
                .map(|_| {
                    let (tx, rx) = oneshot::channel();
                    rxs.push(rx);
                    EncodeJob {
                        tokens: 1024,
                        started: None,
                        done: tx,
                    }
                })
                .collect();
            pool.submit(jobs);
            let mut done = Vec::new();
            for rx in rxs {
                done.push((rx.await.expect("done"), start.elapsed()));
            }
            let each = 2.0 * 47.32;
            assert_ne!(done[0].0.batch, done[1].0.batch);
            assert_eq!(done[0].0.service_ms, each);
            assert!(done[0].1 >= time.wall(each));
            assert!(done[1].1 >= time.wall(2.0 * each), "{:?}", done[1].1);
            for t in tasks {
                t.abort();
            }
        });
    }
}
