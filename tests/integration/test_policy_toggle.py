"""Policy and SLO changes take effect without restarting Envoy (file-based LDS)."""
import json
import subprocess
import sys
import time

import yaml

import harness
from harness import chat_body, data_url, image_bytes, post

VLMCTL = str(harness.ROOT / "tools/vlmctl.py")


def test_xds_files_match_the_static_config():
    static = yaml.safe_load(harness.ENVOY_YAML.read_text())
    lds = yaml.safe_load((harness.ROOT / "envoy/xds/lds.yaml").read_text())
    boot = yaml.safe_load((harness.ROOT / "envoy/xds/bootstrap.yaml").read_text())
    (listener,) = lds["resources"]
    listener = {k: v for k, v in listener.items() if k != "@type"}
    assert listener == static["static_resources"]["listeners"][0]
    assert boot["static_resources"]["clusters"] == static["static_resources"]["clusters"]
    run = subprocess.run([harness.envoy_binary(), "--mode", "validate", "-c", "envoy/xds/bootstrap.yaml"],
                         capture_output=True, text=True, timeout=60, cwd=harness.ROOT)
    assert run.returncode == 0, run.stdout + run.stderr


def wait_for(predicate, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError("condition not reached")


def test_toggle_policy_without_restart(wasm, tmp_path, upstream):
    listen, admin = harness.free_port(), harness.free_port()
    static = harness.render_config({"policy": "static", "static_budget_tokens": 1024}, upstream.port, listen,
                                   admin, wasm)
    listener = static["static_resources"]["listeners"][0]
    lds_path = tmp_path / "lds.yaml"
    lds_path.write_text(yaml.safe_dump(
        {"resources": [{"@type": "type.googleapis.com/envoy.config.listener.v3.Listener", **listener}]}))
    boot = {"node": {"id": "t", "cluster": "t"}, "admin": static["admin"],
            "dynamic_resources": {"lds_config": {"resource_api_version": "V3",
                                                 "path_config_source": {"path": str(lds_path)}}},
            "static_resources": {"clusters": static["static_resources"]["clusters"]}}
    env = harness.Envoy(boot, tmp_path, admin, listen).wait_ready()
    try:
        body = chat_body([data_url(image_bytes(2000, 1500, "JPEG"), "image/jpeg")])
        wait_for(lambda: post(env.url, body)[0] == 200)
        status, headers, _ = post(env.url, body)
        assert headers["x-vlm-policy"] == "static" and headers["x-vlm-images-resized"] == "1"
        pid = env.proc.pid

        def ctl(*args):
            run = subprocess.run([sys.executable, VLMCTL, "set", "--lds", str(lds_path), *args],
                                 capture_output=True, text=True, timeout=30)
            assert run.returncode == 0, run.stderr

        ctl("policy=vanilla")
        headers = wait_for(lambda: (h := post(env.url, body)[1]).get("x-vlm-policy") == "vanilla" and h)
        assert headers["x-vlm-images-resized"] == "0"
        assert upstream.last()["body"] == body

        ctl("policy=dynamic", "ttft_slo_ms=150")
        headers = wait_for(lambda: (h := post(env.url, body)[1]).get("x-vlm-policy") == "dynamic" and h)
        assert headers["x-vlm-budget-reason"] in ("slo", "floor")

        # A bad configuration is rejected by Envoy; the running one stays.
        before = env.stats()["listener_manager.lds.update_rejected"]
        ctl("jpeg_quality=0")
        wait_for(lambda: env.stats()["listener_manager.lds.update_rejected"] > before)
        assert post(env.url, body)[1]["x-vlm-policy"] == "dynamic"
        assert env.proc.poll() is None and env.proc.pid == pid
        assert "invalid configuration: field `jpeg_quality`" in env.log_text()
    finally:
        env.stop()


def test_vlmctl_show_prints_the_plugin_config(tmp_path):
    lds = tmp_path / "lds.yaml"
    lds.write_text((harness.ROOT / "envoy/xds/lds.yaml").read_text())
    run = subprocess.run([sys.executable, VLMCTL, "show", "--lds", str(lds)], capture_output=True, text=True)
    assert run.returncode == 0
    assert json.loads(run.stdout)["policy"] == "static"
