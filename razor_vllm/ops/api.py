"""The types every kernel implementation takes (the kernel contract, /work/coord/CONTRACT.md).

Three small objects replace the long positional argument lists: the local heads' rule (fixed for a
server), which heads of a pool one layer uses (fixed for a layer), and one step's view of a pool (the
builder makes it once per step). The reference and the Triton kernels take them as they are; the
C++ ops' schemas take tensors and numbers only, so ``razor_vllm.ops._CppKernels`` unpacks them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class LocalRule:
    """The local heads' rule: sinks + window + compensation, and how prompt queries are treated.

    ``exact_prefill`` (the paper): a query at a position before its request's prompt length attends
    causally to every position; later queries follow sinks + window + compensation. Without it
    (the first design) every query follows the compressed rule. ``compensation=False`` is an
    ablation that drops the compensation key; the block tails are still written.
    """

    sink: int
    window: int
    compensation: bool = True
    exact_prefill: bool = True

    def __post_init__(self) -> None:
        if self.sink < 0:
            raise ValueError(f"LocalRule.sink must be >= 0, got {self.sink}")
        if self.window < 1:
            raise ValueError(f"LocalRule.window must be >= 1, got {self.window}")

    def check(self, batch: PagedBatch) -> None:
        """What every local-attention kernel needs of the step under this rule: with exact prefill,
        the requests' prompt lengths (a query before its prompt length attends to every position)."""
        if self.exact_prefill and batch.prompt_lens is None:
            raise ValueError("LocalRule(exact_prefill=True) needs PagedBatch.prompt_lens")


@dataclass(frozen=True)
class PoolHeads:
    """Pool heads [offset, offset + count) of one layer; query head j reads KV head j // g."""

    offset: int
    count: int


@dataclass
class PagedBatch:
    """One step's view of one pool (see the contract for the layout).

    Requests without queries (vLLM's CUDA-graph padding: q_len 0, seq_len 0, NULL block-table row)
    are skipped by every kernel. ``max_query_len`` / ``max_seq_len`` are hints for grid sizes only.
    """

    block_table: torch.Tensor  # [R, max_blocks] int32
    seq_lens: torch.Tensor  # [R] int32, tokens including this step's
    query_start_loc: torch.Tensor  # [R + 1] int32
    prompt_lens: Optional[torch.Tensor] = None  # [R] int32; needed by local_attention when exact_prefill
    windows: Optional[torch.Tensor] = None  # [R] int32 per-request window; None = rule.window
    max_query_len: int = 0
    max_seq_len: int = 0

    @property
    def num_reqs(self) -> int:
        return self.seq_lens.shape[0]
