"""Which ``--kv-cache-dtype`` values razor serves on which platform, and how an fp8 cache is read.

vLLM stores an fp8 KV cache (``fp8`` = ``fp8_e4m3``, ``fp8_e5m2``) as uint8 with per-layer
per-tensor scales (``layer._k_scale``/``_v_scale``, stored = value / scale). Razor's pools hold one
byte per K/V element; each local page's tail still holds fp32 compensation sums (layout.tail_slots_for
gives 4 one-byte slots per head: 8*D bytes = 2 x D fp32), so the page arithmetic is unchanged.

Platform capability (RazorAttentionBackend.supported_kv_cache_dtypes is derived from this; the
start-up check in model_support refuses anything else, naming the option and what is supported):

- CPU: no fp8. vLLM's CPU backend does support fp8 KV (cpu_attn.py lists fp8/fp8_e4m3/fp8_e5m2 and
  needs AVX-512 or AMX), and razor's C++ kernels could dequantize the same way, but they read only
  16/32-bit caches today; refusing at start-up beats a wrong answer.
- CUDA: every Triton kernel reads or writes fp8 with vLLM's scales: the store
  (triton_kernels.cache_write, value / scale rounded to nearest), the retrieval path (vLLM's
  unified_attention, FP8_PER_TENSOR), the local heads' attention and block tails (tiles dequantized
  to fp32, stored * scale; the tails sum those, the dots take them in the query's dtype as vLLM's
  kernel does). The impl views the uint8 caches with ``fp8_view`` and passes the layer's
  ``_k_scale``/``_v_scale``. Checked against the float64 oracle in Triton's interpreter and compiled
  for sm_80/sm_90 (tests/kernels/test_triton_kernels.py); not yet run on a GPU or in an engine on one (the GPU
  check runs the same fp8 checks on the device).
"""

from __future__ import annotations

import os
from typing import Optional

import torch

BASE_KV_CACHE_DTYPES = ["auto", "bfloat16", "float16", "float32"]
FP8_KV_CACHE_DTYPES = ["fp8", "fp8_e4m3", "fp8_e5m2"]
FP8_TORCH_DTYPES = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
FP8_READY_ON_CUDA = True  # every kernel of both pools reads fp8; the impl passes layer._k_scale/_v_scale


def supported_kv_cache_dtypes(platform: Optional[str] = None) -> list[str]:
    """``--kv-cache-dtype`` values razor serves on ``platform`` ("cuda", "cpu"; None: vLLM's current one)."""
    if platform is None:
        from vllm.platforms import current_platform

        platform = "cuda" if current_platform.is_cuda() else "cpu"
    if platform == "cuda" and FP8_READY_ON_CUDA and not os.environ.get("RAZOR_VLLM_KERNELS"):
        # (RAZOR_VLLM_KERNELS = ops.KERNELS_ENV: forcing the reference/C++ kernels, which read no fp8)
        return BASE_KV_CACHE_DTYPES + FP8_KV_CACHE_DTYPES
    return list(BASE_KV_CACHE_DTYPES)


def fp8_view(cache: torch.Tensor, kv_cache_dtype: str) -> torch.Tensor:
    """vLLM's uint8 fp8 cache as the float8 type the kernels read (no copy); other caches unchanged."""
    fp8 = FP8_TORCH_DTYPES.get(kv_cache_dtype)
    if fp8 is None or cache.dtype == fp8:
        return cache
    if cache.dtype != torch.uint8:
        raise ValueError(f"an {kv_cache_dtype} KV cache is stored as uint8, got {cache.dtype}")
    return cache.view(fp8)
