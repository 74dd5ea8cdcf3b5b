"""The GPU workers: one thread per role owns its device.

Encode: images wait in one FCFS queue; the worker takes queued images in arrival order while
their visual tokens fit `max_num_batched_tokens` (an image larger than that goes alone) and
runs them through the vision tower in ONE forward (transformers builds the per-image attention
boundaries, cu_seqlens, from image_grid_thw), then stores each image's embeddings in the encoder
cache.

Prefill/decode: requests wait in one FCFS queue. The worker prefills one request at a time
(cache lookups; misses encoded by its own copy of the vision tower; LM prefill over text and
visual tokens) and, whenever no request is waiting, runs one batched decode step that gives
every running request its next token (prefill first, as vLLM's default scheduler without
chunked prefill does). Sampling is greedy over random weights: the text is meaningless.
"""
from __future__ import annotations

import collections
import hashlib
import threading
import time
import traceback
from dataclasses import dataclass, field

import numpy as np
import torch

from .metrics import Metrics
from .models import LanguageModel, ModelSpec
from .processor import patchify
from .request import image_array, resized_array

PREPARE = {"device": image_array, "pil": resized_array}

DONE = object()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class EngineError(Exception):
    pass


def run_vision(model: torch.nn.Module, spec: ModelSpec, arrays: list[np.ndarray], device: torch.device,
               dtype: torch.dtype, sizes: list | None = None) -> list[torch.Tensor]:
    """Embeddings of several images in one vision-tower forward: one [tokens, hidden] tensor each.
    `sizes[i]`: the (height, width) image i is resized to first (None: already that size)."""
    pvs, grids = [], []
    for a, size in zip(arrays, sizes or [None] * len(arrays)):
        pv, grid = patchify(a, spec.patch_size, spec.merge_size, spec.temporal_patch_size, device, dtype, size)
        pvs.append(pv)
        grids.append(grid)
    thw = torch.tensor(grids, dtype=torch.long, device=device)
    with torch.no_grad():
        out = model(torch.cat(pvs, 0), grid_thw=thw).pooler_output
    per = [g[0] * g[1] * g[2] // spec.merge_size ** 2 for g in grids]
    return list(torch.split(out, per, 0))


@dataclass
class EncodeJob:
    key: str
    tokens: int
    array: np.ndarray
    size: tuple[int, int]  # (height, width) by the Qwen rule
    request: "EncodeRequest"
    batch: int = -1
    service_ms: float = 0.0
    error: str | None = None


class EncodeRequest:
    """The misses of one encode request: started when the first is taken, done when all are."""

    def __init__(self, n: int):
        self.started = threading.Event()
        self.done = threading.Event()
        self.left = n
        self.lock = threading.Lock()

    def job_done(self) -> None:
        with self.lock:
            self.left -= 1
            if self.left == 0:
                self.done.set()


class EncodeEngine:
    def __init__(self, model, spec: ModelSpec, device: torch.device, dtype: torch.dtype, cache,
                 max_batch_tokens: int, metrics: Metrics):
        self.model, self.spec, self.device, self.dtype = model, spec, device, dtype
        self.cache = cache
        self.max_batch_tokens = max_batch_tokens
        self.metrics = metrics
        self.queue: collections.deque[EncodeJob] = collections.deque()
        self.cond = threading.Condition()
        self.batches = 0
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name=f"encode-{device}", daemon=True)
        self.thread.start()

    def submit(self, jobs: list[EncodeJob]) -> None:
        with self.cond:
            self.queue.extend(jobs)
            self.cond.notify()

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()

    def _take(self) -> list[EncodeJob] | None:
        with self.cond:
            while not self.queue and not self.stopping:
                self.cond.wait()
            if self.stopping:
                return None
            batch = [self.queue.popleft()]
            tokens = batch[0].tokens
            while self.queue and tokens + self.queue[0].tokens <= self.max_batch_tokens:
                job = self.queue.popleft()
                tokens += job.tokens
                batch.append(job)
            return batch

    def _loop(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # the current device is per thread
        while True:
            batch = self._take()
            if batch is None:
                return
            self.batches += 1
            number = self.batches
            for job in batch:
                job.request.started.set()
            t0 = time.perf_counter()
            error = None
            try:
                embeds = run_vision(self.model, self.spec, [j.array for j in batch], self.device, self.dtype,
                                    [j.size for j in batch])
                for job, e in zip(batch, embeds):
                    self.cache.put(job.key, e)
                sync(self.device)
            except Exception as e:  # noqa: BLE001 - reported to the requests, the worker goes on
                traceback.print_exc()
                error = f"the encoder failed: {e!r}"
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
            seconds = time.perf_counter() - t0
            self.metrics.step("encode", seconds)
            for job in batch:
                job.array = None
                job.batch, job.service_ms, job.error = number, seconds * 1e3, error
                job.request.job_done()


@dataclass
class PdJob:
    """One prefill/decode request."""

    keys: list[str]
    images: list  # ImageInfo, for cache misses
    text_tokens: int
    prompt_tokens: int
    output_tokens: int
    seed: int
    started: threading.Event = field(default_factory=threading.Event)
    tokens: "queue_like" = None  # noqa: F821 - a queue.Queue of ints, then DONE or an EngineError
    hits: list[bool] = field(default_factory=list)
    encode_ms: float = 0.0
    prefill_ms: float = 0.0
    first_token_at: float = 0.0
    aborted: bool = False
    on_start: object = None  # called by the worker when the prefill starts


@dataclass
class _Seq:
    job: PdJob
    slot: int
    length: int  # tokens in the KV arena
    last: int
    produced: int


class PdEngine:
    def __init__(self, lm: LanguageModel, vision, spec: ModelSpec, device: torch.device, dtype: torch.dtype,
                 cache, metrics: Metrics, resize: str = "device"):
        self.prepare = PREPARE[resize]
        self.lm, self.vision, self.spec, self.device, self.dtype = lm, vision, spec, device, dtype
        self.cache = cache
        self.metrics = metrics
        self.waiting: collections.deque[PdJob] = collections.deque()
        self.running: list[_Seq] = []
        self.cond = threading.Condition()
        self.stopping = False
        self.decode_steps = 0
        self.thread = threading.Thread(target=self._loop, name=f"pd-{device}", daemon=True)
        self.thread.start()

    def submit(self, job: PdJob) -> None:
        with self.cond:
            self.waiting.append(job)
            self.cond.notify()

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()

    def _loop(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # the current device is per thread
        while True:
            with self.cond:
                while not self.stopping and not self.running and not self.waiting:
                    self.cond.wait()
                if self.stopping:
                    return
                job = None
                if self.waiting and self.lm.arena.free > 0:
                    job = self.waiting.popleft()
            try:
                if job is not None:
                    self._prefill(job)
                elif self.running:
                    self._decode()
            except Exception as e:  # noqa: BLE001 - fail what was in flight, keep serving
                traceback.print_exc()
                err = EngineError(f"the prefill/decode worker failed: {e!r}")
                if job is not None and not any(s.job is job for s in self.running):
                    job.tokens.put(err)
                if job is None:
                    for s in self.running:
                        s.job.tokens.put(err)
                    self.running = []
                    self.lm.arena.used = 0
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()

    def _text_ids(self, job: PdJob) -> torch.Tensor:
        vocab = self.lm.cfg.vocab_size
        g = torch.Generator().manual_seed(job.seed)
        # Ordinary-token ids below the special tokens' range.
        return torch.randint(0, min(vocab, 151643) - 2, (job.text_tokens,), generator=g)

    def _prefill(self, job: PdJob) -> None:
        job.started.set()
        if job.on_start is not None:
            job.on_start()
        t0 = time.perf_counter()
        embeds: list[torch.Tensor | None] = []
        for key in job.keys:
            embeds.append(self.cache.get(key, self.device))
        job.hits = [e is not None for e in embeds]
        misses = [i for i, e in enumerate(embeds) if e is None]
        if misses:
            arrays = [self.prepare(job.images[i]) for i in misses]
            sizes = [job.images[i].resized for i in misses]
            for i, e in zip(misses, run_vision(self.vision, self.spec, arrays, self.device, self.dtype, sizes)):
                embeds[i] = e
            sync(self.device)
        t1 = time.perf_counter()
        job.encode_ms = (t1 - t0) * 1e3 if misses else 0.0
        job.images = []
        prompt = self.lm.prompt_embeds(self._text_ids(job), embeds)
        if prompt.shape[0] != job.prompt_tokens:
            raise EngineError(f"prompt of {prompt.shape[0]} tokens, expected {job.prompt_tokens}")
        slot, token = self.lm.prefill(prompt)  # the token's .item() synchronises
        t2 = time.perf_counter()
        job.prefill_ms = (t2 - t1) * 1e3
        job.first_token_at = t2
        self.metrics.step("prefill", t2 - t0)
        job.tokens.put(token)
        seq = _Seq(job, slot, job.prompt_tokens, token, 1)
        self.running.append(seq)
        if job.output_tokens <= 1:
            job.tokens.put(DONE)
            self._release(seq)

    def _release(self, seq: _Seq) -> None:
        """Frees a sequence's slot; the last slot's sequence moves into it (slots stay 0..n-1)."""
        last = max(self.running, key=lambda s: s.slot)
        moved = self.lm.release(seq.slot, last.length)
        if moved is not None:
            last.slot = seq.slot
        self.running.remove(seq)

    def _decode(self) -> None:
        for s in [s for s in self.running if s.job.aborted]:
            self._release(s)
        if not self.running:
            return
        self.running.sort(key=lambda s: s.slot)
        t0 = time.perf_counter()
        nxt = self.lm.decode_step([s.length for s in self.running], [s.last for s in self.running])
        self.metrics.step("decode", time.perf_counter() - t0)
        self.decode_steps += 1
        done = []
        for s, token in zip(list(self.running), nxt):
            s.length += 1
            s.last = token
            s.produced += 1
            s.job.tokens.put(token)
            if s.produced >= s.job.output_tokens:
                s.job.tokens.put(DONE)
                done.append(s)
        for s in done:
            self._release(s)


def body_seed(body_hash: int) -> int:
    return int.from_bytes(hashlib.blake2b(body_hash.to_bytes(8, "little"), digest_size=4).digest(), "little")
