"""Scores: task accuracy per cell, and fidelity of a variant's next-token distributions to the full cache."""

from __future__ import annotations

import math
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


def fidelity(
    full_file: Path,
    other_file: Path,
    targets: list[int],
    context: int,
    index: int,
    full_greedy: Optional[list[int]],
    greedy: Optional[list[int]],
) -> Fidelity:
    full = np.load(full_file, mmap_mode="r")
    other = np.load(other_file, mmap_mode="r")
    kl, top1, nll = kl_top1_nll(np.asarray(full), np.asarray(other), targets)
    _, _, nll_full = kl_top1_nll(np.asarray(full), np.asarray(full), targets)
    prefix, match = (
        greedy_agreement(full_greedy, greedy) if full_greedy is not None and greedy is not None else (None, None)
    )
    return Fidelity(
        context,
        index,
        float(kl.mean()),
        float(kl.max()),
        float(top1.mean()),
        float(nll.mean()),
        float(nll_full.mean()),
        prefix,
        match,
    )


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
            n = next(
                (i for i, (a, b) in enumerate(zip(answer.lower(), word.lower())) if a != b), min(len(answer), len(word))
            )
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


def wilson_interval(successes: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval (95% by default) of a proportion: ``successes`` of ``n`` trials.

    Sound at 0% and 100% and for small ``n``, where the normal approximation gives impossible bounds.
    ``successes`` may be fractional (tasks with several answers score a share of them).
    """
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def interval_by(
    rows: Iterable[dict[str, Any]], keys: tuple[str, ...], value: str
) -> dict[tuple, tuple[float, float, int]]:
    """(mean, Wilson low, Wilson high) and count of ``value`` (a score in [0, 1]) grouped by ``keys``."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    for row in rows:
        if row.get(value) is not None:
            groups[tuple(row[k] for k in keys)].append(float(row[value]))
    out = {}
    for k, v in groups.items():
        low, high = wilson_interval(sum(v), len(v))
        out[k] = (sum(v) / len(v), low, high, len(v))
    return out


def pareto_front(points: Iterable[tuple[float, float, Any]]) -> list[tuple[float, float, Any]]:
    """The points (budget, accuracy, label) no other point beats: none with a budget at most as large
    and a higher accuracy, or a smaller budget and the same accuracy. Sorted by budget."""
    front: list[tuple[float, float, Any]] = []
    best = -math.inf
    for budget, accuracy, label in sorted(points, key=lambda p: (p[0], -p[1])):
        if accuracy > best:
            front.append((budget, accuracy, label))
            best = accuracy
    return front
