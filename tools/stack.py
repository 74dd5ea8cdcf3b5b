#!/usr/bin/env python3
"""`make stack`: the local stack on its shipped defaults, until interrupted.

The backend emulator (encode 127.0.0.1:8100, prefill/decode :8200; a stand-in
for GPUs) and Envoy with the filter as in envoy/envoy.yaml (listener :10000,
admin :9901). Point any OpenAI client at http://127.0.0.1:10000/v1."""
import pathlib
import signal
import sys
import threading

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests/integration"))

import harness  # noqa: E402


def main() -> int:
    workdir = ROOT / ".cache/stack"
    workdir.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    emu = harness.Emulator(workdir, encode_port=8100, pd_port=8200)
    envoy = harness.Envoy(harness.render_config(None, 8200, 10000, 9901, encode_port=8100), workdir, 9901, 10000)
    try:
        envoy.wait_ready()
        print("ready: http://127.0.0.1:10000/v1 (admin http://127.0.0.1:9901); Ctrl-C stops", flush=True)
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        envoy.stop()
        emu.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
