"""Test harness: the real Envoy binary with the built module, a recording
upstream, and helpers to build chat requests with images."""
from __future__ import annotations

import base64
import copy
import io
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import yaml
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parents[2]
WASM = ROOT / "target/wasm32-wasip1/release/vlm_budget.wasm"
ENVOY_YAML = ROOT / "envoy/envoy.yaml"
TESTDATA = ROOT / ".cache/testdata/usr/share/backgrounds"


def envoy_binary() -> str:
    path = ROOT / ".venv/bin/envoy"
    if not path.exists():
        raise RuntimeError("no .venv/bin/envoy: run `make venv`")
    return str(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- Qwen rule

FACTOR = 28
MIN_PIXELS = 3136
MAX_PIXELS = 12845056

sys.path.insert(0, str(ROOT / "tools"))
from gen_sizing_reference import smart_resize as _reference_rule  # noqa: E402


def smart_resize(height, width, factor=FACTOR, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS):
    """The reference rule (transformers' Qwen2-VL image processor, in Python)."""
    out = _reference_rule(height, width, factor, min_pixels, max_pixels)
    if out is None:
        raise ValueError(f"{width}x{height} is rejected by the Qwen rule")
    return out


def tokens(width, height, **kw):
    h, w = smart_resize(height, width, **kw)
    return (h // FACTOR) * (w // FACTOR)


# ---------------------------------------------------------------- upstream


class Recorder:
    """An HTTP/1.1 upstream on 127.0.0.1 that records every request."""

    def __init__(self, port: int = 0):
        self.requests: list[dict] = []
        # Behaviour knobs for fault tests.
        self.delay_s = 0.0
        self.status = 200
        # A fixed JSON answer instead of the default one.
        self.reply: bytes | None = None

        self.lock = threading.Lock()
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _read_body(self) -> bytes:
                if self.headers.get("transfer-encoding", "").lower() == "chunked":
                    out = bytearray()
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return bytes(out)
                        out += self.rfile.read(size)
                        self.rfile.readline()
                length = int(self.headers.get("content-length", "0"))
                return self.rfile.read(length)

            def _handle(self):
                body = self._read_body()
                record = {"method": self.command, "path": self.path, "at": time.monotonic(),
                          "headers": {k.lower(): v for k, v in self.headers.items()}, "body": body}
                with recorder.lock:
                    recorder.requests.append(record)
                if recorder.delay_s:
                    time.sleep(recorder.delay_s)
                record["answered_at"] = time.monotonic()
                reply = recorder.reply or json.dumps(
                    {"object": "chat.completion", "received_bytes": len(body)}).encode()
                self.send_response(recorder.status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            do_POST = _handle
            do_GET = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def last(self) -> dict:
        with self.lock:
            return self.requests[-1]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


# ---------------------------------------------------------------- envoy


DECOMPRESSOR = "envoy.filters.http.decompressor"


def wasm_filter(hcm: dict) -> dict:
    """The vlm-budget entry of an HTTP connection manager's filters (the
    shipped configs put Envoy's request decompressor in front of it)."""
    return next(f for f in hcm["http_filters"] if f["name"] != DECOMPRESSOR)


def render_config(plugin_config: dict | None, upstream_port: int, listen_port: int, admin_port: int,
                  wasm: pathlib.Path = WASM, encode_port: int | None = None) -> dict:
    """envoy/envoy.yaml with test ports, the built module and a plugin config.

    encode_cluster points at `encode_port` (default: a closed port); the
    plugin configuration is used as given (no encode_cluster in it: resize only)."""
    cfg = yaml.safe_load(ENVOY_YAML.read_text())
    cfg["admin"]["address"]["socket_address"]["port_value"] = admin_port
    listener = cfg["static_resources"]["listeners"][0]
    listener["address"]["socket_address"]["port_value"] = listen_port
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    wasm_cfg = wasm_filter(hcm)["typed_config"]["config"]
    wasm_cfg["vm_config"]["code"]["local"]["filename"] = str(wasm)
    if plugin_config is not None:
        wasm_cfg["configuration"]["value"] = json.dumps(plugin_config)
    ports = {"pd_cluster": upstream_port, "encode_cluster": encode_port or free_port()}
    for cluster in cfg["static_resources"]["clusters"]:
        addr = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
        addr["socket_address"]["port_value"] = ports[cluster["name"]]
    return cfg


def direct_response_config(port: int, admin_port: int) -> dict:
    """A minimal upstream for benchmarks: an Envoy answering every request
    with a small JSON."""
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {"listeners": [{
            "name": "fast_upstream",
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [{"filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network."
                             "http_connection_manager.v3.HttpConnectionManager",
                    "stat_prefix": "fast_upstream",
                    "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [{
                        "match": {"prefix": "/"},
                        "direct_response": {"status": 200, "body": {"inline_string": '{"object":"chat.completion"}'}},
                    }]}]},
                    "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
                },
            }]}],
        }]},
    }


class Envoy:
    def __init__(self, config: dict, workdir: pathlib.Path, admin_port: int, listen_port: int,
                 concurrency: int = 2, log_level: str = "warn", wasm_level: str = "info"):
        self.admin = f"http://127.0.0.1:{admin_port}"
        self.url = f"http://127.0.0.1:{listen_port}"
        self.config_path = workdir / f"envoy-{listen_port}.json"
        self.config_path.write_text(json.dumps(config))
        self.log_path = workdir / f"envoy-{listen_port}.log"
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [envoy_binary(), "-c", str(self.config_path), "--concurrency", str(concurrency),
             "--base-id", str(listen_port), "--log-level", log_level, "--component-log-level", f"wasm:{wasm_level}"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout=30.0):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"envoy exited {self.proc.returncode}:\n{self.log_text()}")
            try:
                with urllib.request.urlopen(self.admin + "/ready", timeout=1) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"envoy not ready:\n{self.log_text()}")

    def log_text(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def stats(self) -> dict[str, int]:
        with urllib.request.urlopen(self.admin + "/stats", timeout=5) as r:
            out = {}
            for line in r.read().decode().splitlines():
                name, _, value = line.partition(": ")
                if value.strip().lstrip("-").isdigit():
                    out[name] = int(value)
            return out

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


# ---------------------------------------------------------------- requests


def post(url: str, body: bytes, path="/v1/chat/completions", headers=None, timeout=60):
    """POST; returns (status, headers, body) without raising on 4xx/5xx."""
    req = urllib.request.Request(url + path, data=body, method="POST",
                                 headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def post_streamed(url: str, body: bytes, path="/v1/chat/completions", headers=None, timeout=60):
    """POST a streaming request; returns (status, headers, ms from send to the
    first chunk carrying content, or None)."""
    import http.client
    parsed = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=timeout)
    try:
        start = time.monotonic()
        conn.request("POST", path, body=body, headers={"content-type": "application/json", **(headers or {})})
        r = conn.getresponse()
        hdrs = {k.lower(): v for k, v in r.getheaders()}
        first = None
        for line in r:
            if first is None and line.startswith(b"data:") and b'"content":"' in line \
                    and b'"content":""' not in line:
                first = (time.monotonic() - start) * 1000
        return r.status, hdrs, first
    finally:
        conn.close()


def image_bytes(width: int, height: int, fmt="PNG", mode="RGB", noise=False, **save) -> bytes:
    if noise:
        img = Image.frombytes(mode, (width, height), os.urandom(width * height * len(mode)))
    else:
        img = Image.linear_gradient("L").resize((width, height)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    return buf.getvalue()


def data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def chat_body(urls: list[str], bare=False, extra: str = "") -> bytes:
    """A chat body with odd-but-valid JSON: unknown fields, number spellings."""
    parts = []
    for u in urls:
        if bare:
            parts.append({"type": "image_url", "image_url": u})
        else:
            parts.append({"type": "image_url", "image_url": {"url": u, "detail": "high", "x_custom": [1, 2]}})
    msg = {"role": "user", "content": [{"type": "text", "text": "Describe the images."}, *parts]}
    body = json.dumps({"model": "Qwen/Qwen2.5-VL-3B-Instruct", "messages": [msg]}, separators=(", ", ": "))
    # Spellings json.dumps would never write: they must survive byte for byte.
    return (body[:-1] + ', "temperature": 0.70, "top_p": 1e0, "seed": 12345678901234567890123'
            + ', "zz_unknown": {"nested": [true, null, -0.0]}' + extra + "}").encode()


def decode_data_url(url: str) -> tuple[str, bytes]:
    head, _, payload = url.partition(",")
    return head[5:].split(";")[0], base64.b64decode(payload, validate=True)


def image_size(data: bytes) -> tuple[int, int, str]:
    img = Image.open(io.BytesIO(data))
    return img.width, img.height, img.format


def image_urls(body: bytes) -> list[str]:
    out = []
    for m in json.loads(body)["messages"]:
        content = m.get("content")
        if isinstance(content, list):
            for p in content:
                if p.get("type") == "image_url":
                    iu = p["image_url"]
                    out.append(iu["url"] if isinstance(iu, dict) else iu)
    return out


def replace_urls(body: bytes, old: list[str], new: list[str]) -> bytes:
    """The original body with each URL literal swapped: what the filter must send."""
    out = body
    for o, n in zip(old, new):
        assert out.count(o.encode()) >= 1
        out = out.replace(o.encode(), n.encode(), 1)
    return out


def deepcopy(x):
    return copy.deepcopy(x)


# ---------------------------------------------------------------- emulator

EMULATOR = ROOT / "target/release/vlm-emulator"


class Emulator:
    """The backend emulator (tools/emulator): encode and PD roles in one process
    (`split=True`: encode, prefill and decode, decode on the PD port)."""

    def __init__(self, workdir: pathlib.Path, *args: str, encode_port: int | None = None,
                 pd_port: int | None = None, split: bool = False, prefill_port: int | None = None):
        if not EMULATOR.exists():
            raise RuntimeError(f"{EMULATOR} missing: run `make emulator`")
        self.encode_port = encode_port or free_port()
        self.pd_port = pd_port or free_port()
        self.prefill_port = (prefill_port or free_port()) if split else None
        self.encode = f"http://127.0.0.1:{self.encode_port}"
        self.pd = f"http://127.0.0.1:{self.pd_port}"
        self.prefill = f"http://127.0.0.1:{self.prefill_port}" if split else None
        self.log_path = workdir / f"emulator-{self.pd_port}.log"
        self.log = open(self.log_path, "wb")
        roles = ["--role", "split", "--prefill-port", str(self.prefill_port)] if split else ["--role", "both"]
        self.proc = subprocess.Popen(
            [str(EMULATOR), *roles, "--encode-port", str(self.encode_port),
             "--pd-port", str(self.pd_port), *args],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.wait_ready()

    def base(self, role: str) -> str:
        return {"encode": self.encode, "prefill": self.prefill}.get(role) or self.pd

    def wait_ready(self, timeout=10.0):
        deadline = time.time() + timeout
        for base in (self.encode, self.pd, *([self.prefill] if self.prefill else [])):
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"emulator exited: {self.log_path.read_text()}")
                try:
                    with urllib.request.urlopen(base + "/health", timeout=1) as r:
                        if r.status == 200:
                            break
                except (urllib.error.URLError, ConnectionError, OSError):
                    if time.time() > deadline:
                        raise
                time.sleep(0.05)
        return self

    def _json(self, method: str, url: str, body: dict | None = None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read() or b"null")

    def requests(self) -> list[dict]:
        return self._json("GET", self.pd + "/debug/requests")

    def clear(self):
        self._json("DELETE", self.pd + "/debug/requests")

    def faults(self, role: str, **kw):
        return self._json("POST", self.base(role) + "/debug/faults", kw)

    def metrics(self, role: str) -> str:
        with urllib.request.urlopen(self.base(role) + "/metrics", timeout=5) as r:
            return r.read().decode()

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def metric_value(text: str, name: str) -> float:
    """Sum of a Prometheus metric's samples in exposition text."""
    total, found = 0.0, False
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
            found = True
    if not found:
        raise KeyError(name)
    return total
