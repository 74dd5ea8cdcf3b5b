"""The encoder cache: image embeddings keyed by a hash of the decoded pixels.

The encode role stores, the prefill/decode role looks up. In one process (`--role both`) it is an
LRU map of device tensors bounded in bytes (a hit is copied device to device); across processes
it is a directory with one safetensors file per key, named by the key's 32 hex digits, as vLLM's
shared-storage encoder-cache connector keeps one file per image hash.
"""
from __future__ import annotations

import os
import re
import threading
from collections import OrderedDict

import torch
from safetensors.torch import load_file, save_file

KEY = re.compile(r"^[0-9a-f]{32}$")


class MemoryCache:
    def __init__(self, capacity_bytes: int):
        self.capacity = capacity_bytes
        self.lock = threading.Lock()
        self.entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.bytes = 0

    def contains(self, key: str) -> bool:
        with self.lock:
            return key in self.entries

    def put(self, key: str, embeds: torch.Tensor) -> None:
        size = embeds.numel() * embeds.element_size()
        with self.lock:
            old = self.entries.pop(key, None)
            if old is not None:
                self.bytes -= old.numel() * old.element_size()
            self.entries[key] = embeds
            self.bytes += size
            while self.bytes > self.capacity and len(self.entries) > 1:
                _, ev = self.entries.popitem(last=False)
                self.bytes -= ev.numel() * ev.element_size()

    def get(self, key: str, device: torch.device) -> torch.Tensor | None:
        with self.lock:
            t = self.entries.get(key)
            if t is None:
                return None
            self.entries.move_to_end(key)
        return t.to(device)

    def clear(self) -> int:
        with self.lock:
            n = len(self.entries)
            self.entries.clear()
            self.bytes = 0
            return n


class DirCache:
    """One file per key in a directory shared by the roles' processes. The writer (the encode
    role) keeps its own files within `capacity_bytes`, oldest removed first."""

    def __init__(self, path: str, capacity_bytes: int):
        os.makedirs(path, exist_ok=True)
        self.path = path
        self.capacity = capacity_bytes
        self.lock = threading.Lock()
        self.written: OrderedDict[str, int] = OrderedDict()
        self.bytes = 0

    def _file(self, key: str) -> str:
        if not KEY.match(key):
            raise ValueError(f"bad cache key {key!r}")
        return os.path.join(self.path, key)

    def contains(self, key: str) -> bool:
        return os.path.isfile(self._file(key))

    def put(self, key: str, embeds: torch.Tensor) -> None:
        final = self._file(key)
        tmp = f"{final}.{os.getpid()}.{threading.get_ident()}.tmp"
        save_file({"embeds": embeds.detach().to("cpu").contiguous()}, tmp)
        os.replace(tmp, final)
        size = os.path.getsize(final)
        with self.lock:
            self.bytes -= self.written.pop(key, 0)
            self.written[key] = size
            self.bytes += size
            while self.bytes > self.capacity and len(self.written) > 1:
                old, n = self.written.popitem(last=False)
                self.bytes -= n
                try:
                    os.remove(self._file(old))
                except FileNotFoundError:
                    pass

    def get(self, key: str, device: torch.device) -> torch.Tensor | None:
        try:
            return load_file(self._file(key), device=str(device))["embeds"]
        except FileNotFoundError:
            return None

    def clear(self) -> int:
        n = 0
        for name in os.listdir(self.path):
            if KEY.match(name):
                try:
                    os.remove(os.path.join(self.path, name))
                    n += 1
                except FileNotFoundError:
                    pass
        with self.lock:
            self.written.clear()
            self.bytes = 0
        return n
