"""A short storm through Envoy and the backend emulator (tools/soak.py, the
`make soak` tool, for 25 s): mixed and abandoned requests while the encoder is
killed and restarted, PD is killed mid-stream and the encoder freezes. The
filter's in-flight counters must come back to zero, no VM reloads, and every
request is answered or failed with a clear error."""
import json
import subprocess
import sys

import harness


def test_counters_return_to_zero_after_a_storm_of_mixed_and_aborted_requests(tmp_path):
    report_path = tmp_path / "soak.json"
    run = subprocess.run(
        [sys.executable, str(harness.ROOT / "tools/soak.py"), "--seconds", "25", "--clients", "8",
         "--faults", "short", "--report", str(report_path), "--workdir", str(tmp_path / "logs")],
        capture_output=True, text=True, timeout=240)
    assert report_path.exists(), run.stdout + run.stderr
    report = json.loads(report_path.read_text())
    assert run.returncode == 0, json.dumps({k: report[k] for k in ("checks", "violations", "backends")}, indent=1)
    assert report["passed"] and all(report["checks"].values())
    assert report["gauges_after"] == {"encode_inflight": 0, "pd_inflight": 0, "encode_outstanding_ms": 0}
    assert report["vm_reload"] == 0
    faults = [e["fault"] for e in report["faults"]]
    assert faults == ["encoder_kill", "encoder_restarted", "pd_kill_mid_stream", "pd_restarted",
                      "encoder_frozen", "encoder_resumed"]
    # A real storm: many requests of every kind, some abandoned, some refused.
    assert report["requests"] >= 200
    assert sum(report["aborts"].values()) >= 5
    assert report["outcomes"]["ok"] >= 100 and report["outcomes"]["rejected"] >= 5
    assert report["filter"]["encode_fallbacks_total"] >= 1, "the encoder faults were felt"
    assert report["backends"]["pd_entries"].get("ok", 0) >= 100
