"""vlm-gpu: the encode and prefill/decode servers on real devices.

    python3 -m vlm_gpu --role both --encode-device cuda:0 --pd-device cuda:1
    python3 -m vlm_gpu --role encode --encode-device cuda:0 --ec-cache-dir /dev/shm/ec
    python3 -m vlm_gpu --role pd --pd-device cuda:1 --ec-cache-dir /dev/shm/ec
    python3 -m vlm_gpu --config tiny --encode-device cpu --pd-device cpu      # CPU tests
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time

import numpy as np
import torch

from .cache import DirCache, MemoryCache
from .engine import EncodeEngine, PdEngine, run_vision, sync
from .models import SPECS, VISION_ATTN, LanguageModel, build_lm, build_vision, copy_vision
from .server import Options, Shared, log, start_instance
from .sizing import SizingRule


def default_device(index: int) -> str:
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n == 0:
        return "cpu"
    return f"cuda:{min(index, n - 1)}"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlm-gpu", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("roles and addresses")
    g.add_argument("--role", choices=("encode", "pd", "both"), default="both")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--encode-port", type=int, default=8100, help="0: any free port")
    g.add_argument("--pd-port", type=int, default=8200, help="0: any free port")
    g.add_argument("--model", default="Qwen/Qwen2.5-VL-3B-Instruct", help="served model name")
    g.add_argument("--ec-cache-dir", help="shared encoder-cache directory (roles in separate processes); "
                                          "default: in-process map (--role both)")
    g.add_argument("--ec-cache-bytes", type=int, default=8 << 30, help="encoder-cache capacity [8 GiB]")
    g = p.add_argument_group("models and devices")
    g.add_argument("--config", choices=sorted(SPECS), default="3b", help="model shapes [3b]")
    g.add_argument("--encode-device", default=None, help="[cuda:0, else cpu]")
    g.add_argument("--pd-device", default=None, help="[cuda:1, else cuda:0, else cpu]")
    g.add_argument("--dtype", choices=("auto", "bfloat16", "float32"), default="auto",
                   help="auto: bfloat16 on CUDA, float32 on CPU")
    g.add_argument("--vision-attention", choices=VISION_ATTN, default="batched_sdpa")
    g.add_argument("--resize", choices=("device", "pil"), default="device",
                   help="resize images on the vision tower's device (bicubic, antialiased, as the fast "
                        "processor does) or with Pillow on the CPU (as the slow processor does)")
    g.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    g.add_argument("--max-num-batched-tokens", type=int, default=16384, help="visual tokens per encoder batch")
    g.add_argument("--max-num-seqs", type=int, default=16, help="requests decoded together (KV slots)")
    g.add_argument("--max-model-len", type=int, default=32768, help="prompt + output tokens per request")
    g.add_argument("--default-output-tokens", type=int, default=64)
    g.add_argument("--max-output-tokens", type=int, default=512)
    g.add_argument("--no-warmup", action="store_true", help="skip the warm-up forwards (tests)")
    g.add_argument("--no-cuda-graphs", action="store_true", help="decode eagerly on CUDA too")
    g = p.add_argument_group("images")
    g.add_argument("--min-pixels", type=int, default=3136)
    g.add_argument("--max-pixels", type=int, default=12845056)
    g.add_argument("--max-image-pixels", type=int, default=178956970)
    g.add_argument("--max-body-bytes", type=int, default=256 << 20)
    g.add_argument("--debug-log-capacity", type=int, default=100000)
    return p


def dtype_for(device: torch.device, name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


class Backend:
    """Models, engines and servers of one process."""

    def __init__(self, args):
        self.args = args
        spec = SPECS[args.config]
        self.spec = spec
        rule = SizingRule(spec.patch_size, spec.merge_size, args.min_pixels, args.max_pixels)
        has_encode = args.role in ("encode", "both")
        has_pd = args.role in ("pd", "both")
        if args.ec_cache_dir:
            cache = DirCache(args.ec_cache_dir, args.ec_cache_bytes)
        elif args.role == "both":
            cache = MemoryCache(args.ec_cache_bytes)
        else:
            raise SystemExit("--role encode or pd needs --ec-cache-dir (the roles share the encoder cache)")
        self.cache = cache
        opts = Options(model=args.model, rule=rule, max_image_pixels=args.max_image_pixels,
                       max_body_bytes=args.max_body_bytes, default_output_tokens=args.default_output_tokens,
                       max_output_tokens=args.max_output_tokens, max_model_len=args.max_model_len,
                       debug_log_capacity=args.debug_log_capacity, seed=args.seed, resize=args.resize)
        self.shared = Shared(opts, cache)
        self.servers = []
        self.instances = {}
        self.encode_engine = self.pd_engine = None
        t0 = time.time()
        vision = None
        if has_encode:
            dev = torch.device(args.encode_device or default_device(0))
            dt = dtype_for(dev, args.dtype)
            vision = build_vision(spec, dev, dt, args.seed, args.vision_attention)
            self.encode_engine = EncodeEngine(vision, spec, dev, dt, cache, args.max_num_batched_tokens, None)
            log(f"vlm-gpu: vision tower on {dev} ({dt}), "
                f"{sum(p.numel() for p in vision.parameters()) / 1e6:.1f}M parameters")
        if has_pd:
            dev = torch.device(args.pd_device or default_device(1))
            dt = dtype_for(dev, args.dtype)
            pd_vision = (copy_vision(vision, dev, args.vision_attention).to(dt) if vision is not None
                         else build_vision(spec, dev, dt, args.seed, args.vision_attention))
            lm = build_lm(spec, dev, dt, args.seed)
            lmw = LanguageModel(lm, spec, args.max_num_seqs, args.max_model_len, graphs=not args.no_cuda_graphs)
            self.pd_engine = PdEngine(lmw, pd_vision, spec, dev, dt, cache, None, args.resize)
            log(f"vlm-gpu: language model on {dev} ({dt}), {sum(p.numel() for p in lm.parameters()) / 1e6:.1f}M "
                f"parameters, KV arena {args.max_num_seqs} x {args.max_model_len} tokens")
        self.build_s = time.time() - t0
        if not args.no_warmup:
            self.warmup()
        if has_encode:
            srv, inst = start_instance("encode", self.shared, self.encode_engine, args.host, args.encode_port)
            self.encode_engine.metrics = inst.metrics
            self.servers.append(srv)
            self.instances["encode"] = inst
        if has_pd:
            srv, inst = start_instance("pd", self.shared, self.pd_engine, args.host, args.pd_port)
            self.pd_engine.metrics = inst.metrics
            self.servers.append(srv)
            self.instances["pd"] = inst

    def url(self, role: str) -> str | None:
        for srv in self.servers:
            if srv.RequestHandlerClass.instance.role == role:
                host, port = srv.server_address[:2]
                return f"http://{host}:{port}"
        return None

    def warmup(self) -> None:
        """First calls pay for kernel selection and allocator growth; do them before serving."""
        for e in (self.encode_engine, self.pd_engine):
            if e is not None and e.device.type == "cuda":
                with torch.cuda.device(e.device):
                    self._warmup(e)
            elif e is not None:
                self._warmup(e)

    def _warmup(self, engine) -> None:
        t0 = time.time()
        rng = np.random.default_rng(0)
        sides = (224, 448, 1008) if self.spec.name == "3b" else (56, 112)
        if engine is self.encode_engine:
            e = self.encode_engine
            for s in sides:
                run_vision(e.model, self.spec, [rng.integers(0, 255, (s, s, 3), dtype=np.uint8)], e.device, e.dtype)
            run_vision(e.model, self.spec, [rng.integers(0, 255, (s, s, 3), dtype=np.uint8) for s in sides],
                       e.device, e.dtype)
            sync(e.device)
        if engine is self.pd_engine:
            p = self.pd_engine
            lm = p.lm
            img = run_vision(p.vision, self.spec, [rng.integers(0, 255, (sides[-1],) * 2 + (3,), dtype=np.uint8)],
                             p.device, p.dtype)
            for n in (16, 300):
                emb = lm.prompt_embeds(torch.arange(n), img)
                _, tok = lm.prefill(emb)
                length = emb.shape[0]
                _, tok2 = lm.prefill(emb[: length // 2])
                for i in range(3):
                    tok, tok2 = lm.decode_step([length + i, length // 2 + i], [tok, tok2])
                lm.release(1)
                lm.release(0)
            sync(p.device)
            t1 = time.time()
            n = lm.capture_graphs()
            if lm.use_graphs:
                log(f"vlm-gpu: {n} decode CUDA graphs captured in {time.time() - t1:.1f}s"
                    + (f" (failed, decoding eagerly: {lm.graph_error})" if lm.graph_error else ""))
        log(f"vlm-gpu: warm-up {time.time() - t0:.1f}s")

    def shutdown(self) -> None:
        for srv in self.servers:
            srv.shutdown()
            srv.server_close()
        for e in (self.encode_engine, self.pd_engine):
            if e is not None:
                e.stop()


def environment() -> dict:
    import PIL
    import transformers

    env = {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
           "pillow": PIL.__version__, "numpy": np.__version__, "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return env


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    torch.set_grad_enabled(False)
    backend = Backend(args)
    parts = [f"{r} {backend.url(r)}" for r in ("encode", "pd") if backend.url(r)]
    print(f"vlm-gpu listening: {' '.join(parts)} ({json.dumps(environment())}, config {args.config}, "
          f"built in {backend.build_s:.1f}s)", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    backend.shutdown()
    os._exit(0)  # the GPU worker threads are daemons blocked in their queues
