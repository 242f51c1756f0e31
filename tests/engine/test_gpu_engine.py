"""The backend on a CUDA GPU through the real engine: Triton kernels and full CUDA graphs.

CI has no GPU, so everything here skips there; on a lent GPU run ``pytest -v tests/engine/test_gpu_engine.py``.
Compiled engines with vLLM's default ``FULL_AND_PIECEWISE`` mode replay decode batches from full
CUDA graphs (attention included); ``PIECEWISE`` runs attention eagerly between graph pieces. Same
kernels, same padding, so the greedy tokens must be identical: a capture that baked in a stale
address or a host-side value shows up as different tokens (or NaN).
"""

from __future__ import annotations

import pytest
import torch

from engine_runs import GENERAL_PROMPTS, PASSKEY_PROMPTS, PASSKEYS, engine_kwargs, run_engine

pytestmark = [
    pytest.mark.engine,
    pytest.mark.gpu,
    pytest.mark.default_model,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

RAZOR = {"window": 128}
PROMPTS = GENERAL_PROMPTS + PASSKEY_PROMPTS


def gpu_kwargs(model_dir, backend: str, razor=None, cudagraph_mode: str = "FULL_AND_PIECEWISE", **overrides):
    return engine_kwargs(
        model_dir,
        backend,
        razor,
        dtype="bfloat16",
        enforce_eager=False,
        compilation_config={"cudagraph_mode": cudagraph_mode, "cudagraph_capture_sizes": [1, 2, 4, 8, 16]},
        gpu_memory_utilization=0.3,
        kv_cache_memory_bytes=None,
        **overrides,
    )


def test_razor_keeps_full_cuda_graphs(default_model_dir, monkeypatch):
    """vLLM downgrades the mode when a builder cannot replay decode batches from a full graph; with
    the engine in this process the resolved mode is readable from the shared config."""
    from vllm import LLM, SamplingParams
    from vllm.config import CUDAGraphMode

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    llm = LLM(**gpu_kwargs(default_model_dir, "razor", RAZOR))
    try:
        assert llm.llm_engine.vllm_config.compilation_config.cudagraph_mode == CUDAGraphMode.FULL_AND_PIECEWISE
        out = llm.generate(PROMPTS[:3], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
        assert all(len(o.outputs[0].token_ids) == 8 for o in out)
    finally:
        llm.llm_engine.engine_core.shutdown()


def test_full_cuda_graphs_give_the_eager_attention_tokens(default_model_dir):
    full = run_engine(gpu_kwargs(default_model_dir, "razor", RAZOR), PROMPTS * 2, max_tokens=24)
    piecewise = run_engine(gpu_kwargs(default_model_dir, "razor", RAZOR, "PIECEWISE"), PROMPTS * 2, max_tokens=24)
    for i, (got, want) in enumerate(zip(full.token_ids, piecewise.token_ids)):
        assert got == want, f"prompt {i}: full graphs {full.texts[i]!r} vs piecewise {piecewise.texts[i]!r}"


def test_razor_answers_passkeys_on_gpu(default_model_dir):
    """The CPU engine test's claim (razor finds needles 11x-15x past the window) on the GPU kernels."""
    razor = run_engine(gpu_kwargs(default_model_dir, "razor", RAZOR), PASSKEY_PROMPTS, max_tokens=12)
    stock = run_engine(gpu_kwargs(default_model_dir, "stock"), PASSKEY_PROMPTS, max_tokens=12)

    found_stock = [key in text for key, text in zip(PASSKEYS, stock.texts)]
    found_razor = [key in text for key, text in zip(PASSKEYS, razor.texts)]
    assert all(found_stock), stock.texts
    assert sum(found_razor) >= 2, razor.texts


def test_all_retrieval_matches_stock_flash_attention(default_model_dir):
    """Every head retrieval: razor's retrieval path (vLLM's unified_attention on our pool) against
    stock FLASH_ATTN. bf16 kernels accumulate in different orders, so allow rare late divergence."""
    stock = run_engine(gpu_kwargs(default_model_dir, "stock", attention_backend="FLASH_ATTN"), PROMPTS, max_tokens=16)
    razor = run_engine(gpu_kwargs(default_model_dir, "razor", {"all_retrieval": True}), PROMPTS, max_tokens=16)
    first_tokens = [a[:4] == b[:4] for a, b in zip(stock.token_ids, razor.token_ids)]
    assert all(first_tokens), list(zip(stock.texts, razor.texts))
    same = sum(x == y for a, b in zip(stock.token_ids, razor.token_ids) for x, y in zip(a, b))
    assert same >= 0.9 * sum(len(a) for a in stock.token_ids)
