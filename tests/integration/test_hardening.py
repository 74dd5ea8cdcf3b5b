"""Hardening through the real Envoy: a bad-input matrix (each case with its
documented response, then a valid request that still works, and the VM never
reloaded), images of every colour layout resized correctly, and security
checks (no fetching of remote URLs, no image bytes or prompt text in the log,
limits enforced before allocation, bad configurations refused).

Complements test_bad_input.py, which covers the first cases of each kind
(truncated JSON, `messages` as an object, base64 with a bad byte or cut by 3
characters, a 100,000 x 100,000 PNG next to good images, invalid UTF-8 in a
string, ...) in both fail-closed and fail-open modes."""
from __future__ import annotations

import base64
import io
import json
import socket
import struct
import subprocess
import threading
import time
import zlib

import pytest
from PIL import Image

import harness
from harness import FACTOR, chat_body, data_url, decode_data_url, image_bytes, image_urls, post, smart_resize, tokens

BUDGET = 1024
# Every limit at its default; text-only bodies are checked too (the default
# forwards them unparsed: see test_text_only_bodies_are_forwarded_unparsed).
CONFIG = {"policy": "static", "static_budget_tokens": BUDGET, "validate_text_only": True}
GOOD = data_url(image_bytes(1500, 1000, "JPEG"), "image/jpeg")


def rule_size(width: int, height: int, budget: int = BUDGET) -> tuple[int, int]:
    """(width, height) the filter must produce for an image over budget."""
    h, w = smart_resize(height, width, max_pixels=FACTOR * FACTOR * budget)
    return w, h


# ------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def env(start_envoy, upstream):
    e = start_envoy(CONFIG, upstream)
    e.v8_created = e.stats()["wasm.envoy.wasm.runtime.v8.created"]
    return e


def vm_intact(env):
    stats = env.stats()
    assert stats["wasm.vlm_budget.vm_reload"] == 0
    assert stats["wasm.vlm_budget.vm_reload_failure"] == 0
    assert stats["wasm.envoy.wasm.runtime.v8.created"] == env.v8_created, "a VM was re-created"
    assert env.proc.poll() is None, "envoy exited"
    assert "panicked" not in env.log_text()


def still_works(env, upstream):
    status, headers, _ = post(env.url, chat_body([GOOD]))
    assert status == 200
    assert headers["x-vlm-images-resized"] == "1"
    (url,) = image_urls(upstream.last()["body"])
    assert Image.open(io.BytesIO(decode_data_url(url)[1])).size == rule_size(1500, 1000)
    vm_intact(env)


def forwarded_images(upstream) -> list[tuple[str, bytes]]:
    return [decode_data_url(u) for u in image_urls(upstream.last()["body"])]


# ------------------------------------------------------------ images


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def raw_png(width: int, height: int, color_type: int, depth: int, pixel, interlace: bool = False) -> bytes:
    """A PNG written by hand: any colour type and depth (8 or 16), Adam7 or not.
    `pixel(x, y)` gives the samples of a pixel (Pillow writes neither Adam7
    nor 16-bit colour)."""
    fmt = ">" + "BH"[depth == 16] * {0: 1, 2: 3, 4: 2, 6: 4}[color_type]
    passes = ([(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]
              if interlace else [(0, 0, 1, 1)])
    raw = bytearray()
    for x0, y0, dx, dy in passes:
        cols = range(x0, width, dx)
        if not cols:
            continue
        for y in range(y0, height, dy):
            raw.append(0)
            for x in cols:
                raw += struct.pack(fmt, *pixel(x, y))
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, int(interlace))
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(bytes(raw), 6))
            + png_chunk(b"IEND", b""))


def rgb_pattern(width, height):
    return lambda x, y: ((x * 255) // (width - 1), (y * 255) // (height - 1), ((x // 40 + y // 40) % 2) * 255)


def mean_abs_diff(a: Image.Image, b: Image.Image) -> float:
    assert a.size == b.size and a.mode == b.mode, (a.size, b.size, a.mode, b.mode)
    pa, pb = a.tobytes(), b.tobytes()
    return sum(abs(x - y) for x, y in zip(pa, pb)) / len(pa)


def save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def corrupt_scan_jpeg() -> bytes:
    """A JPEG whose entropy-coded scan is overwritten in the middle with
    bytes that are not valid Huffman codes (and stray markers)."""
    data = bytearray(image_bytes(1500, 1000, "JPEG", noise=True))
    sos = data.index(b"\xff\xda")
    mid = sos + (len(data) - sos) // 2
    for i in range(mid, mid + 4000, 3):
        data[i:i + 2] = b"\xff\x00" if i % 2 else b"\xff\xd3"
    return bytes(data)


def jpeg_sof(width: int, height: int) -> bytes:
    """SOI, a baseline frame header claiming width x height, and nothing else."""
    sof = struct.pack(">HBHHB", 11, 8, height, width, 1) + b"\x01\x11\x00"
    return b"\xff\xd8" + b"\xff\xc0" + sof + b"\xff\xd9"


def png_claiming(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + png_chunk(b"IEND", b""))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# ------------------------------------------------------ refused requests

PNG_BIG = image_bytes(1500, 1000, "PNG")
PNG_ODD = PNG_BIG + b"\x00" * ((1 - len(PNG_BIG)) % 3)  # length 1 mod 3: base64 ends in "=="
assert b64(PNG_ODD).endswith("==")
DEEP = 10_000


def refused_cases():
    """name -> (body, code, error message or its start)."""
    many = [data_url(image_bytes(28, 28, "PNG"), "image/png")] * 1000
    return {
        "json_trailing_garbage": (b'{"messages": []} {"x": 1}', "invalid_json", "request body is not valid JSON"),
        "json_single_quotes": (b"{'messages': []}", "invalid_json", "request body is not valid JSON"),
        "json_nan_literal": (b'{"messages": [], "temperature": NaN}', "invalid_json", "request body is not valid JSON"),
        "json_trailing_comma": (b'{"messages": [],}', "invalid_json", "request body is not valid JSON"),
        # (A leading UTF-8 byte-order mark is accepted: test_real_clients.py.)
        "json_two_utf8_boms": (b'\xef\xbb\xbf\xef\xbb\xbf{"messages": []}', "invalid_json",
                               "request body is not valid JSON"),
        "json_utf16": ('{"messages": []}'.encode("utf-16"), "invalid_json", "request body is not valid JSON: invalid UTF-8"),
        "utf8_invalid_in_key": (b'{"mess\xffages": []}', "invalid_json", "request body is not valid JSON: invalid UTF-8"),
        "utf8_overlong": (b'{"messages": [{"role": "user", "content": "\xc0\xaf"}]}', "invalid_json",
                          "request body is not valid JSON: invalid UTF-8"),
        "utf8_invalid_in_url": (b'{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": '
                                b'{"url": "data:image/png;base64,\xfe\xfe"}}]}]}', "invalid_json",
                                "request body is not valid JSON: invalid UTF-8"),
        "nested_10000_messages": (('{"messages":' + "[" * DEEP + "]" * DEEP + "}").encode(), "invalid_request",
                                  "invalid chat request: messages[0] must be an object, not array"),
        "nested_10000_top_level": (("[" * DEEP + "]" * DEEP).encode(), "invalid_request",
                                   "invalid chat request: the request body must be an object, not array"),
        "body_is_string": (b'"hello"', "invalid_request",
                           "invalid chat request: the request body must be an object, not string"),
        "messages_missing": (b'{"model": "m"}', "invalid_request", "invalid chat request: `messages` is required"),
        "messages_string": (b'{"messages": "hi"}', "invalid_request",
                            "invalid chat request: `messages` must be an array, not string"),
        "messages_null": (b'{"messages": null}', "invalid_request",
                          "invalid chat request: `messages` must be an array, not null"),
        "messages_number": (b'{"messages": 3}', "invalid_request",
                            "invalid chat request: `messages` must be an array, not number"),
        "message_not_object": (b'{"messages": ["hi"]}', "invalid_request",
                               "invalid chat request: messages[0] must be an object, not string"),
        "content_number": (b'{"messages": [{"role": "user", "content": 7}]}', "invalid_request",
                           "invalid chat request: messages[0].content must be a string or an array, not number"),
        "part_without_type": (b'{"messages": [{"role": "user", "content": [{"text": "hi"}]}]}', "invalid_request",
                              "invalid chat request: messages[0].content[0].type is required"),
        "images_1000": (chat_body(many), "too_many_images", "request has 1000 images; at most 64 are accepted"),
        "images_1000_remote": (chat_body([f"https://example.com/{i}.png" for i in range(1000)]), "too_many_images",
                               "request has 1000 images; at most 64 are accepted"),
        "base64_partial_padding": (chat_body([GOOD, "data:image/png;base64," + b64(PNG_ODD)[:-1]]), "invalid_base64",
                                   "image 1: misplaced base64 padding"),
        "base64_url_safe_alphabet": (chat_body(["data:image/png;base64," + b64(PNG_BIG).replace("+", "-").replace("/", "_")]),
                                     "invalid_base64", "image 0: invalid base64 byte at offset"),
        "base64_cut_inside_header": (chat_body([GOOD, "data:image/png;base64," + b64(PNG_BIG)[:16]]), "corrupt_image",
                                     "image 1: corrupt image header: PNG does not start with IHDR"),
        "png_100000x100000_as_jpeg": (chat_body(["https://x/a.png"] * 5 + [data_url(png_claiming(100_000, 100_000), "image/jpeg")]),
                                      "image_too_large", "image 5: 100000x100000 is 10000000000 pixels, above the 40000000-pixel limit"),
        "jpeg_65535x65535": (chat_body([data_url(jpeg_sof(65535, 65535), "image/jpeg")]), "image_too_large",
                             "image 0: 65535x65535 is 4294836225 pixels"),
        "jpeg_truncated_before_frame": (chat_body([data_url(image_bytes(300, 200, "JPEG")[:40], "image/jpeg")]), "corrupt_image",
                                        "image 0: corrupt image header: JPEG ends before its frame header"),
    }


@pytest.mark.parametrize("case", sorted(refused_cases()))
def test_refused_with_documented_error(env, upstream, case):
    body, code, message = refused_cases()[case]
    seen = len(upstream.requests)
    status, headers, reply = post(env.url, body)
    assert status == 400, reply[:500]
    assert headers["content-type"] == "application/json"
    assert headers["x-vlm-policy"] == "static"
    err = json.loads(reply)["error"]
    assert (err["type"], err["code"]) == ("invalid_request_error", code)
    assert err["message"].startswith(message), err["message"]
    assert err["param"] == ("messages" if code in ("too_many_images", "invalid_base64", "corrupt_image",
                                                   "image_too_large") else None)
    assert len(upstream.requests) == seen, "a refused request reached the upstream"
    still_works(env, upstream)


# ------------------------------------------------------ accepted requests


def test_nested_10000_deep_unknown_field_is_forwarded_untouched(env, upstream):
    """Deep nesting where the filter does not look is skipped without
    recursion: the image is resized and the nesting reaches the backend."""
    deep = ', "x_deep": ' + "[" * DEEP + "]" * DEEP + ', "x_obj": ' + '{"a":' * DEEP + "1" + "}" * DEEP
    body = chat_body([GOOD], extra=deep)
    status, headers, _ = post(env.url, body)
    assert status == 200 and headers["x-vlm-images-resized"] == "1"
    sent = upstream.last()["body"]
    assert ("[" * DEEP + "]" * DEEP).encode() in sent and ('{"a":' * DEEP).encode() in sent
    still_works(env, upstream)


def test_duplicate_keys_last_wins_like_python(env, upstream):
    big = data_url(PNG_BIG, "image/png")
    # Two `messages`: the last (with the image) is the one vLLM reads.
    body = ('{"messages": [{"role": "user", "content": "first"}], "messages": [{"role": "user", "content": '
            '[{"type": "image_url", "image_url": {"url": "' + big + '"}}]}]}').encode()
    status, headers, _ = post(env.url, body)
    assert status == 200 and (headers["x-vlm-images"], headers["x-vlm-images-resized"]) == ("1", "1")
    sent = upstream.last()["body"]
    assert json.loads(sent)["messages"][0]["content"][0]["image_url"]["url"] != big
    assert b'"messages": [{"role": "user", "content": "first"}]' in sent  # the ignored one, untouched
    # Two `url`s: the last, a remote URL, is the image; the first is left as sent.
    body = chat_body([]).replace(b'"Describe the images."}', b'"Describe."}, {"type": "image_url", "image_url": '
                                 b'{"url": "' + big.encode() + b'", "url": "https://example.com/a.png"}}')
    status, headers, _ = post(env.url, body)
    assert status == 200 and (headers["x-vlm-images"], headers["x-vlm-images-resized"]) == ("1", "0")
    assert upstream.last()["body"] == body
    still_works(env, upstream)


@pytest.mark.parametrize("fmt, label", [("PNG", "image/jpeg"), ("JPEG", "image/png")])
def test_mime_type_not_matching_the_bytes(env, upstream, fmt, label):
    """The bytes decide: resized in their own format and relabelled; an image
    within budget keeps its (wrong) label, byte for byte."""
    big = image_bytes(1500, 1000, fmt)
    small = image_bytes(200, 150, fmt)
    body = chat_body([data_url(big, label), data_url(small, label)])
    status, headers, _ = post(env.url, body)
    assert status == 200 and headers["x-vlm-images-resized"] == "1"
    (mime0, out0), (mime1, out1) = forwarded_images(upstream)
    img = Image.open(io.BytesIO(out0))
    assert (mime0, img.format, img.size) == (f"image/{fmt.lower()}", fmt, rule_size(1500, 1000))
    assert (mime1, out1) == (label, small)
    still_works(env, upstream)


def test_base64_variants_that_are_accepted(env, upstream):
    """Unpadded, and line-wrapped at 76 (MIME style, `\\n` in the JSON string)."""
    text = b64(PNG_ODD)
    wrapped = "\n".join(text[i:i + 76] for i in range(0, len(text), 76))
    body = chat_body(["data:image/png;base64," + text.rstrip("="), "data:image/png;base64," + wrapped])
    status, headers, _ = post(env.url, body)
    assert status == 200 and headers["x-vlm-images-resized"] == "2"
    for mime, data in forwarded_images(upstream):
        assert (mime, Image.open(io.BytesIO(data)).size) == ("image/png", rule_size(1500, 1000))
    still_works(env, upstream)


def test_truncated_image_within_budget_is_not_decoded(env, upstream):
    """Only the header of an image within budget is read: a truncated one
    (whole base64 quanta) reaches the backend as sent, which refuses it."""
    png = image_bytes(300, 200, "PNG")
    cut = png[: (len(png) * 6 // 10) // 3 * 3]
    body = chat_body([data_url(cut, "image/png")])
    status, headers, _ = post(env.url, body)
    assert status == 200 and headers["x-vlm-images-resized"] == "0"
    assert upstream.last()["body"] == body
    still_works(env, upstream)


def test_truncated_jpeg_over_budget_is_refused(env, upstream):
    """A JPEG over budget is decoded: one cut at half its bytes (whole base64
    quanta) ends in corrupt_image."""
    jpeg = image_bytes(1500, 1000, "JPEG", noise=True)
    status, headers, reply = post(env.url, chat_body([GOOD, data_url(jpeg[: len(jpeg) // 2 // 3 * 3], "image/jpeg")]))
    assert status == 400, reply[:300]
    err = json.loads(reply)["error"]
    assert err["code"] == "corrupt_image"
    assert err["message"] == "image 1: cannot decode image: jpeg: failed to fill whole buffer"
    still_works(env, upstream)


def test_jpeg_with_corrupt_scan_is_decoded_as_far_as_it_goes(env, upstream):
    """Invalid Huffman codes and stray markers in the middle of the scan:
    jpeg-decoder recovers (as libjpeg does, with garbage in the damaged
    blocks), so the image is resized to the rule's size, not refused."""
    status, headers, reply = post(env.url, chat_body([GOOD, data_url(corrupt_scan_jpeg(), "image/jpeg")]))
    assert status == 200, reply[:300]
    assert headers["x-vlm-images-resized"] == "2"
    for mime, data in forwarded_images(upstream):
        img = Image.open(io.BytesIO(data))
        img.load()
        assert (mime, img.format, img.size) == ("image/jpeg", "JPEG", rule_size(1500, 1000))
    still_works(env, upstream)


def test_cmyk_jpeg_is_resized_to_rgb_with_the_right_colours(env, upstream):
    # Pure cyan, magenta-ish and key bands: Pillow writes Adobe (inverted) CMYK.
    cmyk = Image.new("CMYK", (1600, 1200), (255, 0, 0, 0))
    cmyk.paste((0, 255, 0, 0), (800, 0, 1600, 1200))
    body = chat_body([data_url(save(cmyk, "JPEG", quality=95), "image/jpeg")])
    status, headers, _ = post(env.url, body)
    assert status == 200 and headers["x-vlm-images-resized"] == "1"
    ((mime, data),) = forwarded_images(upstream)
    out = Image.open(io.BytesIO(data))
    assert (mime, out.format, out.mode, out.size) == ("image/jpeg", "JPEG", "RGB", rule_size(1600, 1200))
    w, h = out.size
    left, right = out.getpixel((w // 4, h // 2)), out.getpixel((3 * w // 4, h // 2))
    want_left, want_right = cmyk.convert("RGB").getpixel((400, 600)), cmyk.convert("RGB").getpixel((1200, 600))
    assert all(abs(a - b) <= 12 for a, b in zip(left, want_left)), (left, want_left)
    assert all(abs(a - b) <= 12 for a, b in zip(right, want_right)), (right, want_right)
    still_works(env, upstream)


def resized_matches_pillow(env, upstream, png: bytes, size: tuple[int, int], want_mode: str, reference: Image.Image):
    status, headers, reply = post(env.url, chat_body([data_url(png, "image/png")]))
    assert status == 200, reply[:300]
    assert headers["x-vlm-images-resized"] == "1"
    ((mime, data),) = forwarded_images(upstream)
    out = Image.open(io.BytesIO(data))
    assert (mime, out.format, out.size) == ("image/png", "PNG", rule_size(*size))
    assert out.mode == want_mode
    want = reference.convert(want_mode).resize(out.size, Image.Resampling.BICUBIC)
    diff = mean_abs_diff(out, want)
    assert diff < 6, f"mean difference from Pillow's resize: {diff:.2f}"
    assert int(headers["x-vlm-visual-tokens-after"]) == tokens(*out.size) <= BUDGET
    return out


def test_interlaced_png_is_resized(env, upstream):
    w, h = 1400, 1000
    png = raw_png(w, h, 2, 8, rgb_pattern(w, h), interlace=True)
    reference = Image.open(io.BytesIO(png))
    assert reference.info.get("interlace") == 1
    resized_matches_pillow(env, upstream, png, (w, h), "RGB", reference)
    still_works(env, upstream)


def test_16_bit_pngs_are_resized_to_8_bit(env, upstream):
    w, h = 1300, 1000
    grey16 = Image.linear_gradient("L").resize((w, h)).convert("I")
    grey16 = grey16.point(lambda v: v * 257).convert("I;16")
    png = save(grey16, "PNG")
    assert Image.open(io.BytesIO(png)).mode == "I;16"
    reference = Image.frombytes("L", (w, h), bytes(v >> 8 for v in grey16.getdata()))
    resized_matches_pillow(env, upstream, png, (w, h), "L", reference)
    pattern = rgb_pattern(w, h)
    rgb48 = raw_png(w, h, 2, 16, lambda x, y: tuple(v * 257 for v in pattern(x, y)))
    reference = Image.new("RGB", (w, h))
    reference.putdata([pattern(x, y) for y in range(h) for x in range(w)])
    resized_matches_pillow(env, upstream, rgb48, (w, h), "RGB", reference)
    still_works(env, upstream)


def test_palette_png_with_transparency_keeps_its_alpha(env, upstream):
    w, h = 1500, 1000
    img = Image.new("P", (w, h), 0)
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    img.paste(1, (0, 0, w // 2, h))  # left half: index 1 (blue), transparent
    png = save(img, "PNG", transparency=1)
    reference = Image.open(io.BytesIO(png)).convert("RGBA")
    assert reference.getpixel((10, 10)) == (0, 0, 255, 0)
    out = resized_matches_pillow(env, upstream, png, (w, h), "RGBA", reference)
    ow, oh = out.size
    assert out.getpixel((ow // 4, oh // 2))[3] == 0, "transparent half lost its alpha"
    assert out.getpixel((3 * ow // 4, oh // 2)) == (255, 0, 0, 255)
    grey_alpha = Image.linear_gradient("L").resize((w, h)).convert("LA")
    resized_matches_pillow(env, upstream, save(grey_alpha, "PNG"), (w, h), "LA", grey_alpha)
    still_works(env, upstream)


def test_exif_rotated_jpeg_resizes_the_stored_grid_and_keeps_the_orientation(env, upstream):
    """Orientation 6 (display rotated 90 degrees): the filter resizes the
    stored 1600 x 1000 grid, as the backend counts tokens on it, and the
    re-encoded JPEG carries the orientation (and nothing else of the EXIF).
    Within budget, the bytes (EXIF included) pass unchanged."""
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010F] = "Maker"
    big = save(Image.linear_gradient("L").resize((1600, 1000)).convert("RGB"), "JPEG", exif=exif.tobytes())
    small = save(Image.linear_gradient("L").resize((400, 250)).convert("RGB"), "JPEG", exif=exif.tobytes())
    assert Image.open(io.BytesIO(big)).getexif().get(0x0112) == 6
    status, headers, _ = post(env.url, chat_body([data_url(big, "image/jpeg"), data_url(small, "image/jpeg")]))
    assert status == 200 and headers["x-vlm-images-resized"] == "1"
    (_, out_big), (_, out_small) = forwarded_images(upstream)
    out = Image.open(io.BytesIO(out_big))
    assert out.size == rule_size(1600, 1000)
    assert dict(out.getexif()) == {0x0112: 6}
    assert out_small == small
    assert int(headers["x-vlm-visual-tokens-before"]) == tokens(1600, 1000) + tokens(400, 250)
    still_works(env, upstream)


def test_lone_surrogate_escape_is_forwarded(env, upstream):
    """`\\ud800` in a text part is valid JSON text that Python's json reads;
    the filter does not unescape text, so the request goes on unchanged."""
    body = chat_body([GOOD]).replace(b"Describe the images.", b"Describe \\ud800 the images.")
    status, headers, _ = post(env.url, body)
    assert status == 200 and headers["x-vlm-images-resized"] == "1"
    assert b"\\ud800" in upstream.last()["body"]
    still_works(env, upstream)


def test_empty_body_goes_to_the_backend(env, upstream):
    """A POST without a body has nothing to inspect: it is forwarded (the
    backend answers it) and not counted as a filtered request."""
    before = env.stats()["wasmcustom.vlm_budget_requests_total"]
    status, _, _ = post(env.url, b"")
    assert status == 200 and upstream.last()["body"] == b""
    assert env.stats()["wasmcustom.vlm_budget_requests_total"] == before
    still_works(env, upstream)


def test_vm_never_reloaded_after_the_matrix(env):
    vm_intact(env)
    stats = env.stats()
    for code in ("invalid_json", "invalid_request", "too_many_images", "invalid_base64", "corrupt_image",
                 "image_too_large"):
        assert stats[f"wasmcustom.vlm_budget_errors_{code}_total"] >= 1, code


# ------------------------------------------- limits before allocation


# harness.Envoy takes the worker count and log levels these tests choose.
CustomEnvoy = harness.Envoy


@pytest.fixture
def custom_envoy(wasm, tmp_path):
    started = []

    def start(plugin_config, upstream, **kw):
        listen, admin = harness.free_port(), harness.free_port()
        cfg = harness.render_config(plugin_config, upstream.port, listen, admin, wasm)
        e = CustomEnvoy(cfg, tmp_path, admin, listen, **kw)
        started.append(e)
        e.wait_ready()
        e.v8_created = e.stats()["wasm.envoy.wasm.runtime.v8.created"]
        return e

    yield start
    for e in started:
        e.stop()


def send_huge_body(env, total: int, pause_after: int, timeout: float = 60.0):
    """POSTs a `total`-byte JSON body over a raw socket, pausing once
    `pause_after` bytes are sent until the answer comes (or `timeout`).
    Returns (status, reply body, bytes sent when the answer came)."""
    port = int(env.url.rsplit(":", 1)[1])
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
              + f"content-length: {total}\r\n\r\n".encode())
    progress = {"sent": 0}
    answered = threading.Event()
    prefix, suffix = b'{"messages": [{"role": "user", "content": "', b'"}]}'
    chunk = b"x" * (1 << 20)

    def sender():
        try:
            s.sendall(prefix)
            progress["sent"] = len(prefix)
            left = total - len(prefix) - len(suffix)
            while left > 0:
                if progress["sent"] >= pause_after and not answered.wait(timeout):
                    return
                if answered.is_set():
                    return
                n = min(left, len(chunk))
                s.sendall(chunk[:n])
                left -= n
                progress["sent"] += n
            s.sendall(suffix)
            progress["sent"] += len(suffix)
        except OSError:
            pass

    t = threading.Thread(target=sender, daemon=True)
    t.start()
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = s.recv(65536)
        if not data:
            break
        buf += data
    sent_at_answer = progress["sent"]
    answered.set()
    head, _, rest = buf.partition(b"\r\n\r\n")
    status = int(head.split(b" ")[1])
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(rest) < length:
        data = s.recv(65536)
        if not data:
            break
        rest += data
    s.close()
    t.join(timeout)
    return status, rest[:length], sent_at_answer


def test_limits_hold_before_allocation(custom_envoy, upstream):
    """One worker, so the VM memory gauge is that worker's VM: a 100 MB body,
    1,000 images and pixel bombs leave it small (nothing was copied or
    decoded), and each got its documented error."""
    env = custom_envoy(CONFIG, upstream, concurrency=1)
    seen = len(upstream.requests)
    limit = 64 * 1024 * 1024
    # The declared length is over the limit: the answer comes at the headers,
    # before the body is buffered. The client pauses with less than the limit
    # sent (its last 1 MiB chunk stays under it) and waits: an answer while it
    # waits can only have come from the headers, since refusing at the body
    # needs more than the limit buffered (on a busy machine the client may
    # reach its pause before it reads the answer, so the pause is below the
    # limit, not past it).
    status, reply, sent_at_answer = send_huge_body(env, 100_000_000, pause_after=limit - (2 << 20))
    assert status == 400, reply[:300]
    err = json.loads(reply)["error"]
    assert (err["code"], err["message"]) == ("body_too_large", "request body is larger than the 67108864-byte limit")
    assert sent_at_answer < limit, sent_at_answer
    cases = refused_cases()
    for case in ("images_1000", "png_100000x100000_as_jpeg", "jpeg_65535x65535"):
        body, code, _ = cases[case]
        status, _, reply = post(env.url, body)
        assert (status, json.loads(reply)["error"]["code"]) == (400, code), case
    assert len(upstream.requests) == seen
    status, headers, _ = post(env.url, chat_body([GOOD]))  # records the VM's memory
    assert status == 200 and headers["x-vlm-images-resized"] == "1"
    stats = env.stats()
    memory = stats["wasmcustom.vlm_budget_vm_memory_bytes"]
    assert 0 < memory < 48 * 1024 * 1024, f"VM memory {memory} bytes"
    assert stats["wasmcustom.vlm_budget_errors_body_too_large_total"] == 1
    vm_intact(env)


# ------------------------------------------------------------- security


class Trap:
    """A listening socket on 127.0.0.1 that records every connection."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop:
            try:
                conn, _ = self.sock.accept()
                self.accepted += 1
                conn.close()
            except OSError:
                pass

    def close(self):
        self.stop = True
        self.thread.join(2)
        self.sock.close()


def test_remote_image_urls_are_never_fetched(env, upstream):
    trap = Trap()
    try:
        urls = [f"http://127.0.0.1:{trap.port}/a.png", f"https://127.0.0.1:{trap.port}/b.jpg",
                f"HTTP://localhost:{trap.port}/c.png", f"//127.0.0.1:{trap.port}/d.png",
                f"ftp://127.0.0.1:{trap.port}/e.png", GOOD]
        for bare in (False, True):
            body = chat_body(urls, bare=bare)
            status, headers, _ = post(env.url, body)
            assert status == 200
            assert (headers["x-vlm-images"], headers["x-vlm-images-resized"]) == ("6", "1")
            assert image_urls(upstream.last()["body"])[:5] == urls[:5]
        time.sleep(1.0)
        assert trap.accepted == 0, "the filter connected to a remote image URL"
    finally:
        trap.close()
    still_works(env, upstream)


PROMPT = "ZEBRA-7f3c-PROMPT describe the quokka in the corner"


@pytest.mark.parametrize("wasm_level", ["info", "debug"])
def test_no_prompt_text_or_image_bytes_in_the_log(custom_envoy, upstream, wasm_level):
    env = custom_envoy({**CONFIG, "fail_open": True}, upstream, log_level="info", wasm_level=wasm_level)
    png = image_bytes(1500, 1000, "PNG", noise=True)
    small = image_bytes(300, 200, "JPEG", noise=True)
    body = chat_body([data_url(png, "image/png"), data_url(small, "image/jpeg")]).replace(
        b"Describe the images.", PROMPT.encode())
    status, headers, _ = post(env.url, body)
    assert status == 200 and headers["x-vlm-images-resized"] == "1"
    (_, resized), _ = forwarded_images(upstream)
    # Bad input with the prompt in it: logged (fail_open) by its code only.
    bad = body.replace(b"data:image/jpeg;base64,", b"data:image/jpeg;base64,%%")
    status, headers, _ = post(env.url, bad)
    assert status == 200 and headers["x-vlm-fail-open"] == "invalid_base64"
    time.sleep(0.5)
    log = env.log_text()
    assert "vlm-budget: configured" in log, "the wasm log is captured"
    assert "vlm-budget: forwarding unchanged (fail_open): image 1: invalid base64" in log
    assert PROMPT not in log and "ZEBRA" not in log
    for data in (png, small, resized):
        text = b64(data)
        for at in (len(text) // 3, len(text) // 2):
            assert text[at:at + 24] not in log, "image bytes in the log"


@pytest.mark.parametrize("bad, field", [
    ({"fail_open": "yes"}, "fail_open"),
    ({"paths": "/v1/chat/completions"}, "paths"),
    ({"max_body_bytes": -1}, "max_body_bytes"),
    ({"max_body_bytes": 1.5}, "max_body_bytes"),
    ({"max_body_bytes": 300_000_000}, "max_body_bytes"),
    ({"max_images_per_request": 0}, "max_images_per_request"),
    ({"max_image_pixels": 10}, "max_image_pixels"),
    ({"encode_retries": None}, "encode_retries"),
    ({"encode_cluster": 5}, "encode_cluster"),
    ({"resize_filter": "bilinear"}, "resize_filter"),
    ({"sizing": 14}, "sizing"),
    ({"sizing": {"patch_size": 0}}, "sizing.patch_size"),
    ({"calibration": []}, "calibration"),
    ({"profile": {"encode_ms": {"a": "x", "b": 1, "c": 0}}}, "profile.encode_ms"),
    ({"ttft_slo_ms": 1e3}, "ttft_slo_ms"),
    ({"metrics_path": "metrics"}, "metrics_path"),
    ([], "(root)"),
    ("not json", "(root)"),
])
def test_bad_configuration_field_types_refuse_to_load(wasm, tmp_path, bad, field):
    """Envoy refuses a configuration of the wrong shape or type, naming the
    field, instead of starting on defaults."""
    cfg = harness.render_config({}, harness.free_port(), harness.free_port(), harness.free_port(), wasm)
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    value = bad if isinstance(bad, str) else json.dumps(bad)
    harness.wasm_filter(hcm)["typed_config"]["config"]["configuration"]["value"] = value
    path = tmp_path / "envoy.json"
    path.write_text(json.dumps(cfg))
    run = subprocess.run([harness.envoy_binary(), "--mode", "validate", "-c", str(path), "--concurrency", "1"],
                         capture_output=True, text=True, timeout=60)
    out = run.stdout + run.stderr
    assert run.returncode != 0, out
    assert f"invalid configuration: field `{field}`" in out, out[-2000:]


# ------------------------------------------------------ text-only bodies


def test_text_only_bodies_are_forwarded_unparsed(start_envoy, upstream):
    """By default a body that cannot hold an image part (no `image_url`, no
    `\\u` escape) goes upstream byte for byte, malformed or not: the backend
    answers it. One that could is parsed and checked as before."""
    env = start_envoy({"policy": "static", "static_budget_tokens": BUDGET}, upstream)
    env.v8_created = env.stats()["wasm.envoy.wasm.runtime.v8.created"]
    for body in (b'{"messages": [', b'{"model": "m"}', b"{'messages': []}", b'{"messages": [{"content": 7}]}'):
        status, headers, _ = post(env.url, body)
        assert status == 200 and upstream.last()["body"] == body
        assert (headers["x-vlm-policy"], headers["x-vlm-images"]) == ("static", "0")
    for body, code in ((b'{"messages": [{"content": [{"type": "image_url"', "invalid_json"),
                       (b'{"messages": [{"content": [{"type": "image\\u005furl", "image_url": 5}]}]}',
                        "invalid_request")):
        seen = len(upstream.requests)
        status, _, reply = post(env.url, body)
        assert status == 400 and json.loads(reply)["error"]["code"] == code, reply
        assert len(upstream.requests) == seen
    still_works(env, upstream)


def raw_post(url: str, body: bytes, extra_headers: bytes) -> bytes:
    """One HTTP/1.1 request with header bytes as given; the status line back."""
    host, port = url.rsplit("/", 1)[-1].split(":")
    req = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n" + extra_headers
           + b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(req)
        out = b""
        while b"\r\n" not in out:
            chunk = s.recv(4096)
            if not chunk:
                break
            out += chunk
    return out.split(b"\r\n", 1)[0]


def test_header_values_that_are_not_utf8(start_envoy, upstream):
    """Envoy passes header bytes 0x80-0xFF through; the filter reads the
    headers it needs as bytes, so such a value is ignored (an SLO) or
    replaced (a request id), never a crash of the worker's VM."""
    env = start_envoy({"policy": "dynamic", "encode_cluster": "encode_cluster"}, upstream)
    env.v8_created = env.stats()["wasm.envoy.wasm.runtime.v8.created"]
    body = chat_body([GOOD])
    for _ in range(4):  # both workers, several times
        line = raw_post(env.url, body, b"x-slo-ttft-ms: \xff\xfe\r\nx-request-id: \xe9t\xe9\r\n")
        assert line.startswith(b"HTTP/1.1 200"), line
        rid = upstream.last()["headers"]["x-request-id"]
        assert rid and rid.isascii(), rid
    for _ in range(4):
        status, headers, _ = post(env.url, body)
        assert status == 200 and headers["x-vlm-images"] == "1"
    vm_intact(env)
