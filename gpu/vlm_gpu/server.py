"""The HTTP servers: one per role, each an OpenAI-compatible vLLM instance, with the backend
emulator's API (tools/emulator/README.md): the same endpoints, metrics, debug log, fault
injection and `x-emulator-*` response headers, so the benchmark and the tests treat both backends
alike. Here every time in a header, the log and the metrics is MEASURED wall-clock time on the
real devices, not modelled.
"""
from __future__ import annotations

import collections
import json
import queue
import socket
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .engine import DONE, PREPARE, EncodeEngine, EncodeJob, EncodeRequest, EngineError, PdEngine, PdJob, body_seed
from .metrics import Metrics
from .request import Analysis, ApiError, analyse
from .sizing import SizingRule

MAX_MODEL_LEN_REPORTED = 32768

# Words of the "generated" text: token id -> word. Random weights generate meaningless ids; the
# words only make the output readable.
WORDS = ("the image shows a scene with several objects in soft light near an open window and colour "
         "detail on left right side of frame text reads small large background foreground people table").split()

ROUTES = ("/health", "/v1/models", "/metrics", "/v1/chat/completions", "/debug/requests", "/debug/faults",
          "/debug/ec-cache")


def word(token: int, i: int) -> str:
    w = WORDS[token % len(WORDS)]
    return w if i == 0 else " " + w


@dataclass
class Options:
    model: str
    rule: SizingRule
    max_image_pixels: int
    max_body_bytes: int
    default_output_tokens: int
    max_output_tokens: int
    max_model_len: int
    debug_log_capacity: int
    seed: int
    resize: str = "device"  # where images are resized: "device" (the encoder's) or "pil" (CPU)


class DebugLog:
    def __init__(self, capacity: int):
        self.entries: collections.deque = collections.deque(maxlen=max(1, capacity))
        self.lock = threading.Lock()

    def push(self, e: dict) -> None:
        with self.lock:
            self.entries.append(e)

    def to_json(self) -> bytes:
        with self.lock:
            return json.dumps(list(self.entries)).encode()

    def clear(self) -> int:
        with self.lock:
            n = len(self.entries)
            self.entries.clear()
            return n


class Faults:
    def __init__(self):
        self.lock = threading.Lock()
        self.state = {"extra_delay_ms": 0, "fail_status": None, "fail_count": 0}

    def set(self, body: bytes) -> dict:
        try:
            f = json.loads(body or b"{}")
        except ValueError as e:
            raise ApiError.bad_request("invalid_faults", f"invalid faults: {e}") from None
        if not isinstance(f, dict) or set(f) - set(self.state):
            raise ApiError.bad_request("invalid_faults", "invalid faults: unknown field")
        new = {"extra_delay_ms": f.get("extra_delay_ms", 0), "fail_status": f.get("fail_status"),
               "fail_count": f.get("fail_count", 0)}
        for k in ("extra_delay_ms", "fail_count"):
            if isinstance(new[k], bool) or not isinstance(new[k], int) or new[k] < 0:
                raise ApiError.bad_request("invalid_faults", f"invalid faults: {k} must be a non-negative integer")
        s = new["fail_status"]
        if s is not None and (isinstance(s, bool) or not isinstance(s, int) or not 400 <= s <= 599):
            raise ApiError.bad_request("invalid_faults",
                                       f"fail_status {s} is not an HTTP error status (400..=599)")
        with self.lock:
            self.state = new
            return dict(new)

    def get(self) -> dict:
        with self.lock:
            return dict(self.state)

    def take(self) -> tuple[int, int | None]:
        with self.lock:
            f = self.state
            fail = None
            if f["fail_status"] is not None and f["fail_count"] > 0:
                f["fail_count"] -= 1
                fail = f["fail_status"]
            return f["extra_delay_ms"], fail


class Shared:
    """State shared by the instances of one process."""

    def __init__(self, opts: Options, cache):
        self.opts = opts
        self.cache = cache
        self.log = DebugLog(opts.debug_log_capacity)
        self.started = time.perf_counter()
        self.started_unix = int(time.time())
        self.requests = 0
        self.lock = threading.Lock()

    def next_id(self) -> str:
        with self.lock:
            self.requests += 1
            n = self.requests
        return f"chatcmpl-{self.opts.seed:08x}{n:024x}"


class Stats:
    def __init__(self):
        self.hits: list[bool] = []
        self.preprocess_ms = 0.0
        self.queue_ms = 0.0
        self.encode_ms = 0.0
        self.prefill_ms = 0.0
        self.ttft_ms = 0.0

    def cache(self) -> str:
        n, h = len(self.hits), sum(self.hits)
        if n == 0:
            return "none"
        if h == n:
            return "hit"
        if h == 0:
            return "miss"
        return "partial"


class ClientGone(Exception):
    pass


class Instance:
    """One role's server."""

    def __init__(self, role: str, shared: Shared, engine):
        self.role = role
        self.shared = shared
        self.engine = engine
        self.metrics = Metrics(shared.opts.model)
        self.faults = Faults()
        self.prepare = PREPARE[shared.opts.resize]

    # ------------------------------------------------------------------ chat

    def log_entry(self, request_id, arrival: float, status: int) -> dict:
        return {"role": self.role, "request_id": request_id,
                "arrival_ms": (arrival - self.shared.started) * 1e3, "images": [], "max_tokens": None,
                "stream": False, "status": status, "error": None, "prompt_tokens": 0, "completion_tokens": 0,
                "ttft_ms": None, "e2e_ms": None}

    def output_len(self, a: Analysis) -> tuple[int, str]:
        o = self.shared.opts
        if self.role == "encode":
            return 1, "length"
        n = a.params.requested_max_tokens()
        if n is not None:
            return min(n, o.max_output_tokens), "length"
        return min(o.default_output_tokens, o.max_output_tokens), "stop"

    def serve(self, a: Analysis, arrival: float) -> tuple[Stats, int, str, object]:
        """Up to the first token; returns the stats, output length, finish reason and the token
        source (a queue for PD, None for encode)."""
        o = self.shared.opts
        self.metrics.decoded(len(a.images), a.visual_tokens)
        n_out, finish = self.output_len(a)
        if self.role == "pd" and a.prompt_tokens + n_out > o.max_model_len:
            raise ApiError.bad_request(
                "invalid_request",
                f"This model's maximum context length is {o.max_model_len} tokens. However, you requested "
                f"{a.prompt_tokens + n_out} tokens ({a.prompt_tokens} in the messages, {n_out} in the completion). "
                "Please reduce the length of the messages or completion.")
        stats = Stats()
        if self.role == "encode":
            self.encode(a, stats, arrival)
            return stats, n_out, finish, None
        tokens = self.prefill(a, stats, arrival, n_out)
        return stats, n_out, finish, tokens

    def encode(self, a: Analysis, stats: Stats, arrival: float) -> None:
        cache = self.shared.cache
        stats.hits = [cache.contains(i.key) for i in a.images]
        misses = [i for i, hit in zip(a.images, stats.hits) if not hit]
        arrays = [self.prepare(i) for i in misses]
        stats.preprocess_ms = (time.perf_counter() - arrival) * 1e3
        self.metrics.ec_lookups(len(a.images) - len(misses), len(misses))
        if misses:
            req = EncodeRequest(len(misses))
            jobs = [EncodeJob(i.key, i.visual_tokens, arr, i.resized, req) for i, arr in zip(misses, arrays)]
            enqueued = time.perf_counter()
            self.metrics.add("waiting", 1)
            self.engine.submit(jobs)
            req.started.wait()
            self.metrics.add("waiting", -1)
            self.metrics.add("running", 1)
            req.done.wait()
            self.metrics.add("running", -1)
            errors = [j.error for j in jobs if j.error]
            if errors:
                raise ApiError(500, "internal_error", errors[0])
            batches = {j.batch: j.service_ms for j in jobs}
            stats.encode_ms = sum(batches.values())
            stats.queue_ms = max(0.0, (time.perf_counter() - enqueued) * 1e3 - stats.encode_ms)
        stats.ttft_ms = (time.perf_counter() - arrival) * 1e3

    def prefill(self, a: Analysis, stats: Stats, arrival: float, n_out: int) -> queue.Queue:
        stats.preprocess_ms = (time.perf_counter() - arrival) * 1e3
        tokens: queue.Queue = queue.Queue()
        job = PdJob(keys=[i.key for i in a.images], images=list(a.images), text_tokens=a.text_tokens,
                    prompt_tokens=a.prompt_tokens, output_tokens=n_out, seed=body_seed(a.body_hash), tokens=tokens)
        enqueued = time.perf_counter()

        def on_start():
            self.metrics.add("waiting", -1)
            self.metrics.add("running", 1)

        job.on_start = on_start
        self.metrics.add("waiting", 1)
        self.engine.submit(job)
        first = tokens.get()
        if isinstance(first, EngineError):
            self.metrics.add("running" if job.started.is_set() else "waiting", -1)
            raise ApiError(500, "internal_error", str(first))
        hits = sum(job.hits)
        self.metrics.ec_lookups(hits, len(job.hits) - hits)
        stats.hits = list(job.hits)
        stats.encode_ms = job.encode_ms
        stats.prefill_ms = job.prefill_ms
        stats.queue_ms = max(0.0, (job.first_token_at - enqueued) * 1e3 - job.encode_ms - job.prefill_ms)
        stats.ttft_ms = (job.first_token_at - arrival) * 1e3
        tokens.job = job
        tokens.first = first
        return tokens

    def stats_headers(self, a: Analysis | None, s: Stats) -> list[tuple[str, str]]:
        vis, n = (a.visual_tokens, len(a.images)) if a else (0, 0)
        return [("x-emulator-visual-tokens", str(vis)), ("x-emulator-images", str(n)),
                ("x-emulator-ec-cache", s.cache()), ("x-emulator-preprocess-ms", f"{s.preprocess_ms:.3f}"),
                ("x-emulator-queue-ms", f"{s.queue_ms:.3f}"), ("x-emulator-encode-ms", f"{s.encode_ms:.3f}"),
                ("x-emulator-prefill-ms", f"{s.prefill_ms:.3f}"), ("x-emulator-ttft-ms", f"{s.ttft_ms:.3f}")]

    def finish(self, a: Analysis, s: Stats, n_out: int, finish: str, arrival: float, entry: dict) -> None:
        e2e_ms = (time.perf_counter() - arrival) * 1e3
        entry["e2e_ms"] = e2e_ms
        self.metrics.finished(a.prompt_tokens, n_out, finish, s.ttft_ms / 1e3, e2e_ms / 1e3)
        self.shared.log.push(entry)


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "total_tokens": prompt + completion, "completion_tokens": completion,
            "prompt_tokens_details": None}


def sse(v: dict) -> bytes:
    return b"data: " + json.dumps(v, separators=(",", ":")).encode() + b"\n\n"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    instance: Instance  # set per server class

    def log_message(self, *args):
        pass

    # ------------------------------------------------------------------ plumbing

    def read_body(self, limit: int) -> bytes:
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                line = self.rfile.readline(1024)
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                if len(out) + size > limit:
                    self.close_connection = True
                    raise ApiError(413, "body_too_large", f"request body is larger than the {limit}-byte limit")
                out += self.rfile.read(size)
                self.rfile.readline(1024)
            return bytes(out)
        length = int(self.headers.get("content-length") or 0)
        if length > limit:
            # Read what was sent (up to 64 MiB more) so that the client sees the answer, not a
            # reset; then close.
            self.close_connection = True
            left = length if length <= limit + (64 << 20) else 0
            while left > 0:
                got = self.rfile.read(min(left, 1 << 20))
                if not got:
                    break
                left -= len(got)
            raise ApiError(413, "body_too_large", f"request body is larger than the {limit}-byte limit")
        return self.rfile.read(length) if length else b""

    def send(self, status: int, body: bytes, ctype: str = "application/json", headers=()) -> None:
        self.send_response(status)
        self.send_header("content-type", ctype)
        self.send_header("content-length", str(len(body)))
        self.send_header("x-emulator-role", self.instance.role)
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def send_error_json(self, e: ApiError, headers=()) -> None:
        self.send(e.status, e.to_json(), headers=headers)

    def route(self, method: str) -> None:
        path = self.path.split("?", 1)[0]
        inst = self.instance
        try:
            if method == "POST" and path == "/v1/chat/completions":
                return self.chat()
            body = self.read_body(1 << 16)
            if method == "GET" and path == "/health":
                return self.send(200, b"", ctype="text/plain")
            if method == "GET" and path == "/v1/models":
                m = inst.shared.opts.model
                return self.send(200, json.dumps({"object": "list", "data": [{
                    "id": m, "object": "model", "created": inst.shared.started_unix, "owned_by": "vllm",
                    "root": m, "parent": None, "max_model_len": inst.shared.opts.max_model_len,
                    "permission": []}]}).encode())
            if method == "GET" and path == "/metrics":
                return self.send(200, inst.metrics.render().encode(),
                                 ctype="text/plain; version=0.0.4; charset=utf-8")
            if method == "GET" and path == "/debug/requests":
                return self.send(200, inst.shared.log.to_json())
            if method == "DELETE" and path == "/debug/requests":
                return self.send(200, json.dumps({"cleared": inst.shared.log.clear()}).encode())
            if method == "GET" and path == "/debug/faults":
                return self.send(200, json.dumps(inst.faults.get()).encode())
            if method == "POST" and path == "/debug/faults":
                return self.send(200, json.dumps(inst.faults.set(body)).encode())
            if method == "DELETE" and path == "/debug/ec-cache":
                return self.send(200, json.dumps({"cleared": inst.shared.cache.clear()}).encode())
            if path in ROUTES:
                raise ApiError(405, "method_not_allowed", f"{method} is not allowed on {path}")
            raise ApiError(404, "not_found", f"no route for {path}")
        except ApiError as e:
            self.send_error_json(e)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def do_GET(self):
        self.route("GET")

    def do_POST(self):
        self.route("POST")

    def do_DELETE(self):
        self.route("DELETE")

    def do_PUT(self):
        self.route("PUT")

    def do_PATCH(self):
        self.route("PATCH")

    # ------------------------------------------------------------------ chat

    def chat(self) -> None:
        inst = self.instance
        arrival = time.perf_counter()
        request_id = self.headers.get("x-request-id")
        rid = [("x-request-id", request_id)] if request_id is not None else []
        delay_ms, fail = inst.faults.take()
        a = None
        try:
            body = self.read_body(inst.shared.opts.max_body_bytes)
            if fail is not None:
                raise ApiError(fail, "injected_fault", f"injected fault: status {fail}")
            a = analyse(body, inst.shared.opts.rule, inst.shared.opts.max_image_pixels)
            stats, n_out, finish, tokens = inst.serve(a, arrival)
        except ApiError as e:
            entry = inst.log_entry(request_id, arrival, e.status)
            entry["error"] = e.code
            if a is not None:
                entry["max_tokens"] = a.params.requested_max_tokens()
                entry["stream"] = a.params.stream
            inst.shared.log.push(entry)
            if delay_ms:
                time.sleep(delay_ms / 1e3)
            self.send_error_json(e, headers=inst.stats_headers(a, Stats()) + rid)
            return
        entry = inst.log_entry(request_id, arrival, 200)
        entry["images"] = [{"sha256": i.sha256, "width": i.width, "height": i.height,
                            "visual_tokens": i.visual_tokens, "cache": "hit" if h else "miss"}
                           for i, h in zip(a.images, stats.hits)]
        entry["max_tokens"] = a.params.requested_max_tokens()
        entry["stream"] = a.params.stream
        entry["prompt_tokens"] = a.prompt_tokens
        entry["completion_tokens"] = n_out
        entry["ttft_ms"] = stats.ttft_ms
        meta = {"id": inst.shared.next_id(), "created": int(time.time()),
                "model": a.params.model if a.params.model is not None else inst.shared.opts.model}
        headers = inst.stats_headers(a, stats) + rid
        try:
            if not a.params.stream:
                content = "".join(word(t, i) for i, t in enumerate(token_source(tokens, a)))
                if delay_ms:
                    time.sleep(delay_ms / 1e3)
                out = {"id": meta["id"], "object": "chat.completion", "created": meta["created"],
                       "model": meta["model"],
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": content,
                                                            "tool_calls": []},
                                    "logprobs": None, "finish_reason": finish, "stop_reason": None}],
                       "usage": usage(a.prompt_tokens, n_out), "prompt_logprobs": None}
                inst.finish(a, stats, n_out, finish, arrival, entry)
                self.send(200, json.dumps(out).encode(), headers=headers)
            else:
                self.stream(meta, a, stats, n_out, finish, tokens, headers, arrival, entry, delay_ms)
        except EngineError as e:
            entry.update(status=500, error="internal_error")
            inst.shared.log.push(entry)
            if not a.params.stream:
                self.send_error_json(ApiError(500, "internal_error", str(e)), headers=rid)
            else:  # headers are out: end the stream without [DONE]
                self.close_connection = True
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            if tokens is not None:
                inst.metrics.add("running", -1)

    def write_chunk(self, data: bytes) -> None:
        try:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
        except OSError as e:  # broken pipe, reset, timeout
            raise ClientGone() from e

    def stream(self, meta, a, stats, n_out, finish, tokens, headers, arrival, entry, delay_ms) -> None:
        inst = self.instance
        include_usage = a.params.include_usage
        if delay_ms:
            time.sleep(delay_ms / 1e3)

        def chunk(choices):
            v = {"id": meta["id"], "object": "chat.completion.chunk", "created": meta["created"],
                 "model": meta["model"], "choices": choices}
            if include_usage:
                v["usage"] = None
            return v

        try:
            self.send_response(200)
            self.send_header("content-type", "text/event-stream; charset=utf-8")
            self.send_header("cache-control", "no-cache")
            self.send_header("transfer-encoding", "chunked")
            self.send_header("x-emulator-role", inst.role)
            for k, v in headers:
                self.send_header(k, v)
            self.end_headers()
            self.write_chunk(sse(chunk([{"index": 0, "delta": {"role": "assistant", "content": ""},
                                         "logprobs": None, "finish_reason": None}])))
            for i, t in enumerate(token_source(tokens, a)):
                last = i + 1 == n_out
                self.write_chunk(sse(chunk([{"index": 0, "delta": {"content": word(t, i)}, "logprobs": None,
                                             "finish_reason": finish if last else None}])))
            if include_usage:
                v = chunk([])
                v["usage"] = usage(a.prompt_tokens, n_out)
                self.write_chunk(sse(v))
            self.write_chunk(b"data: [DONE]\n\n")
            try:
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
            except OSError as e:
                raise ClientGone() from e
            inst.finish(a, stats, n_out, finish, arrival, entry)
        except ClientGone:
            # The client went away: vLLM aborts the request; the worker drops it at its next step.
            self.close_connection = True
            if tokens is not None:
                tokens.job.aborted = True
            entry.update(status=499, error="client_disconnected")
            inst.shared.log.push(entry)


def token_source(tokens, a: Analysis):
    """The generated token ids, first to last."""
    if tokens is None:  # the encode role answers with one token and runs no language model
        yield a.body_hash % len(WORDS)
        return
    yield tokens.first
    while True:
        t = tokens.get()
        if t is DONE:
            return
        if isinstance(t, EngineError):
            raise t
        yield t


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024
    allow_reuse_address = True


def start_instance(role: str, shared: Shared, engine, host: str, port: int) -> tuple[Server, Instance]:
    inst = Instance(role, shared, engine)
    handler = type(f"{role.title()}Handler", (Handler,), {"instance": inst})
    srv = Server((host, port), handler)
    threading.Thread(target=srv.serve_forever, name=f"http-{role}", daemon=True).start()
    return srv, inst


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


__all__ = ["Options", "Shared", "start_instance", "EncodeEngine", "PdEngine"]
