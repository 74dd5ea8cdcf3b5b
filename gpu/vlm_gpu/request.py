"""Reading a chat request: parameters, text size, and every image decoded with Pillow.

The checks and error codes are those of the backend emulator (tools/emulator), so the two
backends refuse the same requests the same way.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import warnings
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, UnidentifiedImageError

from .sizing import SizeError, SizingRule

# The bomb check is ours (max_image_pixels, before decoding); Pillow's own would raise on
# pictures we are configured to accept.
Image.MAX_IMAGE_PIXELS = None

SUPPORTED_MIME = ("image/png", "image/jpeg", "image/jpg", "image/pjpeg")
SUPPORTED_FORMATS = ("PNG", "JPEG")


class ApiError(Exception):
    """A request refused, with its HTTP status and OpenAI-style error code."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param

    @classmethod
    def bad_request(cls, code: str, message: str) -> "ApiError":
        return cls(400, code, message)

    @classmethod
    def image(cls, index: int, code: str, detail: str) -> "ApiError":
        return cls(400, code, f"image {index}: {detail}", "messages")

    def kind(self) -> str:
        if self.status == 404:
            return "not_found_error"
        if 500 <= self.status <= 599:
            return "server_error"
        return "invalid_request_error"

    def to_json(self) -> bytes:
        return json.dumps({"error": {"message": self.message, "type": self.kind(), "param": self.param,
                                     "code": self.code}}).encode()


@dataclass
class ImageInfo:
    """One decoded image, ready for the processor."""

    sha256: str  # of the image file bytes
    width: int
    height: int
    visual_tokens: int
    resized: tuple[int, int]  # (height, width) by the Qwen rule
    key: str  # encoder-cache key: 32 hex digits over the pixels the model sees
    rgb: Image.Image = field(repr=False)  # decoded, converted to RGB

    @property
    def pixels(self) -> int:
        return self.width * self.height


@dataclass
class Params:
    model: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stream: bool = False
    include_usage: bool = False

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


@dataclass
class Analysis:
    params: Params
    images: list[ImageInfo]
    text_tokens: int
    body_hash: int

    @property
    def visual_tokens(self) -> int:
        return sum(i.visual_tokens for i in self.images)

    @property
    def prompt_tokens(self) -> int:
        """Text, visual tokens, and the vision start/end tokens of every image."""
        return self.text_tokens + self.visual_tokens + 2 * len(self.images)


def _reject_constant(name):
    raise ValueError(f"{name} is not valid JSON")


def _kind(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, (int, float)):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "array"
    return "object"


def _literal_len(s: str) -> int:
    """Bytes of a string as a JSON literal without its quotes (how the filter counts text)."""
    return len(json.dumps(s, ensure_ascii=False).encode()) - 2


def _uint(params: dict, key: str) -> int | None:
    v = params.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ApiError.bad_request("invalid_request", f"invalid chat request: `{key}` must be a non-negative integer")
    return v


def _params(top: dict) -> Params:
    model = top.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError.bad_request("invalid_request", "invalid chat request: `model` must be a string")
    stream = top.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise ApiError.bad_request("invalid_request", "invalid chat request: `stream` must be a boolean")
    opts = top.get("stream_options")
    include_usage = False
    if opts is not None:
        if not isinstance(opts, dict):
            raise ApiError.bad_request("invalid_request", "invalid chat request: `stream_options` must be an object")
        iu = opts.get("include_usage")
        if iu is not None and not isinstance(iu, bool):
            raise ApiError.bad_request("invalid_request", "invalid chat request: `include_usage` must be a boolean")
        include_usage = bool(iu)
    p = Params(model=model, max_tokens=_uint(top, "max_tokens"),
               max_completion_tokens=_uint(top, "max_completion_tokens"), stream=bool(stream),
               include_usage=include_usage)
    if p.requested_max_tokens() == 0:
        raise ApiError.bad_request("invalid_request", "max_tokens must be at least 1, got 0.")
    if opts is not None and not p.stream:
        raise ApiError.bad_request("invalid_request", "Stream options can only be defined when `stream=True`.")
    return p


def scan(body: bytes) -> tuple[dict, list[str], int]:
    """The parsed body, its image URLs in document order and its text bytes."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError.bad_request("invalid_json", f"request body is not valid JSON: invalid UTF-8: {e}") from None
    try:
        top = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        raise ApiError.bad_request("invalid_json", f"request body is not valid JSON: {e}") from None
    if not isinstance(top, dict):
        raise ApiError.bad_request("invalid_request", f"the request body must be an object, not {_kind(top)}")
    if "messages" not in top:
        raise ApiError.bad_request("invalid_request", "`messages` is required")
    messages = top["messages"]
    if not isinstance(messages, list):
        raise ApiError.bad_request("invalid_request", f"`messages` must be an array, not {_kind(messages)}")
    urls: list[str] = []
    text_bytes = 0
    for m, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ApiError.bad_request("invalid_request", f"messages[{m}] must be an object, not {_kind(message)}")
        if "content" not in message:
            continue
        content = message["content"]
        k = _kind(content)
        if k == "string":
            text_bytes += _literal_len(content)
        elif k == "null":
            pass
        elif k == "array":
            for p, part in enumerate(content):
                where = f"messages[{m}].content[{p}]"
                if not isinstance(part, dict):
                    raise ApiError.bad_request("invalid_request", f"{where} must be an object, not {_kind(part)}")
                if "type" not in part:
                    raise ApiError.bad_request("invalid_request", f"{where}.type is required")
                if not isinstance(part["type"], str):
                    raise ApiError.bad_request("invalid_request", f"{where}.type must be a string")
                if part["type"] == "image_url":
                    if "image_url" not in part:
                        raise ApiError.bad_request("invalid_request", f"{where}.image_url is required")
                    iu = part["image_url"]
                    if isinstance(iu, dict):
                        if "url" not in iu:
                            raise ApiError.bad_request("invalid_request", f"{where}.image_url.url is required")
                        iu = iu["url"]
                    if not isinstance(iu, str):
                        raise ApiError.bad_request("invalid_request", f"{where}.image_url.url must be a string")
                    urls.append(iu)
                elif part["type"] == "text" and isinstance(part.get("text"), str):
                    text_bytes += _literal_len(part["text"])
        else:
            raise ApiError.bad_request("invalid_request",
                                       f"messages[{m}].content must be a string or an array, not {k}")
    return top, urls, text_bytes


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB as vLLM converts images before its processor: transparency composited over white."""
    if img.mode == "RGB":
        return img
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def read_image(index: int, url: str, rule: SizingRule, max_image_pixels: int) -> ImageInfo:
    if url[:5].lower() != "data:":
        raise ApiError.image(index, "invalid_image_url",
                             "remote image URLs are not fetched by this server; send a data: URL")
    meta, comma, payload = url[5:].partition(",")
    if not comma:
        raise ApiError.image(index, "invalid_image_url", "malformed data URL: no comma")
    parts = meta.split(";")
    mime = parts[0].strip().lower()
    if not any(p.strip().lower() == "base64" for p in parts[1:]):
        raise ApiError.image(index, "invalid_image_url", "malformed data URL: not base64-encoded")
    if mime not in SUPPORTED_MIME:
        raise ApiError.image(index, "unsupported_image_type",
                             f"unsupported image type `{mime}` (only image/png and image/jpeg are supported)")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError.image(index, "invalid_base64", f"invalid base64: {e}") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ApiError.image(index, "corrupt_image", "not a PNG or JPEG image") from None
    except Exception as e:  # noqa: BLE001 - Pillow raises many kinds on bad headers
        raise ApiError.image(index, "corrupt_image", f"cannot read the image header: {e}") from None
    if img.format not in SUPPORTED_FORMATS:
        raise ApiError.image(index, "unsupported_image_type",
                             f"unsupported image format {img.format} (only PNG and JPEG are supported)")
    width, height = img.size
    if width * height > max_image_pixels:
        raise ApiError.image(index, "image_too_large", f"{width}x{height} is more than {max_image_pixels} pixels")
    try:
        img.load()
        rgb = to_rgb(img)
    except Exception as e:  # noqa: BLE001 - truncated or corrupt data
        raise ApiError.image(index, "corrupt_image", f"cannot decode the image: {e}") from None
    try:
        resized = rule.resize(height, width)
    except SizeError as e:
        raise ApiError.image(index, "invalid_image_size", str(e)) from None
    f = rule.factor
    return ImageInfo(
        sha256=hashlib.sha256(data).hexdigest(),
        width=width,
        height=height,
        visual_tokens=(resized[0] // f) * (resized[1] // f),
        resized=resized,
        key=pixel_key(rgb, rule),
        rgb=rgb,
    )


def pixel_key(rgb: Image.Image, rule: SizingRule) -> str:
    """Encoder-cache key: a 128-bit hash of the RGB pixels and the processor's sizing bounds
    (the inputs of the embeddings), as 32 lower-case hex digits."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{rgb.width}x{rgb.height};{rule.min_pixels};{rule.max_pixels};".encode())
    h.update(np.ascontiguousarray(np.asarray(rgb)).data)
    return h.hexdigest()


def analyse(body: bytes, rule: SizingRule, max_image_pixels: int) -> Analysis:
    top, urls, text_bytes = scan(body)
    params = _params(top)
    images = [read_image(i, u, rule, max_image_pixels) for i, u in enumerate(urls)]
    return Analysis(params=params, images=images, text_tokens=max(1, text_bytes // 4),
                    body_hash=int.from_bytes(hashlib.blake2b(body, digest_size=8).digest(), "little"))


def image_array(info: ImageInfo) -> np.ndarray:
    """The decoded picture, uint8 [H, W, 3] (read-only; the processor resizes it on its device)."""
    return np.asarray(info.rgb)


def resized_array(info: ImageInfo) -> np.ndarray:
    """The image resized by the Qwen rule (bicubic, as the processor does): uint8 [H, W, 3]."""
    h, w = info.resized
    img = info.rgb if info.rgb.size == (w, h) else info.rgb.resize((w, h), resample=Image.Resampling.BICUBIC)
    return np.array(img, dtype=np.uint8)  # writable: torch takes it without a copy
