#!/usr/bin/env python3
"""`make bench-hol`: head-of-line blocking on one Envoy worker.

One Envoy worker (`--concurrency 1`) with the filter (static budget, 4,096
tokens by default) in front of a direct-response Envoy. A text client sends
small text-only chats one after another on one keep-alive connection; it runs

  - alone,
  - beside a steady image stream: `--image-clients` clients sending 4K JPEG
    chats back to back, each shrunk in the filter (`transcode: in_filter`),
  - beside the same stream with the images offloaded to `vlm-transcode`
    (`transcode: "offload"`), the service on the same machine.

Reports the text-only p50/p99 in each case, and the image requests' own time
(p50/p99 end to end, the filter's `x-vlm-transcode-ms`) in each mode.
Writes bench/results/hol.md and bench/results/hol.json.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests/integration"))

import harness  # noqa: E402

PHOTOS = ["the-mouse.jpg", "2004default.jpg", "firstgeneration.jpg", "string.jpg"]
TRANSCODER = ROOT / "target/release/vlm-transcode"


def filter_config(plugin: dict, upstream_port: int, listen: int, admin: int, transcode_port: int) -> dict:
    cfg = harness.render_config(plugin, upstream_port, listen, admin, harness.WASM)
    cfg["static_resources"]["clusters"].append({
        "name": "transcode_cluster", "type": "STATIC", "connect_timeout": "2s",
        "per_connection_buffer_limit_bytes": 134217728,
        "load_assignment": {"cluster_name": "transcode_cluster", "endpoints": [{"lb_endpoints": [{"endpoint": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": transcode_port}}}}]}]},
    })
    return cfg


class Proc:
    """A child process in its own session, stopped by its process group."""

    def __init__(self, args: list[str], log: Path):
        self.log = open(log, "wb")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def envoy(config: dict, workdir: Path, name: str, admin: int) -> Proc:
    path = workdir / f"{name}.json"
    path.write_text(json.dumps(config))
    p = Proc([harness.envoy_binary(), "-c", str(path), "--concurrency", "1", "--base-id", str(admin),
              "--log-level", "warn", "--component-log-level", "wasm:warn"], workdir / f"{name}.log")
    wait_http(f"http://127.0.0.1:{admin}/ready", p)
    return p


def wait_http(url: str, p: Proc, timeout=60.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if p.proc.poll() is not None:
            raise RuntimeError(f"{url}: process exited")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} not ready")


class Conn:
    """One keep-alive HTTP/1.1 connection; each call sends one request and
    reads its whole answer."""

    def __init__(self, port: int):
        self.port = port
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def post(self, body: bytes) -> tuple[float, dict]:
        req = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\n"
               + f"content-length: {len(body)}\r\n\r\n".encode() + body)
        t = time.perf_counter()
        self.sock.sendall(req)
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise RuntimeError("connection closed")
            buf += chunk
        head, _, rest = buf.partition(b"\r\n\r\n")
        m = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
        need = int(m.group(1)) if m else 0
        while len(rest) < need:
            rest += self.sock.recv(65536)
        ms = (time.perf_counter() - t) * 1000
        lines = head.decode(errors="replace").split("\r\n")
        if not lines[0].startswith("HTTP/1.1 200"):
            raise RuntimeError(f"unexpected answer: {lines[0]} {rest[:200]!r}")
        headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
        return ms, headers

    def close(self):
        self.sock.close()


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))]


TEXT = json.dumps({"model": "Qwen/Qwen2.5-VL-3B-Instruct", "max_tokens": 16,
                   "messages": [{"role": "user", "content": "Say hello in five words."}]}).encode()


def image_body(path: Path) -> bytes:
    url = "data:image/jpeg;base64," + base64.b64encode(path.read_bytes()).decode()
    return json.dumps({"model": "Qwen/Qwen2.5-VL-3B-Instruct", "max_tokens": 16, "messages": [{"role": "user",
                       "content": [{"type": "text", "text": "Describe."},
                                   {"type": "image_url", "image_url": {"url": url}}]}]}).encode()


def run_case(port: int, seconds: float, image_bodies: list[bytes], image_clients: int, gap_s: float) -> dict:
    """The text client for `seconds`, beside `image_clients` back-to-back
    image clients (none: text alone)."""
    stop = threading.Event()
    images: list[dict] = []
    errors: list[str] = []

    def image_client(k: int):
        c = Conn(port)
        i = k
        try:
            while not stop.is_set():
                ms, h = c.post(image_bodies[i % len(image_bodies)])
                images.append({"ms": ms, "transcode_ms": float(h.get("x-vlm-transcode-ms", "nan")),
                               "how": h.get("x-vlm-transcode", "in_filter"),
                               "resized": h.get("x-vlm-images-resized")})
                i += 1
        except Exception as e:  # reported, never silent
            errors.append(repr(e))
        finally:
            c.close()

    threads = [threading.Thread(target=image_client, args=(k,), daemon=True) for k in range(image_clients)]
    for t in threads:
        t.start()
    if threads:
        time.sleep(1.0)  # the stream is running before the text client starts
    text = Conn(port)
    lat = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        ms, _ = text.post(TEXT)
        lat.append(ms)
        time.sleep(gap_s)
    text.close()
    stop.set()
    for t in threads:
        t.join(120)
    out = {"text_n": len(lat), "text_p50_ms": pct(lat, 50), "text_p99_ms": pct(lat, 99),
           "text_max_ms": max(lat) if lat else float("nan"), "errors": errors}
    if image_clients:
        ms = [r["ms"] for r in images]
        tc = [r["transcode_ms"] for r in images]
        out.update({"images_n": len(images), "image_p50_ms": pct(ms, 50), "image_p99_ms": pct(ms, 99),
                    "image_transcode_p50_ms": pct(tc, 50),
                    "images_per_s": len(images) / (seconds + 1.0),
                    "how": {h: sum(1 for r in images if r["how"] == h) for h in {r["how"] for r in images}}})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=20, help="length of each measured case")
    ap.add_argument("--budget", type=int, default=4096)
    ap.add_argument("--image-clients", type=int, default=2)
    ap.add_argument("--service-threads", type=int, default=2)
    ap.add_argument("--text-gap-ms", type=float, default=5, help="pause between text requests")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results")
    args = ap.parse_args()
    photos = [harness.TESTDATA / p for p in PHOTOS if (harness.TESTDATA / p).exists()]
    if not photos:
        raise SystemExit("no test photographs: run `make testdata`")
    if not TRANSCODER.exists():
        raise SystemExit(f"{TRANSCODER} missing: run `make transcoder`")
    bodies = [image_body(p) for p in photos]
    started = []
    report = {"command": " ".join(["bench/bench_hol.py", *sys.argv[1:]]), "budget": args.budget,
              "seconds": args.seconds, "image_clients": args.image_clients,
              "service_threads": args.service_threads, "photos": [p.name for p in photos],
              "cpus": os.cpu_count(), "load_start": os.getloadavg()[0], "machine": platform.machine(),
              "cases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        try:
            up_port, up_admin = harness.free_port(), harness.free_port()
            started.append(envoy(harness.direct_response_config(up_port, up_admin), work, "upstream", up_admin))
            svc_port = harness.free_port()
            svc = Proc([str(TRANSCODER), "--listen", f"127.0.0.1:{svc_port}", "--threads",
                        str(args.service_threads)], work / "transcode.log")
            started.append(svc)
            wait_http(f"http://127.0.0.1:{svc_port}/health", svc)
            # hold_headers: the upstream sees only whole requests (as prefill/decode
            # reads the whole body), never a request the filter is still shrinking.
            base = {"policy": "static", "static_budget_tokens": args.budget, "metrics_poll_ms": 0,
                    "hold_headers": True}
            modes = {"in_filter": base,
                     "offload": {**base, "transcode": "offload", "transcode_cluster": "transcode_cluster"}}
            gap = args.text_gap_ms / 1000
            for mode, plugin in modes.items():
                listen, admin = harness.free_port(), harness.free_port()
                env = envoy(filter_config(plugin, up_port, listen, admin, svc_port), work, mode, admin)
                started.append(env)
                # Warm up: the VM's first transcode and connections.
                c = Conn(listen)
                for b in bodies:
                    c.post(b)
                c.post(TEXT)
                c.close()
                print(f"[{mode}] text alone ...", flush=True)
                report["cases"][f"{mode}/alone"] = run_case(listen, args.seconds / 2, bodies, 0, gap)
                print(f"[{mode}] text beside {args.image_clients} image clients ...", flush=True)
                report["cases"][f"{mode}/images"] = run_case(listen, args.seconds, bodies, args.image_clients, gap)
                env.stop()
                started.remove(env)
        finally:
            for p in started:
                p.stop()
    report["load_end"] = os.getloadavg()[0]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "hol.json").write_text(json.dumps(report, indent=1))
    md = markdown(report)
    (args.out / "hol.md").write_text(md)
    print(md)
    return 0


def markdown(r: dict) -> str:
    c = r["cases"]
    f = lambda x: f"{x:.1f}"  # noqa: E731
    rows = [
        ("text alone (in-filter VM)", c["in_filter/alone"]),
        ("text + image stream, in-filter", c["in_filter/images"]),
        ("text alone (offload VM)", c["offload/alone"]),
        ("text + image stream, offload", c["offload/images"]),
    ]
    out = [f"One Envoy worker (`--concurrency 1`), static budget {r['budget']} tokens, "
           f"{r['image_clients']} clients sending 4K JPEG chats back to back ({', '.join(r['photos'])}), "
           f"one text-only client; vlm-transcode with {r['service_threads']} threads on the same machine. "
           f"{r['cpus']} CPUs, 1-min load average {r['load_start']:.1f} at the start, {r['load_end']:.1f} at the end. "
           f"Command: `{r['command']}`.", "",
           "| case | text requests | text p50 ms | text p99 ms | text max ms |", "|---|---:|---:|---:|---:|"]
    for name, x in rows:
        out.append(f"| {name} | {x['text_n']} | {f(x['text_p50_ms'])} | {f(x['text_p99_ms'])} | {f(x['text_max_ms'])} |")
    a, b = c["in_filter/alone"], c["offload/alone"]
    i, o = c["in_filter/images"], c["offload/images"]
    out += ["", "| image stream | images | image p50 ms | image p99 ms | x-vlm-transcode-ms p50 | images/s | how |",
            "|---|---:|---:|---:|---:|---:|---|"]
    for name, x in (("in-filter", i), ("offload", o)):
        how = ", ".join(f"{k}: {v}" for k, v in sorted(x["how"].items()))
        out.append(f"| {name} | {x['images_n']} | {f(x['image_p50_ms'])} | {f(x['image_p99_ms'])} | "
                   f"{f(x['image_transcode_p50_ms'])} | {x['images_per_s']:.2f} | {how} |")
    out += ["", "Side by side:", "",
            f"- text p99 added by the image stream: in-filter **+{i['text_p99_ms'] - a['text_p99_ms']:.1f} ms**, "
            f"offload **+{o['text_p99_ms'] - b['text_p99_ms']:.1f} ms** (goal: at most +20 ms)",
            f"- text p50 with the stream / alone: in-filter {i['text_p50_ms'] / a['text_p50_ms']:.1f}x, "
            f"offload {o['text_p50_ms'] / b['text_p50_ms']:.1f}x",
            f"- image requests, offload / in-filter: p50 {o['image_p50_ms'] / i['image_p50_ms']:.2f}x, "
            f"p99 {o['image_p99_ms'] / i['image_p99_ms']:.2f}x (goal: within 1.10x); "
            f"images/s {o['images_per_s'] / i['images_per_s']:.2f}x"]
    errs = [e for x in c.values() for e in x["errors"]]
    if errs:
        out += ["", f"Client errors: {errs[:5]}"]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
