"""Scores: task accuracy per cell, and fidelity of a variant's next-token distributions to the full cache."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np


@dataclass(frozen=True)
class Fidelity:
    """Per text item, against the full cache at the same positions (teacher forcing on the same text).

    ``kl``: mean over positions of KL(full || variant) in nats; ``top1``: share of positions whose
    most likely token agrees; ``nll``: the variant's mean negative log-likelihood of the true text
    (``nll - nll_full`` is its perplexity cost); ``greedy_prefix``: tokens of greedy continuation
    identical to full's before the first difference; ``greedy_match``: share of identical positions.
    """

    context: int
    index: int
    kl: float
    kl_max: float
    top1: float
    nll: float
    nll_full: float
    greedy_prefix: Optional[int]
    greedy_match: Optional[float]

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def kl_top1_nll(full: np.ndarray, other: np.ndarray, targets: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per position: KL(p_full || p_other), top-1 agreement (0/1), and -log p_other(target).

    ``full`` and ``other``: [T, V] log-probabilities (float32 on disk, computed in float64 here).
    """
    f = full.astype(np.float64)
    o = other.astype(np.float64)
    p = np.exp(f)
    with np.errstate(invalid="ignore"):  # 0 * (-inf) where a token has no mass under full
        terms = np.where(p > 0, p * (f - o), 0.0)
    kl = terms.sum(axis=-1)
    top1 = (f.argmax(-1) == o.argmax(-1)).astype(np.float64)
    nll = -o[np.arange(len(targets)), np.asarray(targets)]
    return kl, top1, nll


def greedy_agreement(reference: list[int], other: list[int]) -> tuple[int, float]:
    """(identical leading tokens, share of identical positions) of two greedy continuations."""
    n = min(len(reference), len(other))
    prefix = next((i for i in range(n) if reference[i] != other[i]), n)
    match = sum(a == b for a, b in zip(reference, other)) / max(len(reference), 1)
    return prefix, match


def fidelity(full_file: Path, other_file: Path, targets: list[int], context: int, index: int,
             full_greedy: Optional[list[int]], greedy: Optional[list[int]]) -> Fidelity:
    full = np.load(full_file, mmap_mode="r")
    other = np.load(other_file, mmap_mode="r")
    kl, top1, nll = kl_top1_nll(np.asarray(full), np.asarray(other), targets)
    _, _, nll_full = kl_top1_nll(np.asarray(full), np.asarray(full), targets)
    prefix, match = (greedy_agreement(full_greedy, greedy) if full_greedy is not None and greedy is not None
                     else (None, None))
    return Fidelity(context, index, float(kl.mean()), float(kl.max()), float(top1.mean()), float(nll.mean()),
                    float(nll_full.mean()), prefix, match)


def prefix_credit(answers: Iterable[str], output_text: str) -> float:
    """Partial credit: per answer, the longest leading part of it that the output reproduces (as a share
    of its length), averaged over answers. "4642056" for "4642058" earns 6/7; "11" earns 0.

    Exact match (the task score) hides how close a compressed cache came; this shows it.
    """
    words = output_text.replace(",", " ").replace(".", " ").split()
    credits = []
    for answer in answers:
        best = 0
        for word in words:
            n = next((i for i, (a, b) in enumerate(zip(answer.lower(), word.lower())) if a != b),
                     min(len(answer), len(word)))
            best = max(best, n)
        credits.append(best / len(answer))
    return sum(credits) / len(credits) if credits else 0.0


def mean_by(rows: Iterable[dict[str, Any]], keys: tuple[str, ...], value: str) -> dict[tuple, float]:
    """Mean of ``value`` over rows grouped by ``keys``."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    for row in rows:
        if row.get(value) is not None:
            groups[tuple(row[k] for k in keys)].append(float(row[value]))
    return {k: sum(v) / len(v) for k, v in groups.items()}
