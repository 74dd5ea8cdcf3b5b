"""The static policy through the real Envoy: what reaches the upstream."""
import json

import pytest

from harness import (chat_body, data_url, decode_data_url, image_bytes, image_size, image_urls, post,
                     replace_urls, smart_resize, tokens, FACTOR)

BUDGET = 1024


@pytest.fixture(scope="module")
def envoy(start_envoy, upstream):
    return start_envoy({"policy": "static", "static_budget_tokens": BUDGET}, upstream)


def expected_dims(w, h, budget=BUDGET):
    """The Qwen rule's output for the budget (max_pixels = 784 * budget)."""
    rh, rw = smart_resize(h, w, max_pixels=FACTOR * FACTOR * budget)
    return rw, rh


def check_forwarded(sent: bytes, got: bytes, originals: list[tuple[int, int]], fmt_names: list[str]):
    """Every image over budget has the rule's size; every other byte is as sent."""
    new_urls = image_urls(got)
    old_urls = image_urls(sent)
    assert len(new_urls) == len(old_urls)
    for (w, h), fmt, url in zip(originals, fmt_names, new_urls):
        mime, data = decode_data_url(url)
        rw, rh, rfmt = image_size(data)
        assert rfmt == fmt
        assert mime == {"PNG": "image/png", "JPEG": "image/jpeg"}[fmt]
        if tokens(w, h) <= BUDGET:
            assert (rw, rh) == (w, h)
        else:
            assert (rw, rh) == expected_dims(w, h)
            assert rw % FACTOR == 0 and rh % FACTOR == 0
            # A fixed point: the backend computes the same count.
            assert smart_resize(rh, rw) == (rh, rw)
            assert tokens(rw, rh) <= BUDGET
    assert got == replace_urls(sent, old_urls, new_urls)


@pytest.mark.parametrize("count", [1, 4, 16])
def test_images_are_resized_to_the_budget(envoy, upstream, count):
    sizes = [(1600 + 37 * i, 1000 + 11 * i) for i in range(count)]
    fmts = ["PNG" if i % 2 == 0 else "JPEG" for i in range(count)]
    urls = [data_url(image_bytes(w, h, f), "image/png" if f == "PNG" else "image/jpeg")
            for (w, h), f in zip(sizes, fmts)]
    body = chat_body(urls)
    status, headers, _ = post(envoy.url, body)
    assert status == 200
    check_forwarded(body, upstream.last()["body"], sizes, fmts)
    before = sum(tokens(w, h) for w, h in sizes)
    after = sum(tokens(*expected_dims(w, h)) for w, h in sizes)
    assert headers["x-vlm-policy"] == "static"
    assert headers["x-vlm-budget-tokens"] == str(BUDGET)
    assert headers["x-vlm-visual-tokens-before"] == str(before)
    assert headers["x-vlm-visual-tokens-after"] == str(after)
    assert headers["x-vlm-images-resized"] == str(count)


def test_bare_string_form_and_small_images_pass_byte_for_byte(envoy, upstream):
    small = data_url(image_bytes(300, 200, "JPEG"), "image/jpg")
    big = data_url(image_bytes(2000, 1400, "PNG", mode="RGBA"), "image/png")
    remote = "https://images.example.com/cat.jpg"
    body = chat_body([small, big, remote], bare=True)
    status, headers, _ = post(envoy.url, body)
    assert status == 200
    got = upstream.last()["body"]
    new_urls = image_urls(got)
    assert new_urls[0] == small and new_urls[2] == remote
    _, data = decode_data_url(new_urls[1])
    w, h, fmt = image_size(data)
    assert (w, h, fmt) == (*expected_dims(2000, 1400), "PNG")
    from PIL import Image
    import io
    assert Image.open(io.BytesIO(data)).mode == "RGBA"
    assert got == replace_urls(body, image_urls(body), new_urls)
    assert headers["x-vlm-images"] == "3" and headers["x-vlm-images-resized"] == "1"


def test_text_only_and_other_paths_are_untouched(envoy, upstream):
    text = b'{"model":"m","messages":[{"role":"user","content":"hello"}],"temperature":0.70}'
    status, headers, _ = post(envoy.url, text)
    assert status == 200
    assert upstream.last()["body"] == text
    assert (headers["x-vlm-policy"], headers["x-vlm-images"]) == ("static", "0")
    assert "x-vlm-budget-tokens" not in headers
    big = chat_body([data_url(image_bytes(2000, 2000, "PNG"), "image/png")])
    for path in ["/v1/completions", "/v1/chat/completions/extra", "/health"]:
        status, headers, _ = post(envoy.url, big, path=path)
        assert status == 200
        rec = upstream.last()
        assert rec["path"] == path and rec["body"] == big
        assert rec["headers"].get("content-length") == str(len(big))
        assert "x-vlm-policy" not in headers
    # Not even valid JSON is inspected off-path.
    status, _, _ = post(envoy.url, b"{not json", path="/v1/embeddings")
    assert status == 200 and upstream.last()["body"] == b"{not json"


def test_forty_megabyte_png_body(envoy, upstream):
    png = image_bytes(3840, 2700, "PNG", noise=True, compress_level=0)
    url = data_url(png, "image/png")
    body = chat_body([url])
    assert len(body) > 40_000_000
    status, headers, _ = post(envoy.url, body, timeout=120)
    assert status == 200, headers
    check_forwarded(body, upstream.last()["body"], [(3840, 2700)], ["PNG"])


def test_metrics_count_the_work(envoy, upstream):
    stats = envoy.stats()
    assert stats["wasmcustom.vlm_budget_requests_total"] > 0
    assert stats["wasmcustom.vlm_budget_images_resized_total"] >= 1 + 4 + 16 + 1
    assert stats["wasmcustom.vlm_budget_visual_tokens_before_total"] > stats["wasmcustom.vlm_budget_visual_tokens_after_total"]
    with __import__("urllib.request").request.urlopen(envoy.admin + "/stats?filter=vlm_budget_transcode_ms") as r:
        assert b"vlm_budget_transcode_ms" in r.read()
