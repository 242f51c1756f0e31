"""Tensor parallelism through the real engine on CPU: profiles name global KV-head ids, each rank
serves its shard of them.

A tiny Llama (4 layers, 4 query / 2 KV heads) runs with TP=2, one KV head per rank, and a profile
whose retrieval heads fall differently on the ranks in every layer (rank 1 only, rank 0 only, none,
both); a second one with a single KV head, which vLLM replicates on both ranks. If a rank picked
the wrong heads, its local/retrieval split would differ from the TP=1 run's and so would the
log-probabilities; razor's own difference from stock (window 16 on prompts of up to 300 tokens)
shows the comparison can tell.
"""

from __future__ import annotations

import os
import random

import pytest

from razor_vllm.config import Provenance, RazorProfile, utc_now
from razor_vllm.profile.selectors import fingerprint_of

from engine_runs import EngineRun, engine_kwargs, run_engine
from tiny_models import build_tiny_llama

pytestmark = [
    pytest.mark.engine,
    pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="TP=2 on CPU binds one core per rank"),
]

# KV heads of the model -> retrieval heads per layer (global KV-head ids)
PROFILES = {2: [[1], [0], [], [0, 1]], 1: [[0], [], [0], []]}


@pytest.fixture(scope="module", params=sorted(PROFILES, reverse=True), ids=lambda n: f"{n}kv")
def tiny_model(request, tmp_path_factory):
    path = build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), num_kv_heads=request.param)
    profile = RazorProfile(
        model=fingerprint_of(path),
        sink=4,
        window=16,
        retrieval_heads=PROFILES[request.param],
        provenance=Provenance(method="manual", command="test", tool_version="0", created=utc_now()),
    )
    return path, profile.save(path / "razor-profile.yaml")


def generate(model, tp: int, razor: dict | None, monkeypatch) -> EngineRun:
    """Greedy tokens and their log-probabilities for three prompts (40, 150 and 300 tokens)."""
    # vLLM's CPU worker binds each rank's threads to a NUMA node; this machine has one.
    if tp > 1:
        monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(i) for i in range(tp)))
    else:
        monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    kwargs = engine_kwargs(
        model,
        "stock" if razor is None else "razor",
        razor,
        tensor_parallel_size=tp,
        max_model_len=512,
        kv_cache_memory_bytes=32 << 20,
        max_num_batched_tokens=64,
    )
    rng = random.Random(0)
    prompts = [{"prompt_token_ids": [rng.randrange(4, 500) for _ in range(n)]} for n in (40, 150, 300)]
    return run_engine(kwargs, prompts, max_tokens=16, logprobs=True)


def max_logprob_gap(a: EngineRun, b: EngineRun) -> float:
    return max(abs(x - y) for la, lb in zip(a.logprobs, b.logprobs) for x, y in zip(la, lb))


def test_each_rank_serves_its_shard_of_the_profile(tiny_model, monkeypatch):
    model, profile = tiny_model
    razor = {"profile": str(profile)}
    razor_tp1 = generate(model, 1, razor, monkeypatch)
    razor_tp2 = generate(model, 2, razor, monkeypatch)
    stock_tp2 = generate(model, 2, None, monkeypatch)
    assert razor_tp2.token_ids == razor_tp1.token_ids
    assert max_logprob_gap(razor_tp1, razor_tp2) < 1e-5  # only the all-reduce's rounding
    assert max_logprob_gap(razor_tp2, stock_tp2) > 1e-4  # razor's window does change the numbers
    all_retrieval = generate(model, 2, {"profile": str(profile), "all_retrieval": True}, monkeypatch)
    assert max_logprob_gap(all_retrieval, stock_tp2) < 1e-5
