"""The Qwen2-VL image processor's arithmetic on tensors: resize, rescale, normalise, patchify.

An image resized by the Qwen rule (uint8, H x W x 3, both sides multiples of 28) becomes
`pixel_values` of shape (grid_t * grid_h * grid_w, 3 * temporal_patch * patch * patch) and
`image_grid_thw` = (1, H / 14, W / 14): a still image is one frame repeated temporal_patch (2)
times, exactly as transformers' Qwen2-VL image processor lays it out. Runs on the device that
holds the vision tower, so only the uint8 picture crosses the bus. The resize to the rule's size
happens there too when `size` is given: bicubic with antialiasing, rounded back to 8 bits, as
transformers' fast (torchvision) Qwen2-VL processor, vLLM's default, does it.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F

# OpenAI CLIP's normalisation, which the Qwen2-VL processor uses.
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def patchify(image: np.ndarray | torch.Tensor, patch_size: int = 14, merge_size: int = 2,
             temporal_patch_size: int = 2, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32,
             size: tuple[int, int] | None = None) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """(pixel_values, (grid_t, grid_h, grid_w)) of one uint8 HxWx3 image, first resized to
    `size` = (height, width) if given and different."""
    if isinstance(image, np.ndarray):
        with warnings.catch_warnings():  # read-only arrays: only read here
            warnings.simplefilter("ignore")
            t = torch.from_numpy(image)
    else:
        t = image
    if t.dtype != torch.uint8 or t.ndim != 3 or t.shape[2] != 3:
        raise ValueError(f"expected a uint8 HxWx3 image, got {tuple(t.shape)} {t.dtype}")
    t = t.to(device, non_blocking=True).permute(2, 0, 1).float()  # [C, H, W]
    if size is not None and tuple(size) != tuple(t.shape[1:]):
        t = F.interpolate(t[None], size=tuple(size), mode="bicubic", align_corners=False, antialias=True)[0]
        t = t.round_().clamp_(0, 255)
    height, width = t.shape[1], t.shape[2]
    factor = patch_size * merge_size
    if height % factor or width % factor:
        raise ValueError(f"{width}x{height} is not a multiple of {factor} on both sides")
    mean = torch.tensor(MEAN, device=t.device).view(3, 1, 1)
    std = torch.tensor(STD, device=t.device).view(3, 1, 1)
    t = (t * (1.0 / 255.0) - mean) / std
    gh, gw = height // patch_size, width // patch_size
    p = t.reshape(3, gh // merge_size, merge_size, patch_size, gw // merge_size, merge_size, patch_size)
    p = p.permute(1, 4, 2, 5, 0, 3, 6)  # (gh/m, gw/m, mh, mw, C, ph, pw)
    p = p[:, :, :, :, :, None].expand(*p.shape[:5], temporal_patch_size, *p.shape[5:])
    pixel_values = p.reshape(gh * gw, 3 * temporal_patch_size * patch_size * patch_size).to(dtype)
    return pixel_values, (1, gh, gw)
