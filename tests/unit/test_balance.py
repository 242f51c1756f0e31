"""One pool layout for every rank (razor_vllm/balance.py): pure planning, no engine."""

from __future__ import annotations

import pytest

from razor_vllm.balance import plan_scaleout, promotion_priority, resolve_mode
from razor_vllm.layout import plan_layout

# 6 layers x 2 KV heads, 4 retrieval heads on rank 0 and 1 on rank 1 at TP=2 (tiny_models.py says why)
from tiny_models import UNBALANCED_HEADS as HEADS
from tiny_models import UNBALANCED_SCORES as SCORES


def test_promotion_fills_the_lighter_rank_with_its_next_best_heads():
    plan = plan_scaleout(HEADS, 2, tp_size=2, mode="promote", priority=promotion_priority(SCORES))
    r0, r1 = plan.rank(0, 0), plan.rank(0, 1)
    assert (r0.profile_count, r0.count, r1.profile_count, r1.count) == (4, 4, 1, 4)
    assert r1.heads == ((0,), (), (0,), (), (0,), (0,))  # layers 0, 2 (profile), 4, 5 (promoted)
    assert plan.pool_heads == (4, 2)  # equal on both ranks: no local padding left either
    assert plan.served_global_heads() == [[0, 1], [0], [1], [0], [1], [0, 1]]
    assert plan.retrieval_heads_all_ranks() == (8, 5)
    assert "rank 1: 1+3 promoted" in plan.describe()


def test_padding_keeps_the_profile_and_sizes_pools_for_the_heaviest_rank():
    plan = plan_scaleout(HEADS, 2, tp_size=2, mode="pad")
    assert [r.count for r in plan.ranks] == [4, 1]
    assert plan.pool_heads == (4, 5)
    assert plan.served_global_heads() == HEADS
    # Both ranks plan the same pool specs from the shared pool head counts.
    layouts = [plan_layout(r.heads, 1, 32, 4, pool_heads=plan.pool_heads) for r in plan.ranks]
    shapes = {(lay.retrieval_pool_heads, lay.local_pool_heads, lay.retrieval_block_size) for lay in layouts}
    assert len(shapes) == 1
    # ... which the ranks' own counts would not give (vLLM's "specs ... different across workers").
    own = {plan_layout(r.heads, 1, 32, 4).retrieval_pool_heads for r in plan.ranks}
    assert len(own) == 2


def test_pipeline_stages_plan_their_own_layers_with_global_indices():
    stages = [range(0, 3), range(3, 6)]
    plan = plan_scaleout(
        HEADS, 2, tp_size=1, pp_size=2, mode="promote", priority=promotion_priority(SCORES), layers_per_stage=stages
    )
    s0, s1 = plan.rank(0, 0), plan.rank(1, 0)
    assert s0.layers == (0, 1, 2) and s1.layers == (3, 4, 5)
    assert (s0.profile_count, s1.profile_count) == (3, 2)
    # Stage 1 promotes its best local head: layer 4 head 1 (0.50) over layer 5 head 1 (0.20).
    assert s1.heads == ((0,), (1,), (0,))
    assert plan.pool_heads == (3, 3)


def test_priority_follows_each_score_in_units_of_its_ratio():
    scores = {"a": [[1.0, 0.9, 0.8, 0.7]], "b": [[0.0, 0.1, 0.2, 0.3]]}
    # a's ratio 0.5 selects heads 0, 1; b's 0.25 selects head 3: head 2 is next (a's 3rd of 4).
    prio = promotion_priority(scores, {"a": 0.5, "b": 0.25})
    assert sorted(prio, key=prio.get) == [(0, 0), (0, 3), (0, 1), (0, 2)]
    assert max(prio[(0, 0)], prio[(0, 1)], prio[(0, 3)]) < 1 <= prio[(0, 2)]


def test_replicated_kv_heads_balance_per_rank():
    # 1 KV head, TP=2: both ranks hold head 0 and see the same profile heads.
    plan = plan_scaleout([[0], [], [0], []], 1, tp_size=2, mode="pad")
    assert [r.count for r in plan.ranks] == [2, 2] and plan.balanced


def test_tp_balance_option():
    assert resolve_mode(None, True) == "promote" and resolve_mode(None, False) == "pad"
    with pytest.raises(ValueError, match="tp_balance=promote needs a profile with scores"):
        resolve_mode("promote", False)
    with pytest.raises(ValueError, match="tp_balance must be one of"):
        resolve_mode("even", True)


def test_pool_usage_of_every_engine_core_is_kept():
    """Data parallel: each engine core answers for its own block pool; the sums and each core's part."""
    from razor_vllm.serve.status import describe_usage
    from razor_vllm.vllm_compat import combine_pool_usage

    cores = [
        {"blocks_in_use": {"retrieval": 3, "local": 2}, "num_blocks": 100, "free_blocks": 95, "tokens": [300]},
        None,  # a core without razor pools answers None
        {"blocks_in_use": {"retrieval": 1, "local": 2}, "num_blocks": 100, "free_blocks": 97, "tokens": [40, 10]},
    ]
    usage = combine_pool_usage(cores)
    assert usage["blocks_in_use"] == {"retrieval": 4, "local": 4} and usage["num_blocks"] == 200
    assert [e["engine"] for e in usage["engines"]] == [0, 2]
    status = {"stock_block_size": 16, "kv_bytes_per_token": {"stock": 10}, "page_bytes_all_ranks": 1000}
    described = describe_usage(status, usage)
    assert described["kv_bytes"]["razor"] == 8000
    assert [(e["engine"], e["requests"], e["kv_bytes"]["razor"]) for e in described["engines"]] == [
        (0, 1, 5000),
        (2, 2, 3000),
    ]
    assert combine_pool_usage([None, None]) is None


def test_status_reports_every_ranks_heads_and_the_balancing_cost(tmp_path):
    """/razor/status's document for TP=2 (computed from the engine config, as the route does)."""
    from razor_vllm.serve.status import compute_status

    from tiny_models import unbalanced_tp2_config

    status = compute_status(unbalanced_tp2_config(tmp_path / "tiny"))
    balance = status["balance"]
    assert balance["mode"] == "promote"
    assert [(r["rank"], r["profile"], r["promoted"]) for r in balance["per_rank"]] == [(0, 4, 0), (1, 1, 3)]
    head_token_bytes = 2 * 32 * 4
    assert balance["retrieval_bytes_per_token"]["unbalanced"] == 5 * head_token_bytes
    assert balance["retrieval_bytes_per_token"]["pools"] == 8 * head_token_bytes
    assert status["retrieval_heads"]["served_per_layer"] == [[0, 1], [0], [1], [0], [1], [0, 1]]
    assert status["kv_bytes_per_token"]["retrieval"] >= 8 * head_token_bytes  # both ranks' pools, with padding
