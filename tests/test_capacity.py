"""Capacity in vLLM's own accounting: razor holds >= 3x as many long requests as stock in the same KV memory."""

from __future__ import annotations

import pytest
import torch

from razor_vllm.bench.capacity import measure_capacity
from razor_vllm.config import resolve_profile
from razor_vllm.layout import plan_layout
from razor_vllm.model import prepare_default_model
from razor_vllm.pools import RazorLocalSpec

pytestmark = [pytest.mark.engine, pytest.mark.default_model]

PROMPT_TOKENS, MAX_TOKENS, MAX_MODEL_LEN = 3000, 64, 4096
KV_BYTES = 160 << 20
CHUNK = 512  # prefill chunk: the local pool briefly holds one chunk of a prefilling request


def cdiv(a, b):
    return -(-a // b)


def theoretical_ratio(profile, window: int) -> float:
    """Steady-state bytes per request, stock / razor, from the profile, W, S and block sizes."""
    model = profile.model
    dtype_bytes = torch.tensor([], dtype=torch.bfloat16).element_size()
    head_token = 2 * model.head_size * dtype_bytes
    tokens = PROMPT_TOKENS + MAX_TOKENS
    stock = cdiv(tokens, 128) * 128 * model.num_layers * model.num_kv_heads * head_token
    layout = plan_layout(profile.retrieval_heads, model.num_kv_heads, 32, dtype_bytes)
    page = layout.page_slots() * head_token
    local = RazorLocalSpec(block_size=32, num_kv_heads=1, head_size=model.head_size, dtype=torch.bfloat16,
                           sliding_window=window, sink=profile.sink)
    local_blocks = local.sink_blocks + cdiv(window, 32) + 1
    razor = (cdiv(tokens, layout.retrieval_block_size) + local_blocks) * page
    return stock / razor


def test_razor_holds_3x_more_long_requests():
    model = prepare_default_model(progress=False)
    profile = resolve_profile("smollm2-135m-instruct")
    base = dict(
        model=str(model),
        max_model_len=MAX_MODEL_LEN,
        enforce_eager=True,
        kv_cache_memory_bytes=KV_BYTES,
        max_num_batched_tokens=CHUNK,
        max_num_seqs=32,
        seed=0,
    )
    num_requests = 12
    stock = measure_capacity(base, num_requests, PROMPT_TOKENS, MAX_TOKENS, "stock")
    razor = measure_capacity({**base, "attention_backend": "razor"}, num_requests, PROMPT_TOKENS, MAX_TOKENS, "razor")
    measured = razor.peak_running / stock.peak_running
    theory = theoretical_ratio(profile, profile.window)
    print(f"\npeak running: stock {stock.peak_running}, razor {razor.peak_running} "
          f"(measured {measured:.2f}x, theory {theory:.2f}x); blocks stock {stock.num_gpu_blocks}, razor {razor.num_gpu_blocks}")
    assert razor.peak_running < num_requests, "not saturated: submit more requests"
    assert theory >= 3.0
    assert measured >= 3.0
