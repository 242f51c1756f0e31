"""The random-token probe: a prefix token, then ``n`` random ids repeated ``r`` times.

On such input a head that attends to earlier copies of the current token (echo) or to the token that
followed an earlier copy (induction) stands out, because nothing but repetition links the tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

#: The paper's probe: 2,500 random ids from [10000, 12500), repeated 4 times after one BOS token.
PAPER_TOKENS = 2500
PAPER_REPEATS = 4
PAPER_VOCAB_RANGE = (10000, 12500)


@dataclass(frozen=True)
class Probe:
    """A probe sequence and which of its positions are scored (repeats 2..r)."""

    input_ids: torch.Tensor  # (1 + tokens * repeats,) int64
    tokens: int
    repeats: int
    vocab_range: tuple[int, int]
    seed: int
    prefix_id: int

    @property
    def length(self) -> int:
        return int(self.input_ids.numel())

    def scored_mask(self) -> torch.Tensor:
        """True at the positions of repeats 2..r (the prefix and the first repeat are not scored)."""
        mask = torch.zeros(self.length, dtype=torch.bool)
        mask[1 + self.tokens :] = True
        return mask


def default_vocab_range(vocab_size: int, tokens: int = PAPER_TOKENS) -> tuple[int, int]:
    """The paper's [10000, 12500) where the vocabulary holds it, else a band in the middle of the vocabulary.

    The band is ``min(2500, vocab_size // 2)`` ids wide and centred, which keeps clear of the special
    tokens that usually sit at the start of a vocabulary (and of added tokens at its end).
    """
    low, high = PAPER_VOCAB_RANGE
    if high <= vocab_size:
        return low, high
    width = max(1, min(high - low, vocab_size // 2))
    low = (vocab_size - width) // 2
    return low, low + width


def default_tokens(repeats: int, context_length: Optional[int]) -> int:
    """The paper's 2,500 per repeat, shortened so that the whole probe fits the model's context."""
    if context_length is None:
        return PAPER_TOKENS
    return max(1, min(PAPER_TOKENS, (context_length - 1) // repeats))


def make_probe(
    tokens: int = PAPER_TOKENS,
    repeats: int = PAPER_REPEATS,
    vocab_range: tuple[int, int] = PAPER_VOCAB_RANGE,
    seed: int = 0,
    prefix_id: int = 1,
) -> Probe:
    """``[prefix_id] + x * repeats``, ``x`` = ``tokens`` ids drawn uniformly (with replacement) from ``vocab_range``.

    Deterministic: the ids come from a CPU ``torch.Generator`` seeded with ``seed``.
    """
    if tokens < 1:
        raise ValueError(f"tokens must be >= 1, got {tokens}")
    if repeats < 2:
        raise ValueError(f"repeats must be >= 2 (repeats 2..r are scored), got {repeats}")
    low, high = int(vocab_range[0]), int(vocab_range[1])
    if not 0 <= low < high:
        raise ValueError(f"vocab range must be [low, high) with 0 <= low < high, got [{low}, {high})")
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    block = torch.randint(low, high, (tokens,), generator=gen, dtype=torch.int64)
    ids = torch.cat([torch.tensor([prefix_id], dtype=torch.int64), block.repeat(repeats)])
    return Probe(ids, tokens, repeats, (low, high), int(seed), int(prefix_id))
