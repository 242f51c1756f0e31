"""The local pool's block arithmetic, in one place: which blocks a request holds, what admission
reserves, and how many requests a pool holds at once.

Pure Python (no vLLM, no torch), so the block manager (``pools.RazorLocalManager``), the start-up
line (``install.summary_line``), ``/razor/status`` (``serve/status.py``) and the analytic benchmark
(``bench/analytic.py``) compute the same figures from the same rules.

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
from typing import Optional


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


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

    def max_window(self, max_model_len: int) -> int:
        """The largest window any request can get (the spec's sliding window)."""
        return self.request_window(max_model_len)

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
        window = self.request_window(prompt_len or 0)
        return max(0, processed - max(window, 2) + 1)

    def window_blocks(self, window: int) -> int:
        """Blocks spanning ``window`` tokens that need not start on a block boundary."""
        return cdiv(max(window, 2) - 1, self.block_size) + 1

    def steady_blocks(self, tokens: int, prompt_len: Optional[int] = None) -> int:
        """Blocks a decoding request of ``tokens`` tokens holds (sinks + the blocks of its window)."""
        window = self.request_window(tokens if prompt_len is None else prompt_len)
        return min(cdiv(tokens, self.block_size), self.sink_blocks + self.window_blocks(window))

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


def max_concurrency(num_blocks: int, steady_blocks: int, transient_blocks: int) -> float:
    """Requests a pool of ``num_blocks`` holds at once when each holds ``steady_blocks`` and one at a
    time (the one being admitted) holds ``transient_blocks`` more: (c - 1) * steady + steady +
    transient <= num_blocks. With no transient this is vLLM's own num_blocks / per-request blocks."""
    if steady_blocks <= 0:
        return float("inf")
    return max(0.0, (num_blocks - transient_blocks) / steady_blocks)
