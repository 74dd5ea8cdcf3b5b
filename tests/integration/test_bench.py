"""vlm-bench (tools/bench) against the real emulator and Envoy: the profiler
recovers the emulator's latency model, and `bench`, `run` and `report`
produce sane results end to end."""
from __future__ import annotations

import json
import struct
import subprocess

import pytest
from PIL import Image

import harness

BENCH = harness.ROOT / "target/release/vlm-bench"
LATENCY = harness.ROOT / "tools/emulator/data/h100-qwen2.5-vl-3b-latency.json"


@pytest.fixture(scope="module")
def vlm_bench():
    # A no-op when up to date (make bench builds it too).
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "vlm-bench"], cwd=harness.ROOT, check=True,
                   timeout=1200)
    return str(BENCH)


def curve(points: list[tuple[float, float]]):
    """The emulator's curve inside its table: lower monotone envelope, linear interpolation."""
    pts = sorted(points)
    env, floor = [], float("inf")
    for n, ms in reversed(pts):
        floor = min(floor, ms)
        env.append((n, floor))
    env.reverse()

    def at(n: float) -> float:
        assert env[0][0] <= n <= env[-1][0]
        for (x0, y0), (x1, y1) in zip(env, env[1:]):
            if x0 <= n <= x1:
                return y0 + (y1 - y0) * (n - x0) / (x1 - x0)
        return env[-1][1]

    return at


def models():
    data = json.loads(LATENCY.read_text())
    enc = curve([(p["visual_tokens"], p["median_ms"]) for p in data["vision_encoder"]["batched_sdpa"]])
    pre = curve([(p["tokens"], p["median_ms"]) for p in data["lm_prefill"]["timings"]])
    return enc, pre


def quad(f: dict, n: float) -> float:
    return f["a"] + f["b"] * n + f["c"] * n * n


def run(args, timeout=300):
    p = subprocess.run(args, cwd=harness.ROOT, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{args}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"
    return p


def test_profile_recovers_the_emulator_model(vlm_bench, emulator, start_envoy, tmp_path):
    emu = emulator("--jitter-sigma", "0", "--time-scale", "0.05")
    out, details = tmp_path / "profile.json", tmp_path / "details.json"
    run([vlm_bench, "profile", "--encode-url", emu.encode, "--pd-url", emu.pd,
         "--timing", "header:x-emulator-encode-ms", "--prefill-timing", "header:x-emulator-prefill-ms",
         "--reps", "3", "--warmup", "1", "--out", str(out), "--details", str(details), "--quiet"])
    section = json.loads(out.read_text())
    assert set(section) == {"encode_ms", "prefill_ms", "encode_replicas"}
    enc_model, pre_model = models()
    d = json.loads(details.read_text())
    sizes = [p["tokens"] for p in d["encode"]["points"]]
    assert sizes == [1024, 2304, 4096, 6400, 9216, 12544, 16384]
    for n in sizes:
        want = enc_model(n)
        got = quad(section["encode_ms"], n)
        assert abs(got - want) / want < 0.05, (n, got, want)
    for p in d["prefill"]["points"]:
        n = p["tokens"]
        want, got = pre_model(n), quad(section["prefill_ms"], n)
        assert abs(got - want) / want < 0.05, (n, got, want)
    # Every repetition reached the encoder: distinct images, no cache hit.
    hits = harness.metric_value(emu.metrics("encode"), "ec_cache_hits_total")
    assert hits == 0
    # The section is accepted by the filter as it is: Envoy loads it and serves.
    env = start_envoy({"policy": "dynamic", "encode_cluster": "encode_cluster", "profile": section}, emu)
    status, headers, _ = harness.post(env.url, harness.chat_body([harness.data_url(
        harness.image_bytes(1120, 1120, "JPEG"), "image/jpeg")]))
    assert status == 200 and headers["x-vlm-budget-reason"] == "unconstrained"


def test_profile_wall_time_includes_the_model(vlm_bench, emulator, tmp_path):
    emu = emulator("--jitter-sigma", "0", "--preprocess-ms-per-mpixel", "0")
    out, details = tmp_path / "p.json", tmp_path / "d.json"
    run([vlm_bench, "profile", "--encode-url", emu.encode, "--tokens", "1024,4096,9216",
         "--reps", "2", "--warmup", "0", "--out", str(out), "--details", str(details), "--quiet"])
    enc_model, _ = models()
    d = json.loads(details.read_text())
    assert "prefill_ms" not in json.loads(out.read_text())
    for p in d["encode"]["points"]:
        # Wall time = the emulated GPU time + HTTP and real image decoding.
        assert p["median_ms"] >= enc_model(p["tokens"]) * 0.98, p


def png_size(path):
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_bench_smoke_all_policies(vlm_bench, wasm, tmp_path):
    out = tmp_path / "out"
    p = run([vlm_bench, "bench", "--out", str(out), "--pool-dir", str(tmp_path / "pool"),
             "--log-dir", str(tmp_path / "logs"), "--peaks", "4", "--ramp-s", "1", "--hold-s", "2",
             "--decay-s", "1", "--sizes", "512,1024,2560", "--cooldown-s", "0", "--max-tokens", "8",
             "--emulator-arg=--jitter-sigma=0", "--seeds", "1", "--quiet"], timeout=240)
    assert "| peak-4 | dynamic |" in p.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["backends"]["emulated"] is True
    trace = (out / "traces/peak-4-seed-1.jsonl").read_text().splitlines()
    assert len(trace) >= 3
    # The written trace replays as it is: its image paths resolve from its folder.
    summary = json.loads(run([vlm_bench, "trace", "--check", str(out / "traces/peak-4-seed-1.jsonl")]).stdout)
    assert summary["requests"] == summary["images"] == len(trace)
    runs = {r["policy"]: r for r in results["runs"]}
    assert set(runs) == {"vanilla", "static", "dynamic"}
    images = set()
    for policy, r in runs.items():
        assert len(r["requests"]) == len(trace)
        for q in r["requests"]:
            assert q["status"] == 200 and q["error"] is None, q
            assert 0 < q["ttft_ms"] <= q["e2e_ms"] and q["output_tokens"] == 8
            assert q["headers"]["x-vlm-policy"] == policy
            assert q["headers"]["x-vlm-encode"] == "ok"
            before = int(q["headers"]["x-vlm-visual-tokens-before"])
            assert before == q["image_tokens"]
            after = int(q["headers"]["x-vlm-visual-tokens-after"])
            if policy == "vanilla":
                assert after == before
            if policy == "static":
                assert after <= 4096
            images.update(q["images"])
    # Every request carried a distinct image, the same ones under each policy.
    assert len(images) == len(trace)
    report = (out / "report.md").read_text()
    assert "EMULATED" in report and "ttft-cdf-4.png" in report
    for policy in ("vanilla", "static", "dynamic"):
        assert f"| peak-4 | {policy} | {len(trace)} | 0 |" in report
    plot = out / "ttft-cdf-4.png"
    assert png_size(plot) == (1000, 640)
    colours = set(Image.open(plot).convert("RGB").getdata())
    for c in [(214, 39, 40), (31, 119, 180), (44, 160, 44)]:  # one curve per policy
        assert c in colours


def test_bench_split_runs_1e1p1d(vlm_bench, wasm, tmp_path):
    out = tmp_path / "out"
    p = run([vlm_bench, "bench", "--split", "--out", str(out), "--pool-dir", str(tmp_path / "pool"),
             "--log-dir", str(tmp_path / "logs"), "--peaks", "3", "--ramp-s", "0", "--hold-s", "2",
             "--decay-s", "0", "--sizes", "512,2560", "--cooldown-s", "0", "--max-tokens", "8",
             "--policies", "static,dynamic", "--emulator-arg=--jitter-sigma=0", "--seeds", "1", "--quiet"],
            timeout=240)
    assert "| peak-3 | dynamic |" in p.stdout
    results = json.loads((out / "results.json").read_text())
    assert "1E1P1D" in results["backends"]["description"]
    for r in results["runs"]:
        assert r["plugin_config"]["prefill_cluster"] == "prefill_cluster"
        assert r["requests"]
        for q in r["requests"]:
            assert q["status"] == 200 and q["error"] is None, q
            assert q["output_tokens"] == 8
            assert (q["headers"]["x-vlm-prefill"], q["headers"]["x-vlm-kv-transfer"]) == ("ok", "spliced")
            assert q["headers"]["x-emulator-ec-cache"] == "none", "decode took the KV cache, no images"
            assert float(q["headers"]["x-emulator-kv-transfer-ms"]) > 0


def test_bench_against_running_backends_then_run_and_report(vlm_bench, wasm, emulator, tmp_path):
    emu = emulator("--jitter-sigma", "0", "--time-scale", "0.5")
    out = tmp_path / "ext"
    run([vlm_bench, "bench", "--out", str(out), "--pool-dir", str(tmp_path / "pool"),
         "--log-dir", str(tmp_path / "logs"), "--peaks", "3", "--ramp-s", "0", "--hold-s", "2", "--decay-s", "0",
         "--sizes", "768", "--policies", "static", "--no-start-backends", "--encode-url", emu.encode,
         "--pd-url", emu.pd, "--cooldown-s", "0", "--seeds", "1", "--quiet"], timeout=120)
    results = json.loads((out / "results.json").read_text())
    assert results["backends"]["emulated"] is False and results["backends"]["pd_url"].endswith(str(emu.pd_port))
    served = [e for e in emu.requests() if e["role"] == "pd"]
    assert len(served) == len(results["runs"][0]["requests"]) > 0

    # A user trace in JSONL, replayed straight at the PD instance, then reported.
    photo = sorted(harness.TESTDATA.glob("*.jpg"))[0]
    trace = tmp_path / "user.jsonl"
    trace.write_text("\n".join(json.dumps(r) for r in [
        {"arrival_s": 0.0, "images": [str(photo)], "prompt": "Caption this.", "max_tokens": 4},
        {"t": 0.2, "prompt": "Text only.", "max_output_tokens": 3},
    ]) + "\n")
    run([vlm_bench, "trace", "--check", str(trace)])
    raw = tmp_path / "raw.json"
    run([vlm_bench, "run", "--trace", str(trace), "--url", emu.pd, "--out", str(raw), "--policy", "none"])
    reqs = json.loads(raw.read_text())["runs"][0]["requests"]
    assert [r["output_tokens"] for r in reqs] == [4, 3]
    assert reqs[0]["image_tokens"] == harness.tokens(3840, 2400) and reqs[1]["image_tokens"] == 0
    assert reqs[0]["headers"]["x-emulator-visual-tokens"] == str(reqs[0]["image_tokens"])
    assert all(r["ttft_ms"] > 0 and r["error"] is None for r in reqs)
    rep = tmp_path / "rep"
    run([vlm_bench, "report", "--results", str(raw), "--results", str(out / "results.json"), "--out", str(rep)])
    text = (rep / "report.md").read_text()
    assert "| user | none | 2 | 0 |" in text and "| peak-3 | static |" in text
    assert png_size(rep / "ttft-cdf-user.png") == (1000, 640)
