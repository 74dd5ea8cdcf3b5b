"""transcode: "offload" through the real Envoy on one worker (--concurrency 1)
and the real vlm-transcode service: the worker answers other requests while an
image is at the service; the service's bytes are spliced and reach encode and
prefill/decode alike; a service that is down (or refuses) leaves the work to
the filter, with the filter's own bytes and errors."""
import hashlib
import http.client
import json
import subprocess
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from harness import (ROOT, WASM, Envoy, chat_body, data_url, decode_data_url, free_port, image_bytes,
                     image_size, post, render_config)

TRANSCODER = ROOT / "target/release/vlm-transcode"
BUDGET = 1024
EPD = {"policy": "static", "static_budget_tokens": BUDGET, "encode_cluster": "encode_cluster",
       "encode_timeout_ms": 10000}
OFFLOAD = {**EPD, "transcode": "offload", "transcode_cluster": "transcode_cluster",
           "transcode_timeout_ms": 30000}


class Transcoder:
    """The vlm-transcode binary on a free port."""

    def __init__(self, workdir):
        if not TRANSCODER.exists():
            raise RuntimeError(f"{TRANSCODER} missing: run `make transcoder`")
        self.port = free_port()
        self.log = open(workdir / f"transcode-{self.port}.log", "wb")
        self.proc = subprocess.Popen([str(TRANSCODER), "--listen", f"127.0.0.1:{self.port}", "--threads", "2"],
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 10
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                if time.time() > deadline or self.proc.poll() is not None:
                    raise
                time.sleep(0.05)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self.log.close()


class Gate:
    """In front of the service: while `hold` is set, each transcode call waits
    until `release` is set; it records what arrived and what the service answered."""

    def __init__(self, service_port):
        self.hold = threading.Event()
        self.release = threading.Event()
        self.arrived = threading.Event()
        self.answers: list[tuple[int, bytes]] = []
        gate = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                gate.arrived.set()
                if gate.hold.is_set():
                    gate.release.wait(60)
                conn = http.client.HTTPConnection("127.0.0.1", service_port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower().startswith(("x-vlm-", "content-type"))}
                conn.request("POST", self.path, body=body, headers=headers)
                r = conn.getresponse()
                reply = r.read()
                gate.answers.append((r.status, reply))
                self.send_response(r.status)
                self.send_header("content-type", r.getheader("content-type", "application/octet-stream"))
                self.send_header("content-length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)
                conn.close()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def one_worker_envoy(workdir, plugin, emu, transcode_port):
    listen, admin = free_port(), free_port()
    cfg = render_config(plugin, emu.pd_port, listen, admin, WASM, emu.encode_port)
    cfg["static_resources"]["clusters"].append({
        "name": "transcode_cluster", "type": "STATIC", "connect_timeout": "2s",
        "per_connection_buffer_limit_bytes": 134217728,
        "load_assignment": {"cluster_name": "transcode_cluster", "endpoints": [{"lb_endpoints": [{"endpoint": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": transcode_port}}}}]}]},
    })
    return Envoy(cfg, workdir, admin, listen, concurrency=1).wait_ready()


@pytest.fixture
def stack(tmp_path, emulator):
    emu = emulator("--time-scale", "0.2", "--jitter-sigma", "0")
    service = Transcoder(tmp_path)
    gate = Gate(service.port)
    started = []

    def envoy(plugin, transcode_port=None):
        env = one_worker_envoy(tmp_path, plugin, emu, transcode_port or gate.port)
        started.append(env)
        return env

    yield emu, gate, envoy
    for env in started:
        env.stop()
    gate.close()
    service.stop()


def photo(w=3000, h=2000):
    return image_bytes(w, h, "JPEG", noise=True, quality=90)


def pd_and_encode(emu, request_id):
    entries = [e for e in emu.requests() if e["request_id"] == request_id]
    encodes = [i["sha256"] for e in entries if e["role"] == "encode" for i in e["images"]]
    pd = [i["sha256"] for e in entries if e["role"] == "pd" for i in e["images"]]
    return encodes, pd


def test_the_worker_answers_text_while_an_image_is_at_the_service(stack):
    emu, gate, envoy = stack
    env = envoy(OFFLOAD)
    body = chat_body([data_url(photo(), "image/jpeg")])
    gate.hold.set()
    result = {}

    def send_image():
        result["image"] = post(env.url, body, headers={"x-request-id": "held-image"}, timeout=120)

    t = threading.Thread(target=send_image)
    t.start()
    assert gate.arrived.wait(60), "the image never reached the service"
    # The image's transcode is held at the service. On the same (only)
    # worker, a text-only request is answered meanwhile.
    text = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()
    status, headers, _ = post(env.url, text, headers={"x-request-id": "text"}, timeout=60)
    assert status == 200 and headers["x-vlm-images"] == "0"
    assert "image" not in result and t.is_alive() and not gate.answers, "the image was not still waiting"
    gate.release.set()
    t.join(120)
    status, headers, reply = result["image"]
    assert status == 200, reply
    assert headers["x-vlm-transcode"] == "offload"
    assert headers["x-vlm-images-resized"] == "1"
    assert headers["x-vlm-encode"] == "ok"
    # The service's bytes, spliced as they came, reached encode and PD.
    ((answer_status, answer),) = gate.answers
    assert answer_status == 200
    encodes, pd = pd_and_encode(emu, "held-image")
    assert encodes == pd == [hashlib.sha256(answer).hexdigest()]
    w, h, fmt = image_size(answer)
    assert fmt == "JPEG" and (w // 28) * (h // 28) == int(headers["x-vlm-visual-tokens-after"]) <= BUDGET
    stats = env.stats()
    assert stats["wasmcustom.vlm_budget_transcode_offloads_total"] == 1
    assert stats.get("wasmcustom.vlm_budget_transcode_fallbacks_total", 0) == 0


def test_a_service_that_is_down_leaves_the_work_to_the_filter(stack):
    emu, gate, envoy = stack
    in_filter = envoy(EPD)
    down = envoy(OFFLOAD, transcode_port=free_port())
    body = chat_body([data_url(photo(2400, 1600), "image/jpeg"), data_url(image_bytes(1800, 1200, "PNG"), "image/png")])
    s1, h1, r1 = post(in_filter.url, body, headers={"x-request-id": "in-filter"})
    s2, h2, r2 = post(down.url, body, headers={"x-request-id": "fell-back"})
    assert (s1, s2) == (200, 200), (r1, r2)
    assert "x-vlm-transcode" not in h1
    assert h2["x-vlm-transcode"] == "fallback"
    enc1, pd1 = pd_and_encode(emu, "in-filter")
    enc2, pd2 = pd_and_encode(emu, "fell-back")
    assert len(pd1) == 2 and sorted(enc1) == sorted(pd1)
    # The same bytes as the in-filter path, at encode and at PD.
    assert pd2 == pd1 and sorted(enc2) == sorted(pd1)
    stats = down.stats()
    assert stats["wasmcustom.vlm_budget_transcode_fallbacks_total"] == 2
    assert stats.get("wasmcustom.vlm_budget_transcode_offloads_total", 0) == 0
    assert stats["cluster.transcode_cluster.upstream_cx_connect_fail"] >= 1


def test_bad_images_get_the_filters_error_and_good_ones_still_go(stack):
    emu, gate, envoy = stack
    env = envoy(OFFLOAD)
    png = image_bytes(1500, 1000, "PNG")
    good = data_url(photo(1500, 1000), "image/jpeg")
    # The service refuses the truncated PNG (400); the filter then finds it
    # corrupt itself and answers as it always does.
    status, headers, reply = post(env.url, chat_body([good, data_url(png[: len(png) // 2], "image/png")]))
    assert status == 400, reply
    err = json.loads(reply)["error"]
    assert err["code"] == "corrupt_image" and err["message"].startswith("image 1: ")
    assert sorted(s for s, _ in gate.answers) == [200, 400]
    status, headers, _ = post(env.url, chat_body([good]), headers={"x-request-id": "after"})
    assert status == 200 and headers["x-vlm-transcode"] == "offload"
    stats = env.stats()
    assert stats["wasmcustom.vlm_budget_errors_corrupt_image_total"] == 1
    assert stats["wasm.vlm_budget.vm_reload"] == 0
    assert "panicked" not in env.log_text()
    encodes, pd = pd_and_encode(emu, "after")
    assert encodes == pd and len(pd) == 1
    assert decode_data_url(good)[0] == "image/jpeg"
