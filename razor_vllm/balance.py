"""One pool layout for every rank of a tensor- and pipeline-parallel engine.

vLLM merges the KV-cache specs of all workers and requires a cache layer to have the same spec
on every worker that holds it, and the hybrid allocator requires every KV group's page to be the
same size. A profile picks retrieval heads globally (its top-k), so the heads that fall on one
tensor-parallel rank's shard, or on one pipeline stage's layers, are rarely as many as on another.
Every worker therefore computes the *whole* plan (every stage, every rank) from the profile alone,
deterministically and without communication, and sizes its pools for the heaviest rank:

- ``pool_heads`` = (max retrieval heads, max local heads) over all ranks of all stages, so every
  pool spec is equal (the stages' pools differ only in name, ``pools.pool_names``);
- spare retrieval slots of a lighter rank cost memory whether used or not. With ``promote`` (the
  default when the profile stores scores) they are filled with that rank's next-best heads by the
  profile's own ranking, across its layers: the memory is what the heaviest rank needs anyway and
  a promoted head only gains a full cache. ``pad`` leaves them empty (the exact profile).

Departure from the paper: RazorAttention picks a global top-k and does not discuss parallelism.
Promotion serves a superset of the profile's heads; it never serves fewer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

from razor_vllm.layout import PoolLayout, plan_layout, shard_kv_heads

BALANCE_MODES = ("promote", "pad")


def stage_layers(num_layers: int, pp_size: int) -> list[range]:
    """Global layer indices of each pipeline stage, as vLLM splits them (``get_pp_indices``,
    which honours ``VLLM_PP_LAYER_PARTITION``)."""
    if pp_size == 1:
        return [range(num_layers)]
    from vllm.distributed.utils import get_pp_indices

    return [range(*get_pp_indices(num_layers, stage, pp_size)) for stage in range(pp_size)]


def kv_heads_per_rank(num_kv_heads: int, tp_size: int) -> int:
    return num_kv_heads // tp_size if tp_size <= num_kv_heads else 1


def rank_global_heads(num_kv_heads: int, tp_size: int, tp_rank: int) -> list[int]:
    """The global KV heads ``tp_rank`` holds, in rank-local order (vLLM's split or replication)."""
    if tp_size <= num_kv_heads:
        per = num_kv_heads // tp_size
        return list(range(tp_rank * per, (tp_rank + 1) * per))
    return [tp_rank * num_kv_heads // tp_size]


def promotion_priority(
    scores: Mapping[str, Sequence[Sequence[float]]], ratios: Optional[Mapping[str, float]] = None
) -> dict[tuple[int, int], float]:
    """(layer, kv_head) -> priority, lower first: how deep into each score's ranking a head sits,
    in units of that score's selection ratio, at its best score.

    A profile selects the union of each score's global top ``ratio`` (``profile.selectors``); a head
    whose priority is below 1 is one of them, and raising every ratio by the same factor would add
    heads in this order. Without ratios every score counts alike. Higher scores are better for
    every selector razor stores (induction, echo, ALiBi range, DuoAttention gates, retrieval score).
    """
    priority: dict[tuple[int, int], float] = {}
    for name, table in scores.items():
        ratio = 1.0 if not ratios else ratios.get(name, 0.0)
        if ratio <= 0:
            continue
        cells = [(layer, head) for layer, row in enumerate(table) for head in range(len(row))]
        cells.sort(key=lambda c: (-table[c[0]][c[1]], c))
        for position, cell in enumerate(cells):
            depth = position / (ratio * len(cells))
            priority[cell] = min(priority.get(cell, math.inf), depth)
    return priority


def profile_ratios(profile) -> dict[str, float]:
    """Selection ratios recorded in a profile's provenance, by score name (may be empty)."""
    prov = profile.provenance
    ratios = {}
    for name in profile.scores:
        value = getattr(prov, f"{name}_ratio", None)
        if value is None:
            value = prov.ratio
        if value is not None:
            ratios[name] = float(value)
    return ratios if len(ratios) == len(profile.scores) else {}


@dataclass(frozen=True)
class RankHeads:
    """One worker's retrieval heads (rank-local ids), per layer of its stage."""

    stage: int
    rank: int
    layers: tuple[int, ...]  # global layer indices of the stage
    profile_heads: tuple[tuple[int, ...], ...]  # what the profile puts on this shard
    heads: tuple[tuple[int, ...], ...]  # what this rank serves (profile + promoted)
    kv_heads: int  # KV heads per layer on this rank

    @property
    def profile_count(self) -> int:
        return sum(len(h) for h in self.profile_heads)

    @property
    def count(self) -> int:
        return sum(len(h) for h in self.heads)

    @property
    def promoted(self) -> int:
        return self.count - self.profile_count

    @property
    def local_count(self) -> int:
        return self.kv_heads * len(self.layers) - self.count


@dataclass(frozen=True)
class ScaleoutPlan:
    tp_size: int
    pp_size: int
    mode: str  # "promote" | "pad"
    num_kv_heads: int
    ranks: tuple[RankHeads, ...]  # stage-major

    @property
    def pool_heads(self) -> tuple[int, int]:
        """(retrieval, local) heads every rank sizes its pools for (before equal-page padding)."""
        return max(r.count for r in self.ranks), max(r.local_count for r in self.ranks)

    def rank(self, stage: int, tp_rank: int) -> RankHeads:
        return self.ranks[stage * self.tp_size + tp_rank]

    def rank_layout(
        self,
        rank: RankHeads,
        local_block_size: int,
        dtype_size: int,
        default_block_size: int = 128,
        hash_aligned: bool = False,
    ) -> PoolLayout:
        """``rank``'s pool layout, sized for the heaviest rank (``pool_heads``): the one call the
        workers (install.py), the status route and the bench make, so that all three plan the same pools."""
        return plan_layout(
            rank.heads,
            rank.kv_heads,
            local_block_size,
            dtype_size,
            default_block_size=default_block_size,
            hash_aligned=hash_aligned,
            pool_heads=self.pool_heads,
        )

    @property
    def balanced(self) -> bool:
        return len({r.profile_count for r in self.ranks}) <= 1 and len({len(r.layers) for r in self.ranks}) <= 1

    def served_global_heads(self) -> list[list[int]]:
        """Global retrieval heads per layer that the ranks serve together (profile + promoted).

        Meaningful when each KV head lives on one rank (``tp_size <= num_kv_heads``): a TP=1
        engine given these heads computes what the balanced engine computes.
        """
        layers: dict[int, set[int]] = {}
        for r in self.ranks:
            held = rank_global_heads(self.num_kv_heads, self.tp_size, r.rank)
            for layer, heads in zip(r.layers, r.heads):
                layers.setdefault(layer, set()).update(held[h] for h in heads)
        return [sorted(layers[layer]) for layer in sorted(layers)]

    def per_rank(self) -> list[dict]:
        return [
            dict(stage=r.stage, rank=r.rank, profile=r.profile_count, promoted=r.promoted, local=r.local_count)
            for r in self.ranks
        ]

    def retrieval_heads_all_ranks(self) -> tuple[int, int]:
        """(heads the pools hold over all ranks, heads an unbalanced ideal would hold): each rank
        sized for its own profile heads. Their difference is what balancing costs per token."""
        return len(self.ranks) * self.pool_heads[0], sum(r.profile_count for r in self.ranks)

    def describe(self) -> str:
        """``tp=2 promote: rank 0: 4, rank 1: 1+3 promoted`` (stages as ``s0r1`` under PP)."""
        parts = []
        for r in self.ranks:
            who = f"rank {r.rank}" if self.pp_size == 1 else f"stage {r.stage} rank {r.rank}"
            count = f"{r.profile_count}" + (f"+{r.promoted} promoted" if r.promoted else "")
            parts.append(f"{who}: {count}")
        pooled, ideal = self.retrieval_heads_all_ranks()
        cost = f"{pooled} pool heads over all ranks vs {ideal} unbalanced"
        return f"tp={self.tp_size} pp={self.pp_size} {self.mode}: " + ", ".join(parts) + f" ({cost})"


def resolve_mode(mode: Optional[str], has_scores: bool) -> str:
    if mode is None:
        return "promote" if has_scores else "pad"
    if mode not in BALANCE_MODES:
        raise ValueError(f"razor option tp_balance must be one of {', '.join(BALANCE_MODES)}, got {mode!r}")
    if mode == "promote" and not has_scores:
        raise ValueError(
            "razor option tp_balance=promote needs a profile with scores (it ranks heads by them); "
            "this profile stores none: use tp_balance=pad"
        )
    return mode


def plan_scaleout(
    retrieval_heads: Sequence[Sequence[int]],
    num_kv_heads: int,
    tp_size: int = 1,
    pp_size: int = 1,
    mode: str = "pad",
    priority: Optional[Mapping[tuple[int, int], float]] = None,
    layers_per_stage: Optional[Sequence[range]] = None,
) -> ScaleoutPlan:
    """Every rank's heads, from the profile's global ``retrieval_heads`` alone (no communication)."""
    if mode not in BALANCE_MODES:
        raise ValueError(f"tp_balance must be one of {BALANCE_MODES}, got {mode!r}")
    if mode == "promote" and priority is None:
        raise ValueError("tp_balance=promote needs the profile's head priority (scores)")
    stages = list(layers_per_stage) if layers_per_stage is not None else stage_layers(len(retrieval_heads), pp_size)
    per_rank = kv_heads_per_rank(num_kv_heads, tp_size)
    ranks: list[RankHeads] = []
    for stage, layers in enumerate(stages):
        for tp_rank in range(tp_size):
            own = tuple(
                tuple(shard_kv_heads(retrieval_heads[layer], num_kv_heads, tp_size, tp_rank)) for layer in layers
            )
            ranks.append(RankHeads(stage, tp_rank, tuple(layers), own, own, per_rank))
    if mode == "promote":
        target = max(r.count for r in ranks)
        ranks = [_promote(r, target, priority, num_kv_heads, tp_size) for r in ranks]
    return ScaleoutPlan(tp_size, pp_size, mode, num_kv_heads, tuple(ranks))


def _promote(
    r: RankHeads, target: int, priority: Mapping[tuple[int, int], float], num_kv_heads: int, tp_size: int
) -> RankHeads:
    """``r`` with its best local heads (by ``priority``, across its layers) made retrieval up to ``target``."""
    spare = target - r.count
    if spare <= 0:
        return r
    held = rank_global_heads(num_kv_heads, tp_size, r.rank)
    candidates = [
        (priority.get((layer, held[h]), math.inf), layer, held[h], i, h)
        for i, (layer, heads) in enumerate(zip(r.layers, r.heads))
        for h in range(r.kv_heads)
        if h not in heads
    ]
    candidates.sort()
    heads = [set(h) for h in r.heads]
    for _, _, _, i, h in candidates[:spare]:
        heads[i].add(h)
    return RankHeads(r.stage, r.rank, r.layers, r.profile_heads, tuple(tuple(sorted(h)) for h in heads), r.kv_heads)


def plan_for_resolved(resolved, num_kv_heads: int, tp_size: int = 1, pp_size: int = 1) -> ScaleoutPlan:
    """The plan for a resolved razor configuration (``options.ResolvedRazorConfig``)."""
    profile = resolved.profile
    mode = resolve_mode(resolved.tp_balance, bool(profile.scores))
    priority = promotion_priority(profile.scores, profile_ratios(profile)) if mode == "promote" else None
    return plan_scaleout(resolved.retrieval_heads, num_kv_heads, tp_size, pp_size, mode, priority)
