"""The KV cache arithmetic, in one place: which blocks a request holds, what admission reserves, how
many requests a pool holds at once, and what all of it costs in bytes, for razor's two pools and for
stock vLLM's paged cache.

Pure Python (no vLLM, no torch), so the block manager and specs (``pools.py``), the start-up line
(``install.summary_line``), ``/razor/status`` (``serve/status.py``), vLLM's "Maximum concurrency"
(``vllm_compat`` hook 10) and the analytic benchmark (``bench/analytic.py``) compute the same
figures from the same rules:

- ``LocalGeometry``: the local pool's rule (sink, window, prefill mode) as blocks;
- ``PoolGeometry``: one worker's two pools as bytes (a page holds a block of either pool);
- ``StockGeometry``: stock vLLM's paged cache (a page per layer and block, every KV head).

Positions are 0-based. A local head's query at position ``t`` of a request reads the sinks
``[0, S)``, the window ``[t - W + 1, t]`` and the compensation sums over ``[S, t - W]``, which
``local_attention`` finds in the page tail of the block holding ``t - W + 1`` (the kernel contract).
So a request needs, at query position ``t``, its sink block(s) and every block from the one holding
``t - W + 1`` on.

Two prefill modes (``exact_prefill``):

- exact (the paper): a query at ``t < prompt_len`` attends to every position ``[0, t]``, so the pool
  keeps *every* block of a request while it prefills its prompt and frees what lies outside sinks +
  window once the prompt is done. Admission must reserve the whole prompt (the *transient*).
- compressed: every query follows the sink + window rule, so a request never holds more than its
  sinks + window (+ the tokens in flight of a prefill chunk).

Two window rules: a fixed ``window`` (a memory bound per request), or the paper's
``max(S0, N / C)`` (``compression_ratio`` = C, N = the request's prompt length): the window grows
with the prompt. We round N / C up (a window is a token count).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Optional

from razor_vllm.balance import kv_heads_per_rank
from razor_vllm.layout import PoolLayout


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def head_token_bytes(head_size: int, dtype_bytes: int) -> int:
    """K and V of one head and token."""
    return 2 * head_size * dtype_bytes


def paged_bytes(tokens: int, block_size: int, bytes_per_token: int) -> int:
    """What a paged cache of ``block_size``-token blocks holds for ``tokens`` tokens: whole blocks."""
    return cdiv(tokens, block_size) * block_size * bytes_per_token


@dataclass(frozen=True)
class LocalGeometry:
    """The local heads' rule as block arithmetic (``block_size`` = tokens per local-pool block)."""

    sink: int
    window: int
    block_size: int
    exact_prefill: bool = True
    compression_ratio: Optional[float] = None  # None: fixed window

    @property
    def sink_blocks(self) -> int:
        """Blocks kept for the request's whole life: the sink tokens' (at least one: block 0)."""
        return max(1, cdiv(self.sink, self.block_size))

    def request_window(self, prompt_len: int) -> int:
        """The window of a request whose prompt has ``prompt_len`` tokens."""
        if self.compression_ratio is None:
            return self.window
        return max(self.window, math.ceil(prompt_len / self.compression_ratio))

    def request_windows(self, prompt_lens: Iterable[int]) -> list[int]:
        """``request_window`` of each prompt length: the metadata builder's per-step windows (a few
        integer operations per live request, once per step and pool)."""
        return [self.request_window(n) for n in prompt_lens]

    def max_window(self, max_model_len: int) -> int:
        """The largest window any request can get (the spec's sliding window)."""
        return self.request_window(max_model_len)

    @staticmethod
    def tokens_before_window(processed: int, window: int) -> int:
        """Leading tokens outside the window of the query at position ``processed``, keeping position
        ``processed - 1`` too (a window of at least 2: see ``skipped_tokens``)."""
        return max(0, processed - max(window, 2) + 1)

    def skipped_tokens(self, processed: int, prompt_len: Optional[int]) -> int:
        """Leading tokens whose blocks (past the sinks) a request no longer needs once ``processed``
        tokens are computed.

        The next query (position ``processed``) reads from ``processed - W + 1`` on; the manager also
        keeps position ``processed - 1`` (a window of at least 2), because ``write_block_tails``
        reads the whole block before every block a step starts. In exact mode nothing is skipped
        while the prompt is prefilled (``prompt_len`` unknown: nothing either).
        """
        if self.exact_prefill and (prompt_len is None or processed < prompt_len):
            return 0
        return self.tokens_before_window(processed, self.request_window(prompt_len or 0))

    def blocks_behind(self, window: int) -> int:
        """Whole blocks before a block boundary that the window of the query at the boundary reaches
        into (what a prefix-cache hit ending there must carry besides the sinks)."""
        return cdiv(max(window, 2) - 1, self.block_size)

    def window_blocks(self, window: int) -> int:
        """Blocks spanning ``window`` tokens that need not start on a block boundary."""
        return self.blocks_behind(window) + 1

    def held_blocks(self, window: int) -> int:
        """The most blocks a request with ``window`` holds once its prompt is done: sinks + window."""
        return self.sink_blocks + self.window_blocks(window)

    def steady_blocks(self, tokens: int, prompt_len: Optional[int] = None) -> int:
        """Blocks a decoding request of ``tokens`` tokens holds (sinks + the blocks of its window)."""
        window = self.request_window(tokens if prompt_len is None else prompt_len)
        return min(cdiv(tokens, self.block_size), self.held_blocks(window))

    def chunk_cap(self, in_flight: int, max_model_len: int) -> int:
        """vLLM's recycling cap for a sliding window (``SlidingWindowSpec.max_admission_blocks_per_request``)
        plus the sink blocks: a prefill chunk's tokens are written before the window slides past them."""
        window = self.max_window(max_model_len)
        window_blocks = cdiv(min(max(window, 2) - 1 + in_flight, max_model_len), self.block_size) + 1
        return min(window_blocks + self.sink_blocks, cdiv(max_model_len, self.block_size))

    def admission_blocks(self, tokens: int, in_flight: int, max_model_len: Optional[int] = None) -> int:
        """Blocks vLLM's admission reserves for a new request of ``tokens`` prompt tokens: its peak.

        Exact mode: every prompt block (the transient, held until the prompt is done). Compressed:
        the window plus the tokens in flight, capped by the request's own blocks.
        """
        own = cdiv(tokens, self.block_size)
        if self.exact_prefill:
            return own
        return min(own, self.chunk_cap(in_flight, max_model_len or tokens))

    def transient_blocks(self, tokens: int, in_flight: int, max_model_len: Optional[int] = None) -> int:
        """How many more blocks than its steady state a request holds while it is admitted/prefilled."""
        return max(0, self.admission_blocks(tokens, in_flight, max_model_len) - self.steady_blocks(tokens))

    def logged_blocks(self, in_flight: int, max_model_len: int) -> tuple[int, int]:
        """What razor's "Maximum concurrency" (``max_concurrency``) charges a request of ``max_model_len``
        tokens: (blocks every held request is charged: the recycling cap ``chunk_cap``, blocks the one
        being admitted holds on top: the rest of its admission). The second is 0 in compressed mode."""
        cap = self.chunk_cap(in_flight, max_model_len)
        return cap, max(0, self.admission_blocks(max_model_len, in_flight, max_model_len) - cap)


def max_concurrency(num_blocks: int, steady_blocks: int, transient_blocks: int) -> float:
    """Requests a pool of ``num_blocks`` holds at once when each holds ``steady_blocks`` and one at a
    time (the one being admitted) holds ``transient_blocks`` more: (c - 1) * steady + steady +
    transient <= num_blocks. With no transient this is vLLM's own num_blocks / per-request blocks."""
    if steady_blocks <= 0:
        return float("inf")
    return max(0.0, (num_blocks - transient_blocks) / steady_blocks)


@dataclass(frozen=True)
class PoolGeometry:
    """One worker's two pools in bytes: ``layout``'s page (one block of either pool, equal pages:
    layout.py) and what a request holds in each pool.

    A worker is one tensor-parallel rank of one pipeline stage; every worker sizes its pools for the
    heaviest (``balance.py``), so the figures of all workers are sums of such objects.
    """

    layout: PoolLayout
    head_token_bytes: int  # K and V of one head and token
    local: LocalGeometry  # the local rule on the layout's local blocks

    @classmethod
    def of(
        cls,
        layout: PoolLayout,
        head_size: int,
        dtype_bytes: int,
        sink: int,
        window: int,
        exact_prefill: bool = True,
        compression_ratio: Optional[float] = None,
    ) -> "PoolGeometry":
        rule = LocalGeometry(sink, window, layout.local_block_size, exact_prefill, compression_ratio)
        return cls(layout, head_token_bytes(head_size, dtype_bytes), rule)

    @classmethod
    def for_resolved(cls, layout: PoolLayout, head_size: int, dtype_bytes: int, resolved: Any) -> "PoolGeometry":
        """With the rule of razor's resolved options (``options.ResolvedRazorConfig``), as a worker serves it."""
        return cls.of(
            layout,
            head_size,
            dtype_bytes,
            resolved.sink,
            resolved.window,
            exact_prefill=resolved.exact_prefill,
            compression_ratio=resolved.compression_ratio,
        )

    @property
    def page_bytes(self) -> int:
        """One page: what a block id holds in either pool (the local page's tails and padding included)."""
        return self.layout.page_slots() * self.head_token_bytes

    @property
    def retrieval_bytes_per_token(self) -> int:
        return self.layout.retrieval_pool_heads * self.head_token_bytes if self.layout.has_retrieval_pool else 0

    @property
    def local_bytes_per_token(self) -> float:
        """Per token slot of the local pool, including the compensation tail and padding heads (a page
        over its block's tokens: not a whole number of bytes for every block size)."""
        return self.page_bytes / self.layout.local_block_size if self.layout.has_local_pool else 0.0

    def retrieval_pages(self, tokens: int) -> int:
        return cdiv(tokens, self.layout.retrieval_block_size) if self.layout.has_retrieval_pool else 0

    def local_steady_blocks(self, tokens: int) -> int:
        """Sink block(s) plus the blocks spanning the last W tokens (as RazorLocalManager keeps them)."""
        return self.local.steady_blocks(tokens) if self.layout.has_local_pool else 0

    def local_admission_blocks(self, tokens: int, in_flight: int, max_model_len: Optional[int] = None) -> int:
        """What admission reserves in the local pool (exact prefill: the whole prompt)."""
        return self.local.admission_blocks(tokens, in_flight, max_model_len) if self.layout.has_local_pool else 0

    def steady_pages(self, tokens: int) -> int:
        """Pages a request of ``tokens`` tokens holds once its prompt is done."""
        return self.retrieval_pages(tokens) + self.local_steady_blocks(tokens)

    def admission_pages(self, tokens: int, in_flight: int, max_model_len: Optional[int] = None) -> int:
        """Pages admission reserves for a request of ``tokens`` prompt tokens: its peak."""
        return self.retrieval_pages(tokens) + self.local_admission_blocks(tokens, in_flight, max_model_len)

    def batch_pages(self, batch: int, tokens: int, in_flight: int) -> int:
        """Pages ``batch`` requests of ``tokens`` tokens hold while one of them is admitted (its peak)
        and the others decode: the inequality behind ``max_concurrency``."""
        return (batch - 1) * self.steady_pages(tokens) + self.admission_pages(tokens, in_flight)

    def num_blocks(self, kv_bytes: int) -> int:
        """Block ids (pages) a worker's ``kv_bytes`` hold."""
        return kv_bytes // self.page_bytes

    def logged_concurrency(self, num_blocks: int, max_model_len: int, in_flight: int) -> float:
        """vLLM's logged "Maximum concurrency" for requests of ``max_model_len`` tokens: vLLM's own
        figure (num_blocks / each pool's peak) in compressed mode, razor's (``vllm_compat`` hook 10:
        every request its steady cap, one at a time its transient) with exact prefill."""
        retrieval = self.retrieval_pages(max_model_len)
        if not self.layout.has_local_pool:
            return num_blocks / retrieval
        if not self.local.exact_prefill:
            return num_blocks / (retrieval + self.local_admission_blocks(max_model_len, in_flight, max_model_len))
        held, transient = self.local.logged_blocks(in_flight, max_model_len)
        return max_concurrency(num_blocks, retrieval + held, transient)


@dataclass(frozen=True)
class StockGeometry:
    """Stock vLLM's paged cache: a page per layer and block of ``block_size`` tokens, every KV head."""

    num_layers: int
    kv_heads: int  # over all tensor-parallel ranks (replicas included: see ``of``)
    head_token_bytes: int
    block_size: int

    @classmethod
    def of(
        cls, num_layers: int, num_kv_heads: int, head_token_bytes: int, block_size: int, tp_size: int = 1
    ) -> "StockGeometry":
        """With more ranks than KV heads vLLM gives every rank a copy of one head: ``tp_size`` heads in all."""
        return cls(num_layers, kv_heads_per_rank(num_kv_heads, tp_size) * tp_size, head_token_bytes, block_size)

    @property
    def bytes_per_token(self) -> int:
        return self.num_layers * self.kv_heads * self.head_token_bytes

    @property
    def block_bytes(self) -> int:
        """One block of vLLM's block pool: a page in every layer."""
        return self.block_size * self.bytes_per_token

    def blocks(self, tokens: int) -> int:
        return cdiv(tokens, self.block_size)

    def request_bytes(self, tokens: int) -> int:
        """What a request of ``tokens`` tokens holds: whole blocks."""
        return paged_bytes(tokens, self.block_size, self.bytes_per_token)

    def num_blocks(self, kv_bytes: int) -> int:
        return kv_bytes // self.block_bytes
