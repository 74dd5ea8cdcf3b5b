"""Decoding, the Qwen processor's layout and the request checks."""
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from conftest import chat, data_url, png
from vlm_gpu.processor import STD, patchify
from vlm_gpu.request import ApiError, analyse, image_array, read_image, resized_array, to_rgb
from vlm_gpu.sizing import SizingRule

RULE = SizingRule()
HF = Qwen2VLImageProcessorPil(min_pixels=RULE.min_pixels, max_pixels=RULE.max_pixels)


def encoded(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, quality=90) if fmt == "JPEG" else img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("w,h,mode,fmt", [
    (300, 200, "RGB", "PNG"),      # snapped up/down to multiples of 28
    (640, 480, "RGB", "JPEG"),
    (97, 41, "RGBA", "PNG"),       # transparency composited over white
    (60, 60, "L", "PNG"),          # greyscale; below min_pixels after snapping: scaled up
    (29, 29 * 150, "RGB", "PNG"),  # extreme aspect
    (56, 84, "LA", "PNG"),
])
def test_pixel_values_match_transformers(w, h, mode, fmt):
    rng = np.random.default_rng(w * h)
    shape = (h, w, len(mode)) if len(mode) > 1 else (h, w)
    src = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
    data = encoded(src, fmt)
    info = read_image(0, data_url(data, "image/jpeg" if fmt == "JPEG" else "image/png"), RULE, 10 ** 8)
    pv, grid = patchify(resized_array(info))
    # vLLM composites transparency over white before transformers' processor sees the image.
    want = HF(images=[to_rgb(Image.open(io.BytesIO(data)))], return_tensors="np")
    assert list(grid) == want["image_grid_thw"][0].tolist()
    assert pv.shape == want["pixel_values"].shape == (grid[1] * grid[2], 3 * 2 * 14 * 14)
    np.testing.assert_allclose(pv.numpy(), want["pixel_values"], rtol=0, atol=2e-6)
    h2, w2 = RULE.resize(h, w)
    assert grid == (1, h2 // 14, w2 // 14)
    assert info.visual_tokens == grid[1] * grid[2] // 4 == RULE.tokens(w, h)


@pytest.mark.parametrize("w,h", [(3840, 2400), (300, 200), (60, 60), (1000, 1000)])
def test_device_resize_is_close_to_pillows(w, h):
    """The resize on the encoder's device (bicubic, antialiased, as the fast processor) against
    Pillow's bicubic (the slow processor): the same geometry, pixels within a few 8-bit levels."""
    yy, xx = np.mgrid[0:h, 0:w]
    smooth = np.stack([(xx * 255 // w), (yy * 255 // h), ((xx + yy) * 127 // (w + h))], -1).astype(np.uint8)
    info = read_image(0, data_url(encoded(Image.fromarray(smooth), "PNG")), RULE, 10 ** 8)
    on_device, grid = patchify(image_array(info), size=info.resized)
    pil, grid_pil = patchify(resized_array(info))
    assert grid == grid_pil
    diff = (on_device - pil).abs() * max(STD) * 255  # back to 8-bit levels
    assert float(diff.mean()) < 0.5 and float(diff.max()) <= 3.01, (float(diff.mean()), float(diff.max()))


def test_transparency_becomes_white():
    img = Image.new("RGBA", (56, 56), (10, 20, 30, 0))
    img.putpixel((0, 0), (10, 20, 30, 255))
    rgb = to_rgb(Image.open(io.BytesIO(encoded(img, "PNG"))))
    assert rgb.mode == "RGB"
    assert rgb.getpixel((1, 1)) == (255, 255, 255)
    assert rgb.getpixel((0, 0)) == (10, 20, 30)


def test_temporal_patch_repeats_the_frame():
    a = np.random.default_rng(1).integers(0, 256, (56, 84, 3), dtype=np.uint8)
    pv, grid = patchify(a)
    assert grid == (1, 4, 6)
    p = pv.reshape(-1, 3, 2, 14, 14)
    assert torch.equal(p[:, :, 0], p[:, :, 1])
    with pytest.raises(ValueError):
        patchify(a[:50])


def test_prompt_tokens_are_text_plus_visual_plus_two_per_image():
    urls = [data_url(png(300, 200, 1)), data_url(png(640, 480, 2))]
    text = "Compare these two pictures, please, in detail."
    a = analyse(json.dumps(chat(urls, text, max_tokens=9)).encode(), RULE, 10 ** 8)
    assert a.text_tokens == len(text) // 4
    assert [i.visual_tokens for i in a.images] == [RULE.tokens(300, 200), RULE.tokens(640, 480)]
    assert a.prompt_tokens == len(text) // 4 + RULE.tokens(300, 200) + RULE.tokens(640, 480) + 4
    assert a.params.requested_max_tokens() == 9


def test_same_pixels_same_key_different_files():
    img = Image.fromarray(np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    a = read_image(0, data_url(encoded(img, "PNG")), RULE, 10 ** 8)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    b = read_image(0, data_url(buf.getvalue()), RULE, 10 ** 8)
    assert a.sha256 != b.sha256 and a.key == b.key and len(a.key) == 32
    c = read_image(0, data_url(png(64, 64, 4)), RULE, 10 ** 8)
    assert c.key != a.key


@pytest.mark.parametrize("url,code", [
    ("https://example.com/a.png", "invalid_image_url"),
    ("data:image/png;base64", "invalid_image_url"),
    ("data:image/png,rawbytes", "invalid_image_url"),
    ("data:image/png;base64,ab$d", "invalid_base64"),
    ("data:image/webp;base64,AAAA", "unsupported_image_type"),
    (data_url(b"hello world"), "corrupt_image"),
    (data_url(png(64, 64)[:200]), "corrupt_image"),
    (data_url(png(20, 20)), "invalid_image_size"),
    (data_url(png(64, 64, fmt="GIF", mode="L"), "image/png"), "unsupported_image_type"),
])
def test_refuses_with_the_emulators_codes(url, code):
    with pytest.raises(ApiError) as e:
        analyse(json.dumps(chat([url])).encode(), RULE, 10 ** 8)
    assert (e.value.status, e.value.code) == (400, code)
    assert e.value.message.startswith("image 0: ")


def test_refuses_bad_requests():
    for body, code in [
        (b"{", "invalid_json"),
        (b"\xff\xfe", "invalid_json"),
        (b'{"model":"m"}', "invalid_request"),
        (b'{"messages":{}}', "invalid_request"),
        (b'{"messages":[],"max_tokens":-1}', "invalid_request"),
        (b'{"messages":[],"max_tokens":0}', "invalid_request"),
        (b'{"messages":[],"stream_options":{"include_usage":true}}', "invalid_request"),
        (b'{"messages":[{"role":"user","content":[{"text":"x"}]}]}', "invalid_request"),
        (b'{"messages":[{"role":"user","content":5}]}', "invalid_request"),
    ]:
        with pytest.raises(ApiError) as e:
            analyse(body, RULE, 10 ** 8)
        assert e.value.code == code, body
    with pytest.raises(ApiError) as e:
        analyse(json.dumps(chat([data_url(png(64, 64))])).encode(), RULE, 1000)
    assert e.value.code == "image_too_large"
