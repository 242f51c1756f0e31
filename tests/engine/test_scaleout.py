"""Scale-out through the real engine on CPU with an unbalanced profile: TP=2 and PP=2.

A tiny Llama (6 layers, 4 query / 2 KV heads). Its profile puts 4 retrieval heads on TP rank 0's
shard (KV head 0) and 1 on rank 1's (KV head 1), and 3 on pipeline stage 0's layers and 2 on stage
1's: before ``balance.py`` the ranks planned different pool specs and vLLM refused to start.

- TP=2 ``pad`` serves exactly the profile: it must equal TP=1 with the profile.
- TP=2 ``promote`` (the default: the profile has scores) serves the profile plus rank 1's three
  next-best heads: it must equal TP=1 given that superset as its profile, and differ from the
  profile alone (so the comparison can tell which heads a rank serves).
- PP=2 (each stage its own pools, global layer indices) must equal TP=1 likewise.

Tolerance as tests/engine/test_tensor_parallel.py: tokens equal, log-probabilities within 1e-5 (the
all-reduce's rounding); razor's own effect at window 16 is ~1e-3.
"""

from __future__ import annotations

import os
import random

import pytest

from razor_vllm.balance import plan_scaleout, promotion_priority
from razor_vllm.config import Provenance, RazorProfile, utc_now
from razor_vllm.profile.selectors import fingerprint_of

from engine_runs import max_logprob_gap, tiny_model_run
from tiny_models import build_tiny_llama

pytestmark = [
    pytest.mark.engine,
    pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="two workers on CPU bind one core each"),
]

HEADS = [[0], [0], [1], [0], [], [0]]  # global KV-head ids per layer: rank 0 holds 4, rank 1 holds 1
SCORES = {"induction": [[0.9, 0.30], [0.8, 0.01], [0.1, 0.7], [0.6, 0.02], [0.05, 0.50], [0.5, 0.20]]}
TOLERANCE = 1e-5


def _profile(path, heads, scores=None):
    return RazorProfile(
        model=fingerprint_of(path),
        sink=4,
        window=16,
        retrieval_heads=heads,
        scores=scores or {},
        provenance=Provenance(method="manual", command="test", tool_version="0", created=utc_now()),
    )


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    path = build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-6"), num_layers=6)
    return path, _profile(path, HEADS, SCORES).save(path / "razor-profile.yaml")


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory):
    """TP=1 runs: the profile, and the superset that TP=2 promotion serves."""
    model, profile = tiny_model
    promoted = plan_scaleout(HEADS, 2, tp_size=2, mode="promote", priority=promotion_priority(SCORES))
    served = promoted.served_global_heads()
    assert served == [[0, 1], [0], [1], [0], [1], [0, 1]]  # rank 1 gains layers 0, 4, 5
    superset = _profile(model, served).save(tmp_path_factory.mktemp("promoted") / "promoted.yaml")
    return {
        "profile": tiny_model_run(model, {"profile": str(profile)}),
        "promoted": tiny_model_run(model, {"profile": str(superset)}),
    }


def test_tp2_unbalanced_profile_pad_equals_tp1(tiny_model, reference):
    model, profile = tiny_model
    run = tiny_model_run(model, {"profile": str(profile), "tp_balance": "pad"}, tp=2)
    assert run.token_ids == reference["profile"].token_ids
    assert max_logprob_gap(run, reference["profile"]) < TOLERANCE


def test_tp2_unbalanced_profile_promote_equals_tp1_with_promoted_heads(tiny_model, reference):
    model, profile = tiny_model
    run = tiny_model_run(model, {"profile": str(profile)}, tp=2)  # promote: the profile has scores
    assert run.token_ids == reference["promoted"].token_ids
    assert max_logprob_gap(run, reference["promoted"]) < TOLERANCE
    assert (
        max_logprob_gap(reference["promoted"], reference["profile"]) > 1e-4
    )  # the promoted heads do change the numbers


def test_pp2_stages_serve_their_own_layers(tiny_model, reference):
    model, profile = tiny_model
    # vLLM 0.32's CPU worker allocates a later stage's intermediate-tensor buffer only in its warm-up
    # run, which it skips in eager mode (CPUModelRunner.warming_up_model), so PP on CPU needs compilation.
    run = tiny_model_run(model, {"profile": str(profile), "tp_balance": "pad"}, pp=2, enforce_eager=False)
    assert run.token_ids == reference["profile"].token_ids
    assert max_logprob_gap(run, reference["profile"]) < TOLERANCE


def test_dp2_two_engine_cores_serve_and_report_their_own_pools(tiny_model, reference, tmp_path):
    """``vllm serve --data-parallel-size 2``: two engine cores, each with its own scheduler and pools;
    greedy completions equal the TP=1 engine's, and /razor/status and /metrics report both cores."""
    import json
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    from razor_vllm.serve.harness import vllm_server

    model, profile = tiny_model
    args = [
        "--attention-backend",
        "razor",
        "--dtype",
        "float32",
        "--max-model-len",
        "512",
        "--seed",
        "0",
        "--max-num-batched-tokens",
        "64",
        "--kv-cache-memory-bytes",
        str(32 << 20),
        "--enforce-eager",
        "--data-parallel-size",
        "2",
        "--additional-config",
        json.dumps({"razor": {"profile": str(profile)}}),
    ]
    env = {"VLLM_PLUGINS": "razor,razor_status", "VLLM_CPU_OMP_THREADS_BIND": "0|1"}  # one core per engine
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    rng = random.Random(0)
    prompts = [[rng.randrange(4, 500) for _ in range(n)] for n in (40, 150, 300)]  # as tiny_model_run

    with vllm_server(model, args, log_path=tmp_path / "server.log", timeout=900, env=env) as srv:

        def complete(ids):
            body = json.dumps({"model": str(model), "prompt": ids, "max_tokens": 16, "temperature": 0}).encode()
            req = urllib.request.Request(srv.url + "/v1/completions", body, {"Content-Type": "application/json"})
            with opener.open(req, timeout=300) as resp:
                return json.loads(resp.read())["choices"][0]["text"]

        with ThreadPoolExecutor(3) as pool:  # concurrent, so vLLM's load balancer uses both cores
            texts = list(pool.map(complete, prompts))
        with opener.open(srv.url + "/razor/status", timeout=60) as resp:
            status = json.loads(resp.read())
        with opener.open(srv.url + "/metrics", timeout=60) as resp:
            metrics = resp.read().decode()
        log = srv.log_text()

    assert texts == reference["profile"].texts
    engines = status["usage"]["engines"]
    assert [e["engine"] for e in engines] == [0, 1], status["usage"]
    assert all(e["num_blocks"] > 0 and set(e["blocks_in_use"]) == {"retrieval", "local"} for e in engines)
    assert status["usage"]["num_blocks"] == sum(e["num_blocks"] for e in engines)
    for engine in ("0", "1"):
        assert f'razor_engine_blocks_in_use{{engine="{engine}",pool="retrieval"}}' in metrics
    assert log.count("RAZOR: profile") >= 2, "each engine core's worker logs its pools"
