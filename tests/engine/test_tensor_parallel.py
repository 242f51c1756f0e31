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

import pytest

from razor_vllm.config import Provenance, RazorProfile, utc_now
from razor_vllm.profile.selectors import fingerprint_of

from engine_runs import max_logprob_gap, tiny_model_run
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


def test_each_rank_serves_its_shard_of_the_profile(tiny_model):
    model, profile = tiny_model
    razor = {"profile": str(profile)}
    razor_tp1 = tiny_model_run(model, razor)
    razor_tp2 = tiny_model_run(model, razor, tp=2)
    # Stock at TP=1 (an in-process engine: a TP=2 engine starts two worker processes): TP=2 differs
    # from it only by the all-reduce's rounding, as razor's TP=2 from razor's TP=1.
    stock_tp1 = tiny_model_run(model, None)
    assert razor_tp2.token_ids == razor_tp1.token_ids
    assert max_logprob_gap(razor_tp1, razor_tp2) < 1e-5  # only the all-reduce's rounding
    assert max_logprob_gap(razor_tp2, stock_tp1) > 1e-4  # razor's window does change the numbers
    all_retrieval = tiny_model_run(model, {"profile": str(profile), "all_retrieval": True}, tp=2)
    assert max_logprob_gap(all_retrieval, stock_tp1) < 1e-5
    print(
        f"log-prob gaps: razor TP1/TP2 {max_logprob_gap(razor_tp1, razor_tp2):.2e}, "
        f"all-retrieval TP2/stock TP1 {max_logprob_gap(all_retrieval, stock_tp1):.2e}, "
        f"razor TP2/stock TP1 {max_logprob_gap(razor_tp2, stock_tp1):.2e}"
    )
