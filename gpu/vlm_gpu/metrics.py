"""Prometheus metrics with vLLM's names (and the backend emulator's), text exposition format."""
from __future__ import annotations

import threading

# vLLM's bucket bounds.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)
# This backend's own: GPU time of one encoder batch, one prefill, one decode step.
STEP_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.6, 0.8, 1.0, 1.5, 2.0, 3.0, 5.0)


def fmt_float(v: float) -> str:
    """A float as Prometheus clients write it (always with a decimal point)."""
    v = float(v)
    if v == int(v) and abs(v) < 1e15:
        return f"{v:.1f}"
    return repr(v)


def escape_label(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Histogram:
    def __init__(self, bounds):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        v = max(0.0, v) if v == v and v not in (float("inf"), float("-inf")) else 0.0
        i = 0
        while i < len(self.bounds) and self.bounds[i] < v:
            i += 1
        self.counts[i] += 1
        self.sum += v
        self.count += 1

    def samples(self, label: str):
        out, cum = [], 0
        for b, c in zip(self.bounds, self.counts):
            cum += c
            out.append(("_bucket", f'le="{fmt_float(b)}",{label}', str(cum)))
        cum += self.counts[-1]
        out.append(("_bucket", f'le="+Inf",{label}', str(cum)))
        out.append(("_count", label, str(self.count)))
        out.append(("_sum", label, fmt_float(self.sum)))
        return out


class Metrics:
    """The metrics of one instance (one role)."""

    def __init__(self, model: str):
        self.model = model
        self.lock = threading.Lock()
        self.running = 0
        self.waiting = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.success = {"stop": 0, "length": 0}
        self.ec_hits = 0
        self.ec_misses = 0
        self.images = 0
        self.visual_tokens = 0
        self.steps = {"encode": Histogram(STEP_BUCKETS), "prefill": Histogram(STEP_BUCKETS),
                      "decode": Histogram(STEP_BUCKETS)}

    def add(self, gauge: str, delta: int) -> None:
        with self.lock:
            setattr(self, gauge, getattr(self, gauge) + delta)

    def ec_lookups(self, hits: int, misses: int) -> None:
        with self.lock:
            self.ec_hits += hits
            self.ec_misses += misses

    def decoded(self, images: int, visual_tokens: int) -> None:
        with self.lock:
            self.images += images
            self.visual_tokens += visual_tokens

    def step(self, kind: str, seconds: float) -> None:
        with self.lock:
            self.steps[kind].observe(seconds)

    def finished(self, prompt_tokens: int, generation_tokens: int, reason: str, ttft_s: float, e2e_s: float):
        with self.lock:
            self.prompt_tokens += prompt_tokens
            self.generation_tokens += generation_tokens
            self.success[reason] += 1
            self.ttft.observe(ttft_s)
            self.e2e.observe(e2e_s)

    def render(self) -> str:
        with self.lock:
            label = f'model_name="{escape_label(self.model)}"'
            out: list[str] = []

            def family(name, kind, help_, samples):
                out.append(f"# HELP {name} {help_}")
                out.append(f"# TYPE {name} {kind}")
                for suffix, labels, value in samples:
                    out.append(f"{name}{suffix}{{{labels}}} {value}")

            def one(v):
                return [("", label, str(v))]

            family("vllm:num_requests_running", "gauge", "Number of requests in model execution batches.",
                   one(self.running))
            family("vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed.",
                   one(self.waiting))
            family("vllm:time_to_first_token_seconds", "histogram", "Histogram of time to first token in seconds.",
                   self.ttft.samples(label))
            family("vllm:e2e_request_latency_seconds", "histogram", "Histogram of e2e request latency in seconds.",
                   self.e2e.samples(label))
            family("vllm:prompt_tokens_total", "counter", "Number of prefill tokens processed.",
                   one(self.prompt_tokens))
            family("vllm:generation_tokens_total", "counter", "Number of generation tokens processed.",
                   one(self.generation_tokens))
            family("vllm:request_success_total", "counter", "Count of successfully processed requests.",
                   [("", f'finished_reason="stop",{label}', str(self.success["stop"])),
                    ("", f'finished_reason="length",{label}', str(self.success["length"]))])
            family("ec_cache_hits_total", "counter", "Images whose encoder output was found in the encoder cache.",
                   one(self.ec_hits))
            family("ec_cache_misses_total", "counter", "Images not in the encoder cache (encoded by this instance).",
                   one(self.ec_misses))
            family("emulator_images_total", "counter", "Images decoded.", one(self.images))
            family("emulator_visual_tokens_total", "counter",
                   "Visual tokens of the images decoded (Qwen sizing rule).", one(self.visual_tokens))
            family("vlm_gpu_encoder_batch_seconds", "histogram",
                   "GPU time of one vision-tower batch (processor, forward, cache store).",
                   self.steps["encode"].samples(label))
            family("vlm_gpu_prefill_seconds", "histogram",
                   "GPU time of one prefill (cache lookups, miss encoding, LM forward).",
                   self.steps["prefill"].samples(label))
            family("vlm_gpu_decode_step_seconds", "histogram",
                   "GPU time of one batched decode step (one token for every running request).",
                   self.steps["decode"].samples(label))
            return "\n".join(out) + "\n"
