"""The types every kernel implementation takes (the kernel contract: ``razor_vllm.ops``' docstring).

Three small objects replace the long positional argument lists: the local heads' rule (fixed for a
server), which heads of a pool one layer uses (fixed for a layer), and one step's view of a pool (the
builder makes it once per step). A fourth, ``LayerPoolHeads``, says which of a layer's own heads
those pool heads are: the per-layer steps (``ops.retrieval_step``/``ops.local_step``) read the
layer's query, keys and values and write its output in place through it. The reference and the
Triton kernels take them as they are; the C++ ops' schemas take tensors and numbers only, so
``razor_vllm.ops._CppKernels`` unpacks them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

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


@dataclass(frozen=True)
class LayerPoolHeads:
    """One layer's heads in one pool (its retrieval heads, or its local heads): which of the layer's
    KV heads (query head j reads KV head j // g), and where they sit in the pool (``pool``).

    Everything the forward needs is made here once, at install: contiguous heads are read through
    slices (views, no copies), others through index tensors already on the layer's device (a CUDA
    graph never captures a host-to-device copy), and a pool that holds all the layer's heads needs
    no selection at all (``None``). ``kv_index`` is the same selection as an index tensor (``None``
    for all heads), as the C++ per-layer steps read it.
    """

    kv_heads: tuple[int, ...]
    pool: PoolHeads
    kv_select: Union[slice, torch.Tensor, None] = field(default=None, repr=False)
    q_select: Union[slice, torch.Tensor, None] = field(default=None, repr=False)
    kv_index: Optional[torch.Tensor] = field(default=None, repr=False)

    @classmethod
    def of(
        cls,
        kv_heads: tuple[int, ...],
        offset: int,
        queries_per_kv: int,
        layer_kv_heads: int,
        device: Union[torch.device, str] = "cpu",
    ) -> "LayerPoolHeads":
        kv_heads = tuple(kv_heads)
        pool = PoolHeads(offset, len(kv_heads))
        if kv_heads == tuple(range(layer_kv_heads)):
            return cls(kv_heads, pool)
        kv_index = torch.tensor(kv_heads, dtype=torch.long, device=device)
        if kv_heads and kv_heads == tuple(range(kv_heads[0], kv_heads[-1] + 1)):
            first, end = kv_heads[0], kv_heads[-1] + 1
            q_slice = slice(first * queries_per_kv, end * queries_per_kv)
            return cls(kv_heads, pool, slice(first, end), q_slice, kv_index)
        q_heads = [h * queries_per_kv + j for h in kv_heads for j in range(queries_per_kv)]
        return cls(kv_heads, pool, kv_index, torch.tensor(q_heads, dtype=torch.long, device=device), kv_index)

    @property
    def num_kv_heads(self) -> int:
        return self.pool.count

    @property
    def offset(self) -> int:
        return self.pool.offset

    def select_q(self, q: torch.Tensor) -> torch.Tensor:
        """The layer's query (or output) heads that read this pool's heads, in pool order."""
        select = self.q_select
        if select is None:
            return q
        if isinstance(select, slice):
            return q[:, select]
        return q.index_select(1, select)

    def scatter_q(self, out: torch.Tensor, heads_out: torch.Tensor) -> None:
        """Write ``heads_out`` (this pool's heads, in pool order) into the layer's ``out``."""
        select = self.q_select
        if select is None:
            out.copy_(heads_out)
        elif isinstance(select, slice):
            out[:, select] = heads_out
        else:
            out.index_copy_(1, select, heads_out.to(out.dtype))
