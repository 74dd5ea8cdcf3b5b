//! The prefill/decode instance's GPUs.
//!
//! Each GPU task takes requests from the role's FCFS queue and prefills one
//! at a time, first running the vision encoder for the images the encoder
//! cache lacks. A request's first token is ready at the end of its prefill.
//!
//! With the queued decode model the GPU then keeps the request in its own
//! running set (continuous batching). A decode step gives every running
//! request one token and costs
//! `(decode_step_ms + decode_step_ms_per_request x running) x speed factor x jitter`.
//! Prefill first: whenever the GPU is free it takes a waiting prefill before
//! the next step, so a prefill waits at most for the step in flight, and the
//! tokens of running requests wait behind prefills. A request whose job has
//! no [`Decoder`] (the free decode model, or a single output token) is only
//! prefilled.

use crate::cache::EcCache;
use crate::sched::{after, Job, JobQueue, TimeModel, STREAM_PD_ENCODER};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// The output tokens of a request after its first, made by decode steps.
#[derive(Debug)]
pub struct Decoder {
    left: u64,
    tokens: mpsc::UnboundedSender<()>,
}

impl Decoder {
    /// A decoder for `tokens` tokens after the first, and the receiver that
    /// gets one message at the end of each step that made one of them.
    pub fn new(tokens: u64) -> (Self, mpsc::UnboundedReceiver<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Self {
                left: tokens,
                tokens: tx,
            },
            rx,
        )
    }
}

/// When a request's tokens after the first are ready, as its server sees it.
#[derive(Debug)]
pub enum Pace {
    /// No token after the first.
    Done,
    /// The free decode model: token `i` comes `i x` this many emulated ms
    /// after the first, whatever the GPU does.
    Free(f64),
    /// The queued decode model: one message per token from the [`Decoder`]
    /// on the GPU that prefilled the request; the count received so far.
    Steps(mpsc::UnboundedReceiver<()>, u64),
}

impl Pace {
    /// Waits until token `i` (0: the first, ready at `first`) is ready;
    /// false if the GPU stopped before making it.
    pub async fn until(&mut self, time: &TimeModel, first: Instant, i: u64) -> bool {
        match self {
            Self::Done => i == 0,
            Self::Free(step_ms) => {
                tokio::time::sleep_until(after(first, time.wall(i as f64 * *step_ms))).await;
                true
            }
            Self::Steps(rx, received) => {
                while *received < i {
                    if rx.recv().await.is_none() {
                        return false;
                    }
                    *received += 1;
                }
                true
            }
        }
    }
}

/// The requests one GPU is decoding: its continuous batch.
#[derive(Debug, Default)]
pub struct DecodeBatch {
    running: Vec<Decoder>,
}

impl DecodeBatch {
    /// Adds a request past its first token (none with no tokens left).
    pub fn join(&mut self, d: Decoder) {
        if d.left > 0 {
            self.running.push(d);
        }
    }

    pub fn len(&self) -> usize {
        self.running.len()
    }

    pub fn is_empty(&self) -> bool {
        self.running.is_empty()
    }

    /// Drops the requests nobody waits for any more (client gone), as vLLM
    /// aborts them.
    pub fn drop_cancelled(&mut self) {
        self.running.retain(|d| !d.tokens.is_closed());
    }

    /// The end of a step: one token for every running request. Finished
    /// requests, and those whose client went away, leave the batch.
    pub fn emit(&mut self) {
        self.running.retain_mut(|d| {
            d.left = d.left.saturating_sub(1);
            d.tokens.send(()).is_ok() && d.left > 0
        });
    }
}

/// One request for a prefill/decode GPU.
#[derive(Debug)]
pub struct PrefillJob {
    /// (encoder-cache key, visual tokens) per image.
    pub images: Vec<(u128, u64)>,
    pub prompt_tokens: u64,
    /// The prompt's KV cache came from a prefill instance (a split's
    /// decode): no encoder, no prefill, only the step that makes the first
    /// token.
    pub remote_kv: bool,
    /// Decode steps after the first token, on the GPU that prefilled it.
    pub decoder: Option<Decoder>,
    pub started: Option<oneshot::Sender<()>>,
    pub done: oneshot::Sender<PrefillDone>,
}

impl Job for PrefillJob {
    fn tokens(&self) -> u64 {
        self.prompt_tokens
    }
    fn cancelled(&self) -> bool {
        self.done.is_closed()
    }
}

/// What prefilling a request took.
#[derive(Debug, Clone, PartialEq)]
pub struct PrefillDone {
    /// Per image: found in the encoder cache.
    pub hits: Vec<bool>,
    /// Emulated encoder time for the cache misses (0 if all hit).
    pub encode_ms: f64,
    pub prefill_ms: f64,
}

fn take_one(q: &mut VecDeque<PrefillJob>) -> Vec<PrefillJob> {
    q.retain(|j| !j.cancelled());
    q.pop_front().into_iter().collect()
}

/// Sequence numbers of the role's GPU work (jitter draws).
#[derive(Debug, Default)]
struct Counters {
    prefills: AtomicU64,
    steps: AtomicU64,
}

/// The prefill/decode role's GPUs.
#[derive(Debug, Clone)]
pub struct PrefillPool {
    queue: Arc<JobQueue<PrefillJob>>,
}

impl PrefillPool {
    /// Starts `gpus` GPU tasks. The cache is consulted when a prefill is
    /// scheduled, as vLLM's scheduler asks its encoder-cache connector.
    pub fn spawn(gpus: usize, time: Arc<TimeModel>, cache: Arc<EcCache>) -> (Self, Vec<JoinHandle<()>>) {
        let queue = Arc::new(JobQueue::default());
        let counters = Arc::new(Counters::default());
        let tasks = (0..gpus)
            .map(|_| tokio::spawn(gpu(queue.clone(), time.clone(), cache.clone(), counters.clone())))
            .collect();
        (Self { queue }, tasks)
    }

    pub fn submit(&self, job: PrefillJob) {
        self.queue.push_all([job]);
    }
}

/// One GPU: prefills first, decode steps of its own running set between.
async fn gpu(
    queue: Arc<JobQueue<PrefillJob>>,
    time: Arc<TimeModel>,
    cache: Arc<EcCache>,
    counters: Arc<Counters>,
) {
    let mut batch = DecodeBatch::default();
    loop {
        let jobs = if batch.is_empty() {
            queue.next(take_one).await
        } else {
            queue.try_next(take_one)
        };
        if let Some(job) = jobs.into_iter().next() {
            let id = counters.prefills.fetch_add(1, Ordering::Relaxed);
            if let Some(d) = prefill(job, id, &time, &cache).await {
                batch.join(d);
            }
            continue;
        }
        batch.drop_cancelled();
        if batch.is_empty() {
            continue;
        }
        let id = counters.steps.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(time.wall(time.decode_step_ms(batch.len(), id))).await;
        batch.emit();
    }
}

/// Encodes the cache misses and prefills; the request's decoder if its
/// client still waits.
async fn prefill(mut job: PrefillJob, id: u64, time: &TimeModel, cache: &EcCache) -> Option<Decoder> {
    if let Some(s) = job.started.take() {
        let _ = s.send(());
    }
    if job.remote_kv {
        let step_ms = time.decode_step_ms(1, id);
        tokio::time::sleep(time.wall(step_ms)).await;
        job.done
            .send(PrefillDone {
                hits: Vec::new(),
                encode_ms: 0.0,
                prefill_ms: step_ms,
            })
            .ok()?;
        return job.decoder;
    }
    let hits: Vec<bool> = job.images.iter().map(|&(k, _)| cache.contains(k)).collect();
    let misses: Vec<u64> = job
        .images
        .iter()
        .zip(&hits)
        .filter(|(_, &hit)| !hit)
        .map(|(&(_, t), _)| t)
        .collect();
    let encode_ms = time.encoder_batch_ms(&misses, STREAM_PD_ENCODER, id);
    let prefill_ms = time.prefill_ms(job.prompt_tokens, id);
    tokio::time::sleep(time.wall(encode_ms + prefill_ms)).await;
    job.done
        .send(PrefillDone {
            hits,
            encode_ms,
            prefill_ms,
        })
        .ok()?;
    job.decoder
}

#[cfg(test)]
#[path = "pd_tests.rs"]
mod tests;
