"""The vision tower's batching, the batched decode against transformers' own forward, the caches."""
import numpy as np
import pytest
import torch

from vlm_gpu.cache import DirCache, MemoryCache
from vlm_gpu.engine import run_vision
from vlm_gpu.models import SPECS, LanguageModel, build_lm, build_vision, copy_vision, set_vision_attention

SPEC = SPECS["tiny"]
CPU = torch.device("cpu")


def image(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def vision():
    return build_vision(SPEC, CPU, torch.float32, seed=0)


def test_two_images_in_one_batch_equal_each_alone(vision):
    # 140x196 has partial attention windows (10x14 merged tokens, 4x4 windows): unequal chunks.
    a, b = image(140, 196, 1), image(112, 112, 2)
    together = run_vision(vision, SPEC, [a, b], CPU, torch.float32)
    alone = [run_vision(vision, SPEC, [x], CPU, torch.float32)[0] for x in (a, b)]
    assert [t.shape for t in together] == [(5 * 7, 64), (4 * 4, 64)]
    for t, s in zip(together, alone):
        torch.testing.assert_close(t, s, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(together[0][:16], together[1])


def test_batched_windows_equal_transformers_loop(vision):
    imgs = [image(140, 196, 3), image(56, 252, 4)]
    ours = torch.cat(run_vision(vision, SPEC, imgs, CPU, torch.float32))
    set_vision_attention(vision, "hf_sdpa")
    try:
        stock = torch.cat(run_vision(vision, SPEC, imgs, CPU, torch.float32))
    finally:
        set_vision_attention(vision, "batched_sdpa")
    torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-5)


def test_same_seed_same_weights_and_copies_agree(vision):
    x = [image(84, 112, 5)]
    ref = run_vision(vision, SPEC, x, CPU, torch.float32)[0]
    again = build_vision(SPEC, CPU, torch.float32, seed=0)
    other = build_vision(SPEC, CPU, torch.float32, seed=1)
    copied = copy_vision(vision, CPU, "batched_sdpa")
    torch.testing.assert_close(run_vision(again, SPEC, x, CPU, torch.float32)[0], ref)
    torch.testing.assert_close(run_vision(copied, SPEC, x, CPU, torch.float32)[0], ref)
    assert not torch.allclose(run_vision(other, SPEC, x, CPU, torch.float32)[0], ref)


def test_batched_decode_matches_transformers_forward():
    lm = build_lm(SPEC, CPU, torch.float32, seed=0)
    wrap = LanguageModel(lm, SPEC, slots=3, max_len=64)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randn(n, 64, generator=g) * 0.02 for n in (7, 19, 12)]
    seqs, lengths = [], []
    for i, p in enumerate(prompts):
        slot, tok = wrap.prefill(p)
        assert slot == i
        seqs.append([tok])
        lengths.append(p.shape[0])
    order = [0, 1, 2]  # sequence in each slot
    for step in range(5):
        if step == 2:
            # The middle sequence leaves: the last slot's sequence moves into its slot.
            assert wrap.release(1, lengths[order[2]]) == 2
            order = [0, 2]
        logits = wrap.decode_logits([lengths[i] for i in order], [seqs[i][-1] for i in order])
        for row, i in enumerate(order):
            # Reference: transformers over the whole sequence so far, no cache.
            full = torch.cat([prompts[i], lm.get_input_embeddings()(torch.tensor(seqs[i]))])
            want = lm(inputs_embeds=full[None], use_cache=False).logits[0, -1]
            torch.testing.assert_close(logits[row], want, rtol=1e-4, atol=1e-4)
            seqs[i].append(int(logits[row].argmax()))
            lengths[i] += 1
    assert len(seqs[0]) == 6 and len(seqs[1]) == 3 and len(seqs[2]) == 6
    args = ([lengths[i] for i in order], [seqs[i][-1] for i in order])
    assert wrap.decode_step(*args) == wrap.decode_logits(*args).argmax(-1).tolist()
    assert wrap.release(1) is None and wrap.release(0) is None and wrap.arena.used == 0


def test_prefill_first_token_is_transformers_argmax():
    lm = build_lm(SPEC, CPU, torch.float32, seed=0)
    wrap = LanguageModel(lm, SPEC, slots=1, max_len=32)
    img = torch.randn(4, 64)
    emb = wrap.prompt_embeds(torch.tensor([5, 6, 7]), [img])
    assert emb.shape == (3 + 1 + 4 + 1, 64)
    torch.testing.assert_close(emb[4:8], img)
    slot, tok = wrap.prefill(emb)
    assert tok == int(lm(inputs_embeds=emb[None]).logits[0, -1].argmax())
    with pytest.raises(IndexError):
        wrap.prefill(emb)  # no free slot
    wrap.release(slot)
    with pytest.raises(ValueError):
        wrap.prefill(torch.zeros(32, 64))


@pytest.mark.parametrize("kind", ["memory", "dir"])
def test_encoder_cache(kind, tmp_path):
    t = [torch.full((10, 8), float(i)) for i in range(3)]  # 320 bytes each
    c = MemoryCache(700) if kind == "memory" else DirCache(str(tmp_path / "ec"), 1000)
    keys = [f"{i:032x}" for i in range(3)]
    assert not c.contains(keys[0]) and c.get(keys[0], CPU) is None
    c.put(keys[0], t[0])
    c.put(keys[1], t[1])
    assert c.contains(keys[0])
    torch.testing.assert_close(c.get(keys[1], CPU), t[1])
    if kind == "memory":
        c.get(keys[0], CPU)  # most recently used: keys[1] goes first
    c.put(keys[2], t[2])
    evicted = keys[1] if kind == "memory" else keys[0]
    assert not c.contains(evicted)
    assert all(c.contains(k) for k in keys if k != evicted)
    if kind == "dir":
        other = DirCache(str(tmp_path / "ec"), 1000)  # another process's view
        torch.testing.assert_close(other.get(keys[2], CPU), t[2])
    assert c.clear() == 2
    assert not any(c.contains(k) for k in keys)
