"""KV-cache arithmetic without an engine: bytes per token and per request, and vLLM's concurrency figures.

Everything here mirrors what vLLM 0.32 does with razor's two pools (``pools.py``) and with a stock
paged cache, so the numbers can be checked against a running engine:

- stock: one ``FullAttentionSpec`` page per layer and block of ``block_size`` tokens; a block of the
  shared pool costs ``num_layers`` pages;
- razor: one page holds ``retrieval_block_size`` tokens of every retrieval head, or
  ``local_block_size`` tokens (plus the compensation tail) of every local head; both pools draw
  whole pages from one block pool of ``kv_bytes // page`` pages.

Per request at context ``T``:

- *steady*: what a decoding request holds: every retrieval page of its ``T`` tokens, plus the
  local pool's sink block(s) and the blocks spanning its last ``W`` tokens;
- *admission*: what vLLM's scheduler reserves before it admits a request (its full-sequence gate):
  with exact prefill (the default) every block of the prompt, which the request holds until its
  prompt is done (the *transient*); with compressed prefill the window *plus the tokens in flight*
  (``max_num_batched_tokens`` per concurrent batch), because a prefill chunk is written before the
  window slides past it. vLLM's logged "Maximum concurrency" (razor's figure through
  ``vllm_compat.wrap_max_concurrency`` in exact mode) charges every request its steady cap and one
  request at a time its transient.

The arithmetic lives in ``razor_vllm.geometry`` (shared with the block manager, the start-up line,
``/razor/status`` and vLLM's logged "Maximum concurrency"); this module adds the tensor-parallel
view and the report.

Pure Python (no vLLM import), so ``razor-vllm bench --skip-engine`` and its test are fast.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional, Sequence

from razor_vllm.balance import ScaleoutPlan, plan_scaleout, profile_ratios, promotion_priority, resolve_mode
from razor_vllm.config import ModelFingerprint, RazorProfile
from razor_vllm.geometry import LocalGeometry, PoolGeometry, StockGeometry, head_token_bytes
from razor_vllm.layout import PoolLayout

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
STOCK_BLOCK_SIZE = 128  # vLLM's CPU default; the engine section reads the real value
LOCAL_BLOCK_SIZE = 32
PAPER_RATIO = 8.0  # C of the paper's window rule in the bytes-per-rule table (``--compression-ratio``)


@dataclass(frozen=True)
class KVGeometry:
    """Stock and razor cache geometry for one model, profile, dtype, window and sink, over all
    tensor-parallel ranks: the bench's view of ``geometry.PoolGeometry`` (rank 0's pools, every rank
    alike) and ``geometry.StockGeometry``, which hold the arithmetic."""

    num_layers: int
    num_kv_heads: int
    head_size: int
    dtype: str
    window: int
    sink: int
    stock_block_size: int
    layout: PoolLayout  # every rank's pool shape (rank 0's heads)
    exact_prefill: bool = True
    compression_ratio: Optional[float] = None  # the paper's window rule max(window, N / C); None: fixed
    plan: Optional[ScaleoutPlan] = None  # tensor parallelism: which heads each rank holds

    @property
    def pool(self) -> PoolGeometry:
        """One rank's pools (every rank's have this shape)."""
        return PoolGeometry.of(
            self.layout,
            self.head_size,
            self.dtype_bytes,
            self.sink,
            self.window,
            exact_prefill=self.exact_prefill,
            compression_ratio=self.compression_ratio,
        )

    @property
    def stock(self) -> StockGeometry:
        """Stock vLLM over the same ranks: with more ranks than KV heads each rank holds a copy of one."""
        return StockGeometry.of(
            self.num_layers, self.num_kv_heads, self.head_token_bytes, self.stock_block_size, self.tp_size
        )

    @property
    def local(self) -> LocalGeometry:
        return self.pool.local

    @property
    def tp_size(self) -> int:
        return self.plan.tp_size if self.plan is not None else 1

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def reported_block_size(self) -> int:
        """The block size a razor engine reports in ``cache_config.block_size``: vLLM's engine core
        (v1/engine/core.py) sets it to the smallest block of the prefix-cacheable KV groups, and both
        pools are prefix-cacheable (pools.py), so it is the smaller of the two pools' blocks."""
        layout = self.layout
        blocks = [layout.retrieval_block_size] if layout.has_retrieval_pool else []
        blocks += [layout.local_block_size] if layout.has_local_pool else []
        return min(blocks)

    def with_stock_block_size(self, block_size: int) -> "KVGeometry":
        """The same model and profile on an engine whose vLLM block size is ``block_size`` (razor's
        retrieval block follows it, as ``install_pools`` plans it)."""
        if block_size == self.stock_block_size:
            return self
        layout = self.plan.rank_layout(self.plan.ranks[0], self.layout.local_block_size, self.dtype_bytes, block_size)
        return replace(self, stock_block_size=block_size, layout=layout)

    @property
    def head_token_bytes(self) -> int:
        return head_token_bytes(self.head_size, self.dtype_bytes)

    # -- stock ----------------------------------------------------------------------------------
    @property
    def stock_bytes_per_token(self) -> int:
        return self.stock.bytes_per_token

    @property
    def stock_block_bytes(self) -> int:
        return self.stock.block_bytes

    def stock_blocks(self, tokens: int) -> int:
        return self.stock.blocks(tokens)

    # -- razor: a block id is a page on every rank ------------------------------------------------
    @property
    def page_bytes(self) -> int:
        """One block id's pages on all tensor-parallel ranks (each holds a page of the same shape)."""
        return self.pool.page_bytes * self.tp_size

    @property
    def retrieval_bytes_per_token(self) -> int:
        return self.pool.retrieval_bytes_per_token * self.tp_size

    @property
    def local_bytes_per_token(self) -> float:
        return self.pool.local_bytes_per_token * self.tp_size

    @property
    def sink_blocks(self) -> int:
        return self.local.sink_blocks

    def retrieval_pages(self, tokens: int) -> int:
        return self.pool.retrieval_pages(tokens)

    def local_steady_blocks(self, tokens: int) -> int:
        return self.pool.local_steady_blocks(tokens)

    def local_admission_blocks(self, tokens: int, in_flight: int, max_model_len: Optional[int] = None) -> int:
        return self.pool.local_admission_blocks(tokens, in_flight, max_model_len)

    def razor_logged_concurrency(self, num_blocks: int, context: int, in_flight: int) -> float:
        """vLLM's logged "Maximum concurrency" for requests of ``context`` = max_model_len tokens."""
        return self.pool.logged_concurrency(num_blocks, context, in_flight)

    def razor_steady_pages(self, tokens: int) -> int:
        return self.pool.steady_pages(tokens)

    def razor_admission_pages(self, tokens: int, in_flight: int) -> int:
        return self.pool.admission_pages(tokens, in_flight)

    # -- pools of a given size --------------------------------------------------------------------
    def stock_num_blocks(self, kv_bytes: int) -> int:
        return self.stock.num_blocks(kv_bytes)

    def razor_num_blocks(self, kv_bytes: int) -> int:
        return kv_bytes // self.page_bytes


def geometry(
    profile: RazorProfile,
    dtype: str,
    window: Optional[int] = None,
    sink: Optional[int] = None,
    local_block_size: int = LOCAL_BLOCK_SIZE,
    stock_block_size: int = STOCK_BLOCK_SIZE,
    fingerprint: Optional[ModelFingerprint] = None,
    exact_prefill: bool = True,
    compression_ratio: Optional[float] = None,
    tp_size: int = 1,
    tp_balance: Optional[str] = None,
) -> KVGeometry:
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {dtype!r}")
    model = fingerprint or profile.model
    mode = resolve_mode(tp_balance, bool(profile.scores))
    priority = promotion_priority(profile.scores, profile_ratios(profile)) if mode == "promote" else None
    plan = plan_scaleout(profile.retrieval_heads, model.num_kv_heads, tp_size, 1, mode, priority)
    return KVGeometry(
        num_layers=model.num_layers,
        num_kv_heads=model.num_kv_heads,
        head_size=model.head_size,
        dtype=dtype,
        window=profile.window if window is None else window,
        sink=profile.sink if sink is None else sink,
        stock_block_size=stock_block_size,
        layout=plan.rank_layout(plan.ranks[0], local_block_size, DTYPE_BYTES[dtype], stock_block_size),
        exact_prefill=exact_prefill,
        compression_ratio=compression_ratio,
        plan=plan,
    )


def balance_report(geo: KVGeometry) -> dict[str, Any]:
    """Per-rank retrieval heads and what one pool shape for all ranks costs (``balance.py``).

    ``unbalanced``: every rank's retrieval pool sized for its own profile heads (what vLLM cannot
    run: specs must be equal). ``pools``: what the ranks hold (the heaviest rank's count, with
    equal-page padding, on every rank); with ``promote`` the extra slots serve promoted heads.
    """
    plan = geo.plan
    htb = geo.head_token_bytes
    pooled, ideal = plan.retrieval_heads_all_ranks()
    counts = [r.profile_count for r in plan.ranks]
    return dict(
        tp_size=plan.tp_size,
        mode=plan.mode,
        per_rank=plan.per_rank(),
        retrieval_bytes_per_token=dict(
            unbalanced=ideal * htb,
            balanced=pooled * htb,  # heaviest rank's heads x ranks, before equal-page padding
            pools=geo.retrieval_bytes_per_token,  # as allocated, with equal-page padding
        ),
        cost=(geo.retrieval_bytes_per_token / (ideal * htb) - 1) if ideal else 0.0,
        imbalance=dict(min=min(counts), max=max(counts)),
    )


def analytic_report(
    geo: KVGeometry,
    contexts: Sequence[int],
    in_flight: int,
    kv_bytes_for: dict[int, int],
    paper_ratio: float = PAPER_RATIO,
) -> dict[str, Any]:
    """The analytic section of the benchmark JSON.

    ``in_flight``: vLLM's ``max_in_flight_tokens`` (``max_num_batched_tokens`` x concurrent batches).
    ``kv_bytes_for``: KV cache bytes per context (the pool the max-concurrency figures refer to).
    """
    layout = geo.layout
    requests = []
    concurrency = []
    for ctx in contexts:
        stock_bytes = geo.stock.request_bytes(ctx)
        steady = geo.razor_steady_pages(ctx) * geo.page_bytes
        admission = geo.razor_admission_pages(ctx, in_flight) * geo.page_bytes
        requests.append(
            dict(
                context=ctx,
                stock_bytes=stock_bytes,
                razor_steady_bytes=steady,
                razor_admission_bytes=admission,
                razor_retrieval_bytes=geo.retrieval_pages(ctx) * geo.page_bytes,
                razor_local_steady_bytes=geo.local_steady_blocks(ctx) * geo.page_bytes,
                razor_local_admission_bytes=geo.local_admission_blocks(ctx, in_flight) * geo.page_bytes,
                ratio_steady=stock_bytes / steady,
                ratio_admission=stock_bytes / admission,
            )
        )
        kv = kv_bytes_for[ctx]
        stock_blocks = geo.stock_num_blocks(kv)
        razor_blocks = geo.razor_num_blocks(kv)
        # vLLM's logged figure: num_blocks / per-request blocks at max_model_len (= ctx here).
        stock_conc = stock_blocks / geo.stock_blocks(ctx)
        razor_logged = geo.razor_logged_concurrency(razor_blocks, ctx, in_flight)
        razor_steady = razor_blocks / geo.razor_steady_pages(ctx)
        concurrency.append(
            dict(
                context=ctx,
                kv_bytes=kv,
                stock_num_blocks=stock_blocks,
                razor_num_blocks=razor_blocks,
                stock=stock_conc,
                razor_vllm_logged=razor_logged,
                razor_steady=razor_steady,
                ratio_steady=razor_steady / stock_conc,
                ratio_vllm_logged=razor_logged / stock_conc,
            )
        )
    # Steady bytes per request under both window rules (the fixed bound and the paper's max(W, N/C)).
    fixed, paper = replace(geo, compression_ratio=None), replace(geo, compression_ratio=paper_ratio)
    window_rules = [
        dict(
            context=ctx,
            fixed_window=fixed.local.request_window(ctx),
            paper_window=paper.local.request_window(ctx),
            fixed_steady_bytes=fixed.razor_steady_pages(ctx) * geo.page_bytes,
            paper_steady_bytes=paper.razor_steady_pages(ctx) * geo.page_bytes,
            stock_bytes=geo.stock.request_bytes(ctx),
        )
        for ctx in contexts
    ]
    return dict(
        dtype=geo.dtype,
        window=geo.window,
        sink=geo.sink,
        prefill="exact" if geo.exact_prefill else "compressed",
        window_rule="fixed" if geo.compression_ratio is None else f"paper (C={geo.compression_ratio:g})",
        paper_ratio=paper_ratio,
        window_rules=window_rules,
        in_flight_tokens=in_flight,
        num_layers=geo.num_layers,
        num_kv_heads=geo.num_kv_heads,
        head_size=geo.head_size,
        retrieval_heads=sum(r.count for r in geo.plan.ranks),  # all ranks
        local_heads=sum(r.local_count for r in geo.plan.ranks),
        retrieval_pool_heads=layout.retrieval_pool_heads * geo.tp_size,  # all ranks
        local_pool_heads=layout.local_pool_heads * geo.tp_size,
        retrieval_block_size=layout.retrieval_block_size,
        local_block_size=layout.local_block_size,
        stock_block_size=geo.stock_block_size,
        page_bytes=geo.page_bytes,
        tensor_parallel=balance_report(geo),
        bytes_per_token=dict(
            stock=geo.stock_bytes_per_token,
            retrieval_pool=geo.retrieval_bytes_per_token,
            local_pool=geo.local_bytes_per_token,
        ),
        requests=requests,
        max_concurrency=concurrency,
    )


def default_kv_bytes(geo: KVGeometry, context: int, stock_requests: float = 2.5) -> int:
    """A KV size in which stock holds ``floor(stock_requests)`` full requests of ``context`` tokens."""
    return int(stock_requests * geo.stock.request_bytes(context))
