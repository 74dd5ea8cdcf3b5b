"""Bad input through the real Envoy: a clear 400 (fail closed) or the
original request unchanged (fail open); the VM survives every case."""
import base64
import json
import struct
import zlib

import pytest

from harness import chat_body, data_url, image_bytes, post

GOOD = data_url(image_bytes(1500, 1000, "JPEG"), "image/jpeg")


def png_claiming(width, height) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk + b"\x00" * 64


def corrupt_jpeg() -> bytes:
    data = bytearray(image_bytes(1500, 1000, "JPEG", noise=True))
    sos = data.index(b"\xff\xda")
    for i in range(sos + 200, len(data) - 2, 7):
        data[i] = 0xFF  # markers in the middle of the scan
    return bytes(data)


def bad_cases():
    png = image_bytes(1500, 1000, "PNG")
    b64 = base64.b64encode(png).decode()
    return {
        "malformed_json": (b'{"messages": [', "invalid_json", None),
        "messages_not_array": (b'{"messages": {"role": "user"}}', "invalid_request", None),
        "bad_base64": (chat_body([GOOD, "data:image/png;base64," + b64[:1000] + "!!" + b64[1002:]]), "invalid_base64", 1),
        "truncated_base64": (chat_body([GOOD, "data:image/png;base64," + b64[:-3]]), "invalid_base64", 1),
        "truncated_image": (chat_body([GOOD, data_url(png[: len(png) // 2], "image/png")]), "corrupt_image", 1),
        "webp": (chat_body([data_url(b"RIFF\x00\x00\x00\x00WEBPVP8 " + b"\x00" * 32, "image/webp")]), "unsupported_image_type", 0),
        "gif_as_png": (chat_body([GOOD, data_url(image_bytes(64, 64, "GIF"), "image/png")]), "unsupported_image_type", 1),
        "svg": (chat_body([data_url(b"<svg xmlns='http://www.w3.org/2000/svg'/>", "image/svg+xml")]), "unsupported_image_type", 0),
        "pixel_bomb": (chat_body([GOOD, GOOD, data_url(png_claiming(100_000, 100_000), "image/png")]), "image_too_large", 2),
        "corrupt_jpeg_header": (chat_body([data_url(b"\xff\xd8\xff\xe0\x00\x10JFIF", "image/jpeg")]), "corrupt_image", 0),
        "not_base64_uri": (chat_body(["data:image/png,rawbytes"]), "invalid_image_url", 0),
        "too_large_body": (chat_body([GOOD], extra=', "pad": "' + "x" * 2_100_000 + '"'), "body_too_large", None),
        "invalid_utf8": (b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', "invalid_json", None),
    }


CONFIG = {"policy": "static", "static_budget_tokens": 512, "max_body_bytes": 2_000_000,
          "max_image_pixels": 20_000_000, "validate_text_only": True}


@pytest.fixture(scope="module")
def closed(start_envoy, upstream):
    return start_envoy({**CONFIG, "fail_open": False}, upstream)


@pytest.fixture(scope="module")
def opened(start_envoy, upstream):
    return start_envoy({**CONFIG, "fail_open": True}, upstream)


def assert_still_works(envoy, upstream):
    status, headers, _ = post(envoy.url, chat_body([GOOD]))
    assert status == 200
    assert headers["x-vlm-images-resized"] == "1"
    assert len(upstream.last()["body"]) < len(chat_body([GOOD]))


@pytest.mark.parametrize("case", sorted(bad_cases()))
def test_fail_closed_gives_openai_error(closed, upstream, case):
    body, code, index = bad_cases()[case]
    seen = len(upstream.requests)
    status, headers, reply = post(closed.url, body)
    assert status == 400, reply
    assert headers["content-type"] == "application/json"
    err = json.loads(reply)["error"]
    assert err["type"] == "invalid_request_error"
    assert err["code"] == code
    if index is not None:
        assert err["message"].startswith(f"image {index}: "), err["message"]
    # Nothing reached the upstream as a complete request.
    assert len(upstream.requests) == seen
    assert_still_works(closed, upstream)


@pytest.mark.parametrize("case", sorted(bad_cases()))
def test_fail_open_forwards_the_original(opened, upstream, case):
    body, code, _ = bad_cases()[case]
    status, headers, _ = post(opened.url, body)
    assert status == 200
    assert upstream.last()["body"] == body
    assert headers["x-vlm-fail-open"] == code
    assert_still_works(opened, upstream)


def test_vm_never_reloaded_and_errors_counted(closed, opened):
    for env in (closed, opened):
        stats = env.stats()
        assert stats["wasm.vlm_budget.vm_reload"] == 0
        assert stats["wasm.vlm_budget.vm_reload_failure"] == 0
        # 2 workers + main + the base VM; a crashed VM would be re-created.
        assert stats["wasm.envoy.wasm.runtime.v8.created"] == 5
        assert stats["wasmcustom.vlm_budget_errors_invalid_base64_total"] >= 2
        assert "panicked" not in env.log_text()
