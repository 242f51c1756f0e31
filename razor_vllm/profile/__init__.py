"""Finding retrieval heads: probes, head selectors and the profile they produce.

Public API::

    profile_model(model_dir, ...) -> RazorProfile      # probe (RoPE & co.) or Theorem 1 (ALiBi)
    reselect(profile, induction_ratio, echo_ratio)      # new ratios from the stored scores, no probe

    EchoInductionSelector, AlibiRangeSelector, DuoAttentionImport, RetrievalHeadImport
        one class per method, each ``select(source) -> HeadSelection``; ``HeadSelection.to_profile(...)``

The command line (``razor-vllm profile``) lives in :mod:`razor_vllm.profile.command`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from razor_vllm.config import RazorProfile

from .alibi import AlibiRangeSelector, alibi_head_ranges
from .importers import DuoAttentionImport, KVzipImport, RetrievalHeadImport
from .probe import Probe, default_tokens, default_vocab_range, make_probe
from .scoring import ATTN_IMPLEMENTATION, QueryHeadScores, kv_head_scores, score_probe
from .selectors import (
    DEFAULT_SINK,
    DEFAULT_WINDOW,
    EchoInductionSelector,
    HeadSelection,
    HeadSelector,
    fingerprint_of,
    global_top_k,
    select_union,
    top_k_count,
)

__all__ = [
    "ATTN_IMPLEMENTATION",
    "DEFAULT_SINK",
    "DEFAULT_WINDOW",
    "AlibiRangeSelector",
    "DuoAttentionImport",
    "EchoInductionSelector",
    "HeadSelection",
    "HeadSelector",
    "KVzipImport",
    "Probe",
    "QueryHeadScores",
    "RetrievalHeadImport",
    "alibi_head_ranges",
    "default_tokens",
    "default_vocab_range",
    "fingerprint_of",
    "global_top_k",
    "kv_head_scores",
    "make_probe",
    "profile_model",
    "reselect",
    "score_probe",
    "select_union",
    "top_k_count",
]


def selector_for(
    model_dir: str | Path,
    *,
    tokens: Optional[int] = None,
    repeats: int = 4,
    vocab_range: Optional[tuple[int, int]] = None,
    seed: int = 0,
    induction_ratio: float = 0.14,
    echo_ratio: float = 0.01,
    block_size: int = 512,
    alibi_eps: float = 1e-3,
    context_length: Optional[int] = None,
    progress: bool = False,
    device: str = "cpu",
    dtype="float32",
    device_map: Optional[str] = None,
    key_block_size: Optional[int] = 1024,
    show_estimate: bool = False,
) -> HeadSelector:
    """The paper's selector for this model: Theorem 1 for ALiBi models, the echo/induction probe otherwise."""
    if fingerprint_of(model_dir).position_encoding == "alibi":
        return AlibiRangeSelector(eps=alibi_eps, context_length=context_length)
    return EchoInductionSelector(
        induction_ratio=induction_ratio,
        echo_ratio=echo_ratio,
        tokens=tokens,
        repeats=repeats,
        vocab_range=vocab_range,
        seed=seed,
        block_size=block_size,
        progress=progress,
        device=device,
        dtype=dtype,
        device_map=device_map,
        key_block_size=key_block_size,
        show_estimate=show_estimate,
    )


def profile_model(
    model_dir: str | Path,
    *,
    sink: int = DEFAULT_SINK,
    window: Optional[int] = None,
    command: str = "",
    **selector_options,
) -> RazorProfile:
    """Find the retrieval heads of the checkpoint in ``model_dir`` and return its profile.

    ``selector_options`` go to :func:`selector_for` (probe size, seed, ratios, ALiBi eps, ...).
    ``window=None``: the selector's suggestion (ALiBi: the longest local range) or 256.
    """
    selection = selector_for(model_dir, **selector_options).select(model_dir)
    return selection.to_profile(sink=sink, window=window, command=command)


def reselect(
    profile: RazorProfile,
    induction_ratio: float = 0.14,
    echo_ratio: float = 0.01,
    *,
    sink: Optional[int] = None,
    window: Optional[int] = None,
    command: Optional[str] = None,
    note: Optional[str] = None,
) -> RazorProfile:
    """The same profile with its retrieval heads re-chosen from its stored echo/induction scores.

    Everything but the heads, sink/window (when given), and the provenance's command, date and note is
    kept: the model names a bundled profile is matched by, the compensation switch, the probe settings.
    """
    selection = EchoInductionSelector(induction_ratio=induction_ratio, echo_ratio=echo_ratio).select(profile)
    if command is None:
        command = (
            f"reselect(induction_ratio={induction_ratio}, echo_ratio={echo_ratio}) of: {profile.provenance.command}"
        )
    reselected = selection.to_profile(
        sink=profile.sink if sink is None else sink,
        window=profile.window if window is None else window,
        command=command,
        note=note,
    )
    return reselected.model_copy(update=dict(model_names=list(profile.model_names), compensation=profile.compensation))
