"""Capacity in vLLM's own accounting: razor holds >= 3x as many long requests as stock in the same KV memory
(with the paper's 15% share of retrieval heads and window 256, pinned below)."""

from __future__ import annotations

import pytest

from razor_vllm.bench.analytic import geometry
from razor_vllm.bench.capacity import measure_capacity
from razor_vllm.config import resolve_profile
from razor_vllm.eval.variants import share_profile
from razor_vllm.model import prepare_default_model

from engine_runs import in_engine_process

pytestmark = [pytest.mark.engine, pytest.mark.default_model]

PROMPT_TOKENS, MAX_TOKENS, MAX_MODEL_LEN = 3000, 64, 4096
KV_BYTES = 160 << 20
CHUNK = 512  # prefill chunk: the local pool briefly holds one chunk of a prefilling request


def theoretical_ratio(profile, window: int) -> float:
    """Steady-state bytes per request, stock / razor, from the profile, W, S and block sizes."""
    geo = geometry(profile, "bfloat16", window=window)
    tokens = PROMPT_TOKENS + MAX_TOKENS
    stock = geo.stock_blocks(tokens) * geo.stock_block_bytes
    return stock / (geo.razor_steady_pages(tokens) * geo.page_bytes)


def test_razor_holds_3x_more_long_requests(tmp_path):
    model = prepare_default_model(progress=False)
    # Pinned to the paper's share of the shipped profile's scores (14/90 heads) and window 256: the
    # profile shipped before its share was calibrated. The shipped profile (35/90 heads, window 128)
    # keeps 2.2x as many of these requests in theory, not 3x; the property under test (vLLM's own
    # accounting admits what the profile's arithmetic says) is the same.
    profile = share_profile(resolve_profile("smollm2-135m-instruct"), 0.15).model_copy(update=dict(window=256))
    assert profile.num_retrieval_heads == 14
    path = profile.save(tmp_path / "paper-share.yaml")
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
    stock = in_engine_process(measure_capacity, base, num_requests, PROMPT_TOKENS, MAX_TOKENS, "stock")
    razor_kwargs = {**base, "attention_backend": "razor", "additional_config": {"razor": {"profile": str(path)}}}
    razor = in_engine_process(measure_capacity, razor_kwargs, num_requests, PROMPT_TOKENS, MAX_TOKENS, "razor")
    measured = razor.peak_running / stock.peak_running
    theory = theoretical_ratio(profile, profile.window)
    print(
        f"\npeak running: stock {stock.peak_running}, razor {razor.peak_running} "
        f"(measured {measured:.2f}x, theory {theory:.2f}x); "
        f"blocks stock {stock.num_gpu_blocks}, razor {razor.num_gpu_blocks}"
    )
    assert razor.peak_running < num_requests, "not saturated: submit more requests"
    assert theory >= 3.0
    assert measured >= 3.0
