#!/usr/bin/env python3
"""Tables of bench/results/gpu/README.md from the raw files next to this script (stdlib only):

    python3 bench/results/gpu/analyse.py > bench/results/gpu/analysis.md

- the measured encoder and prefill profiles against the H100 measurements the emulator uses;
- TTFT and SLO attainment on the GPUs against the emulator on the same traces and images;
- where the time went, per request means from the response headers;
- GPU utilisation during each run (nvidia-smi, once a second).
"""
from __future__ import annotations

import csv
import datetime as dt
import json
import pathlib
import statistics

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[2]
H100 = ROOT / "tools/emulator/data/h100-qwen2.5-vl-3b-latency.json"
SLO_MS = 1000.0
ORDER = {"vanilla": 0, "static": 1, "dynamic": 2}


def load(path: pathlib.Path) -> list[dict]:
    return json.loads(path.read_text())["runs"]


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def hmean(reqs: list[dict], name: str) -> float:
    vals = [float(r["headers"][name]) for r in reqs if r["status"] == 200 and name in r["headers"]]
    return statistics.fmean(vals) if vals else float("nan")


def summary(run: dict) -> dict:
    reqs = run["requests"]
    ok = [r for r in reqs if r["status"] == 200 and r["ttft_ms"] is not None]
    ttft = [r["ttft_ms"] for r in ok]
    before = sum(int(r["headers"].get("x-vlm-visual-tokens-before", 0)) for r in ok)
    after = sum(int(r["headers"].get("x-vlm-visual-tokens-after", 0)) for r in ok)
    net_pre = [max(0.0, float(r["headers"]["x-emulator-preprocess-ms"]) - float(r["headers"].get("x-vlm-encode-ms", 0)))
               for r in ok if "x-emulator-preprocess-ms" in r["headers"]]
    return {
        "n": len(reqs), "errors": len(reqs) - len(ok),
        "p50": pct(ttft, 50), "p90": pct(ttft, 90), "p99": pct(ttft, 99),
        "mean": statistics.fmean(ttft) if ttft else float("nan"),
        "slo": sum(t <= SLO_MS for t in ttft) / len(reqs) if reqs else float("nan"),
        "retention": after / before if before else float("nan"),
        "transcode": hmean(ok, "x-vlm-transcode-ms"), "encode": hmean(ok, "x-vlm-encode-ms"),
        "pd_pre": statistics.fmean(net_pre) if net_pre else float("nan"),
        "pd_queue": hmean(ok, "x-emulator-queue-ms"), "prefill": hmean(ok, "x-emulator-prefill-ms"),
        "tpot": statistics.fmean([r["tpot_ms"] for r in ok if r.get("tpot_ms") is not None] or [float("nan")]),
        "start": run["started_unix_s"], "wall": run["wall_s"],
    }


def runs_by_key(runs: list[dict]) -> dict:
    return {(r["trace"], r["policy"]): summary(r) for r in runs}


def trace_key(t: str) -> float:
    return float(t.split("-")[1])


def f0(v: float) -> str:
    return "–" if v != v else f"{v:.0f}"


def profile_tables() -> str:
    h100 = json.loads(H100.read_text())
    vis = {p["visual_tokens"]: p["median_ms"] for p in h100["vision_encoder"]["batched_sdpa"]}
    pre = {p["tokens"]: p["median_ms"] for p in h100["lm_prefill"]["timings"]}
    wall = json.loads((HERE / "profile-wall-details.json").read_text())
    gpu = json.loads((HERE / "profile-gpu-details.json").read_text())
    out = ["### Encoder: visual tokens -> ms", "",
           "| visual tokens | H200, GPU time (x-emulator-encode-ms) | H200, client wall time | wall − GPU (ms) | "
           "image MP | (wall − GPU) / MP | H100 data (batched_sdpa, forward only) | H200 GPU / H100 |",
           "|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for pw, pg in zip(wall["encode"]["points"], gpu["encode"]["points"]):
        n = pw["tokens"]
        mp = n * 784 / 1e6
        ref = vis.get(n)
        g, w = pg["median_ms"], pw["median_ms"]
        r1 = "–" if ref is None else f"{ref:.1f}"
        r2 = "–" if ref is None else f"{g / ref:.2f}"
        out.append(f"| {n} | {g:.1f} | {w:.1f} | {w - g:.0f} | {mp:.1f} | {(w - g) / mp:.1f} | {r1} | {r2} |")
    fw, fg = wall["encode"]["fit"], gpu["encode"]["fit"]
    fh = h100["vision_encoder"]["fit_ms_a_plus_bn_plus_cn2_for_n_ge_1024"]["batched_sdpa"]
    out += ["", f"Fits (ms, n visual tokens): client wall {fw['a']:.2f} + {fw['b']:.5f}·n + {fw['c']:.3e}·n²; "
            f"GPU time {fg['a']:.2f} + {fg['b']:.5f}·n + {fg['c']:.3e}·n²; "
            f"H100 data {fh['a']} + {fh['b']}·n + {fh['c']:.3e}·n².", ""]
    out += ["### Prefill: prompt tokens -> ms", "",
            "| prompt tokens | H200, GPU time (x-emulator-prefill-ms) | H200, client wall time | H100 data | H200 GPU / H100 |",
            "|--:|--:|--:|--:|--:|"]
    for pw, pg in zip(wall["prefill"]["points"], gpu["prefill"]["points"]):
        n = pg["tokens"]
        ref = pre.get(n)
        g, w = pg["median_ms"], pw["median_ms"]
        r1 = "–" if ref is None else f"{ref:.1f}"
        r2 = "–" if ref is None else f"{g / ref:.2f}"
        out.append(f"| {n} | {g:.1f} | {w:.1f} | {r1} | {r2} |")
    fw, fg = wall["prefill"]["fit"], gpu["prefill"]["fit"]
    fh = h100["lm_prefill"]["fit_ms_a_plus_bn_plus_cn2_for_n_ge_2048"]
    out += ["", f"Fits: client wall {fw['a']:.2f} + {fw['b']:.5f}·n + {fw['c']:.3e}·n²; GPU time {fg['a']:.2f} + "
            f"{fg['b']:.5f}·n + {fg['c']:.3e}·n²; H100 data {fh['a']} + {fh['b']}·n + {fh['c']:.3e}·n².", ""]
    return "\n".join(out)


def comparison(gpu: dict, emu: dict, emu_full: dict) -> str:
    out = ["| trace | policy | GPU TTFT p50 / p90 / p99 (ms) | emulated, same traces | GPU TTFT ≤ 1 s | emulated, same traces | "
           "emulated, full-length traces (bench/results/emulated) | GPU retention | emulated retention |",
           "|---|---|--:|--:|--:|--:|--:|--:|--:|"]
    for key in sorted(gpu, key=lambda k: (trace_key(k[0]), ORDER[k[1]])):
        g, e, f = gpu[key], emu.get(key), emu_full.get(key)
        es = "–" if e is None else f"{f0(e['p50'])} / {f0(e['p90'])} / {f0(e['p99'])}"
        eslo = "–" if e is None else f"{e['slo'] * 100:.1f}%"
        fslo = "–" if f is None else f"{f['slo'] * 100:.1f}%"
        eret = "–" if e is None else f"{e['retention'] * 100:.1f}%"
        out.append(f"| {key[0]} | {key[1]} | {f0(g['p50'])} / {f0(g['p90'])} / {f0(g['p99'])} | {es} | "
                   f"{g['slo'] * 100:.1f}% | {eslo} | {fslo} | {g['retention'] * 100:.1f}% | {eret} |")
    return "\n".join(out)


def breakdown(gpu: dict, emu: dict) -> str:
    out = ["| trace | policy | backend | filter transcode | encode wait | PD preprocess (after the body) | PD queue | "
           "prefill | TTFT mean | TPOT mean |", "|---|---|---|--:|--:|--:|--:|--:|--:|--:|"]
    for key in sorted(gpu, key=lambda k: (trace_key(k[0]), ORDER[k[1]])):
        for name, d in (("GPU", gpu), ("emulated", emu)):
            s = d.get(key)
            if s is None:
                continue
            out.append(f"| {key[0]} | {key[1]} | {name} | {f0(s['transcode'])} | {f0(s['encode'])} | {f0(s['pd_pre'])} | "
                       f"{f0(s['pd_queue'])} | {f0(s['prefill'])} | {f0(s['mean'])} | {s['tpot']:.1f} |")
    return "\n".join(out)


def utilisation(gpu: dict, files: list[pathlib.Path]) -> str:
    samples = []
    for f in files:
        for row in csv.reader(f.open()):
            if len(row) < 4:
                continue
            try:
                t = dt.datetime.strptime(row[0].strip(), "%Y/%m/%d %H:%M:%S.%f").replace(tzinfo=dt.timezone.utc)
                samples.append((t.timestamp(), int(row[1]), float(row[2].strip().rstrip(" %"))))
            except ValueError:
                continue
    out = ["| trace | policy | GPU 0 (encoder) busy | GPU 1 (prefill/decode) busy |", "|---|---|--:|--:|"]
    for key in sorted(gpu, key=lambda k: (trace_key(k[0]), ORDER[k[1]])):
        s = gpu[key]
        lo, hi = s["start"], s["start"] + s["wall"]
        u = {i: [v for t, g, v in samples if g == i and lo <= t <= hi] for i in (0, 1)}
        if not u[0]:
            continue
        out.append(f"| {key[0]} | {key[1]} | {statistics.fmean(u[0]):.0f}% | {statistics.fmean(u[1]):.0f}% |")
    return "\n".join(out)


def main() -> None:
    gpu = runs_by_key(load(HERE / "results-vanilla.json") + load(HERE / "results-static-dynamic.json"))
    emu = runs_by_key(load(HERE / "emulated-same-traces/results.json"))
    full_path = ROOT / "bench/results/emulated/results.json"
    emu_full = runs_by_key(load(full_path)) if full_path.exists() else {}
    print("## Profiles\n")
    print(profile_tables())
    print("## TTFT: GPU against the emulator\n")
    print(comparison(gpu, emu, emu_full))
    print("\n## Where the time went (means over successful requests, ms)\n")
    print(breakdown(gpu, emu))
    print("\n## GPU utilisation during the runs (nvidia-smi, 1 s samples)\n")
    print(utilisation(gpu, [HERE / "gpu-util-vanilla.csv", HERE / "gpu-util-static-dynamic.csv"]))


if __name__ == "__main__":
    main()
