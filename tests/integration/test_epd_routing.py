"""EPD routing through the real Envoy, with recording servers standing in
for the encode and prefill/decode clusters."""
import json
import socket
import time

import pytest

import harness
from harness import chat_body, data_url, image_bytes, image_urls, post

EPD = {"policy": "static", "static_budget_tokens": 1024, "encode_cluster": "encode_cluster",
       "encode_timeout_ms": 2000, "encode_retries": 1}


@pytest.fixture
def encoder():
    rec = harness.Recorder()
    yield rec
    rec.close()


@pytest.fixture
def pd():
    rec = harness.Recorder()
    yield rec
    rec.close()


def images(n):
    return [data_url(image_bytes(1500 + 10 * i, 1000, "JPEG" if i % 2 else "PNG"),
                     "image/jpeg" if i % 2 else "image/png") for i in range(n)]


def test_per_image_fanout_encodes_each_image_before_pd(start_envoy, encoder, pd):
    env = start_envoy({**EPD, "encode_fanout": "per_image"}, pd, encoder.port)
    body = chat_body(images(4))
    status, headers, _ = post(env.url, body, headers={"x-request-id": "req-42"})
    assert status == 200
    assert headers["x-vlm-encode"] == "ok" and headers["x-vlm-encode-calls"] == "4"
    (pd_req,) = pd.requests
    pd_urls = image_urls(pd_req["body"])
    assert len(encoder.requests) == 4
    enc_urls = []
    for r in encoder.requests:
        v = json.loads(r["body"])
        assert v["max_tokens"] == 1 and v["stream"] is False and "stream_options" not in v
        assert v["model"] == "Qwen/Qwen2.5-VL-3B-Instruct"
        (part,) = v["messages"][0]["content"]  # the text is removed
        enc_urls.append(part["image_url"]["url"])
        assert r["headers"]["x-request-id"] == "req-42"
        assert r["headers"][":authority" if ":authority" in r["headers"] else "host"] == "vlm-encode"
        assert r["answered_at"] <= pd_req["at"]
    # Exactly the (resized) image bytes PD gets: the encoder cache will hit.
    assert sorted(enc_urls) == sorted(pd_urls)
    assert pd_req["headers"]["x-request-id"] == "req-42"


def test_per_request_fanout_and_generated_request_id(start_envoy, encoder, pd):
    env = start_envoy({**EPD, "encode_fanout": "per_request"}, pd, encoder.port)
    body = chat_body(images(2), extra=', "stream": true, "stream_options": {"include_usage": true}'
                                      ', "max_completion_tokens": 77')
    status, headers, _ = post(env.url, body)
    assert status == 200
    (enc,), (pd_req,) = encoder.requests, pd.requests
    v = json.loads(enc["body"])
    assert (v["max_tokens"], v["max_completion_tokens"], v["stream"]) == (1, 1, False)
    assert "stream_options" not in v
    assert v["messages"][0]["content"][0]["text"] == "Describe the images."
    assert image_urls(enc["body"]) == image_urls(pd_req["body"])
    # Envoy or the filter set an id; both calls carry the same one.
    assert enc["headers"]["x-request-id"] and enc["headers"]["x-request-id"] == pd_req["headers"]["x-request-id"]
    assert json.loads(pd_req["body"])["stream"] is True


def test_text_only_requests_skip_the_encoder(start_envoy, encoder, pd):
    env = start_envoy(EPD, pd, encoder.port)
    status, headers, _ = post(env.url, b'{"messages":[{"role":"user","content":"hi"}]}')
    assert status == 200 and len(pd.requests) == 1 and not encoder.requests
    assert "x-vlm-encode" not in headers


def test_encoder_down_falls_back_to_pd(start_envoy, pd):
    env = start_envoy(EPD, pd, harness.free_port())  # nothing listens there
    status, headers, _ = post(env.url, chat_body(images(2)))
    assert status == 200
    assert headers["x-vlm-encode"] == "fallback"
    assert headers["x-vlm-encode-calls"] == "4"  # 2 images, each retried once
    assert len(pd.requests) == 1
    stats = env.stats()
    assert stats["wasmcustom.vlm_budget_encode_fallbacks_total"] == 1
    assert stats["wasmcustom.vlm_budget_encode_retries_total"] == 2


def test_encoder_down_with_fail_gives_502(start_envoy, pd):
    env = start_envoy({**EPD, "encode_failure": "fail"}, pd, harness.free_port())
    status, headers, reply = post(env.url, chat_body(images(1)))
    assert status == 502
    err = json.loads(reply)["error"]
    assert err["code"] == "encoder_unavailable" and err["type"] == "server_error"
    assert "503" in err["message"]
    assert not pd.requests


def test_slow_encoder_times_out_retries_then_falls_back(start_envoy, encoder, pd):
    env = start_envoy({**EPD, "encode_timeout_ms": 300}, pd, encoder.port)
    encoder.delay_s = 1.0
    t0 = time.monotonic()
    status, headers, _ = post(env.url, chat_body(images(1)))
    elapsed = time.monotonic() - t0
    assert status == 200 and headers["x-vlm-encode"] == "fallback"
    assert len(encoder.requests) == 2  # first call + one retry
    assert elapsed >= 0.6  # two timed-out attempts
    assert len(pd.requests) == 1


def test_client_abort_during_encode_leaves_nothing_behind(start_envoy, encoder, pd):
    env = start_envoy(EPD, pd, encoder.port)
    encoder.delay_s = 1.0
    body = chat_body(images(1))
    port = int(env.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                  + f"content-length: {len(body)}\r\n\r\n".encode() + body)
        deadline = time.monotonic() + 5
        while not encoder.requests and time.monotonic() < deadline:
            time.sleep(0.02)
        assert encoder.requests, "the encode call went out"
    time.sleep(1.5)  # the encoder answers after the client is gone
    assert not pd.requests
    stats = env.stats()
    assert stats["http.vlm_ingress.downstream_rq_active"] == 0
    assert stats["wasm.vlm_budget.vm_reload"] == 0
    encoder.delay_s = 0
    status, headers, _ = post(env.url, chat_body(images(1)))
    assert status == 200 and headers["x-vlm-encode"] == "ok"
