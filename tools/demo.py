#!/usr/bin/env python3
"""`make demo`: the full local stack on its shipped defaults.

Starts the backend emulator (encode on 127.0.0.1:8100, prefill/decode on
:8200 — a stand-in for H100 GPUs, see tools/emulator/README.md) and Envoy
with the filter as configured in envoy/envoy.yaml (listener :10000, admin
:9901), then sends image requests (real 3840x2400 photographs and a text-only
one), streams each answer and prints what the filter did, the encode and
prefill times and the time to first token. Then the same requests through a
fully disaggregated stack (1E1P1D: encode :8100, prefill :8300, decode :8200,
envoy/envoy-1e1p1d.yaml). All times come from the emulator's latency model,
not from GPUs."""
import http.client
import json
import pathlib
import sys
import time

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests/integration"))

import harness  # noqa: E402
from harness import chat_body, data_url, image_size  # noqa: E402


def stream(body: bytes) -> tuple[dict, float, int]:
    """POST a streaming request; (response headers, TTFT ms, content chunks)."""
    conn = http.client.HTTPConnection("127.0.0.1", 10000, timeout=120)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body=body, headers={"content-type": "application/json"})
    resp = conn.getresponse()
    headers = {k.lower(): v for k, v in resp.getheaders()}
    ttft, chunks = None, 0
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
    for line in resp:
        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
            continue
        event = json.loads(line[6:])
        if event.get("choices") and event["choices"][0]["delta"].get("content"):
            chunks += 1
            if ttft is None:
                ttft = (time.perf_counter() - t0) * 1000
    conn.close()
    return headers, ttft or 0.0, chunks


def table(emu, envoy, log_role: str, prefill: str) -> None:
    """Sends the demo requests through `envoy` and prints a row each. The
    forwarded sizes come from the emulator's log of `log_role`; the prefill
    column from the response header `prefill`."""
    cols = f"{'request':22} {'sent':>21} {'forwarded':>21} {'visual tokens':^15} {'filter':>8} {'encode':>8} {'prefill':>8} {'TTFT':>8}"
    print(cols + "\n" + "-" * len(cols))
    requests = [(name, [(harness.TESTDATA / name).read_bytes()])
                for name in ["rhythm.jpg", "the-mouse.jpg", "calla.png", "goldfish.png"]]
    requests.append(("2 photos", [(harness.TESTDATA / n).read_bytes() for n in ["string.jpg", "desert.png"]]))
    requests.append(("text only", []))
    for name, images in requests:
        urls, sizes = [], []
        for raw in images:
            w, h, fmt = image_size(raw)
            sizes.append(f"{w}x{h}")
            urls.append(data_url(raw, "image/png" if fmt == "PNG" else "image/jpeg"))
        if urls:
            body = chat_body(urls, extra=', "stream": true, "max_tokens": 32')
        else:
            body = json.dumps({"model": "Qwen/Qwen2.5-VL-3B-Instruct", "stream": True, "max_tokens": 32,
                               "messages": [{"role": "user", "content": "Say hello."}]}).encode()
        headers, ttft, _ = stream(body)
        log = [e for e in emu.requests() if e["role"] == log_role][-1]
        fwd = ",".join(f"{i['width']}x{i['height']}" for i in log["images"]) or "-"
        before = headers.get("x-vlm-visual-tokens-before", "0")
        after = headers.get("x-vlm-visual-tokens-after", "0")
        print(f"{name:22} {(','.join(sizes) or '-'):>21} {fwd:>21} {before:>7}→{after:<7}"
              f"{headers.get('x-vlm-transcode-ms', '-'):>8} {headers.get('x-vlm-encode-ms', '-'):>8}"
              f" {float(headers.get(prefill, 0)):>8.1f} {ttft:>8.0f}")


def metrics(envoy) -> None:
    print("\nFilter metrics (admin /stats):")
    for k, v in sorted(envoy.stats().items()):
        if k.startswith("wasmcustom.") and "errors" not in k and v:
            print(f"  {k[len('wasmcustom.'):]:45} {v}")


def split_config() -> dict:
    """envoy/envoy-1e1p1d.yaml with the built module."""
    cfg = yaml.safe_load((ROOT / "envoy/envoy-1e1p1d.yaml").read_text())
    listener = cfg["static_resources"]["listeners"][0]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    harness.wasm_filter(hcm)["typed_config"]["config"]["vm_config"]["code"]["local"]["filename"] = str(harness.WASM)
    return cfg


def main() -> int:
    workdir = ROOT / ".cache/demo"
    workdir.mkdir(parents=True, exist_ok=True)
    emu = harness.Emulator(workdir, encode_port=8100, pd_port=8200)
    envoy = harness.Envoy(harness.render_config(None, 8200, 10000, 9901, encode_port=8100), workdir, 9901, 10000)
    try:
        envoy.wait_ready()
        print("vlm-budget demo — Envoy :10000 (admin :9901) → emulated encode :8100 and prefill/decode :8200")
        print("policy from envoy/envoy.yaml: static, 4,096 visual tokens per image; encode fan-out per image")
        print("(times come from the emulator's H100 latency model, not from GPUs)\n")
        table(emu, envoy, "pd", "x-emulator-prefill-ms")
        print("\nms: filter = decode+resize+encode in Envoy; encode = waiting for the encode cluster;"
              "\n    prefill = emulated prefill at PD; TTFT = client-side time to the first streamed token")
        print("encoder cache at PD:", {k: harness.metric_value(emu.metrics("pd"), k)
                                       for k in ("ec_cache_hits_total", "ec_cache_misses_total")})
        metrics(envoy)
    finally:
        envoy.stop()
        emu.stop()

    # 1E1P1D: encode, then prefill with vLLM's KV-transfer handshake, then decode.
    emu = harness.Emulator(workdir, encode_port=8100, pd_port=8200, split=True, prefill_port=8300)
    envoy = harness.Envoy(split_config(), workdir, 9901, 10000)
    try:
        envoy.wait_ready()
        print("\n\n1E1P1D — Envoy :10000 → emulated encode :8100, prefill :8300, decode :8200 (envoy/envoy-1e1p1d.yaml)")
        print("each request: encode calls, one prefill call (max_tokens 1, kv_transfer_params), then decode with"
              "\nthe prefill's kv_transfer_params\n")
        table(emu, envoy, "prefill", "x-vlm-prefill-ms")
        print("\nms: prefill = the filter's wait for the prefill call (queue + prefill + answer)")
        decoded = [e for e in emu.requests() if e["role"] == "decode"]
        handed = sum(1 for e in decoded if e["kv_transfer"])
        print(f"KV transfers taken by decode: {handed} of {len(decoded)} requests")
        print("encoder cache at prefill:", {k: harness.metric_value(emu.metrics("prefill"), k)
                                            for k in ("ec_cache_hits_total", "ec_cache_misses_total")})
        metrics(envoy)
    finally:
        envoy.stop()
        emu.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
