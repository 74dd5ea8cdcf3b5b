"""GPU backend of vlm-budget: vLLM-style encode and prefill/decode servers running a
Qwen2.5-VL-3B-shaped vision tower and language model (random weights) on real devices, with the
backend emulator's HTTP API."""

__version__ = "0.1.0"
