"""EPD through the real Envoy and the backend emulator: the encoder cache
handshake, fan-out, fallback, streaming and aborts."""
import json
import socket
import time

import openai
import pytest

from harness import Emulator, chat_body, data_url, image_bytes, metric_value, post

EPD = {"policy": "static", "static_budget_tokens": 1024, "encode_cluster": "encode_cluster",
       "encode_timeout_ms": 5000, "encode_retries": 1}


def images(n, w=1400, h=1000):
    return [data_url(image_bytes(w + 28 * i, h, "JPEG" if i % 2 else "PNG"),
                     "image/jpeg" if i % 2 else "image/png") for i in range(n)]


@pytest.fixture
def emu(emulator):
    return emulator("--time-scale", "0.2", "--jitter-sigma", "0")


def by_request(log, request_id):
    return [e for e in log if e["request_id"] == request_id]


def test_encoder_first_then_pd_with_zero_cache_misses(start_envoy, emu):
    env = start_envoy({**EPD, "encode_fanout": "per_image"}, emu)
    for i, n in enumerate([1, 4]):
        status, headers, reply = post(env.url, chat_body(images(n)), headers={"x-request-id": f"epd-{i}"})
        assert status == 200, reply
        assert headers["x-vlm-encode"] == "ok"
        assert headers["x-emulator-ec-cache"] == "hit"
        entries = by_request(emu.requests(), f"epd-{i}")
        encodes = [e for e in entries if e["role"] == "encode"]
        (pd,) = [e for e in entries if e["role"] == "pd"]
        assert len(encodes) == n  # per_image: one encode request per image
        assert all(len(e["images"]) == 1 and e["max_tokens"] == 1 and not e["stream"] for e in encodes)
        # (PD's headers go upstream at once; its body waits for the encoder:
        # the cache hits below show the encoder ran first.)
        # The same decoded images on both sides.
        assert sorted(e["images"][0]["sha256"] for e in encodes) == sorted(i["sha256"] for i in pd["images"])
        assert all(img["cache"] == "hit" for img in pd["images"])
        assert all(img["visual_tokens"] <= 1024 for img in pd["images"])
    assert metric_value(emu.metrics("pd"), "ec_cache_misses_total") == 0
    assert metric_value(emu.metrics("pd"), "ec_cache_hits_total") == 5


def test_encoder_failing_falls_back_and_pd_encodes(start_envoy, emu):
    env = start_envoy(EPD, emu)
    emu.faults("encode", fail_status=503, fail_count=100)
    status, headers, _ = post(env.url, chat_body(images(2)), headers={"x-request-id": "fb"})
    assert status == 200
    assert headers["x-vlm-encode"] == "fallback"
    assert headers["x-emulator-ec-cache"] == "miss"
    assert metric_value(emu.metrics("pd"), "ec_cache_misses_total") == 2
    assert env.stats()["wasmcustom.vlm_budget_encode_fallbacks_total"] == 1
    emu.faults("encode", fail_status=None, fail_count=0)
    env_fail = start_envoy({**EPD, "encode_failure": "fail"}, emu)
    emu.faults("encode", fail_status=500, fail_count=100)
    status, _, reply = post(env_fail.url, chat_body(images(1)))
    assert status == 502 and json.loads(reply)["error"]["code"] == "encoder_unavailable"


def test_streaming_with_the_openai_sdk(start_envoy, emu):
    env = start_envoy(EPD, emu)
    client = openai.OpenAI(base_url=env.url + "/v1", api_key="unused", max_retries=0)
    content = [{"type": "text", "text": "Describe."},
               {"type": "image_url", "image_url": {"url": images(1, 2000, 1500)[0]}}]
    stream = client.chat.completions.create(
        model="Qwen/Qwen2.5-VL-3B-Instruct", messages=[{"role": "user", "content": content}],
        max_tokens=24, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    deltas = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(deltas) == 24
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
    assert chunks[-1].usage.completion_tokens == 24
    # The resized image (at most 1,024 tokens, + 2 markers) and a little text.
    assert 900 < chunks[-1].usage.prompt_tokens <= 1024 + 2 + 8
    assert len({c.id for c in chunks}) == 1


def test_client_abort_during_encode_leaves_no_counters(start_envoy, emu):
    env = start_envoy({**EPD, "policy": "dynamic"}, emu)
    emu.faults("encode", extra_delay_ms=1500)
    body = chat_body(images(1))
    port = int(env.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                  + f"content-length: {len(body)}\r\n\r\n".encode() + body)
        deadline = time.monotonic() + 10
        while env.stats().get("wasmcustom.vlm_budget_encode_inflight", 0) == 0:
            assert time.monotonic() < deadline, "the encode call never went out"
            time.sleep(0.05)
    deadline = time.monotonic() + 10
    while True:
        stats = env.stats()
        held = [stats[f"wasmcustom.vlm_budget_{g}"] for g in ("encode_inflight", "pd_inflight", "encode_outstanding_ms")]
        if held == [0, 0, 0] or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert held == [0, 0, 0]
    assert stats["http.vlm_ingress.downstream_rq_active"] == 0
    time.sleep(1.6)  # the encoder answers after the client left: nothing goes to PD
    # Envoy opened the PD stream with the headers; the reset ended it before any body.
    pd = [e for e in emu.requests() if e["role"] == "pd"]
    assert all(e["status"] != 200 and e["prompt_tokens"] == 0 for e in pd), pd
    emu.faults("encode", extra_delay_ms=0)
    status, headers, _ = post(env.url, body)
    assert status == 200 and headers["x-vlm-encode"] == "ok"
