"""Qwen2.5-VL-3B-shaped models with random weights, built from transformers' own modules.

Latency depends on shapes, not on weight values: the vision tower is transformers'
`Qwen2_5_VisionTransformerPretrainedModel` and the language model `Qwen2ForCausalLM`, both with
the real Qwen2.5-VL-3B configuration (`--config 3b`) or a tiny one for CPU tests (`--config tiny`),
initialised from a seed. What they generate is meaningless.
"""
from __future__ import annotations

import copy
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import Qwen2Config, Qwen2ForCausalLM
from transformers.models.qwen2 import modeling_qwen2 as mq2
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as mqv
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig

# The vision tower of Qwen2.5-VL-3B-Instruct (its config.json's vision_config).
VISION_3B = dict(
    depth=32,
    hidden_size=1280,
    num_heads=16,
    intermediate_size=3420,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    window_size=112,
    fullatt_block_indexes=[7, 15, 23, 31],
    out_hidden_size=2048,
    hidden_act="silu",
    in_channels=3,
    tokens_per_second=2,
)
# The language model of Qwen2.5-VL-3B-Instruct (Qwen2.5-3B-shaped). Ordinary 1-D RoPE instead
# of the 3-D M-RoPE: the same cost up to a few element-wise operations.
LM_3B = dict(
    vocab_size=151936,
    hidden_size=2048,
    intermediate_size=11008,
    num_hidden_layers=36,
    num_attention_heads=16,
    num_key_value_heads=2,
    max_position_embeddings=32768,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    use_sliding_window=False,
    hidden_act="silu",
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
)
# Qwen2.5-VL's <|vision_start|> and <|vision_end|> token ids.
VISION_START_3B, VISION_END_3B = 151652, 151653

# A tiny configuration of the same architecture for CPU tests (same patch/merge/window geometry,
# so the image path is exercised exactly).
VISION_TINY = dict(VISION_3B, depth=2, hidden_size=64, num_heads=2, intermediate_size=128,
                   fullatt_block_indexes=[1], out_hidden_size=64)
LM_TINY = dict(LM_3B, vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    vision: dict
    lm: dict
    vision_start: int
    vision_end: int

    @property
    def patch_size(self) -> int:
        return self.vision["patch_size"]

    @property
    def merge_size(self) -> int:
        return self.vision["spatial_merge_size"]

    @property
    def temporal_patch_size(self) -> int:
        return self.vision["temporal_patch_size"]

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token over all layers, in bytes, at 2 bytes a value."""
        lm = self.lm
        head_dim = lm["hidden_size"] // lm["num_attention_heads"]
        return 2 * lm["num_hidden_layers"] * lm["num_key_value_heads"] * head_dim * 2


SPECS = {
    "3b": ModelSpec("3b", VISION_3B, LM_3B, VISION_START_3B, VISION_END_3B),
    "tiny": ModelSpec("tiny", VISION_TINY, LM_TINY, 998, 999),
}


# ------------------------------------------------------------------------------- vision tower

class _WindowPlan:
    """Groups the attention chunks of one cu_seqlens tensor by length (one host sync per
    distinct cu_seqlens per forward; cleared by a forward pre-hook)."""

    def __init__(self):
        self.cache: dict = {}

    def clear(self, *_args, **_kw):
        self.cache.clear()

    def get(self, cu_seqlens: torch.Tensor) -> dict:
        key = (id(cu_seqlens), cu_seqlens.data_ptr(), cu_seqlens.numel())
        plan = self.cache.get(key)
        if plan is not None:
            return plan
        cu = cu_seqlens.tolist()
        lengths = [b - a for a, b in zip(cu[:-1], cu[1:])]
        if len(set(lengths)) == 1:
            plan = {"uniform": True, "L": lengths[0], "n": len(lengths)}
        else:
            groups: dict[int, list[int]] = {}
            for a, length in zip(cu[:-1], lengths):
                groups.setdefault(length, []).append(a)
            idx = []
            for length, starts in groups.items():
                st = torch.tensor(starts, dtype=torch.long)
                ix = (st[:, None] + torch.arange(length)[None, :]).reshape(-1).to(cu_seqlens.device)
                idx.append((length, len(starts), ix))
            plan = {"uniform": False, "groups": idx}
        self.cache[key] = plan
        return plan


def _attn_batched_sdpa(self, hidden_states, cu_seqlens, position_embeddings=None, max_seqlen=None, **kw):
    """Qwen2.5-VL vision attention with every window of equal length stacked into the batch
    dimension of one SDPA call per layer (transformers' stock code runs one SDPA call per window
    in a Python loop); the same math."""
    seq = hidden_states.shape[0]
    q, k, v = self.qkv(hidden_states).reshape(seq, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    q, k = mqv.apply_rotary_pos_emb_vision(q, k, cos, sin)
    heads, dim = q.shape[1], q.shape[2]
    plan = self._vlm_plan.get(cu_seqlens)
    if plan["uniform"]:
        n, length = plan["n"], plan["L"]
        qb, kb, vb = (t.reshape(n, length, heads, dim).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(qb, kb, vb, scale=self.scaling)
        out = out.transpose(1, 2).reshape(seq, heads * dim)
    else:
        out = q.new_empty(seq, heads, dim)
        for length, n, ix in plan["groups"]:
            qb, kb, vb = (t.index_select(0, ix).reshape(n, length, heads, dim).transpose(1, 2) for t in (q, k, v))
            og = F.scaled_dot_product_attention(qb, kb, vb, scale=self.scaling)
            out.index_copy_(0, ix, og.transpose(1, 2).reshape(n * length, heads, dim))
        out = out.reshape(seq, heads * dim)
    return self.proj(out)


VISION_ATTN = ("batched_sdpa", "hf_sdpa")


def set_vision_attention(model: torch.nn.Module, variant: str) -> None:
    if variant not in VISION_ATTN:
        raise ValueError(f"unknown vision attention {variant!r} (one of {', '.join(VISION_ATTN)})")
    plan = getattr(model, "_vlm_plan", None)
    if plan is None:
        plan = model._vlm_plan = _WindowPlan()
        model.register_forward_pre_hook(plan.clear)
    for blk in model.blocks:
        a = blk.attn
        if variant == "hf_sdpa":
            a.__dict__.pop("forward", None)
        else:
            a._vlm_plan = plan
            a.forward = types.MethodType(_attn_batched_sdpa, a)


def build_vision(spec: ModelSpec, device: torch.device, dtype: torch.dtype, seed: int,
                 attention: str = "batched_sdpa") -> torch.nn.Module:
    """The vision tower, weights drawn from `seed` (same seed, device type and dtype: same weights)."""
    cfg = Qwen2_5_VLVisionConfig(**spec.vision)
    torch.manual_seed(seed)
    with torch.device(device):
        model = mqv.Qwen2_5_VisionTransformerPretrainedModel._from_config(
            cfg, attn_implementation="sdpa", dtype=dtype)
    model = model.to(device).eval().requires_grad_(False)
    set_vision_attention(model, attention)
    return model


def copy_vision(model: torch.nn.Module, device: torch.device, attention: str) -> torch.nn.Module:
    """The same tower on another device (the PD role encodes its cache misses with it)."""
    other = copy.deepcopy(model).to(device)
    other.__dict__.pop("_vlm_plan", None)
    other._forward_pre_hooks.clear()
    set_vision_attention(other, attention)
    return other


# ------------------------------------------------------------------------------- language model

def build_lm(spec: ModelSpec, device: torch.device, dtype: torch.dtype, seed: int) -> Qwen2ForCausalLM:
    cfg = Qwen2Config(**spec.lm)
    torch.manual_seed(seed + 1)
    with torch.device(device):
        model = Qwen2ForCausalLM._from_config(cfg, attn_implementation="sdpa", dtype=dtype)
    return model.to(device).eval().requires_grad_(False)


class KvArena:
    """K/V of the running sequences: per layer one tensor [slots, kv_heads, max_len, head_dim].

    The running sequences always hold slots 0..n-1 (a sequence that finishes is replaced by the
    last one, whose K/V is moved), so a decode step attends over one contiguous block."""

    def __init__(self, lm: Qwen2ForCausalLM, slots: int, max_len: int):
        cfg = lm.config
        p = next(lm.parameters())
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        shape = (slots, cfg.num_key_value_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=p.dtype, device=p.device) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=p.dtype, device=p.device) for _ in range(cfg.num_hidden_layers)]
        self.slots = slots
        self.max_len = max_len
        self.used = 0

    @property
    def free(self) -> int:
        return self.slots - self.used

    def take(self) -> int:
        if self.used >= self.slots:
            raise IndexError("no free KV slot")
        self.used += 1
        return self.used - 1

    def give(self, slot: int, length: int = 0) -> int | None:
        """Frees `slot`; the last slot's sequence (`length` tokens) moves into it. Returns the
        slot that moved (now `slot`), or None."""
        last = self.used - 1
        if not 0 <= slot <= last:
            raise IndexError(f"slot {slot} is not in use")
        self.used -= 1
        if slot == last:
            return None
        for t in self.k + self.v:
            t[slot, :, :length].copy_(t[last, :, :length])
        return last

    def store_prefill(self, slot: int, cache) -> int:
        """Copies a transformers DynamicCache of one sequence into `slot`; returns its length."""
        n = 0
        for i, layer in enumerate(cache.layers):
            n = layer.keys.shape[-2]
            self.k[i][slot, :, :n].copy_(layer.keys[0])
            self.v[i][slot, :, :n].copy_(layer.values[0])
        return n


def _buckets(limit: int, values) -> list[int]:
    out = sorted({v for v in values if v < limit} | {limit})
    return out


class LanguageModel:
    """Prefill through transformers' `Qwen2ForCausalLM.forward` (inputs_embeds, KV cache kept),
    and batched decode steps over the model's own modules with the KV arena: one step advances
    every running sequence (slots 0..n-1) by one token, whatever its length (per-sequence
    positions and a length mask). On CUDA the decode step is captured as CUDA graphs, one per
    (batch, length) bucket, so that a step costs its GPU time rather than Python's launch time."""

    def __init__(self, lm: Qwen2ForCausalLM, spec: ModelSpec, slots: int, max_len: int, graphs: bool = True):
        self.lm = lm
        self.spec = spec
        self.cfg = lm.config
        self.arena = KvArena(lm, slots, max_len)
        self.embed = lm.get_input_embeddings()
        p = next(lm.parameters())
        self.device, self.dtype = p.device, p.dtype
        cfg = self.cfg
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = cfg.hidden_size // self.heads
        self.inv_freq = lm.model.rotary_emb.inv_freq.to(self.device, torch.float32)
        self.graphs: dict[tuple[int, int], tuple] = {}
        self.graph_error: str | None = None
        self.use_graphs = graphs and self.device.type == "cuda"
        self.batch_buckets = _buckets(slots, (1, 2, 4, 8, 12, 16, 24, 32, 48, 64))
        self.len_buckets = _buckets(max_len, (512, 1024, 2048, 4096, 6144, 8192, 12288, 16384))

    @torch.no_grad()
    def prefill(self, embeds: torch.Tensor) -> tuple[int, int]:
        """Prefills one sequence ([length, hidden] input embeddings) into the next slot; returns
        (slot, first token)."""
        from transformers import DynamicCache

        length = embeds.shape[0]
        if length >= self.arena.max_len:
            raise ValueError(f"prompt of {length} tokens does not fit the KV arena ({self.arena.max_len})")
        if self.arena.free == 0:
            raise IndexError("no free KV slot")
        cache = DynamicCache(config=self.cfg)
        pos = torch.arange(length, device=self.device)[None]
        out = self.lm(inputs_embeds=embeds[None], position_ids=pos, past_key_values=cache, use_cache=True,
                      logits_to_keep=1)
        token = int(out.logits[0, -1].argmax())
        slot = self.arena.take()
        try:
            self.arena.store_prefill(slot, out.past_key_values)
        except BaseException:
            self.arena.give(slot)  # the last slot: nothing moves
            raise
        return slot, token

    def release(self, slot: int, last_length: int = 0) -> int | None:
        """Frees `slot`; see KvArena.give."""
        return self.arena.give(slot, last_length)

    # -------------------------------------------------------------------------- decode

    def _step(self, tokens: torch.Tensor, pos: torch.Tensor, n_ctx: int) -> torch.Tensor:
        """Logits [b, vocab] of one decode step for slots 0..b-1 (b = len(tokens)), attending over
        the first n_ctx positions of the arena. Shapes depend only on (b, n_ctx): capturable."""
        b = tokens.shape[0]
        heads, kv_heads, d = self.heads, self.kv_heads, self.head_dim
        group = heads // kv_heads
        model = self.lm.model
        h = self.embed(tokens)[:, None, :]  # [b, 1, hidden]
        freqs = pos[:, None].float() * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(h.dtype)[:, None, :], emb.sin().to(h.dtype)[:, None, :]  # [b, 1, d]
        mask = (torch.arange(n_ctx, device=tokens.device)[None, :] <= pos[:, None])[:, None, None, :]
        rows = torch.arange(b, device=tokens.device)
        for i, layer in enumerate(model.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(b, heads, d)
            k = attn.k_proj(x).view(b, kv_heads, d)
            v = attn.v_proj(x).view(b, kv_heads, d)
            q = q * cos + mq2.rotate_half(q) * sin
            k = k * cos + mq2.rotate_half(k) * sin
            ka, va = self.arena.k[i], self.arena.v[i]
            ka[rows, :, pos] = k
            va[rows, :, pos] = v
            # Grouped-query attention without repeating K/V: the `group` query heads of each
            # K/V head attend as `group` queries of one head.
            o = F.scaled_dot_product_attention(q.view(b, kv_heads, group, d), ka[:b, :, :n_ctx], va[:b, :, :n_ctx],
                                               attn_mask=mask, scale=attn.scaling)
            h = h + attn.o_proj(o.reshape(b, 1, heads * d))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        h = model.norm(h)
        return self.lm.lm_head(h[:, 0])

    @torch.no_grad()
    def decode_logits(self, lengths: list[int], tokens: list[int]) -> torch.Tensor:
        """Eager decode step for slots 0..len(lengths)-1: `lengths[i]` tokens are cached and
        `tokens[i]` (at position lengths[i]) is the last sampled token. Returns [b, vocab]."""
        b = len(lengths)
        if b == 0 or b > self.arena.used:
            raise ValueError(f"decode of {b} sequences with {self.arena.used} slots in use")
        n_ctx = max(lengths) + 1
        if n_ctx > self.arena.max_len:
            raise ValueError("sequence longer than the KV arena")
        t = torch.tensor(tokens, dtype=torch.long, device=self.device)
        p = torch.tensor(lengths, dtype=torch.long, device=self.device)
        return self._step(t, p, n_ctx)

    @torch.no_grad()
    def decode_step(self, lengths: list[int], tokens: list[int]) -> list[int]:
        """Greedy next tokens of slots 0..len(lengths)-1 (through a CUDA graph when there is one)."""
        if self.use_graphs and self.graphs:
            b = len(lengths)
            n_ctx = max(lengths) + 1
            bb = next((x for x in self.batch_buckets if x >= b), None)
            lb = next((x for x in self.len_buckets if x >= n_ctx), None)
            g = self.graphs.get((bb, lb))
            if g is not None and n_ctx <= self.arena.max_len:
                graph, tok_buf, pos_buf, out_buf = g
                # Padding rows decode slots b..bb-1 (free or other sequences' slots at position 0
                # only if they are free): only rows >= used could collide, so pad with position 0
                # of slots that are not in use.
                if bb <= self.arena.slots and all(r >= self.arena.used for r in range(b, bb)):
                    tok_buf.zero_()
                    pos_buf.zero_()
                    tok_buf[:b].copy_(torch.tensor(tokens, dtype=torch.long), non_blocking=True)
                    pos_buf[:b].copy_(torch.tensor(lengths, dtype=torch.long), non_blocking=True)
                    graph.replay()
                    return out_buf[:b].tolist()
        return self.decode_logits(lengths, tokens).argmax(-1).tolist()

    @torch.no_grad()
    def capture_graphs(self) -> int:
        """Captures the decode step for every (batch, length) bucket. Returns how many; on a
        capture failure, decoding stays eager and the error is kept in graph_error."""
        if not self.use_graphs:
            return 0
        with torch.cuda.device(self.device):  # capture on this device's streams, not the current one's
            return self._capture_graphs()

    def _capture_graphs(self) -> int:
        pool = torch.cuda.graph_pool_handle()
        used = self.arena.used
        try:
            for bb in self.batch_buckets:
                tok_buf = torch.zeros(bb, dtype=torch.long, device=self.device)
                pos_buf = torch.zeros(bb, dtype=torch.long, device=self.device)
                for lb in self.len_buckets:
                    # Position lb-1 exercises the whole context; the arena's content is scratch
                    # here (no sequence is running during capture).
                    pos_buf.fill_(lb - 1)
                    s = torch.cuda.Stream(self.device)
                    s.wait_stream(torch.cuda.current_stream(self.device))
                    with torch.cuda.stream(s):
                        self._step(tok_buf, pos_buf, lb).argmax(-1)
                    torch.cuda.current_stream(self.device).wait_stream(s)
                    g = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g, pool=pool):
                        out = self._step(tok_buf, pos_buf, lb).argmax(-1)
                    self.graphs[(bb, lb)] = (g, tok_buf, pos_buf, out)
            torch.cuda.synchronize(self.device)
            # A replay must give what the eager step gives for the same inputs (both write the
            # same K/V at the same positions, so the order does not matter).
            for (bb, lb), (g, tok_buf, pos_buf, out) in list(self.graphs.items())[:: max(1, len(self.graphs) // 5)]:
                gen = torch.Generator(device="cpu").manual_seed(bb * 100003 + lb)
                tok = torch.randint(0, self.cfg.vocab_size, (bb,), generator=gen)
                pos = torch.randint(0, lb, (bb,), generator=gen)
                pos[0] = lb - 1
                want = self._step(tok.to(self.device), pos.to(self.device), lb).argmax(-1).tolist()
                tok_buf.copy_(tok)
                pos_buf.copy_(pos)
                g.replay()
                if out.tolist() != want:
                    raise RuntimeError(f"CUDA graph ({bb}, {lb}) disagrees with the eager step")
        except Exception as e:  # noqa: BLE001 - eager decoding still works
            self.graph_error = repr(e)
            self.graphs.clear()
        assert self.arena.used == used
        return len(self.graphs)

    def prompt_embeds(self, text_ids: torch.Tensor, images: list[torch.Tensor]) -> torch.Tensor:
        """[text tokens, then per image <vision_start> embeddings <vision_end>] as one
        [length, hidden] tensor: the image embeddings spliced between their marker tokens."""
        parts = [self.embed(text_ids.to(self.device))]
        marks = self.embed(torch.tensor([self.spec.vision_start, self.spec.vision_end], device=self.device))
        for e in images:
            parts += [marks[:1], e.to(self.device, self.dtype), marks[1:]]
        return torch.cat(parts, 0)
