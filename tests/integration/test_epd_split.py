"""Full disaggregation (1E1P1D) through the real Envoy: encode, then prefill
with vLLM's KV-transfer handshake, then decode with the prefill's
kv_transfer_params. Recording upstreams prove the order and the bytes; the
emulator's split roles prove the hand-off (its decode refuses a transfer it
does not know)."""
import json
import socket
import time

import openai
import pytest

import harness
from harness import chat_body, data_url, image_bytes, image_urls, post

SPLIT = {"policy": "static", "static_budget_tokens": 1024, "encode_cluster": "encode_cluster",
         "encode_timeout_ms": 5000, "encode_retries": 1, "prefill_cluster": "prefill_cluster",
         "prefill_timeout_ms": 5000, "prefill_retries": 1, "hold_headers": True}

OPEN = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
        "remote_block_ids": None, "remote_host": None, "remote_port": None}


def with_prefill(port):
    """mutate(): adds prefill_cluster at 127.0.0.1:`port`."""
    def mutate(cfg):
        clusters = cfg["static_resources"]["clusters"]
        pre = json.loads(json.dumps(clusters[0]))
        pre["name"] = pre["load_assignment"]["cluster_name"] = "prefill_cluster"
        pre["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"][
            "socket_address"]["port_value"] = port
        clusters.append(pre)
    return mutate


def images(n, w=1400, h=1000):
    return [data_url(image_bytes(w + 28 * i, h, "JPEG" if i % 2 else "PNG"),
                     "image/jpeg" if i % 2 else "image/png") for i in range(n)]


def wait_for(check, what, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def held(env):
    stats = env.stats()
    return [stats[f"wasmcustom.vlm_budget_{g}"] for g in
            ("encode_inflight", "pd_inflight", "pd_pending", "encode_outstanding_ms")]


@pytest.fixture
def recorders():
    recs = [harness.Recorder() for _ in range(3)]
    yield recs
    for r in recs:
        r.close()


KV = {"do_remote_prefill": True, "do_remote_decode": False, "remote_engine_id": "e-7",
      "remote_block_ids": [1, 2, 3], "remote_host": "10.1.2.3", "remote_port": 5601, "tp_size": 1}


def test_order_bytes_and_params_at_recording_upstreams(start_envoy, recorders):
    enc, pre, dec = recorders
    kv_raw = json.dumps(KV, separators=(",", ":"))
    pre.reply = ('{"id":"p","object":"chat.completion","choices":[],"kv_transfer_params":' + kv_raw + "}").encode()
    env = start_envoy({**SPLIT, "encode_fanout": "per_image"}, dec, enc.port, mutate=with_prefill(pre.port))
    body = chat_body(images(2), extra=', "stream": true, "stream_options": {"include_usage": true}'
                                      ', "max_completion_tokens": 77')
    status, headers, _ = post(env.url, body, headers={"x-request-id": "split-1"})
    assert status == 200
    assert (headers["x-vlm-encode"], headers["x-vlm-prefill"], headers["x-vlm-kv-transfer"]) == ("ok", "ok", "spliced")
    assert headers["x-vlm-prefill-calls"] == "1"
    (p,), (d,) = pre.requests, dec.requests
    assert len(enc.requests) == 2
    # E -> P -> D: every encode answered before the prefill arrived, the
    # prefill answered before decode got the request (headers held too).
    assert max(e["answered_at"] for e in enc.requests) <= p["at"]
    assert p["answered_at"] <= d["at"]
    for r in (*enc.requests, p, d):
        assert r["headers"]["x-request-id"] == "split-1"
    # The prefill request: the whole body, one token, no stream, the handshake.
    v = json.loads(p["body"])
    assert (v["max_tokens"], v["max_completion_tokens"], v["stream"]) == (1, 1, False)
    assert "stream_options" not in v and v["kv_transfer_params"] == OPEN
    assert p["headers"].get(":authority", p["headers"].get("host")) == "vlm-prefill"
    # Identical image bytes at E, P and D.
    enc_urls = sorted(json.loads(e["body"])["messages"][0]["content"][0]["image_url"]["url"] for e in enc.requests)
    assert sorted(image_urls(p["body"])) == enc_urls == sorted(image_urls(d["body"]))
    # Decode: the body as it would go without the split, plus the params.
    member = b',"kv_transfer_params":' + kv_raw.encode()
    assert d["body"].count(member) == 1
    expected = harness.replace_urls(body, image_urls(body), image_urls(d["body"]))
    assert d["body"].replace(member, b"") == expected
    assert json.loads(d["body"])["kv_transfer_params"] == KV
    assert held(env) == [0, 0, 0, 0]


def test_text_only_and_answers_without_params(start_envoy, recorders):
    enc, pre, dec = recorders
    pre.reply = b'{"id":"p","object":"chat.completion","choices":[]}'
    env = start_envoy(SPLIT, dec, enc.port, mutate=with_prefill(pre.port))
    body = b'{"messages":[{"role":"user","content":"hi"}],"stream":true ,"n":1.50}'
    status, headers, _ = post(env.url, body)
    assert status == 200 and not enc.requests
    assert (headers["x-vlm-prefill"], headers["x-vlm-kv-transfer"]) == ("ok", "absent")
    (p,), (d,) = pre.requests, dec.requests
    assert json.loads(p["body"])["kv_transfer_params"] == OPEN
    assert d["body"] == body, "no params: decode gets the body as sent"
    assert p["headers"]["x-request-id"] == d["headers"]["x-request-id"] != ""


def test_unset_prefill_cluster_keeps_the_request_byte_for_byte(start_envoy, recorders):
    enc, pre, dec = recorders
    env = start_envoy({k: v for k, v in SPLIT.items() if not k.startswith("prefill")}, dec, enc.port,
                      mutate=with_prefill(pre.port))
    body = b'{"messages":[{"role":"user","content":"hi"}],"stream":true ,"n":1.50}'
    status, headers, _ = post(env.url, body)
    assert status == 200 and not pre.requests and dec.requests[0]["body"] == body
    assert "x-vlm-prefill" not in headers


@pytest.fixture
def split_emu(tmp_path):
    emu = harness.Emulator(tmp_path, "--time-scale", "0.2", "--jitter-sigma", "0", split=True)
    yield emu
    emu.stop()


def start_split(start_envoy, emu, **over):
    return start_envoy({**SPLIT, **over}, emu, mutate=with_prefill(emu.prefill_port))


def by_request(log, request_id):
    return {e["role"]: e for e in log if e["request_id"] == request_id}, \
        [e for e in log if e["request_id"] == request_id and e["role"] == "encode"]


def test_the_emulator_hands_the_kv_cache_to_decode_and_streams_to_the_sdk(start_envoy, split_emu):
    env = start_split(start_envoy, split_emu, encode_fanout="per_image")
    client = openai.OpenAI(base_url=env.url + "/v1", api_key="unused", max_retries=0)
    content = [{"type": "text", "text": "Describe."},
               *({"type": "image_url", "image_url": {"url": u}} for u in images(2, 2000, 1500))]
    stream = client.chat.completions.create(
        model="Qwen/Qwen2.5-VL-3B-Instruct", messages=[{"role": "user", "content": content}],
        max_tokens=24, stream=True, stream_options={"include_usage": True},
        extra_headers={"x-request-id": "sdk-split"})
    chunks = list(stream)
    deltas = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(deltas) == 24
    assert chunks[-1].usage.completion_tokens == 24
    assert len({c.id for c in chunks}) == 1
    roles, encodes = by_request(split_emu.requests(), "sdk-split")
    pre, dec = roles["prefill"], roles["decode"]
    assert len(encodes) == 2 and all(e["status"] == 200 for e in encodes)
    # E -> P -> D, the same images at E and P (P found them in the encoder cache).
    assert max(e["arrival_ms"] for e in encodes) < pre["arrival_ms"] < dec["arrival_ms"]
    assert sorted(e["images"][0]["sha256"] for e in encodes) == sorted(i["sha256"] for i in pre["images"])
    assert all(i["cache"] == "hit" for i in pre["images"])
    assert (pre["max_tokens"], pre["stream"], pre["status"]) == (1, False, 200)
    # Decode took the transfer prefill opened (it refuses unknown ones).
    assert pre["kv_transfer"] and dec["kv_transfer"] == pre["kv_transfer"]
    assert (dec["status"], dec["stream"], dec["completion_tokens"]) == (200, True, 24)
    assert harness.metric_value(split_emu.metrics("prefill"), "ec_cache_misses_total") == 0
    wait_for(lambda: held(env) == [0, 0, 0, 0], "counters released")
    assert env.stats()["wasmcustom.vlm_budget_prefill_calls_total"] == 1


def test_prefill_failure_answers_502_or_falls_back(start_envoy, split_emu):
    env = start_split(start_envoy, split_emu)
    split_emu.faults("prefill", fail_status=503, fail_count=100)
    status, headers, reply = post(env.url, chat_body(images(1)), headers={"x-request-id": "pf"})
    assert status == 502
    err = json.loads(reply)["error"]
    assert (err["code"], err["type"]) == ("prefill_unavailable", "server_error")
    stats = env.stats()
    assert stats["wasmcustom.vlm_budget_prefill_calls_total"] == 2
    assert stats["wasmcustom.vlm_budget_prefill_retries_total"] == 1
    assert stats["wasmcustom.vlm_budget_prefill_failures_total"] == 1
    roles, _ = by_request(split_emu.requests(), "pf")
    assert "decode" not in roles, "nothing reached decode"
    assert held(env) == [0, 0, 0, 0]
    # fallback: decode gets the plain request and prefills it itself.
    env_fb = start_split(start_envoy, split_emu, prefill_failure="fallback")
    status, headers, _ = post(env_fb.url, chat_body(images(1)), headers={"x-request-id": "fb"})
    assert status == 200 and headers["x-vlm-prefill"] == "fallback"
    roles, _ = by_request(split_emu.requests(), "fb")
    assert roles["decode"]["kv_transfer"] is None and roles["decode"]["status"] == 200
    assert float(headers["x-emulator-prefill-ms"]) > 0
    assert env_fb.stats()["wasmcustom.vlm_budget_prefill_fallbacks_total"] == 1
    assert held(env_fb) == [0, 0, 0, 0]
    for e in (env, env_fb):
        assert e.stats()["wasm.vlm_budget.vm_reload"] == 0


def test_prefill_timeout_and_client_abort_leave_no_counters(start_envoy, split_emu):
    env = start_split(start_envoy, split_emu, prefill_timeout_ms=300, prefill_retries=0, policy="dynamic")
    split_emu.faults("prefill", extra_delay_ms=1500)
    status, _, reply = post(env.url, chat_body(images(1)), headers={"x-request-id": "slow"})
    assert status == 502 and json.loads(reply)["error"]["code"] == "prefill_unavailable"
    assert "504" in json.loads(reply)["error"]["message"]
    assert held(env) == [0, 0, 0, 0]
    # The client goes away while the prefill runs.
    body = chat_body(images(1))
    port = int(env.url.rsplit(":", 1)[1])
    env_abort = start_split(start_envoy, split_emu, policy="dynamic")
    port = int(env_abort.url.rsplit(":", 1)[1])
    calls = env_abort.stats()["wasmcustom.vlm_budget_prefill_calls_total"]
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                  b"x-request-id: gone\r\n" + f"content-length: {len(body)}\r\n\r\n".encode() + body)
        wait_for(lambda: env_abort.stats()["wasmcustom.vlm_budget_prefill_calls_total"] > calls,
                 "the prefill call never went out")
        assert held(env_abort)[1] == 1, "in flight at the prefill side"
    wait_for(lambda: held(env_abort) == [0, 0, 0, 0], "counters released after the abort")
    assert env_abort.stats()["http.vlm_ingress.downstream_rq_active"] == 0
    time.sleep(1.6)  # the prefill answers after the client left: nothing goes to decode
    roles, _ = by_request(split_emu.requests(), "gone")
    assert "decode" not in roles
    split_emu.faults("prefill", extra_delay_ms=0)
    status, headers, _ = post(env_abort.url, body)
    assert status == 200 and headers["x-vlm-prefill"] == "ok"
    for e in (env, env_abort):
        assert e.stats()["wasm.vlm_budget.vm_reload"] == 0


def test_audio_and_video_parts_are_primed_at_the_encoder_and_passed_through(start_envoy, recorders):
    enc, pre, dec = recorders
    pre.reply = b'{"id":"p","kv_transfer_params":{"transfer_id":"t-9"}}'
    env = start_envoy({**SPLIT, "encode_fanout": "per_image"}, dec, enc.port, mutate=with_prefill(pre.port))
    audio = '{"type": "input_audio", "input_audio": {"data": "UklGRiQAAABXQVZF", "format": "wav"}}'
    audio_url = '{"type":"audio_url","audio_url":{"url":"data:audio/mpeg;base64,SUQz"}}'
    video = '{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAAIGZ0eXA=", "x": 1e0}}'
    body = ('{"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "what?"}, '
            + audio + ", " + audio_url + ", " + video + ']}], "temperature": 0.70}').encode()
    status, headers, _ = post(env.url, body, headers={"x-request-id": "av"})
    assert status == 200
    assert (headers["x-vlm-audio-parts"], headers["x-vlm-video-parts"], headers["x-vlm-images"]) == ("2", "1", "0")
    assert headers["x-vlm-encode"] == "ok" and headers["x-vlm-encode-calls"] == "3"
    # Each part alone at the encoder, byte for byte as sent.
    primed = sorted(r["body"] for r in enc.requests)
    for part in (audio, audio_url, video):
        assert sum(part.encode() in b for b in primed) == 1, part
    (p,), (d,) = pre.requests, dec.requests
    assert max(r["answered_at"] for r in enc.requests) <= p["at"] and p["answered_at"] <= d["at"]
    assert d["body"] == body[:-1] + b',"kv_transfer_params":{"transfer_id":"t-9"}}'
    stats = env.stats()
    assert (stats["wasmcustom.vlm_budget_audio_parts_total"], stats["wasmcustom.vlm_budget_video_parts_total"]) == (2, 1)
    # Per request: one call with the whole body.
    env_whole = start_envoy({**SPLIT, "encode_fanout": "per_request"}, dec, enc.port, mutate=with_prefill(pre.port))
    enc.requests.clear()
    status, headers, _ = post(env_whole.url, body)
    assert status == 200 and len(enc.requests) == 1
    assert all(part.encode() in enc.requests[0]["body"] for part in (audio, audio_url, video))
