#!/usr/bin/env python3
"""`make bench-image`: the image job side by side, in one run, on the same images.

The job: a chat request with a 4K image as a base64 data URL in, the image
resized to a visual-token budget by the Qwen rule (1,024 tokens), a base64 data
URL out. Done by

  (a) the filter in V8 inside Envoy (time from the `x-vlm-transcode-ms`
      response header: base64 decode, decode, resize, encode, base64 encode),
  (b) the same Rust core compiled natively (`examples/bench_image.rs`),
  (c) Pillow, with `Image.draft` for JPEG (DCT scaling in libjpeg),
  (d) pyvips `thumbnail_buffer` (shrink-on-load for JPEG),

all to the same output size, format and quality. Then the cost of the filter
on text-only requests (wrk, Envoy with the filter vs without it), and a soak:
many large-image requests through one Envoy worker while the VM's linear
memory gauge (`wasmcustom.vlm_budget_vm_memory_bytes`) is sampled.

Writes bench/results/image.md (the table) and bench/results/image.json (raw).
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import math
import os
import platform
import random
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests/integration"))

import harness  # noqa: E402
import PIL  # noqa: E402
import pyvips  # noqa: E402
from PIL import Image, ImageChops, ImageDraw, ImageFilter, ImageStat  # noqa: E402

GENERATED = ROOT / ".cache/bench"
MIME = {"JPEG": "image/jpeg", "PNG": "image/png"}


# ------------------------------------------------------------------ images


def generated_images() -> list[Path]:
    """A photo-like 3840x2160 picture (smooth shading, soft shapes, fine
    detail, sensor-like grain), saved as a camera-style JPEG and as a PNG.
    Seeded, so every run uses the same pixels; cached under .cache/bench."""
    GENERATED.mkdir(parents=True, exist_ok=True)
    jpg, png = GENERATED / "generated-4k.jpg", GENERATED / "generated-4k.png"
    if jpg.exists() and png.exists():
        return [jpg, png]
    w, h = 3840, 2160
    rnd = random.Random(6)
    bands = [
        Image.linear_gradient("L").rotate(rnd.uniform(0, 360)).resize((w, h), Image.Resampling.BICUBIC),
        Image.radial_gradient("L").resize((w, h), Image.Resampling.BICUBIC),
        Image.linear_gradient("L").transpose(Image.Transpose.ROTATE_90).resize((w, h)),
    ]
    img = Image.merge("RGB", bands)
    shapes = Image.new("RGB", (w, h))
    mask = Image.new("L", (w, h))
    draw, mdraw = ImageDraw.Draw(shapes), ImageDraw.Draw(mask)
    for _ in range(300):
        x, y = rnd.randrange(-200, w), rnd.randrange(-200, h)
        rw, rh = rnd.randrange(40, 900), rnd.randrange(40, 900)
        color = tuple(rnd.randrange(256) for _ in range(3))
        box = [x, y, x + rw, y + rh]
        if rnd.random() < 0.5:
            draw.ellipse(box, fill=color)
            mdraw.ellipse(box, fill=rnd.randrange(90, 230))
        else:
            draw.rectangle(box, fill=color)
            mdraw.rectangle(box, fill=rnd.randrange(90, 230))
    img = Image.composite(shapes.filter(ImageFilter.GaussianBlur(2)), img, mask.filter(ImageFilter.GaussianBlur(6)))
    # Fine detail: thin lines and small text-like ticks in one corner.
    draw = ImageDraw.Draw(img)
    for i in range(0, 900, 6):
        draw.line([(100 + i, 100), (100 + i, 700)], fill=(20, 20, 20) if i % 12 else (240, 240, 240), width=1)
    grain = Image.frombytes("RGB", (w, h), rnd.randbytes(w * h * 3)).filter(ImageFilter.GaussianBlur(0.7))
    img = Image.blend(img, grain, 0.12)
    img.save(jpg, "JPEG", quality=92)
    img.save(png, "PNG")
    return [jpg, png]


def real_images() -> list[Path]:
    paths = sorted(harness.TESTDATA.glob("*.jpg")) + sorted(harness.TESTDATA.glob("*.png"))
    if not paths:
        raise SystemExit(f"no photographs under {harness.TESTDATA}: run `make testdata`")
    return paths


# ------------------------------------------------------------------ Python contestants


def to_data_url(raw: bytes, fmt: str) -> str:
    return f"data:{MIME[fmt]};base64,{base64.b64encode(raw).decode()}"


def pillow_job(url: str, size: tuple[int, int], quality: int) -> str:
    raw = base64.b64decode(url[url.index(",") + 1:])
    im = Image.open(io.BytesIO(raw))
    fmt = im.format
    if fmt == "JPEG":
        im.draft(im.mode if im.mode in ("L", "RGB") else "RGB", size)
    im = im.resize(size, Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    if fmt == "JPEG":
        im.save(buf, "JPEG", quality=quality)  # 4:2:0, standard Huffman tables
    else:
        im.save(buf, "PNG")  # zlib level 6
    return to_data_url(buf.getvalue(), fmt)


def vips_job(url: str, size: tuple[int, int], quality: int) -> str:
    raw = base64.b64decode(url[url.index(",") + 1:])
    fmt = "PNG" if raw.startswith(b"\x89PNG") else "JPEG"
    im = pyvips.Image.thumbnail_buffer(raw, size[0], height=size[1], size="force")
    if fmt == "JPEG":
        out = im.write_to_buffer(".jpg", Q=quality, subsample_mode="on")
    else:
        out = im.write_to_buffer(".png")  # zlib level 6
    return to_data_url(out, fmt)


def decode_url(url: str) -> Image.Image:
    im = Image.open(io.BytesIO(base64.b64decode(url[url.index(",") + 1:])))
    im.load()
    return im


def psnr(a: Image.Image, b: Image.Image) -> float:
    """PSNR of two same-size images over their RGB channels."""
    a, b = a.convert("RGB"), b.convert("RGB")
    rms = ImageStat.Stat(ImageChops.difference(a, b)).rms
    mse = sum(r * r for r in rms) / len(rms)
    return float("inf") if mse == 0 else 10 * math.log10(255 * 255 / mse)


# ------------------------------------------------------------------ Envoy


def envoy_config(wasm: Path, plugin: dict, upstream_port: int, fast_port: int, filtered_port: int,
                 plain_port: int, admin_port: int, null_wasm: Path | None = None, null_port: int = 0,
                 strict_port: int = 0) -> dict:
    """envoy/envoy.yaml with two listeners, one with the filter and one
    without (a third, with `strict_port`, with the filter checking text-only
    bodies too, and one with `null_wasm`, a filter that only buffers the
    body), sharing one route table: requests with `x-bench-upstream: fast`
    go to a direct-response Envoy, the rest to the recording upstream."""
    cfg = harness.render_config(plugin, upstream_port, filtered_port, admin_port, wasm)
    filtered = cfg["static_resources"]["listeners"][0]
    hcm = filtered["filter_chains"][0]["filters"][0]["typed_config"]
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    fast_route = harness.deepcopy(routes[0])
    fast_route["match"]["headers"] = [{"name": "x-bench-upstream", "string_match": {"exact": "fast"}}]
    fast_route["route"]["cluster"] = "fast_cluster"
    routes.insert(0, fast_route)
    plain = harness.deepcopy(filtered)
    plain["name"] = "plain_ingress"
    plain["address"]["socket_address"]["port_value"] = plain_port
    plain_hcm = plain["filter_chains"][0]["filters"][0]["typed_config"]
    plain_hcm["stat_prefix"] = "plain_ingress"
    plain_hcm["http_filters"] = [f for f in plain_hcm["http_filters"] if f["name"] != "envoy.filters.http.wasm"]
    cfg["static_resources"]["listeners"].append(plain)
    if strict_port:
        # The filter again, parsing and checking text-only bodies too.
        strict = harness.deepcopy(filtered)
        strict["name"] = "strict_ingress"
        strict["address"]["socket_address"]["port_value"] = strict_port
        strict_hcm = strict["filter_chains"][0]["filters"][0]["typed_config"]
        strict_hcm["stat_prefix"] = "strict_ingress"
        strict_cfg = harness.wasm_filter(strict_hcm)["typed_config"]["config"]
        strict_cfg["configuration"]["value"] = json.dumps({**plugin, "validate_text_only": True})
        cfg["static_resources"]["listeners"].append(strict)
    if null_wasm is not None:
        null = harness.deepcopy(filtered)
        null["name"] = "null_ingress"
        null["address"]["socket_address"]["port_value"] = null_port
        null_hcm = null["filter_chains"][0]["filters"][0]["typed_config"]
        null_hcm["stat_prefix"] = "null_ingress"
        wasm_cfg = harness.wasm_filter(null_hcm)["typed_config"]["config"]
        wasm_cfg["name"] = wasm_cfg["root_id"] = wasm_cfg["vm_config"]["vm_id"] = "null_filter"
        wasm_cfg["vm_config"]["code"]["local"]["filename"] = str(null_wasm)
        cfg["static_resources"]["listeners"].append(null)
    fast = harness.deepcopy(cfg["static_resources"]["clusters"][0])
    fast["name"] = fast["load_assignment"]["cluster_name"] = "fast_cluster"
    addr = fast["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    addr["socket_address"]["port_value"] = fast_port
    cfg["static_resources"]["clusters"].append(fast)
    return cfg


class EnvoyProc:
    """One Envoy process, one worker thread, in its own session."""

    def __init__(self, config: dict, workdir: Path, admin_port: int, name: str):
        self.admin = f"http://127.0.0.1:{admin_port}"
        path = workdir / f"{name}.json"
        path.write_text(json.dumps(config))
        self.log_path = workdir / f"{name}.log"
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [harness.envoy_binary(), "-c", str(path), "--concurrency", "1", "--base-id", str(admin_port),
             "--log-level", "warn", "--component-log-level", "wasm:warn"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout=60.0):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"envoy exited:\n{self.log_path.read_text(errors='replace')}")
            try:
                with urllib.request.urlopen(self.admin + "/ready", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"envoy not ready:\n{self.log_path.read_text(errors='replace')}")

    def stat(self, name: str) -> int | None:
        with urllib.request.urlopen(f"{self.admin}/stats?filter=^{name}$", timeout=5) as r:
            for line in r.read().decode().splitlines():
                k, _, v = line.partition(": ")
                if k == name and v.strip().isdigit():
                    return int(v)
        return None

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def envoy_version() -> str:
    out = subprocess.run([harness.envoy_binary(), "--version"], capture_output=True, text=True).stdout
    m = re.search(r"version: [0-9a-f]+/([^/]+)/", out)
    return m.group(1) if m else out.strip()


# ------------------------------------------------------------------ wrk


def wrk_p50_us(url: str, body: bytes, seconds: int, workdir: Path) -> dict:
    script = workdir / "post.lua"
    script.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = {json.dumps(body.decode())}\n"
        'wrk.headers["content-type"] = "application/json"\n'
        'wrk.headers["x-bench-upstream"] = "fast"\n')
    out = subprocess.run(["wrk", "-t1", "-c1", f"-d{seconds}s", "--latency", "-s", str(script),
                          url + "/v1/chat/completions"], capture_output=True, text=True, check=True).stdout
    unit = {"us": 1.0, "ms": 1000.0, "s": 1e6}

    def us(text: str) -> float:
        m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
        if not m:
            raise RuntimeError(f"cannot read wrk latency {text!r}:\n{out}")
        return float(m.group(1)) * unit[m.group(2)]

    pct = {p: us(v) for p, v in re.findall(r"^\s+(50|75|90|99)%\s+(\S+)", out, re.M)}
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx:
        raise RuntimeError(f"wrk got {non2xx.group(1)} error responses:\n{out}")
    return {"p50_us": pct["50"], "p90_us": pct["90"], "p99_us": pct["99"],
            "rps": float(rps.group(1)) if rps else None}


class KeepAlive:
    """One HTTP/1.1 keep-alive connection sending the same request over and
    over; reads each response whole (headers and content-length body)."""

    def __init__(self, port: int, request: bytes):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.request = request

    def roundtrip_us(self) -> float:
        t = time.perf_counter_ns()
        self.sock.sendall(self.request)
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += self.sock.recv(65536)
        head, _, rest = buf.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"unexpected response: {head[:200]!r}")
        m = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
        need = int(m.group(1)) if m else 0
        while len(rest) < need:
            rest += self.sock.recv(65536)
        return (time.perf_counter_ns() - t) / 1000

    def close(self):
        self.sock.close()


def paired_latency(ports: dict[str, int], body: bytes, seconds: float) -> dict:
    """Sends single requests to each Envoy listener in turn (random order in
    each round), so background load hits all alike; per listener the p50,
    and per round the difference to the listener without a filter."""
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\n"
               b"x-bench-upstream: fast\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    conns = {name: KeepAlive(port, request) for name, port in ports.items()}
    names = list(conns)
    rnd = random.Random(50)
    times: dict[str, list[float]] = {name: [] for name in names}
    try:
        for _ in range(200):  # warm-up
            for c in conns.values():
                c.roundtrip_us()
        deadline = time.time() + seconds
        while time.time() < deadline:
            rnd.shuffle(names)
            for name in names:
                times[name].append(conns[name].roundtrip_us())
    finally:
        for c in conns.values():
            c.close()
    out: dict = {"rounds": len(times["plain"])}
    for name, ts in times.items():
        out[name] = {"p50_us": statistics.median(ts)}
        if name != "plain":
            diffs = sorted(t - p for t, p in zip(ts, times["plain"]))
            out[name]["p50_extra_us"] = statistics.median(ts) - statistics.median(times["plain"])
            out[name]["median_round_diff_us"] = statistics.median(diffs)
            out[name]["round_diff_iqr_us"] = [diffs[len(diffs) // 4], diffs[3 * len(diffs) // 4]]
    return out


# ------------------------------------------------------------------ main


class Native:
    """The bench_image example binary in --serve mode: one run per request."""

    def __init__(self, binary: Path, quality: int, budget: int):
        self.proc = subprocess.Popen(
            [str(binary), "--serve", "--reps", "1", "--quality", str(quality), "--budget", str(budget)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def run(self, path: Path) -> dict:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(f"{path}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"bench_image exited {self.proc.wait()} on {path}")
        return json.loads(line)

    def close(self):
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(timeout=30)


def post_image(url: str, body: bytes) -> tuple[float, dict]:
    t = time.perf_counter()
    status, headers, _ = harness.post(url, body, timeout=120)
    wall = (time.perf_counter() - t) * 1000
    if status != 200:
        raise RuntimeError(f"HTTP {status} from {url}")
    return wall, headers


def gmean(xs: list[float]) -> float:
    xs = [x for x in xs if x > 0 and math.isfinite(x)]
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else float("nan")


class Case:
    """One image and every contestant's runs on it."""

    def __init__(self, path: Path, kind: str):
        self.path, self.kind = path, kind
        self.raw = path.read_bytes()
        with Image.open(io.BytesIO(self.raw)) as im:
            self.fmt, (self.w, self.h), self.mode = im.format, im.size, im.mode
        self.url = to_data_url(self.raw, self.fmt)
        self.body = harness.chat_body([self.url])
        self.size: tuple[int, int] = (0, 0)
        self.runs: dict[str, list[float]] = {k: [] for k in
                                             ("native", "native_request", "native_scan", "serde_json_pass",
                                              "v8", "v8_request",
                                                       "plain_request", "pillow", "pyvips")}
        self.peak_heap = 0
        self.outputs: dict[str, str] = {}
        self.headers: dict = {}


def run_round(case: Case, native: Native, upstream: harness.Recorder, filtered_url: str, plain_url: str,
              quality: int, timed: bool):
    nat = native.run(case.path)
    case.size = (nat["out_width"], nat["out_height"])
    case.peak_heap = max(case.peak_heap, nat["peak_heap_bytes"])
    plain_wall, _ = post_image(plain_url, case.body)
    wall, headers = post_image(filtered_url, case.body)
    with upstream.lock:
        got = upstream.requests[-1]["body"]
        upstream.requests.clear()
    case.outputs["filter"] = harness.image_urls(got)[0]
    case.headers = headers
    t = time.perf_counter()
    case.outputs["pillow"] = pillow_job(case.url, case.size, quality)
    pil = (time.perf_counter() - t) * 1000
    t = time.perf_counter()
    case.outputs["pyvips"] = vips_job(case.url, case.size, quality)
    vips = (time.perf_counter() - t) * 1000
    if timed:
        for key, value in (("native", nat["image_median_ms"]), ("native_request", nat["median_ms"]),
                           ("native_scan", nat["scan_median_ms"]), ("serde_json_pass", nat["serde_json_pass_median_ms"]),
                           ("v8", float(headers["x-vlm-transcode-ms"])),
                           ("v8_request", wall), ("plain_request", plain_wall), ("pillow", pil),
                           ("pyvips", vips)):
            case.runs[key].append(value)
        case.native_out_bytes = nat["out_bytes"]


def summarize(case: Case) -> dict:
    images = {k: decode_url(u) for k, u in case.outputs.items()}
    for name, im in images.items():
        if im.size != case.size:
            raise RuntimeError(f"{case.path.name}: {name} gave {im.size}, wanted {case.size}")
    med = {k: statistics.median(v) for k, v in case.runs.items()}
    nbytes = {k: len(base64.b64decode(u[u.index(",") + 1:])) for k, u in case.outputs.items()}
    return {
        "image": case.path.name, "kind": case.kind, "format": case.fmt, "mode": case.mode,
        "width": case.w, "height": case.h, "in_bytes": len(case.raw), "body_bytes": len(case.body),
        "out_width": case.size[0], "out_height": case.size[1],
        "tokens_after": int(case.headers.get("x-vlm-visual-tokens-after", "0")),
        "v8_ms": med["v8"], "native_ms": med["native"], "native_request_ms": med["native_request"],
        "native_scan_ms": med["native_scan"], "serde_json_pass_ms": med["serde_json_pass"],
        "pillow_ms": med["pillow"], "pyvips_ms": med["pyvips"],
        "v8_request_extra_ms": med["v8_request"] - med["plain_request"],
        "runs_ms": case.runs,
        "native_peak_heap_bytes": case.peak_heap,
        "out_bytes": {**nbytes, "native": case.native_out_bytes},
        "psnr_vs_pillow_db": {"filter": psnr(images["filter"], images["pillow"]),
                              "pyvips": psnr(images["pyvips"], images["pillow"])},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--native", type=Path, help="the bench_image example binary")
    ap.add_argument("--render", type=Path, help="only rewrite image.md from this image.json")
    ap.add_argument("--wasm", type=Path, default=harness.WASM)
    ap.add_argument("--null-wasm", type=Path, help="a filter that only buffers the body (bench/null-filter)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--quality", type=int, default=90)
    ap.add_argument("--soak", type=int, default=1000, help="large-image requests in the memory soak (0: skip)")
    ap.add_argument("--wrk-seconds", type=int, default=10)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results")
    ap.add_argument("--images", default="", help="comma-separated file names to keep (default: all)")
    args = ap.parse_args()
    if args.render:
        md = markdown(json.loads(args.render.read_text()))
        (args.out / "image.md").write_text(md)
        print(md)
        return 0
    if args.native is None:
        ap.error("--native is required")

    started = time.time()
    load_before = os.getloadavg()
    cases = [Case(p, "real") for p in real_images()] + [Case(p, "generated") for p in generated_images()]
    if args.images:
        keep = set(args.images.split(","))
        cases = [c for c in cases if c.path.name in keep]
    plugin = {"policy": "static", "static_budget_tokens": args.budget, "min_tokens_per_image": 256,
              "max_image_pixels": 40_000_000, "max_body_bytes": 67_108_864, "jpeg_quality": args.quality}
    upstream = harness.Recorder()
    workdir = Path(tempfile.mkdtemp(prefix="bench-image-"))
    fast_port, fast_admin, filtered_port, plain_port, admin_port, null_port, strict_port = (
        harness.free_port() for _ in range(7))
    fast = EnvoyProc(harness.direct_response_config(fast_port, fast_admin), workdir, fast_admin, "upstream")
    envoy = EnvoyProc(envoy_config(args.wasm, plugin, upstream.port, fast_port, filtered_port, plain_port,
                                   admin_port, args.null_wasm, null_port, strict_port), workdir, admin_port,
                     "envoy")
    native = Native(args.native, args.quality, args.budget)
    filtered_url, plain_url = f"http://127.0.0.1:{filtered_port}", f"http://127.0.0.1:{plain_port}"
    gauge = "wasmcustom.vlm_budget_vm_memory_bytes"
    first_pass_memory = []
    try:
        fast.wait_ready()
        envoy.wait_ready()
        print(f"{len(cases)} images, 1 warm-up + {args.reps} rounds; each round runs every image through "
              "native, Envoy without and with the filter, Pillow and pyvips in turn", flush=True)
        for case in cases:
            run_round(case, native, upstream, filtered_url, plain_url, args.quality, timed=False)
            first_pass_memory.append((case.path.name, envoy.stat(gauge)))
            print(f"  {case.path.name}: {case.w}x{case.h} {case.fmt} -> {case.size[0]}x{case.size[1]}", flush=True)
        for r in range(args.reps):
            print(f"round {r + 1}/{args.reps}", flush=True)
            for case in cases:
                run_round(case, native, upstream, filtered_url, plain_url, args.quality, timed=True)
        rows = [summarize(c) for c in cases]
        jpegs = [str(c.path) for c in cases if c.fmt == "JPEG"]
        if jpegs:
            out = subprocess.run([str(args.native), "--reps", "1", "--check-scaled", "--quality", str(args.quality),
                                  "--budget", str(args.budget), *jpegs], capture_output=True, text=True,
                                 check=True).stdout
            scaled = {Path(r["file"]).name: r.get("psnr_scaled_vs_full_db") for r in map(json.loads, out.splitlines())}
            for row in rows:
                if row["image"] in scaled:
                    row["psnr_scaled_vs_full_db"] = scaled[row["image"]]

        rounds = 5
        print(f"text-only overhead: wrk, 1 connection, {rounds} alternating runs of "
              f"{max(1, args.wrk_seconds // rounds)} s per Envoy ...", flush=True)
        text_body = harness.chat_body([])
        text = {"plain": [], "filter": []}
        for _ in range(rounds):
            for name, url in (("plain", plain_url), ("filter", filtered_url)):
                text[name].append(wrk_p50_us(url, text_body, max(1, args.wrk_seconds // rounds), workdir))
        print(f"text-only overhead: paired single requests for {args.wrk_seconds} s ...", flush=True)
        ports = {"plain": plain_port, "filter": filtered_port}
        ports["filter_validate_text_only"] = strict_port
        if args.null_wasm is not None:
            ports["null_filter"] = null_port
        paired = paired_latency(ports, text_body, args.wrk_seconds)
        core_text = json.loads(subprocess.run([str(args.native), "--text-only", "20000"], capture_output=True,
                                              text=True, check=True).stdout.splitlines()[0])

        soak = None
        if args.soak > 0:
            print(f"soak: {args.soak} large-image requests ...", flush=True)
            samples, lock, done = [], threading.Lock(), [0]
            big = [c.body for c in cases]

            def one(i: int):
                post_image(filtered_url, big[i % len(big)])
                with lock:
                    done[0] += 1
                    n = done[0]
                    if n % 50 == 0 or n == args.soak:
                        samples.append((n, envoy.stat(gauge)))
                    with upstream.lock:
                        upstream.requests.clear()

            t0 = time.time()
            with ThreadPoolExecutor(2) as pool:
                list(pool.map(one, range(args.soak)))
            samples.sort()
            mem = [m for _, m in samples if m is not None]
            soak = {"requests": args.soak, "seconds": time.time() - t0, "distinct_bodies": len(big),
                    "samples": samples, "vm_memory_first_sample": mem[0] if mem else None,
                    "vm_memory_max": max(mem) if mem else None, "vm_memory_last": mem[-1] if mem else None,
                    "resized_total": envoy.stat("wasmcustom.vlm_budget_images_resized_total"),
                    "requests_total": envoy.stat("wasmcustom.vlm_budget_requests_total")}
    finally:
        native.close()
        envoy.stop()
        fast.stop()
        upstream.close()

    text_summary = {
        name: statistics.median(r["p50_us"] for r in runs) for name, runs in text.items()}
    result = {
        "job": f"base64 data URL in -> {args.budget}-token budget (Qwen2.5-VL rule) -> base64 data URL out",
        "command": "make bench-image",
        "reps": args.reps, "quality": args.quality, "budget_tokens": args.budget,
        "machine": {"cpus": os.cpu_count(), "cpu": cpu_model(), "python": platform.python_version(),
                    "pillow": PIL.__version__, "pyvips": pyvips.__version__,
                    "libvips": f"{pyvips.version(0)}.{pyvips.version(1)}.{pyvips.version(2)}",
                    "libvips_threads": pyvips.concurrency_get(), "envoy": envoy_version()},
        "images": rows,
        "vm_memory_first_pass": first_pass_memory,
        "text_only": {"wrk_runs": text, "wrk_p50_us": text_summary,
                      "wrk_p50_extra_us": text_summary["filter"] - text_summary["plain"], "paired": paired,
                      "native_core_us": core_text["text_only_median_us"]},
        "soak": soak,
        "seconds": time.time() - started,
        "load_average": {"start": load_before, "end": os.getloadavg()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "image.json").write_text(json.dumps(result, indent=1) + "\n")
    md = markdown(result)
    (args.out / "image.md").write_text(md)
    print("\n" + md)
    return 0


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = [
        f"Job: {r['job']}. JPEG out at quality {r['quality']}, 4:2:0; PNG out with each library's default "
        f"deflate. Every program makes the same output size. Median of {r['reps']} interleaved rounds, in ms.",
        f"Machine: {m['cpus']} CPUs ({m['cpu']}), shared with other work, so noisy (1-min load average "
        f"{r['load_average']['start'][0]:.1f} at the start, {r['load_average']['end'][0]:.1f} at the end). "
        f"Envoy {m['envoy']} "
        f"(V8, one worker), Python {m['python']}, Pillow {m['pillow']}, pyvips {m['pyvips']} "
        f"(libvips {m['libvips']}, {m['libvips_threads']} threads). Command: `{r['command']}`.",
        "",
        "- **V8**: the filter inside Envoy, from its `x-vlm-transcode-ms` header (base64 decode, decode, "
        "resize, encode, base64 encode). **V8 whole**: the request's time through Envoy with the filter minus "
        "without it (adds body copies, JSON scan, base64 check, header probe, body rewrite).",
        "- **native**: the same Rust core as a native binary (`pipeline::process`): its image work, counted as "
        "the header counts it; **native whole**: the whole `process` call (adds the JSON scan, base64 check, "
        "probe and body rewrite).",
        "- **Pillow**: `Image.draft` (JPEG) + `resize(BICUBIC)` + `save`; **pyvips**: `thumbnail_buffer` + "
        "`write_to_buffer`; both with base64 decode and encode, in-process.",
        "",
        "| image | in | out | V8 | V8 whole | native | native whole | Pillow | pyvips | V8/Pillow | V8/pyvips "
        "| V8/native | out KB filter / Pillow / pyvips | PSNR vs Pillow dB | native peak heap MB |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for x in r["images"]:
        ob = x["out_bytes"]
        lines.append(
            f"| {x['image']} ({x['kind']}) | {x['width']}x{x['height']} {x['format']} {x['in_bytes'] / 1e6:.1f} MB "
            f"| {x['out_width']}x{x['out_height']} | {x['v8_ms']:.1f} | {x['v8_request_extra_ms']:.1f} "
            f"| {x['native_ms']:.1f} | {x['native_request_ms']:.1f} | {x['pillow_ms']:.1f} | {x['pyvips_ms']:.1f} "
            f"| {x['v8_ms'] / x['pillow_ms']:.2f} | {x['v8_ms'] / x['pyvips_ms']:.2f} "
            f"| {x['v8_ms'] / x['native_ms']:.2f} "
            f"| {ob['filter'] / 1e3:.0f} / {ob['pillow'] / 1e3:.0f} / {ob['pyvips'] / 1e3:.0f} "
            f"| {x['psnr_vs_pillow_db']['filter']:.1f} | {x['native_peak_heap_bytes'] / 1e6:.0f} |")
    lines += ["", "Geometric means of the per-image ratios:", "",
              "| images | V8/Pillow | V8/pyvips | V8/native | V8 whole/Pillow | V8 whole/pyvips "
              "| out bytes filter/Pillow | filter/pyvips |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for fmt in ("JPEG", "PNG"):
        for kind in ("real", "generated", None):
            xs = [x for x in r["images"] if x["format"] == fmt and (kind is None or x["kind"] == kind)]
            if not xs or (kind is None and len({x["kind"] for x in xs}) < 2):
                continue
            label = f"{fmt}, {kind or 'all'} ({len(xs)})"
            lines.append(
                f"| {label} | {gmean([x['v8_ms'] / x['pillow_ms'] for x in xs]):.2f} "
                f"| {gmean([x['v8_ms'] / x['pyvips_ms'] for x in xs]):.2f} "
                f"| {gmean([x['v8_ms'] / x['native_ms'] for x in xs]):.2f} "
                f"| {gmean([x['v8_request_extra_ms'] / x['pillow_ms'] for x in xs]):.2f} "
                f"| {gmean([x['v8_request_extra_ms'] / x['pyvips_ms'] for x in xs]):.2f} "
                f"| {gmean([x['out_bytes']['filter'] / x['out_bytes']['pillow'] for x in xs]):.2f} "
                f"| {gmean([x['out_bytes']['filter'] / x['out_bytes']['pyvips'] for x in xs]):.2f} |")
    checked = [(x["image"], x["psnr_scaled_vs_full_db"]) for x in r["images"] if x.get("psnr_scaled_vs_full_db")]
    if checked:
        lines += ["", "JPEG fast path (DCT-scaled decode, then resize) against decoding at full size and resizing, "
                      "same output size, native: PSNR " + ", ".join(f"{n} {db:.1f} dB" for n, db in checked) + "."]
    scans = [x for x in r["images"] if x.get("serde_json_pass_ms")]
    if scans:
        lines += ["", "Reading the request's JSON (native, the whole body with its image): the filter's reader "
                      "(validate, then locate the images) " + ", ".join(
                          f"{x['image']} {x['native_scan_ms']:.1f} ms" for x in scans)
                  + f": {gmean([x['native_scan_ms'] / x['serde_json_pass_ms'] for x in scans]):.2f}x the time "
                    "of one plain `serde_json` pass over the same bytes (geometric mean of the per-image ratios)."]
    t = r["text_only"]
    pr = t["paired"]
    runs = ", ".join(f"{a['p50_us']:.0f}/{b['p50_us']:.0f}"
                     for a, b in zip(t["wrk_runs"]["plain"], t["wrk_runs"]["filter"]))

    def extra(name: str) -> str:
        x = pr[name]
        return (f"p50 {x['p50_us']:.0f} µs, **{x['p50_extra_us']:+.0f} µs** (median per-round difference "
                f"{x['median_round_diff_us']:+.0f} µs, interquartile {x['round_diff_iqr_us'][0]:+.0f} to "
                f"{x['round_diff_iqr_us'][1]:+.0f} µs)")

    lines += ["", "Text-only chat request (no image), Envoy to a direct-response Envoy, one connection:", "",
              f"- single requests to each listener in turn ({pr['rounds']} rounds): without a filter p50 "
              f"{pr['plain']['p50_us']:.0f} µs; with vlm-budget {extra('filter')}"
              + (f"; with vlm-budget and `validate_text_only: true` (the body parsed and checked) "
                 f"{extra('filter_validate_text_only')}" if "filter_validate_text_only" in pr else "")
              + (f"; with a wasm filter that only buffers the body {extra('null_filter')}"
                 if "null_filter" in pr else "") + ".",
              f"- the core's own work on such a request (`pipeline::process`, native): "
              f"{t['native_core_us']:.2f} µs.",
              f"- wrk, 5 alternating runs each: p50 {t['wrk_p50_us']['plain']:.0f} µs without, "
              f"{t['wrk_p50_us']['filter']:.0f} µs with: {t['wrk_p50_extra_us']:+.0f} µs "
              f"(runs without/with: {runs} µs)."]
    s = r["soak"]
    if s:
        first = r["vm_memory_first_pass"]
        lines += ["", f"VM linear memory (`wasmcustom.vlm_budget_vm_memory_bytes`, one worker VM): "
                      f"{first[0][1] / 2**20:.1f} MiB after the first image, {first[-1][1] / 2**20:.1f} MiB after "
                      f"one pass over all {len(first)}. Soak: {s['requests']} more large-image requests "
                      f"({s['distinct_bodies']} bodies in turn, 2 clients) in {s['seconds']:.0f} s: sampled every 50, "
                      f"{s['vm_memory_first_sample'] / 2**20:.1f} MiB at the first sample, "
                      f"max {s['vm_memory_max'] / 2**20:.1f} MiB, {s['vm_memory_last'] / 2**20:.1f} MiB at the end."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
