"""Fixtures: the servers as subprocesses with the tiny configuration on CPU (fp32)."""
from __future__ import annotations

import base64
import io
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

GPU_DIR = pathlib.Path(__file__).resolve().parents[1]
ROOT = GPU_DIR.parent
sys.path.insert(0, str(GPU_DIR))


class Backend:
    """`python -m vlm_gpu` with --config tiny on CPU, on free ports."""

    def __init__(self, tmp: pathlib.Path, *args: str, name: str = "both"):
        self.log_path = tmp / f"vlm-gpu-{name}-{os.getpid()}-{time.monotonic_ns()}.log"
        self.log = open(self.log_path, "wb")
        env = dict(os.environ, PYTHONPATH=str(GPU_DIR), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vlm_gpu", "--config", "tiny", "--encode-device", "cpu", "--pd-device", "cpu",
             "--encode-port", "0", "--pd-port", "0", "--no-warmup", "--max-num-seqs", "4", "--max-model-len", "8192",
             *args],
            stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.encode = self.pd = None

    def wait(self, timeout=90.0) -> "Backend":
        deadline = time.time() + timeout
        while time.time() < deadline:
            text = self.log_path.read_text(errors="replace")
            m = re.search(r"vlm-gpu listening: (.*)", text)
            if m:
                self.encode = (re.search(r"encode (http://\S+)", m.group(1)) or [None, None])[1]
                self.pd = (re.search(r"pd (http://\S+)", m.group(1)) or [None, None])[1]
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"vlm-gpu exited {self.proc.returncode}:\n{text}")
            time.sleep(0.1)
        raise RuntimeError(f"vlm-gpu did not start:\n{self.log_path.read_text(errors='replace')}")

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


@pytest.fixture(scope="session")
def backends(tmp_path_factory):
    """Three processes started together: --role both (in-memory cache), and an encode and a PD
    process sharing a cache directory."""
    tmp = tmp_path_factory.mktemp("vlm-gpu")
    ec = tmp / "ec"
    both = Backend(tmp, "--role", "both", "--default-output-tokens", "7", "--max-body-bytes", "3000000",
                   name="both")
    enc = Backend(tmp, "--role", "encode", "--ec-cache-dir", str(ec), name="encode")
    pd = Backend(tmp, "--role", "pd", "--ec-cache-dir", str(ec), name="pd")
    try:
        yield {"both": both.wait(), "encode": enc.wait(), "pd": pd.wait(), "ec_dir": ec}
    finally:
        for b in (both, enc, pd):
            b.stop()


# ---------------------------------------------------------------- helpers

def png(width: int, height: int, seed: int = 0, mode: str = "RGB", fmt: str = "PNG", **save) -> bytes:
    """A noise image (distinct pixels per seed), encoded."""
    rng = np.random.default_rng(seed)
    shape = (height, width, len(mode)) if len(mode) > 1 else (height, width)
    img = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
    assert img.mode == mode, img.mode
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def chat(urls: list[str], text: str = "Describe the images.", **extra) -> dict:
    content = [{"type": "text", "text": text}] + [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return {"model": "Qwen/Qwen2.5-VL-3B-Instruct", "messages": [{"role": "user", "content": content}], **extra}


def request(base: str, path: str, body=None, method: str | None = None, headers=None, timeout=60):
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(base + path, data=data, method=method or ("POST" if data is not None else "GET"),
                                 headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def metric(text: str, name: str, **labels) -> float:
    total, found = 0.0, False
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(3) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(m.group(4))
            found = True
    if not found:
        raise KeyError(name)
    return total
