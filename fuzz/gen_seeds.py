"""Writes the seed corpora of the fuzz targets into fuzz/corpus/<target>/.

Small valid PNGs (every colour type, 16-bit, palette with transparency,
Adam7-interlaced) and JPEGs (baseline, progressive, greyscale, CMYK, EXIF,
restart markers), chat bodies of every shape the filter reads, plugin
configurations and vLLM-style Prometheus text. Needs Pillow (the project's
.venv): `.venv/bin/python fuzz/gen_seeds.py`.
"""
from __future__ import annotations

import base64
import io
import json
import pathlib
import struct
import sys
import zlib

from PIL import Image

OUT = pathlib.Path(__file__).resolve().parent / "corpus"


def gradient(width: int, height: int, mode: str) -> Image.Image:
    img = Image.linear_gradient("L").resize((width, height))
    if mode in ("RGB", "RGBA", "CMYK"):
        bands = [img, img.transpose(Image.Transpose.FLIP_LEFT_RIGHT), img.rotate(90).resize((width, height))]
        if mode == "RGBA":
            bands.append(img.transpose(Image.Transpose.FLIP_TOP_BOTTOM))
        if mode == "CMYK":
            bands.append(img.point(lambda v: v // 4))
        return Image.merge(mode, bands)
    return img.convert(mode)


def save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def adam7_png(width: int, height: int) -> bytes:
    """An RGB8 PNG with Adam7 interlacing (Pillow only writes progressive-free PNGs)."""
    px = [[((x * 255) // max(width - 1, 1), (y * 255) // max(height - 1, 1), (x ^ y) & 0xFF)
           for x in range(width)] for y in range(height)]
    passes = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]
    raw = bytearray()
    for x0, y0, dx, dy in passes:
        cols = range(x0, width, dx)
        if not cols:
            continue
        for y in range(y0, height, dy):
            raw.append(0)
            for x in cols:
                raw.extend(px[y][x])
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 1)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(bytes(raw)))
            + png_chunk(b"IEND", b""))


def images() -> dict[str, bytes]:
    out = {}
    for mode in ("1", "L", "LA", "RGB", "RGBA", "I;16"):
        out[f"png-{mode.replace(';', '')}"] = save(gradient(150, 100, "L" if mode == "I;16" else mode)
                                                   .convert(mode) if mode != "I;16" else
                                                   gradient(150, 100, "I").convert("I;16"), "PNG")
    pal = gradient(120, 90, "RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    out["png-P-transparent"] = save(pal, "PNG", transparency=3)
    out["png-adam7"] = adam7_png(70, 50)
    out["png-tiny"] = save(gradient(3, 2, "RGB"), "PNG")
    rgb = gradient(160, 120, "RGB")
    out["jpeg-baseline"] = save(rgb, "JPEG", quality=80)
    out["jpeg-progressive"] = save(rgb, "JPEG", quality=70, progressive=True)
    out["jpeg-grey"] = save(gradient(130, 100, "L"), "JPEG")
    out["jpeg-cmyk"] = save(gradient(96, 64, "CMYK"), "JPEG")
    out["jpeg-444"] = save(rgb, "JPEG", subsampling=0)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees clockwise
    out["jpeg-exif-rotated"] = save(gradient(120, 80, "RGB"), "JPEG", exif=exif.tobytes())
    # Restart markers: Pillow's `restart_marker_blocks` option where available.
    try:
        out["jpeg-restart"] = save(rgb, "JPEG", restart_marker_blocks=4)
    except (TypeError, ValueError, OSError):
        pass
    out["jpeg-tiny"] = save(gradient(9, 7, "RGB"), "JPEG")
    return out


def data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def bodies(imgs: dict[str, bytes]) -> dict[str, bytes]:
    png = data_url(imgs["png-RGBA"], "image/png")
    jpeg = data_url(imgs["jpeg-baseline"], "image/jpeg")
    tiny = data_url(imgs["png-tiny"], "image/png")
    out = {
        "text-only": json.dumps({"model": "m", "messages": [{"role": "user", "content": "hello"}]}),
        "object-form": json.dumps({"model": "m", "messages": [{"role": "user", "content": [
            {"type": "text", "text": "what?"}, {"type": "image_url", "image_url": {"url": png, "detail": "high"}}]}]}),
        "bare-form": json.dumps({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": jpeg}, {"type": "image_url", "image_url": "https://x/y.png"}]}]}),
        "mismatched-mime": json.dumps({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(imgs["png-RGB"], "image/jpeg")}}]}]}),
        "escaped": ('{"messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"'
                    + tiny.replace("/", "\\/") + '"}},{"type":"te\\u0078t","text":"\\u00e9\\n"}]}],'
                    '"str\\u0065am":true}'),
        "duplicates": ('{"messages":[1],"messages":[{"content":[{"type":"image_url","image_url":'
                       '{"url":"data:a","url":"' + tiny + '"}}]}],"model":"a","model":"b"}'),
        "numbers": ('{"model":"m","temperature":0.70,"seed":12345678901234567890123,"x":1e400,"y":-0.0,'
                    '"messages":[{"role":"system","content":null},{"role":"user","content":[{"type":"image_url",'
                    '"image_url":{"url":"' + tiny + '"}}]}],"stream":true,"stream_options":{"include_usage":true},'
                    '"max_completion_tokens":7,"mm_processor_kwargs":{"max_pixels":1003520}}'),
        "three-images": json.dumps({"model": "m", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": png}}, {"type": "image_url", "image_url": {"url": jpeg}},
            {"type": "image_url", "image_url": {"url": data_url(imgs["png-adam7"], "image/png")}}]}]}),
        "schema-error": '{"messages":[{"content":[{"type":"image_url"}]}]}',
        "deep": '{"messages":[{"x":' + '{"a":' * 200 + "1" + "}" * 200 + "}]}",
    }
    return {k: v.encode() for k, v in out.items()}


CONFIGS = {
    "empty": "",
    "defaults": "{}",
    "static": '{"policy":"static","static_budget_tokens":1024,"min_tokens_per_image":64,"max_image_pixels":1000000,'
              '"max_body_bytes":1048576,"max_images_per_request":4,"jpeg_quality":75,"resize_filter":"lanczos3",'
              '"fail_open":true,"paths":["/a","/b"],"sizing":{"patch_size":14,"merge_size":2,"min_pixels":3136,'
              '"max_pixels":1003520}}',
    "dynamic": '{"policy":"dynamic","ttft_slo_ms":800,"profile":{"encode_ms":{"table":[[0,10],[1000,40]]},'
               '"prefill_ms":{"a":1,"b":0.01,"c":0},"encode_replicas":2},"calibration":{"enabled":false},'
               '"encode_cluster":"encode_cluster","encode_fanout":"per_request","encode_failure":"fail",'
               '"metrics_poll_ms":500,"metrics_stale_ms":2000,"slo_min_ms":100,"slo_max_ms":5000}',
    "vanilla-odd-rule": '{"policy":"vanilla","sizing":{"patch_size":16,"merge_size":1,"min_pixels":256,'
                        '"max_pixels":65536},"min_tokens_per_image":1,"static_budget_tokens":1}',
    "bad-field": '{"polcy":"static"}',
}

PROMETHEUS = {
    "vllm": """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="Qwen/Qwen2.5-VL-3B-Instruct"} 2.0
vllm:num_requests_running{engine="1",model_name="a}b \\"q\\""} 1.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="Qwen/Qwen2.5-VL-3B-Instruct"} 7.0 1700000000000
vllm:time_to_first_token_seconds_bucket{le="+Inf",model_name="m"} 12.0
vllm:x -Inf
nan_metric NaN
garbage line {{{
""",
    "empty": "",
    "crlf": "a 1\r\nb{x=\"1\"} 2e3\r\n# c\r\n",
}


# Prefill answers (vLLM's NIXL connector's shape) for the prefill target.
PREFILL_ANSWERS = {
    "answer": '{"id":"c","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant",'
              '"content":"a"}}],"kv_transfer_params":{"do_remote_prefill":true,"do_remote_decode":false,'
              '"remote_engine_id":"e","remote_block_ids":[1,2,3],"remote_host":"10.0.0.1","remote_port":5600,'
              '"tp_size":1}}',
    "answer-null": '{"id":"c","kv_transfer_params":null}',
    "answer-none": '{"id":"c","choices":[]}',
    "answer-bad": '{"kv_transfer_params":[1]}',
    "answer-dup": '{"kv_transfer_params":{"a":1},"kv_transfer_params":{"b":2}}',
    "body-params": '{"messages":[],"kv_transfer_params":{"old":1},"stream":true,"stream_options":{}}',
}


def main() -> int:
    imgs = images()
    chat = bodies(imgs)
    seeds: dict[str, dict[str, bytes]] = {t: {} for t in (
        "request", "encode_requests", "prefill", "pipeline", "probe_decode", "datauri_base64", "config",
        "prometheus", "offload_answer")}
    for name, body in chat.items():
        seeds["request"][name] = body
        seeds["encode_requests"][name] = body
        seeds["prefill"]["body-" + name] = body
        seeds["pipeline"]["body-" + name] = b"\x00" + body
        seeds["pipeline"]["body-dynamic-" + name] = b"\x02" + body
    for name, data in imgs.items():
        seeds["probe_decode"][name] = data
        seeds["pipeline"]["image-" + name] = b"\x01" + data
        seeds["pipeline"]["image-dynamic-" + name] = b"\x03" + data
        seeds["datauri_base64"][name] = data_url(data, "image/png" if name.startswith("png") else "image/jpeg").encode()
    b64 = base64.b64encode(imgs["png-tiny"]).decode()
    seeds["datauri_base64"].update({
        "unpadded": ("data:image/png;base64," + b64.rstrip("=")).encode(),
        "wrapped": ("data:image/png;name=a.png;base64," + "\n".join(b64[i:i + 16] for i in range(0, len(b64), 16))).encode(),
        "upper": ("DATA:IMAGE/JPEG;BASE64," + b64).encode(),
        "remote": b"https://example.com/a.png",
        "webp": b"data:image/webp;base64,UklGRgAAAABXRUJQVlA4IA==",
    })
    for name, text in PREFILL_ANSWERS.items():
        seeds["prefill"][name] = text.encode()
    for name, data in imgs.items():
        # offload_answer: status 200, format, the image's own size, the image.
        try:
            img = Image.open(io.BytesIO(data))
        except OSError:
            continue
        fmt = b"\x00" if img.format == "PNG" else b"\x01"
        size = struct.pack("<HH", img.width, img.height)
        seeds["offload_answer"]["ok-" + name] = b"\x01" + fmt + size + data
        seeds["offload_answer"]["503-" + name] = b"\x03" + fmt + size + data
    seeds["offload_answer"]["headers"] = (b"\x01\x00\x10\x00\x10\x00x-vlm-target-width: 28\nx-vlm-target-height: 56\n"
                                          b"x-vlm-jpeg-quality: 85\nx-vlm-resize-filter: lanczos3\n")
    for name, text in CONFIGS.items():
        seeds["config"][name] = text.encode()
    for name, text in PROMETHEUS.items():
        seeds["prometheus"][name] = text.encode()
    for target, files in seeds.items():
        folder = OUT / target
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            (folder / f"seed-{name}").write_bytes(data)
    print(f"seeds: {sum(len(f) for f in seeds.values())} files in {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
