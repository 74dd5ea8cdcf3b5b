"""Vanilla policy, configuration refusal and real photographs."""
import json
import subprocess

import pytest

import harness
from harness import (TESTDATA, chat_body, data_url, decode_data_url, image_bytes, image_size, image_urls,
                     post, smart_resize, tokens, FACTOR)


def test_vanilla_forwards_unchanged_but_reports(start_envoy, upstream):
    env = start_envoy({"policy": "vanilla"}, upstream)
    sizes = [(3000, 2000), (640, 480)]
    body = chat_body([data_url(image_bytes(w, h, "JPEG"), "image/jpeg") for w, h in sizes])
    status, headers, _ = post(env.url, body)
    assert status == 200
    assert upstream.last()["body"] == body
    want = str(sum(tokens(w, h) for w, h in sizes))
    assert headers["x-vlm-policy"] == "vanilla"
    assert headers["x-vlm-visual-tokens-before"] == want
    assert headers["x-vlm-visual-tokens-after"] == want
    assert headers["x-vlm-budget-tokens"] == str(MAX_TOKENS)
    assert headers["x-vlm-images-resized"] == "0"


MAX_TOKENS = 12845056 // (FACTOR * FACTOR)


@pytest.mark.parametrize("bad, field", [
    ({"policy": "fastest"}, "policy"),
    ({"jpeg_quality": 0}, "jpeg_quality"),
    ({"static_budget_tokens": 1}, "static_budget_tokens"),
    ({"unknown_knob": 1}, "unknown_knob"),
    ({"sizing": {"max_pixels": 1}}, "sizing.max_pixels"),
])
def test_bad_configuration_refuses_to_load(wasm, tmp_path, bad, field):
    """Envoy will not start with a bad plugin configuration, and says why."""
    cfg = harness.render_config(bad, harness.free_port(), harness.free_port(), harness.free_port(), wasm)
    path = tmp_path / "envoy.json"
    path.write_text(json.dumps(cfg))
    run = subprocess.run([harness.envoy_binary(), "--mode", "validate", "-c", str(path), "--concurrency", "2"],
                         capture_output=True, text=True, timeout=60)
    out = run.stdout + run.stderr
    assert run.returncode != 0, out
    assert f"invalid configuration: field `{field}`" in out, out


def test_shipped_config_validates():
    run = subprocess.run([harness.envoy_binary(), "--mode", "validate", "-c", str(harness.ENVOY_YAML)],
                         capture_output=True, text=True, timeout=60, cwd=harness.ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "vlm-budget: configured: policy=static" in run.stdout + run.stderr


PHOTOS = ["2004default.jpg", "rhythm.jpg", "the-mouse.jpg", "calla.png", "focal-ubuntukylin.png", "goldfish.png"]


@pytest.mark.parametrize("budget", [4096, 1024])
def test_real_photographs(start_envoy, upstream, budget):
    """3840x2400 wallpapers (Debian ukui-wallpapers) shrink to the rule's size."""
    env = start_envoy({"policy": "static", "static_budget_tokens": budget}, upstream)
    for name in PHOTOS:
        path = TESTDATA / name
        assert path.exists(), f"{path} missing: run `make testdata`"
        raw = path.read_bytes()
        w, h, fmt = image_size(raw)
        mime = "image/png" if fmt == "PNG" else "image/jpeg"
        body = chat_body([data_url(raw, mime)])
        status, headers, _ = post(env.url, body, timeout=120)
        assert status == 200, name
        (url,) = image_urls(upstream.last()["body"])
        got_mime, data = decode_data_url(url)
        rw, rh, rfmt = image_size(data)
        eh, ew = smart_resize(h, w, max_pixels=FACTOR * FACTOR * budget)
        assert (rw, rh, rfmt, got_mime) == (ew, eh, fmt, mime), name
        assert smart_resize(rh, rw) == (rh, rw)
        assert int(headers["x-vlm-visual-tokens-after"]) == tokens(rw, rh) <= budget
        assert int(headers["x-vlm-visual-tokens-before"]) == tokens(w, h)
