"""The Qwen2-VL / Qwen2.5-VL image sizing rule (`smart_resize`).

Python's `round` is round-half-to-even, which is what the rule relies on
(`round(2.5) == 2`); `math.floor`/`math.ceil` and a float `sqrt` as in
transformers' image processor.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

PATCH_SIZE = 14
MERGE_SIZE = 2
FACTOR = PATCH_SIZE * MERGE_SIZE  # 28 pixels per visual token side
MIN_PIXELS = 3136  # 4 tokens
MAX_PIXELS = 12845056  # 16,384 tokens (the Qwen2.5-VL checkpoints' preprocessor config)
MAX_ASPECT = 200


class SizeError(ValueError):
    """An image the rule refuses (a side under one token, or aspect over 200:1)."""


@dataclass(frozen=True)
class SizingRule:
    patch_size: int = PATCH_SIZE
    merge_size: int = MERGE_SIZE
    min_pixels: int = MIN_PIXELS
    max_pixels: int = MAX_PIXELS

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def resize(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) the processor resizes a height x width image to."""
        return smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)

    def tokens(self, width: int, height: int) -> int:
        """Visual tokens of a width x height image (before the 2 vision start/end tokens)."""
        h, w = self.resize(height, width)
        return (h // self.factor) * (w // self.factor)


def smart_resize(height: int, width: int, factor: int = FACTOR, min_pixels: int = MIN_PIXELS,
                 max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    if height < factor or width < factor:
        raise SizeError(f"height:{height} or width:{width} must be at least {factor}")
    if max(height, width) / min(height, width) > MAX_ASPECT:
        raise SizeError(f"absolute aspect ratio must be at most {MAX_ASPECT}, got "
                        f"{max(height, width) / min(height, width)}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar
