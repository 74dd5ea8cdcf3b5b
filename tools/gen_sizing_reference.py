#!/usr/bin/env python3
"""Writes tests/data/smart_resize_reference.json: the Qwen2-VL `smart_resize`
rule (as in transformers' Qwen2-VL image processor, Python semantics:
round-half-to-even, float sqrt) evaluated on a fixed set of sizes, used as
the oracle of the Rust sizing unit tests. Run: python3 tools/gen_sizing_reference.py
"""
import json
import math
import pathlib

FACTOR = 28
BOUNDS = [(3136, 12845056), (3136, 1003520), (100000, 12845056), (3136, 784 * 256)]


def smart_resize(height, width, factor, min_pixels, max_pixels):
    if height < factor or width < factor:
        return None
    if max(height, width) / min(height, width) > 200:
        return None
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


def sizes():
    sides = [27, 28, 29, 41, 42, 43, 56, 70, 98, 126, 154, 182, 210, 224, 255, 256, 333,
             448, 480, 512, 640, 720, 768, 1000, 1024, 1080, 1920, 2400, 3640, 3840, 4000,
             5000, 5599, 5600, 5601, 7680, 10000, 20000]
    out = set()
    for w in sides:
        for h in sides:
            out.add((w, h))
    # extreme aspect ratios around the 200:1 limit
    for short in (28, 29, 30, 50, 100):
        for ratio in (199, 199.9, 200, 200.1, 201):
            out.add((int(short * ratio), short))
            out.add((short, int(short * ratio)))
    return sorted(out)


def main():
    rows = []
    for min_px, max_px in BOUNDS:
        for w, h in sizes():
            r = smart_resize(h, w, FACTOR, min_px, max_px)
            rows.append({"w": w, "h": h, "min_pixels": min_px, "max_pixels": max_px,
                         "out": None if r is None else [r[1], r[0]]})
    path = pathlib.Path(__file__).resolve().parent.parent / "tests/data/smart_resize_reference.json"
    path.write_text(json.dumps({"factor": FACTOR, "cases": rows}, separators=(",", ":")) + "\n")
    print(f"wrote {len(rows)} cases to {path}")


if __name__ == "__main__":
    main()
