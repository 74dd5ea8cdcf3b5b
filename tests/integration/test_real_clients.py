"""What real clients send, through the real Envoy: phone photos with an EXIF
orientation and a colour profile, compressed bodies, a UTF-8 byte-order
mark, encoder 4xx answers; and what prefill/decode (PD) sees of the
requests the filter is still working on or answers itself."""
import gzip
import io
import json
import urllib.error

import pytest
from PIL import Image, ImageCms, ImageOps

import harness
from harness import chat_body, data_url, decode_data_url, image_bytes, image_urls, post, replace_urls, tokens

STATIC = {"policy": "static", "static_budget_tokens": 4096}
EPD = {"policy": "static", "static_budget_tokens": 1024, "encode_cluster": "encode_cluster",
       "encode_timeout_ms": 5000, "encode_retries": 1, "encode_fanout": "per_request"}
BOM = b"\xef\xbb\xbf"
RED, BLUE = (220, 20, 20), (20, 20, 220)
SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def phone_photo(width, height, orientation=6, icc=SRGB) -> bytes:
    """A JPEG stored landscape with an EXIF orientation, like a phone's: blue,
    with a red block in the stored top-left corner."""
    img = Image.new("RGB", (width, height), BLUE)
    img.paste(RED, (0, 0, width // 4, height // 4))
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[0x010F] = "PhoneMaker"
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, exif=exif.tobytes(), icc_profile=icc)
    return buf.getvalue()


def near(pixel, colour, tol=40):
    return all(abs(a - b) <= tol for a, b in zip(pixel, colour))


def displayed(data: bytes) -> Image.Image:
    """The image as a viewer that honours EXIF shows it."""
    return ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")


def test_resized_phone_photo_keeps_orientation_and_colour_profile(start_envoy, upstream):
    env = start_envoy(STATIC, upstream)
    photo = phone_photo(4000, 3000)
    status, headers, _ = post(env.url, chat_body([data_url(photo, "image/jpeg")]))
    assert status == 200 and headers["x-vlm-images-resized"] == "1"
    (url,) = image_urls(upstream.last()["body"])
    _, out = decode_data_url(url)
    img = Image.open(io.BytesIO(out))
    # Stored as sent (landscape), resized, the tag carried: shown 1540 wide
    # and 2044 tall, as the original is shown upright.
    assert img.size == (2044, 1540)
    assert img.getexif()[0x0112] == 6
    assert 0x010F not in img.getexif(), "only the orientation is carried"
    assert img.info["icc_profile"] == SRGB
    original, resized = displayed(photo), displayed(out)
    assert original.size == (3000, 4000) and resized.size == (1540, 2044)
    # The red block is in the same displayed corner (top right for tag 6).
    for im in (original, resized):
        w, h = im.size
        assert near(im.getpixel((int(w * 0.9), int(h * 0.1))), RED)
        assert near(im.getpixel((int(w * 0.1), int(h * 0.1))), BLUE)
        assert near(im.getpixel((int(w * 0.9), int(h * 0.9))), BLUE)
    # The filter's count is the backend's for either reading of the tag.
    assert int(headers["x-vlm-visual-tokens-after"]) == tokens(2044, 1540) == tokens(1540, 2044)


def test_phone_photo_within_budget_is_forwarded_byte_for_byte(start_envoy, upstream):
    env = start_envoy(STATIC, upstream)
    photo = phone_photo(800, 600)
    body = chat_body([data_url(photo, "image/jpeg")])
    status, headers, _ = post(env.url, body)
    assert status == 200 and headers["x-vlm-images-resized"] == "0"
    assert upstream.last()["body"] == body
    assert displayed(photo).size == (600, 800)


def test_encoder_400_is_not_retried(start_envoy, emulator):
    emu = emulator("--time-scale", "0.2", "--jitter-sigma", "0")
    env = start_envoy(EPD, emu)
    image = [data_url(image_bytes(1400, 1000, "JPEG"), "image/jpeg")]
    for rid, fault, calls in [("four-hundred", 400, 1), ("five-oh-three", 503, 2)]:
        emu.faults("encode", fail_status=fault, fail_count=1)
        status, headers, _ = post(env.url, chat_body(image), headers={"x-request-id": rid})
        assert status == 200
        encodes = [e for e in emu.requests() if e["request_id"] == rid and e["role"] == "encode"]
        assert len(encodes) == calls == int(headers["x-vlm-encode-calls"]), rid
        assert encodes[0]["status"] == fault
    assert headers["x-vlm-encode"] == "ok"  # the retry of the 503 succeeded
    stats = env.stats()
    assert stats["wasmcustom.vlm_budget_encode_retries_total"] == 1
    assert stats["wasmcustom.vlm_budget_encode_fallbacks_total"] == 1  # the 400's request


def without_decompressor(cfg):
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] != harness.DECOMPRESSOR]


def test_gzip_body_is_budgeted_through_the_decompressor(start_envoy, upstream):
    """The decompressor inflates the body (and ends it with trailers of its
    own, which the filter takes as the end of the body)."""
    env = start_envoy({**STATIC, "static_budget_tokens": 1024}, upstream)
    # A photo-like (incompressible) image: Envoy's gzip decompressor stops
    # at 100x inflation, which a body of base64 photographs never nears.
    photo = image_bytes(2000, 1500, "JPEG", noise=True, quality=90)
    body = chat_body([data_url(photo, "image/jpeg")])
    status, headers, reply = post(env.url, gzip.compress(body), headers={"content-encoding": "gzip"})
    assert status == 200, reply
    assert headers["x-vlm-images-resized"] == "1"
    assert int(headers["x-vlm-visual-tokens-after"]) <= 1024 < int(headers["x-vlm-visual-tokens-before"])
    sent = upstream.last()
    assert "content-encoding" not in sent["headers"]
    (old,), (new,) = image_urls(body), image_urls(sent["body"])
    assert sent["body"] == replace_urls(body, [old], [new])
    # A small text-only body too: decompressed, then forwarded as plain JSON.
    text = b'{"messages":[{"role":"user","content":"hi"}]}'
    status, _, _ = post(env.url, gzip.compress(text), headers={"content-encoding": "gzip"})
    assert status == 200 and upstream.last()["body"] == text


def test_encoded_body_without_a_decompressor_gets_415(start_envoy, upstream):
    env = start_envoy(STATIC, upstream, mutate=without_decompressor)
    before = len(upstream.requests)
    big = chat_body([data_url(image_bytes(3840, 2400, "JPEG"), "image/jpeg")])
    small = b'{"messages":[{"role":"user","content":"hi"}]}'
    for body, coding in [(gzip.compress(big), "gzip"), (gzip.compress(small), "gzip"), (small, "br")]:
        status, headers, reply = post(env.url, body, headers={"content-encoding": coding})
        assert status == 415, reply
        err = json.loads(reply)["error"]
        assert err["code"] == "unsupported_content_encoding" and err["type"] == "invalid_request_error"
        assert coding in err["message"]
    assert len(upstream.requests) == before
    # identity is no encoding.
    status, _, _ = post(env.url, small, headers={"content-encoding": "identity"})
    assert status == 200 and upstream.last()["body"] == small
    assert env.stats()["wasmcustom.vlm_budget_errors_unsupported_content_encoding_total"] == 3


@pytest.mark.parametrize("validate", [False, True])
def test_byte_order_mark_is_accepted_and_kept(start_envoy, upstream, validate):
    env = start_envoy({**STATIC, "validate_text_only": validate}, upstream)
    small = data_url(image_bytes(640, 480, "PNG"), "image/png")
    big_jpeg = image_bytes(3840, 2400, "JPEG")
    for body in [b'{"messages":[{"role":"user","content":"hi"}]}', chat_body([small])]:
        status, headers, reply = post(env.url, BOM + body)
        assert status == 200, reply
        assert upstream.last()["body"] == BOM + body
    body = chat_body([data_url(big_jpeg, "image/jpeg")])
    status, headers, _ = post(env.url, BOM + body)
    assert status == 200 and headers["x-vlm-images-resized"] == "1"
    sent = upstream.last()["body"]
    assert sent.startswith(BOM) and not sent[3:].startswith(BOM)
    (old,), (new,) = image_urls(body), image_urls(sent[3:])
    assert sent == BOM + replace_urls(body, [old], [new])


HOLD = {**EPD, "hold_headers": True}


def test_pd_sees_no_request_before_the_encoder_answered(start_envoy, emulator):
    emu = emulator("--time-scale", "0.2", "--jitter-sigma", "0")
    env = start_envoy(HOLD, emu)
    emu.faults("encode", extra_delay_ms=1500)
    status, headers, _ = post(env.url, chat_body([data_url(image_bytes(1400, 1000, "JPEG"), "image/jpeg")]),
                              headers={"x-request-id": "held"})
    assert status == 200 and headers["x-vlm-encode"] == "ok"
    (enc,) = [e for e in emu.requests() if e["role"] == "encode"]
    (pd,) = [e for e in emu.requests() if e["role"] == "pd"]
    # PD's request arrived (headers included) only after the encoder's
    # answer, which left no earlier than 1.5 s after its arrival.
    assert pd["arrival_ms"] >= enc["arrival_ms"] + 1500
    assert pd["status"] == 200 and pd["images"][0]["cache"] == "hit"


def test_pd_sees_no_request_the_filter_answers(start_envoy, emulator):
    emu = emulator("--time-scale", "0.2", "--jitter-sigma", "0")
    env = start_envoy({**HOLD, "max_body_bytes": 4 << 20}, emu)
    good = data_url(image_bytes(1400, 1000, "JPEG"), "image/jpeg")
    bad = [
        chat_body(["data:image/png;base64,@@@@"]),                       # invalid_base64
        b'{"messages":[{"role":"user","content":[{"type":"image_url"',  # invalid_json
        chat_body([data_url(b"GIF89a" + bytes(40), "image/gif")]),      # unsupported_image_type
        chat_body([data_url(image_bytes(64, 64, "PNG"), "image/png")] * 70),  # too_many_images
        chat_body([data_url(image_bytes(1200, 1200, "PNG", noise=True), "image/png")]),  # body_too_large
    ]
    for i, body in enumerate(bad):
        try:
            status, _, reply = post(env.url, body)
        except (urllib.error.URLError, ConnectionError):
            # Refused at the headers (declared length) while the client still
            # sends: Envoy answers and closes, the client may see a reset.
            assert i == len(bad) - 1
            continue
        assert status in (400, 413), reply
    assert emu.requests() == [], "PD (and the encoder) saw none of them"
    status, _, _ = post(env.url, chat_body([good]), headers={"x-request-id": "ok"})
    assert status == 200
    log = emu.requests()
    assert [(e["role"], e["status"]) for e in log] == [("encode", 200), ("pd", 200)]


def test_without_hold_headers_requests_still_work(start_envoy, emulator):
    """The knob off (Envoy's flag on): headers go on at once, as before."""
    emu = emulator("--time-scale", "0.2", "--jitter-sigma", "0")
    env = start_envoy(EPD, emu)
    status, headers, _ = post(env.url, chat_body([data_url(image_bytes(1400, 1000, "JPEG"), "image/jpeg")]))
    assert status == 200 and headers["x-vlm-encode"] == "ok" and headers["x-emulator-ec-cache"] == "hit"


def without_stop_iteration(cfg):
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    harness.wasm_filter(hcm)["typed_config"]["config"].pop("allow_on_headers_stop_iteration")


def test_hold_headers_without_envoys_flag_does_not_hang(start_envoy, upstream):
    """hold_headers on, Envoy's allow_on_headers_stop_iteration off: a header
    Pause would stop the body too. The watchdog resumes the request, the VM
    stops holding and says why; nothing hangs."""
    env = start_envoy({**STATIC, "hold_headers": True}, upstream, mutate=without_stop_iteration)
    body = chat_body([data_url(image_bytes(3840, 2400, "JPEG"), "image/jpeg")])
    for _ in range(4):
        status, headers, _ = post(env.url, body, timeout=30)
        assert status == 200 and headers["x-vlm-images-resized"] == "1"
    assert "set allow_on_headers_stop_iteration: true" in env.log_text()
