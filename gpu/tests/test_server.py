"""The HTTP API through real server processes (tiny models on CPU): the backend emulator's
endpoints, SSE order, usage, the encoder-cache handshake, metrics, the debug log and faults."""
import json
import re
import threading

import pytest

from conftest import chat, data_url, metric, png, request
from vlm_gpu.sizing import SizingRule

RULE = SizingRule()
TEXT = "Describe the images."


def post_chat(base, body, **kw):
    return request(base, "/v1/chat/completions", body, **kw)


def test_health_models_and_routes(backends):
    b = backends["both"]
    for base, role in ((b.encode, "encode"), (b.pd, "pd")):
        s, h, body = request(base, "/health")
        assert (s, body, h["x-emulator-role"]) == (200, b"", role)
        s, _, body = request(base, "/v1/models")
        m = json.loads(body)
        assert s == 200 and m["data"][0]["id"] == "Qwen/Qwen2.5-VL-3B-Instruct"
        s, _, body = request(base, "/nope")
        assert s == 404 and json.loads(body)["error"]["code"] == "not_found"
        s, _, body = request(base, "/v1/chat/completions", method="GET")
        assert s == 405 and json.loads(body)["error"]["code"] == "method_not_allowed"


def test_pd_non_streaming_usage_and_length(backends):
    b = backends["both"]
    urls = [data_url(png(300, 200, 11)), data_url(png(128, 96, 12))]
    s, h, body = post_chat(b.pd, chat(urls, TEXT, max_tokens=5), headers={"x-request-id": "r-1"})
    assert s == 200, body
    out = json.loads(body)
    visual = RULE.tokens(300, 200) + RULE.tokens(128, 96)
    assert out["usage"] == {"prompt_tokens": len(TEXT) // 4 + visual + 4, "completion_tokens": 5,
                            "total_tokens": len(TEXT) // 4 + visual + 4 + 5, "prompt_tokens_details": None}
    assert out["object"] == "chat.completion" and out["choices"][0]["finish_reason"] == "length"
    assert len(out["choices"][0]["message"]["content"].split(" ")) == 5
    assert h["x-request-id"] == "r-1" and h["x-emulator-role"] == "pd"
    assert h["x-emulator-visual-tokens"] == str(visual) and h["x-emulator-images"] == "2"
    assert h["x-emulator-ec-cache"] == "miss"  # never sent to the encoder
    assert float(h["x-emulator-encode-ms"]) > 0 and float(h["x-emulator-prefill-ms"]) > 0
    assert float(h["x-emulator-ttft-ms"]) >= float(h["x-emulator-prefill-ms"]) + float(h["x-emulator-encode-ms"])
    # Without max_tokens: --default-output-tokens (7), finish "stop".
    s, _, body = post_chat(b.pd, chat(urls[:1], TEXT))
    out = json.loads(body)
    assert out["usage"]["completion_tokens"] == 7 and out["choices"][0]["finish_reason"] == "stop"


def sse_events(body: bytes) -> list:
    text = body.decode()
    assert text.endswith("data: [DONE]\n\n")
    events = text.split("\n\n")[:-1]
    assert all(e.startswith("data: ") for e in events)
    return [e[6:] for e in events]


def test_sse_order_and_decode_length(backends):
    b = backends["both"]
    body = chat([data_url(png(200, 150, 21))], TEXT, max_tokens=6, stream=True,
                stream_options={"include_usage": True})
    s, h, raw = post_chat(b.pd, body)
    assert s == 200 and h["content-type"].startswith("text/event-stream")
    ev = sse_events(raw)
    assert ev[-1] == "[DONE]"
    chunks = [json.loads(e) for e in ev[:-1]]
    assert len({c["id"] for c in chunks}) == 1
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    tokens = chunks[1:-1]
    assert len(tokens) == 6  # decode produced max_tokens tokens, one chunk each
    assert [c["choices"][0]["finish_reason"] for c in tokens] == [None] * 5 + ["length"]
    assert all("usage" in c and c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6
    assert chunks[-1]["usage"]["prompt_tokens"] == len(TEXT) // 4 + RULE.tokens(200, 150) + 2
    # Without include_usage: no usage key anywhere.
    body.pop("stream_options")
    chunks = [json.loads(e) for e in sse_events(post_chat(b.pd, body)[2])[:-1]]
    assert len(chunks) == 7 and all("usage" not in c for c in chunks)


def check_handshake(enc: str, pd: str, seed: int):
    before = request(pd, "/metrics")[2].decode()
    a, c = data_url(png(224, 168, seed)), data_url(png(112, 140, seed + 1))
    s, h, body = post_chat(enc, chat([a], TEXT, max_tokens=1))
    assert s == 200 and h["x-emulator-ec-cache"] == "miss", body
    out = json.loads(body)
    assert out["usage"]["completion_tokens"] == 1 and float(h["x-emulator-encode-ms"]) > 0
    # Again: the encoder finds it in its cache and does not encode.
    s, h, _ = post_chat(enc, chat([a], TEXT, max_tokens=1))
    assert h["x-emulator-ec-cache"] == "hit" and float(h["x-emulator-encode-ms"]) == 0
    s, h, _ = post_chat(pd, chat([a], TEXT, max_tokens=2))
    assert s == 200 and h["x-emulator-ec-cache"] == "hit" and float(h["x-emulator-encode-ms"]) == 0
    s, h, _ = post_chat(pd, chat([a, c], TEXT, max_tokens=2))
    assert h["x-emulator-ec-cache"] == "partial" and float(h["x-emulator-encode-ms"]) > 0
    after = request(pd, "/metrics")[2].decode()
    assert metric(after, "ec_cache_hits_total") - metric(before, "ec_cache_hits_total") == 2
    assert metric(after, "ec_cache_misses_total") - metric(before, "ec_cache_misses_total") == 1


def test_encoder_cache_handshake_in_one_process(backends):
    b = backends["both"]
    check_handshake(b.encode, b.pd, 31)


def test_encoder_cache_handshake_across_processes(backends):
    check_handshake(backends["encode"].encode, backends["pd"].pd, 41)
    files = [p.name for p in backends["ec_dir"].iterdir()]
    assert len(files) >= 1 and all(re.fullmatch(r"[0-9a-f]{32}", f) for f in files)
    s, _, body = request(backends["encode"].encode, "/debug/ec-cache", method="DELETE")
    assert s == 200 and json.loads(body)["cleared"] == len(files)
    assert not list(backends["ec_dir"].iterdir())


def test_concurrent_requests_are_all_served(backends):
    b = backends["both"]
    results = []

    def one(i):
        results.append(post_chat(b.pd, chat([data_url(png(84, 84, 100 + i))], TEXT, max_tokens=4 + i)))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]  # more than the 4 KV slots
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(json.loads(r[2])["usage"]["completion_tokens"] for r in results) == [4, 5, 6, 7, 8, 9]
    assert all(r[0] == 200 for r in results)


def parse_exposition(text: str) -> dict:
    """A strict reader of the Prometheus text format: every sample's family is TYPEd first,
    names and labels are well-formed, histograms are cumulative and end with +Inf = _count."""
    assert text.endswith("\n")
    types, samples = {}, []
    for line in text.splitlines():
        if line.startswith("# HELP "):
            assert re.fullmatch(r"# HELP [a-zA-Z_:][a-zA-Z0-9_:]* .*", line), line
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge", "histogram") and name not in types, line
            types[name] = kind
            continue
        m = re.fullmatch(r'([a-zA-Z_:][a-zA-Z0-9_:]*)\{((?:[a-zA-Z_]\w*="(?:[^"\\]|\\.)*",?)*)\} (\S+)', line)
        assert m, line
        name, labels, value = m.groups()
        float(value)
        base = re.sub(r"_(bucket|count|sum)$", "", name)
        family = name if name in types else base
        assert family in types, f"untyped sample {line}"
        samples.append((name, dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', labels)), float(value)))
    for fam, kind in types.items():
        if kind == "histogram":
            buckets = [s for s in samples if s[0] == fam + "_bucket"]
            counts = [v for _, _, v in buckets]
            assert counts == sorted(counts) and buckets[-1][1]["le"] == "+Inf"
            assert counts[-1] == next(v for n, _, v in samples if n == fam + "_count")
    return types


def test_metrics_parse_and_count(backends):
    b = backends["both"]
    before = request(b.pd, "/metrics")[2].decode()
    post_chat(b.pd, chat([data_url(png(56, 56, 51))], TEXT, max_tokens=3))
    s, h, raw = request(b.pd, "/metrics")
    assert s == 200 and h["content-type"].startswith("text/plain; version=0.0.4")
    text = raw.decode()
    types = parse_exposition(text)
    for name, kind in [("vllm:num_requests_running", "gauge"), ("vllm:num_requests_waiting", "gauge"),
                       ("vllm:time_to_first_token_seconds", "histogram"),
                       ("vllm:e2e_request_latency_seconds", "histogram"), ("vllm:prompt_tokens_total", "counter"),
                       ("vllm:generation_tokens_total", "counter"), ("vllm:request_success_total", "counter"),
                       ("ec_cache_hits_total", "counter"), ("ec_cache_misses_total", "counter")]:
        assert types[name] == kind
    assert metric(text, "vllm:generation_tokens_total") - metric(before, "vllm:generation_tokens_total") == 3
    assert metric(text, "vllm:time_to_first_token_seconds_count") == \
        metric(before, "vllm:time_to_first_token_seconds_count") + 1
    assert metric(text, "vllm:num_requests_running") == 0 and metric(text, "vllm:num_requests_waiting") == 0
    assert metric(text, "vllm:request_success_total", finished_reason="length") >= 1
    parse_exposition(request(b.encode, "/metrics")[2].decode())


def test_debug_log_errors_and_faults(backends):
    b = backends["both"]
    request(b.pd, "/debug/requests", method="DELETE")
    img = png(300, 200, 61)
    post_chat(b.pd, chat([data_url(img)], TEXT, max_tokens=2), headers={"x-request-id": "log-1"})
    s, h, body = post_chat(b.pd, chat(["data:image/webp;base64,AAAA"], TEXT))
    assert s == 400 and json.loads(body)["error"]["code"] == "unsupported_image_type"
    assert h["x-emulator-visual-tokens"] == "0"
    s, _, body = post_chat(b.pd, b"{" + b" " * 3_000_001 + b"}")
    assert s == 413 and json.loads(body)["error"]["code"] == "body_too_large"
    s, _, body = request(b.pd, "/debug/faults", {"fail_status": 503, "fail_count": 1})
    assert s == 200 and json.loads(body)["fail_count"] == 1
    s, _, body = post_chat(b.pd, chat([data_url(img)], TEXT, max_tokens=1))
    assert s == 503 and json.loads(body)["error"]["code"] == "injected_fault"
    assert post_chat(b.pd, chat([data_url(img)], TEXT, max_tokens=1))[0] == 200
    assert request(b.pd, "/debug/faults", {"fail_status": 200})[0] == 400
    log = json.loads(request(b.pd, "/debug/requests")[2])
    first = log[0]
    assert first["request_id"] == "log-1" and first["role"] == "pd" and first["status"] == 200
    assert first["images"][0]["width"] == 300 and first["images"][0]["visual_tokens"] == RULE.tokens(300, 200)
    assert len(first["images"][0]["sha256"]) == 64 and first["images"][0]["cache"] == "miss"
    assert first["completion_tokens"] == 2 and first["max_tokens"] == 2 and first["e2e_ms"] >= first["ttft_ms"] > 0
    assert [e["status"] for e in log] == [200, 400, 413, 503, 200]
    assert log[1]["error"] == "unsupported_image_type" and log[3]["error"] == "injected_fault"
    s, _, body = request(b.pd, "/debug/requests", method="DELETE")
    assert json.loads(body) == {"cleared": 5}


def test_chunked_request_body_and_keep_alive(backends):
    """Envoy may forward a rewritten body chunked; two requests on one connection."""
    import http.client
    from urllib.parse import urlsplit

    b = backends["both"]
    u = urlsplit(b.pd)
    body = json.dumps(chat([data_url(png(84, 112, 71))], TEXT, max_tokens=2)).encode()
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    try:
        conn.request("POST", "/v1/chat/completions", body=iter([body[:1000], body[1000:]]),
                     headers={"content-type": "application/json", "transfer-encoding": "chunked"},
                     encode_chunked=True)
        r = conn.getresponse()
        out = json.loads(r.read())
        assert r.status == 200 and out["usage"]["completion_tokens"] == 2
        assert out["usage"]["prompt_tokens"] == len(TEXT) // 4 + RULE.tokens(84, 112) + 2
        conn.request("GET", "/health")
        r = conn.getresponse()
        assert r.status == 200 and r.read() == b""
    finally:
        conn.close()
