"""Scale-out without a cluster: two Envoy replicas with the filter (dynamic
policy) in front of one emulated encode cluster (tools/emulator). A burst is
split between them, half each, and fills the encoders' queue; then each
replica budgets one more request. With the encoders' /metrics polled
(`metrics_poll_ms`), both replicas see the whole backlog, the other
replica's half included, and shrink that request to the floor; with the
poll off (`metrics_poll_ms: 0`) each sees only its own half and keeps
several times more."""
from __future__ import annotations

import io
import threading
import time

from PIL import Image

import harness

HALF = 4                 # burst requests per replica
SIZE = (2800, 2100)      # 7,500 visual tokens
TOKENS = 7500
FLOOR = 256
# The burst keeps every token (a lax per-request SLO). The probe's SLO
# (x-slo-ttft-ms) leaves room for one replica's half of the queue, by the
# filter's default H100 profile (encode 289 ms, prefill 123 ms for 7,500
# tokens; 90% headroom; 30 ms overhead), but not for the whole queue:
#   own half:   4 x 289 = 1157 ms waiting -> ~3,800 tokens or more
#   all of it: >= 6 x 289 = 1735 ms waiting -> the floor
BURST_SLO_MS = 60000
PROBE_SLO_MS = 1550


def plugin(poll_ms: int) -> dict:
    return {
        "policy": "dynamic",
        "encode_cluster": "encode_cluster",
        "ttft_slo_ms": 1000,
        "min_tokens_per_image": FLOOR,
        "max_utilisation": 1.0,
        # Predictions from the fixed H100 profile, not corrected by the
        # emulator's observed times.
        "calibration": {"enabled": False},
        "metrics_poll_ms": poll_ms,
        "metrics_stale_ms": 5000,
    }


# One encode instance (one GPU, one image per batch, at half the H100's speed
# so the queue outlasts the polls) and a prefill/decode instance.
EMULATOR_ARGS = ("--jitter-sigma", "0", "--encode-gpus", "1", "--max-num-batched-tokens", "8192",
                 "--speed-factor", "2", "--pd-gpus", "8", "--default-output-tokens", "1")


def backlog(emu: harness.Emulator) -> int:
    """vllm:num_requests_waiting + vllm:num_requests_running of the encoders."""
    text = emu.metrics("encode")
    return int(harness.metric_value(text, "vllm:num_requests_waiting")
               + harness.metric_value(text, "vllm:num_requests_running"))


def body(i: int) -> bytes:
    """A chat request with one PNG of SIZE in a colour of its own: distinct
    pixels, so the emulator's encoder cache never answers for another."""
    img = Image.new("RGB", SIZE, (i * 37 % 256, 255 - i * 11 % 256, 40 + i))
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return harness.chat_body([harness.data_url(buf.getvalue(), "image/png")])


def gauges(env) -> dict[str, int]:
    return {k.removeprefix("wasmcustom.vlm_budget_"): v for k, v in env.stats().items()
            if k.startswith("wasmcustom.vlm_budget_")}


def wait_for(what, cond, timeout=15.0):
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


class Sender:
    """Requests sent from threads; results kept by label."""

    def __init__(self):
        self.results: dict[str, tuple[int, dict]] = {}
        self.threads: list[threading.Thread] = []

    def send(self, label, env, data, slo_ms):
        def run():
            status, headers, _ = harness.post(env.url, data, headers={"x-slo-ttft-ms": str(slo_ms)}, timeout=120)
            self.results[label] = (status, headers)
        t = threading.Thread(target=run)
        t.start()
        self.threads.append(t)

    def join(self):
        for t in self.threads:
            t.join(timeout=120)


def scenario(poll_ms: int, tmp_path, bodies) -> dict:
    emu = harness.Emulator(tmp_path, *EMULATOR_ARGS)
    envs = {}
    try:
        for name in ("A", "B"):
            listen, admin = harness.free_port(), harness.free_port()
            cfg = harness.render_config(plugin(poll_ms), emu.pd_port, listen, admin, harness.WASM, emu.encode_port)
            envs[name] = harness.Envoy(cfg, tmp_path, admin, listen)
        for env in envs.values():
            env.wait_ready()
        if poll_ms:
            # Steady state: both replicas hold a fresh (idle) reading.
            for name, env in envs.items():
                wait_for(f"{name}'s first reading", lambda e=env: gauges(e).get("cluster_signal_fresh") == 1)
        sender = Sender()
        # The burst: HALF requests to each replica at once.
        for k in range(2 * HALF):
            name = "AB"[k % 2]
            sender.send(f"burst-{name}-{k // 2}", envs[name], bodies[k], BURST_SLO_MS)
        # The encoders hold (nearly) all of it.
        wait_for("the burst at the encoders", lambda: backlog(emu) >= 2 * HALF - 1)
        seen = {}
        if poll_ms:
            # Each replica's poll has read that backlog.
            for name, env in envs.items():
                wait_for(f"{name}'s reading",
                         lambda e=env: (lambda g: g.get("cluster_waiting", 0) + g.get("cluster_running", 0))(
                             gauges(e)) >= 2 * HALF - 2)
                seen[name] = gauges(env)
        else:
            time.sleep(0.3)
        backlog_at_probe = backlog(emu)
        # One more request to each replica.
        for name, env in envs.items():
            sender.send(f"probe-{name}", env, bodies[2 * HALF + "AB".index(name)], PROBE_SLO_MS)
        sender.join()
        final = {name: gauges(env) for name, env in envs.items()}
        return {"results": sender.results, "seen": seen, "final": final, "backlog": backlog_at_probe}
    finally:
        for env in envs.values():
            env.stop()
        emu.stop()


def test_replicas_budget_for_the_whole_backlog(wasm, tmp_path):
    on = scenario(200, tmp_path, [body(i) for i in range(2 * HALF + 2)])
    off = scenario(0, tmp_path, [body(50 + i) for i in range(2 * HALF + 2)])

    report = {}
    for label, run in (("on", on), ("off", off)):
        results = run["results"]
        assert len(results) == 2 * HALF + 2, sorted(results)
        for key, (status, h) in results.items():
            assert status == 200, (label, key, status)
            assert h["x-vlm-policy"] == "dynamic"
            assert int(h["x-vlm-visual-tokens-before"]) == TOKENS
            if key.startswith("burst"):
                # The lax SLO: the burst itself keeps every token in both runs.
                assert int(h["x-vlm-budget-tokens"]) >= TOKENS, (label, key, h)
        assert run["backlog"] >= 2 * HALF - 2, (label, run["backlog"])
        report[label] = {name: (int(results[f"probe-{name}"][1]["x-vlm-budget-tokens"]),
                                results[f"probe-{name}"][1]["x-vlm-budget-reason"],
                                float(results[f"probe-{name}"][1]["x-vlm-predicted-ttft-ms"]))
                         for name in "AB"}

    for name in "AB":
        # With the poll, the replica read the whole queue: more requests than
        # it had sent itself.
        seen = on["seen"][name]
        assert seen["cluster_signal_fresh"] == 1
        assert seen["cluster_waiting"] + seen["cluster_running"] > HALF, seen
        assert on["final"][name]["metrics_polls_total"] > 0
        assert off["final"][name].get("metrics_polls_total", 0) == 0
        assert off["final"][name].get("cluster_signal_fresh", 0) == 0

        budget_on, reason_on, ttft_on = report["on"][name]
        budget_off, reason_off, _ = report["off"][name]
        # The whole backlog: the probe goes down to the floor ...
        assert budget_on == FLOOR and reason_on == "floor", report
        # ... its own half only: it keeps several times more.
        assert budget_off >= 4 * FLOOR and reason_off in ("slo", "unconstrained"), report
        # The floor is reported as over the SLO: the predicted wait alone
        # exceeds what the probe's SLO allows.
        assert ttft_on > 0.9 * PROBE_SLO_MS, report
    print("probe (budget, reason, predicted ttft):", report)
