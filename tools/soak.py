#!/usr/bin/env python3
"""Soak and fault test: Envoy with the filter in front of the backend
emulator's encode and prefill/decode (PD) instances, all on 127.0.0.1.

Closed-loop clients send mixed chat traffic (text only, small and large
images, several images, SSE streams, remote URLs, bad input) as fast as the
machine answers; 10% of the requests are abandoned by their client (mid
upload, while waiting, or mid stream). Faults are injected on a schedule:
encode calls answered 503, the encoder killed and restarted, PD killed
mid-stream and restarted, the encoder frozen (its /metrics and encode calls
time out), PD answering 500.

Afterwards it checks: the filter's in-flight gauges are back to 0, no VM was
reloaded, Envoy's memory is flat after warm-up, every request was answered or
failed with a clear error, and every body PD (and the encoder) received was a
complete, readable chat request carrying the images it should (the
emulators' /debug/requests logs, keyed by x-request-id).

    .venv/bin/python tools/soak.py --seconds 600 --report bench/results/soak.json

Exits 0 when every check holds, 1 otherwise. Needs `make wasm emulator venv`.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import pathlib
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests/integration"))

import harness  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

EMULATOR = ROOT / "target/release/vlm-emulator"
CLIENT_TIMEOUT_S = 30.0
# Outcomes that are a clear answer whenever they happen.
CLEAR = {"ok", "rejected", "backend_error", "aborted"}
# Outcomes that are clear only while PD is down or just restarted.
PD_FAULT_ONLY = {"upstream_unavailable", "cut"}


# ------------------------------------------------------------------ processes


class Role:
    """One emulator role in its own process, restartable on the same port."""

    def __init__(self, role: str, port: int, workdir: pathlib.Path, args: list[str]):
        self.role, self.port, self.workdir, self.args = role, port, workdir, args
        self.base = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.log_entries: list[dict] = []  # collected before each kill and at the end

    def start(self):
        self.starts += 1
        log = open(self.workdir / f"{self.role}-{self.starts}.log", "wb")
        port_flag = "--encode-port" if self.role == "encode" else "--pd-port"
        self.proc = subprocess.Popen([str(EMULATOR), "--role", self.role, port_flag, str(self.port), *self.args],
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 15
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.role} emulator exited {self.proc.returncode}")
            try:
                with urllib.request.urlopen(self.base + "/health", timeout=1):
                    return
            except (urllib.error.URLError, OSError):
                time.sleep(0.05)
        raise RuntimeError(f"{self.role} emulator not ready")

    def collect_log(self):
        try:
            with urllib.request.urlopen(self.base + "/debug/requests", timeout=10) as r:
                entries = json.loads(r.read())
            req = urllib.request.Request(self.base + "/debug/requests", method="DELETE")
            urllib.request.urlopen(req, timeout=10).read()
            self.log_entries.extend(entries)
        except (urllib.error.URLError, OSError, ValueError) as e:
            print(f"soak: cannot read the {self.role} log: {e}", file=sys.stderr)

    def faults(self, **kw):
        req = urllib.request.Request(self.base + "/debug/faults", data=json.dumps(kw).encode(), method="POST",
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def kill(self):
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def signal(self, sig):
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGCONT)
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


# ------------------------------------------------------------------ workload


def make_image(rng: random.Random, width: int, height: int, fmt: str) -> bytes:
    img = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x, y = rng.randrange(width), rng.randrange(height)
        r = rng.randrange(20, max(21, width // 4))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.randrange(256) for _ in range(3)))
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 85} if fmt == "JPEG" else {}))
    return buf.getvalue()


class Workload:
    """Pre-built request bodies of each kind (images built once)."""

    WEIGHTS = {"text": 5, "small": 20, "large": 20, "multi": 15, "stream": 22, "remote": 5, "bad": 13}

    def __init__(self, rng: random.Random):
        def url(w, h, fmt):
            return harness.data_url(make_image(rng, w, h, fmt), f"image/{fmt.lower()}")

        self.small = [url(rng.choice([224, 300, 448]), rng.choice([168, 200, 336]), rng.choice(["PNG", "JPEG"]))
                      for _ in range(12)]
        self.large = [url(rng.choice([1280, 1600, 1920]), rng.choice([960, 1080, 1200]), rng.choice(["PNG", "JPEG"]))
                      for _ in range(10)]
        self.rng = rng
        b64 = self.small[0].split(",", 1)[1]
        self.bad = [
            (b'{"messages": [{"role": "user", "content": [{"type": "image_url"', "invalid_json"),
            (b'{"messages": {"role": "user", "content": [{"type": "image_url"}]}}', "invalid_request"),
            (self.body([f"data:image/png;base64,{b64[:200]}!{b64[201:]}"]), "invalid_base64"),
            (self.body(["data:image/webp;base64,UklGRgAAAABXRUJQ"]), "unsupported_image_type"),
            (self.body([self.small[1]] * 65), "too_many_images"),
        ]

    def body(self, urls: list[str], text="Describe the images.", stream=False, max_tokens=16) -> bytes:
        content = [{"type": "text", "text": text}] + [{"type": "image_url", "image_url": {"url": u}} for u in urls]
        doc = {"model": "Qwen/Qwen2.5-VL-3B-Instruct", "messages": [{"role": "user", "content": content}],
               "max_tokens": max_tokens}
        if stream:
            doc["stream"] = True
            doc["stream_options"] = {"include_usage": True}
        return json.dumps(doc).encode()

    def pick(self) -> tuple[str, bytes, int, str | None, bool]:
        """(kind, body, data-URL images, expected error code, streamed)."""
        rng = self.rng
        kind = rng.choices(list(self.WEIGHTS), weights=list(self.WEIGHTS.values()))[0]
        if kind == "text":
            return kind, self.body([], text="Say hello."), 0, None, False
        if kind == "small":
            return kind, self.body([rng.choice(self.small)]), 1, None, False
        if kind == "large":
            return kind, self.body([rng.choice(self.large)]), 1, None, False
        if kind == "multi":
            urls = [rng.choice(self.small), rng.choice(self.large), rng.choice(self.small)]
            return kind, self.body(urls), 3, None, False
        if kind == "stream":
            urls = [rng.choice(self.small + self.large)]
            return kind, self.body(urls, stream=True, max_tokens=rng.randrange(64, 256)), 1, None, True
        if kind == "remote":
            return kind, self.body(["http://127.0.0.1:9/never-fetched.png"]), 0, None, False
        body, code = rng.choice(self.bad)
        return kind, body, 0, code, False


# ------------------------------------------------------------------ client


class Response:
    def __init__(self):
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body = b""
        self.complete = False


def read_response(f, stop_after_events: int | None = None, on_headers=None) -> Response:
    """Reads one HTTP/1.1 response; `complete` tells whether it ended as framed.
    `on_headers()` is called once the status line and headers are in."""
    r = Response()
    line = f.readline()
    if not line:
        return r
    r.status = int(line.split()[1])
    while True:
        line = f.readline()
        if not line:
            return r
        if line in (b"\r\n", b"\n"):
            break
        k, _, v = line.decode("latin-1").partition(":")
        r.headers[k.strip().lower()] = v.strip()
    if on_headers:
        on_headers()
    if r.headers.get("transfer-encoding", "").lower() == "chunked":
        out = bytearray()
        while True:
            size_line = f.readline()
            if not size_line:
                r.body = bytes(out)
                return r
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                f.readline()
                r.body, r.complete = bytes(out), True
                return r
            chunk = f.read(size)
            f.readline()
            if len(chunk) < size:
                r.body = bytes(out + chunk)
                return r
            out += chunk
            if stop_after_events is not None and out.count(b"\n\n") >= stop_after_events:
                r.body = bytes(out)
                return r
    length = int(r.headers.get("content-length", "0"))
    r.body = f.read(length)
    r.complete = len(r.body) == length
    return r


def classify(kind: str, code: str | None, streamed: bool, r: Response) -> str:
    if r.status == 0:
        return "cut"
    if r.status == 200:
        if not r.complete:
            return "cut"
        if kind == "bad":
            return "violation: bad input answered 200"
        if streamed:
            return "ok" if r.body.rstrip().endswith(b"data: [DONE]") else "violation: stream without [DONE]"
        try:
            return "ok" if json.loads(r.body)["choices"] else "violation: empty choices"
        except (ValueError, KeyError, TypeError):
            return "violation: unreadable 200 body"
    if r.status == 503 and b"upstream" in r.body:
        return "upstream_unavailable"
    try:
        err = json.loads(r.body)["error"]
    except (ValueError, KeyError, TypeError):
        return f"violation: {r.status} without an error body"
    if "x-emulator-role" not in r.headers and r.status == 400:
        # The filter's own reply (backend answers carry x-emulator-role).
        return "rejected" if kind == "bad" and err.get("code") == code else f"violation: filter said {err.get('code')}"
    if kind == "bad":
        return f"violation: bad input reached the backend ({err.get('code')})"
    return "backend_error"


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.outcomes: Counter = Counter()
        self.by_kind: Counter = Counter()
        self.aborts: Counter = Counter()
        self.violations: list[dict] = []
        self.ids: dict[str, tuple[str, int, bool]] = {}  # request id -> (kind, images, aborted)
        self.in_fault_window = lambda t: False
        self.streams_inflight = 0
        self.streams_started = 0  # streams whose response headers came: PD is sending

    def record(self, rid, kind, outcome, at, detail="", abort=None):
        with self.lock:
            if abort:
                self.aborts[abort] += 1
            if outcome in PD_FAULT_ONLY and not self.in_fault_window(at):
                outcome = f"violation: {outcome} outside a PD fault"
            self.outcomes[outcome.split(":")[0]] += 1
            self.by_kind[(kind, outcome.split(":")[0])] += 1
            if outcome.startswith("violation"):
                self.violations.append({"id": rid, "kind": kind, "outcome": outcome, "at": round(at, 2),
                                        "detail": detail[:300]})


def client_loop(n: int, port: int, wl: Workload, stats: Stats, deadline: float, t0: float, abort_rate: float,
                seed: int):
    rng = random.Random(seed)
    seq = 0
    while time.monotonic() < deadline:
        seq += 1
        rid = f"soak-{n}-{seq}"
        kind, body, images, code, streamed = wl.pick()
        abort = rng.choice(["upload", "wait", "stream"] if streamed else ["upload", "wait"]) \
            if rng.random() < abort_rate else None
        with stats.lock:
            stats.ids[rid] = (kind, images, abort is not None)
        start = time.monotonic() - t0
        head = (f"POST /v1/chat/completions HTTP/1.1\r\nhost: vlm\r\ncontent-type: application/json\r\n"
                f"x-request-id: {rid}\r\ncontent-length: {len(body)}\r\n\r\n").encode()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT_S) as s:
                if abort == "upload":
                    s.sendall(head + body[: rng.randrange(1, max(2, len(body)))])
                    time.sleep(rng.uniform(0, 0.05))
                    stats.record(rid, kind, "aborted", start, abort="upload")
                    continue
                s.sendall(head + body)
                if abort == "wait":
                    time.sleep(rng.uniform(0, 0.2))
                    stats.record(rid, kind, "aborted", start, abort="wait")
                    continue
                f = s.makefile("rb")
                started = []

                def on_headers():
                    if streamed:
                        with stats.lock:
                            stats.streams_started += 1
                        started.append(1)

                if streamed:
                    with stats.lock:
                        stats.streams_inflight += 1
                try:
                    r = read_response(f, stop_after_events=2 if abort == "stream" else None, on_headers=on_headers)
                finally:
                    with stats.lock:
                        stats.streams_inflight -= int(streamed)
                        stats.streams_started -= len(started)
                if abort == "stream" and r.status == 200:
                    stats.record(rid, kind, "aborted", start, abort="stream")
                    continue
                outcome = classify(kind, code, streamed, r)
                stats.record(rid, kind, outcome, time.monotonic() - t0, f"{r.status} {r.body[:200]!r}")
        except socket.timeout:
            stats.record(rid, kind, "violation: no answer within the client timeout", start)
        except (ConnectionResetError, BrokenPipeError, ConnectionRefusedError) as e:
            stats.record(rid, kind, "cut", time.monotonic() - t0, repr(e))


# ------------------------------------------------------------------ checks


def envoy_rss_kib(pid: int) -> int:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def envoy_allocated(env) -> int:
    with urllib.request.urlopen(env.admin + "/memory", timeout=5) as r:
        return int(json.loads(r.read())["allocated"])


def check_backend_logs(encode: Role, pd: Role, stats: Stats) -> dict:
    """Every body PD and the encoder read was a complete chat request with the
    images it should carry; refused and abandoned requests never got further
    than an interrupted upload."""
    problems = []
    pd_counts: Counter = Counter()
    for e in pd.log_entries:
        rid = e.get("request_id") or ""
        kind, images, aborted = stats.ids.get(rid, ("?", -1, False))
        err = e.get("error")
        pd_counts[err or "ok"] += 1
        if err is None:
            if kind in ("bad", "remote", "?"):
                problems.append(f"PD served {rid} ({kind})")
            elif len(e.get("images") or []) != images:
                problems.append(f"PD got {len(e.get('images') or [])} images for {rid}, want {images}")
        elif err == "invalid_body":
            pass  # an upload interrupted by Envoy (refused or abandoned request): no body was read
        elif err == "client_disconnected" and aborted:
            pass  # a stream whose client went away
        elif err == "injected_fault" or (err == "invalid_image_url" and kind == "remote"):
            pass
        else:
            problems.append(f"PD could not read the body of {rid} ({kind}): {err}")
    enc_counts: Counter = Counter()
    for e in encode.log_entries:
        rid = e.get("request_id") or ""
        kind = stats.ids.get(rid, ("?", -1, False))[0]
        err = e.get("error")
        enc_counts[err or "ok"] += 1
        if err is None:
            if kind in ("bad", "text", "?") or len(e.get("images") or []) != 1:
                problems.append(f"encoder served {rid} ({kind}) with {len(e.get('images') or [])} images")
        elif err in ("invalid_body", "injected_fault") or (err == "invalid_image_url" and kind == "remote"):
            pass
        else:
            problems.append(f"encoder could not read an encode request of {rid} ({kind}): {err}")
    return {"pd_entries": dict(pd_counts), "encode_entries": dict(enc_counts), "problems": problems[:50],
            "problem_count": len(problems)}


# ------------------------------------------------------------------ main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=600.0, help="traffic duration (default 600)")
    ap.add_argument("--clients", type=int, default=12, help="closed-loop client threads (default 12)")
    ap.add_argument("--abort-rate", type=float, default=0.10, help="fraction of requests abandoned (default 0.1)")
    ap.add_argument("--time-scale", type=float, default=0.1, help="emulator --time-scale (default 0.1)")
    ap.add_argument("--faults", choices=["full", "short", "none"], default="full")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--report", type=pathlib.Path, help="write the JSON report here")
    ap.add_argument("--workdir", type=pathlib.Path, help="logs (default: a temporary directory)")
    args = ap.parse_args(argv)
    for path in (EMULATOR, harness.WASM):
        if not path.exists():
            print(f"soak: {path} missing: run `make wasm emulator venv`", file=sys.stderr)
            return 2
    workdir = args.workdir or pathlib.Path(tempfile.mkdtemp(prefix="vlm-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    cache = workdir / "ec-cache"
    cache.mkdir(exist_ok=True)
    emu_args = ["--ec-cache-dir", str(cache), "--time-scale", str(args.time_scale), "--seed", str(args.seed)]
    encode = Role("encode", harness.free_port(), workdir, emu_args)
    pd = Role("pd", harness.free_port(), workdir, emu_args)
    plugin = {"policy": "dynamic", "ttft_slo_ms": 1000, "encode_cluster": "encode_cluster",
              "encode_timeout_ms": 1000, "encode_retries": 1, "encode_failure": "fallback",
              "encode_fanout": "per_image", "metrics_poll_ms": 500, "metrics_stale_ms": 2000}
    listen, admin = harness.free_port(), harness.free_port()
    cfg = harness.render_config(plugin, pd.port, listen, admin, harness.WASM, encode.port)
    env = None
    stats = Stats()
    events: list[dict] = []
    memory: list[dict] = []
    try:
        encode.start()
        pd.start()
        env = harness.Envoy(cfg, workdir, admin, listen).wait_ready()
        v8_created = env.stats()["wasm.envoy.wasm.runtime.v8.created"]
        wl = Workload(rng)
        s = args.seconds
        t0 = time.monotonic()
        deadline = t0 + s
        grace = 3.0
        windows: list[list[float]] = []  # [PD killed, PD back], in seconds since t0

        def in_window(t):
            return any(a - 0.5 <= t <= b + grace for a, b in windows)

        stats.in_fault_window = in_window
        threads = [threading.Thread(target=client_loop, daemon=True,
                                    args=(i, listen, wl, stats, deadline, t0, args.abort_rate, args.seed * 1000 + i))
                   for i in range(args.clients)]
        for t in threads:
            t.start()

        def at(frac):
            return max(0.0, s * frac)

        def now():
            return time.monotonic() - t0

        def wait_until(t):
            while now() < t:
                time.sleep(0.05)

        def event(name, **kw):
            events.append({"at_s": round(now(), 2), "fault": name, **kw})
            print(f"soak: {now():7.1f}s {name} {kw if kw else ''}", flush=True)

        schedule = {
            "full": [(0.15, "encoder_503"), (0.25, "encoder_kill"), (0.45, "pd_kill_mid_stream"),
                     (0.60, "encoder_frozen"), (0.75, "pd_500"), (0.85, "encoder_kill")],
            "short": [(0.25, "encoder_kill"), (0.5, "pd_kill_mid_stream"), (0.7, "encoder_frozen")],
            "none": [],
        }[args.faults]
        next_sample = 0.0
        pending = list(schedule)
        while now() < s:
            if now() >= next_sample:
                memory.append({"at_s": round(now(), 1), "rss_kib": envoy_rss_kib(env.proc.pid),
                               "allocated": envoy_allocated(env),
                               "vm_memory": env.stats().get("wasmcustom.vlm_budget_vm_memory_bytes", 0)})
                next_sample += max(1.0, s / 60)
            if pending and now() >= at(pending[0][0]):
                _, fault = pending.pop(0)
                if fault == "encoder_503":
                    encode.faults(fail_status=503, fail_count=40)
                    event(fault, calls=40)
                elif fault == "encoder_kill":
                    encode.collect_log()
                    encode.kill()
                    event(fault)
                    time.sleep(max(3.0, s * 0.02))
                    encode.start()
                    event("encoder_restarted")
                elif fault == "pd_kill_mid_stream":
                    pd.collect_log()
                    # A long stream of our own: PD is killed once its first events are in.
                    probe = socket.create_connection(("127.0.0.1", listen), timeout=CLIENT_TIMEOUT_S)
                    body = wl.body([wl.small[0]], stream=True, max_tokens=512)
                    with stats.lock:
                        stats.ids["soak-probe"] = ("stream", 1, True)
                    probe.sendall(("POST /v1/chat/completions HTTP/1.1\r\nhost: vlm\r\ncontent-type: "
                                   f"application/json\r\nx-request-id: soak-probe\r\ncontent-length: {len(body)}"
                                   "\r\n\r\n").encode() + body)
                    pf = probe.makefile("rb")
                    first = read_response(pf, stop_after_events=1)
                    inflight, sending = stats.streams_inflight, stats.streams_started
                    window = [now(), float("inf")]
                    windows.append(window)
                    pd.kill()
                    rest = b""
                    try:
                        while chunk := pf.read1(65536):
                            rest += chunk
                    except OSError:
                        pass
                    probe.close()
                    probe_cut = first.status == 200 and not first.complete and not rest.endswith(b"0\r\n\r\n")
                    event(fault, streams_in_flight=inflight + 1, streams_sending=sending + 1,
                          probe_stream_cut=probe_cut)
                    time.sleep(max(2.0, s * 0.01))
                    pd.start()
                    window[1] = now()
                    event("pd_restarted")
                elif fault == "encoder_frozen":
                    encode.signal(signal.SIGSTOP)
                    event(fault)
                    time.sleep(max(4.0, s * 0.03))
                    encode.signal(signal.SIGCONT)
                    event("encoder_resumed")
                elif fault == "pd_500":
                    pd.faults(fail_status=500, fail_count=20)
                    event(fault, calls=20)
            time.sleep(0.05)
        for t in threads:
            t.join(CLIENT_TIMEOUT_S + 5)
        elapsed = now()
        # Drain: nothing in flight, then one more tick so the gauges are republished.
        drain_deadline = time.monotonic() + 30
        while env.stats().get("http.vlm_ingress.downstream_rq_active", 0) and time.monotonic() < drain_deadline:
            time.sleep(0.2)
        time.sleep(1.5)
        final = env.stats()
        memory.append({"at_s": round(now(), 1), "rss_kib": envoy_rss_kib(env.proc.pid),
                       "allocated": envoy_allocated(env), "vm_memory": final.get("wasmcustom.vlm_budget_vm_memory_bytes", 0)})
        encode.collect_log()
        pd.collect_log()
        backend = check_backend_logs(encode, pd, stats)
        gauges = {g: final.get(f"wasmcustom.vlm_budget_{g}", -1)
                  for g in ("encode_inflight", "pd_inflight", "encode_outstanding_ms")}
        warm = [m for m in memory if m["at_s"] >= s * 0.25]
        base = warm[0] if warm else memory[0]
        growth_kib = max(m["rss_kib"] for m in warm or memory) - base["rss_kib"]
        checks = {
            "gauges_back_to_zero": all(v == 0 for v in gauges.values()),
            "no_vm_reload": final["wasm.vlm_budget.vm_reload"] == 0
            and final["wasm.envoy.wasm.runtime.v8.created"] == v8_created,
            "memory_flat_after_warmup": growth_kib <= max(32 * 1024, base["rss_kib"] // 5),
            "every_request_answered_or_clear_error": not stats.violations,
            "no_unreadable_body_at_backends": backend["problem_count"] == 0,
            "downstream_drained": final.get("http.vlm_ingress.downstream_rq_active", -1) == 0,
            "envoy_alive": env.proc.poll() is None and "panicked" not in env.log_text(),
            "pd_killed_mid_stream": all(e.get("probe_stream_cut") for e in events if e["fault"] == "pd_kill_mid_stream"),
        }
        total = sum(stats.outcomes.values())
        report = {
            "seconds": round(elapsed, 1),
            "clients": args.clients,
            "requests": total,
            "requests_per_s": round(total / elapsed, 1) if elapsed else 0,
            "outcomes": dict(stats.outcomes),
            "by_kind": {f"{k}/{o}": n for (k, o), n in sorted(stats.by_kind.items())},
            "aborts": dict(stats.aborts),
            "faults": events,
            "gauges_after": gauges,
            "filter": {k.removeprefix("wasmcustom.vlm_budget_"): v for k, v in sorted(final.items())
                       if k.startswith("wasmcustom.vlm_budget_") and k.endswith("_total") and v},
            "vm_reload": final["wasm.vlm_budget.vm_reload"],
            "v8_vms_created": final["wasm.envoy.wasm.runtime.v8.created"],
            "envoy_memory": {"rss_kib_after_warmup": base["rss_kib"], "rss_kib_end": memory[-1]["rss_kib"],
                             "rss_growth_after_warmup_kib": growth_kib, "samples": memory},
            "backends": backend,
            "violations": stats.violations[:50],
            "checks": checks,
            "passed": all(checks.values()),
            "workdir": str(workdir),
        }
    finally:
        if env is not None:
            env.stop()
        encode.stop()
        pd.stop()
    text = json.dumps(report, indent=1)
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(text + "\n")
    summary = {k: report[k] for k in ("seconds", "requests", "requests_per_s", "outcomes", "aborts", "gauges_after",
                                      "vm_reload", "checks", "passed")}
    summary["faults"] = [f"{e['at_s']}s {e['fault']}" for e in events]
    summary["envoy_rss_kib"] = (base["rss_kib"], memory[-1]["rss_kib"])
    summary["backend_problems"] = backend["problems"][:5]
    summary["violations"] = stats.violations[:5]
    print(json.dumps(summary, indent=1))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
