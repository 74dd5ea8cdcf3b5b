"""smart_resize against the project's 5,968-case reference table and transformers' own rule."""
import json

import pytest
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

from conftest import ROOT
from vlm_gpu.sizing import SizeError, SizingRule, smart_resize


def test_reference_table():
    ref = json.loads((ROOT / "tests/data/smart_resize_reference.json").read_text())
    assert len(ref["cases"]) == 5968
    for c in ref["cases"]:
        args = (c["h"], c["w"], ref["factor"], c["min_pixels"], c["max_pixels"])
        if c["out"] is None:
            with pytest.raises(SizeError):
                smart_resize(*args)
        else:
            h, w = smart_resize(*args)
            assert [w, h] == c["out"], c


def test_agrees_with_transformers_where_both_accept():
    for w in range(28, 1200, 37):
        for h in range(28, 1200, 41):
            for lo, hi in ((3136, 12845056), (3136, 100352), (200704, 12845056)):
                assert smart_resize(h, w, 28, lo, hi) == hf_smart_resize(h, w, 28, lo, hi), (w, h, lo, hi)


def test_round_half_to_even_and_rejections():
    # 70 / 28 = 2.5 rounds to 2 (half to even), not 3.
    assert smart_resize(70, 70) == (56, 56)
    # 98 / 28 = 3.5 rounds to 4.
    assert smart_resize(98, 98) == (112, 112)
    rule = SizingRule()
    assert rule.tokens(3840, 2400) == (2408 // 28) * (3836 // 28)
    assert rule.tokens(1000, 1000) == 36 * 36
    with pytest.raises(SizeError):
        smart_resize(27, 500)
    with pytest.raises(SizeError):
        smart_resize(28, 28 * 201)
