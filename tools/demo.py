#!/usr/bin/env python3
"""`make demo`: Envoy with the filter (envoy/envoy.yaml as shipped) in front of
a local recording upstream on 127.0.0.1:8200; sends image requests and shows
what the filter did to each."""
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests/integration"))

import harness  # noqa: E402
from harness import chat_body, data_url, decode_data_url, image_size, image_urls, post  # noqa: E402


def main() -> int:
    upstream = harness.Recorder(port=8200)
    cfg = harness.render_config(None, 8200, 10000, 9901)
    workdir = ROOT / ".cache/demo"
    workdir.mkdir(parents=True, exist_ok=True)
    envoy = harness.Envoy(cfg, workdir, 9901, 10000)
    try:
        envoy.wait_ready()
        print("Envoy with vlm-budget on http://127.0.0.1:10000 (admin :9901), upstream recorder on :8200")
        print("policy: static, 4096 visual tokens per image (envoy/envoy.yaml)\n")
        print(f"{'image':28} {'sent':>11} {'forwarded':>11} {'tokens':>13} {'body MB':>13} {'filter ms':>9}")
        for name in ["rhythm.jpg", "2004default.jpg", "the-mouse.jpg", "calla.png", "goldfish.png"]:
            raw = (harness.TESTDATA / name).read_bytes()
            w, h, fmt = image_size(raw)
            body = chat_body([data_url(raw, "image/png" if fmt == "PNG" else "image/jpeg")])
            t0 = time.perf_counter()
            status, headers, _ = post(envoy.url, body, timeout=120)
            elapsed = (time.perf_counter() - t0) * 1000
            got = upstream.last()["body"]
            _, data = decode_data_url(image_urls(got)[0])
            rw, rh, _ = image_size(data)
            print(f"{name:28} {w:>5}x{h:<5} {rw:>5}x{rh:<5} "
                  f"{headers.get('x-vlm-visual-tokens-before', '?'):>6}->{headers.get('x-vlm-visual-tokens-after', '?'):<6}"
                  f"{len(body) / 1e6:>6.1f}->{len(got) / 1e6:<6.1f}{headers.get('x-vlm-transcode-ms', '?'):>9}"
                  f"  (HTTP {status}, {elapsed:.0f} ms)")
        print("\nFilter metrics (admin /stats):")
        for k, v in sorted(envoy.stats().items()):
            if k.startswith("wasmcustom.") and "errors" not in k:
                print(f"  {k[len('wasmcustom.'):]:45} {v}")
    finally:
        envoy.stop()
        upstream.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
