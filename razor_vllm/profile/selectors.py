"""Head selectors: one small class per way of finding retrieval heads, all behind :class:`HeadSelector`.

``selector.select(source)`` returns a :class:`HeadSelection` (retrieval KV heads per layer, the score
tables behind them, the settings used); ``selection.to_profile(...)`` turns it into a
:class:`~razor_vllm.config.RazorProfile`. This module holds the interface, the global top-k rule shared by
the selectors and the paper's probe selector (:class:`EchoInductionSelector`); the ALiBi and import
selectors live in ``alibi.py`` and ``importers.py``.

Selection rule (the RazorAttention paper, arXiv 2407.15891): over all (layer, KV head) pairs of the model,
the top ``induction_ratio`` by induction score united with the top ``echo_ratio`` by echo score. A ratio
``r`` of ``N`` heads means ``k = floor(r * N + 0.5)`` heads (round half up), at least 1 when ``r > 0``;
ties go to the lower layer, then the lower head id. Scores are stored rounded to 6 significant digits and
the selection is made on the stored values, so re-selecting from a saved profile reproduces it exactly.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping, Optional, Sequence, Union

import torch

import razor_vllm
from razor_vllm.config import ModelFingerprint, ProfileError, Provenance, RazorProfile, utc_now

from . import probe as _probe
from . import scoring

ScoreTable = list[list[float]]  # [layer][kv_head]
ModelSource = Union[str, Path, torch.nn.Module, ModelFingerprint]

#: Significant digits kept for stored scores (and used for selection).
SCORE_DIGITS = 6
#: Profile defaults for local heads: sink tokens and recent window.
DEFAULT_SINK = 4
DEFAULT_WINDOW = 256


@dataclass(frozen=True)
class HeadSelection:
    """What a selector found: retrieval KV heads per layer (global ids), the scores, the settings used."""

    model: ModelFingerprint
    retrieval_heads: list[list[int]]
    scores: dict[str, ScoreTable]
    provenance: dict[str, Any]  # Provenance fields except command/tool_version/created
    suggested_window: Optional[int] = None  # e.g. ALiBi: the longest range among local heads
    stats: dict[str, Any] = field(default_factory=dict)  # run statistics for the report (not stored)

    def to_profile(
        self,
        *,
        sink: int = DEFAULT_SINK,
        window: Optional[int] = None,
        command: str = "",
        note: Optional[str] = None,
    ) -> RazorProfile:
        """The profile; ``window=None`` takes the selector's suggestion, else :data:`DEFAULT_WINDOW`."""
        window = window if window is not None else (self.suggested_window or DEFAULT_WINDOW)
        provenance = Provenance(
            command=command, tool_version=razor_vllm.__version__, created=utc_now(), note=note, **self.provenance
        )
        return RazorProfile(
            model=self.model,
            sink=sink,
            window=window,
            retrieval_heads=self.retrieval_heads,
            scores=self.scores,
            provenance=provenance,
        )


class HeadSelector(abc.ABC):
    """Finds the retrieval KV heads of one model."""

    method: ClassVar[str]

    @abc.abstractmethod
    def select(self, source: Any) -> HeadSelection:
        """``source``: a checkpoint dir, a loaded transformers model, or what the selector scores from."""


# -- global selection --------------------------------------------------------------------------


def top_k_count(ratio: float, total: int) -> int:
    """``floor(ratio * total + 0.5)`` (round half up), at least 1 when ``ratio > 0``, at most ``total``."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    if ratio == 0.0:
        return 0
    return min(total, max(1, math.floor(ratio * total + 0.5 + 1e-9)))


def global_top_k(table: ScoreTable, k: int) -> list[tuple[int, int]]:
    """The ``k`` highest-scoring (layer, head) pairs; ties go to the lower layer, then the lower head."""
    ranked = sorted(((-float(score), layer, head) for layer, row in enumerate(table) for head, score in enumerate(row)))
    return [(layer, head) for _, layer, head in ranked[:k]]


def select_union(scores: Mapping[str, ScoreTable], ratios: Mapping[str, float]) -> list[list[int]]:
    """Union over ``ratios`` of each score's global top ``ratio``: sorted KV-head ids per layer."""
    if not ratios:
        raise ValueError("no ratios given")
    first = scores[next(iter(ratios))]
    num_layers, num_kv = len(first), len(first[0]) if first else 0
    chosen: set[tuple[int, int]] = set()
    for name, ratio in ratios.items():
        if name not in scores:
            raise ProfileError(f"no '{name}' scores to select from (have: {', '.join(sorted(scores)) or 'none'})")
        chosen.update(global_top_k(scores[name], top_k_count(ratio, num_layers * num_kv)))
    return [sorted(h for l, h in chosen if l == layer) for layer in range(num_layers)]


def select_threshold(table: ScoreTable, threshold: float) -> list[list[int]]:
    """Every (layer, head) with score >= ``threshold``."""
    return [[h for h, s in enumerate(row) if s >= threshold] for row in table]


def round_scores(table: torch.Tensor | Sequence[Sequence[float]]) -> ScoreTable:
    """A (layers, heads) table as plain floats rounded to :data:`SCORE_DIGITS` significant digits."""
    rows = table.tolist() if isinstance(table, torch.Tensor) else table
    return [[float(f"{float(x):.{SCORE_DIGITS}g}") for x in row] for row in rows]


# -- model helpers -----------------------------------------------------------------------------


def hf_config_of(source: Union[str, Path, torch.nn.Module]) -> Any:
    if isinstance(source, torch.nn.Module):
        return source.config
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(source))


def fingerprint_of(source: ModelSource) -> ModelFingerprint:
    """The fingerprint of a checkpoint dir (reads only config.json), a loaded model, or a fingerprint."""
    if isinstance(source, ModelFingerprint):
        return source
    return ModelFingerprint.from_hf_config(hf_config_of(source))


def context_length_of(hf_config: Any) -> Optional[int]:
    cfg = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def prefix_id_of(hf_config: Any) -> int:
    """The probe's first token: the model's BOS id (0 when the config names none)."""
    cfg = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    bos = getattr(cfg, "bos_token_id", None)
    if isinstance(bos, (list, tuple)):
        bos = bos[0] if bos else None
    return int(bos) if bos is not None else 0


# -- the paper's probe selector ----------------------------------------------------------------


@dataclass
class EchoInductionSelector(HeadSelector):
    """RazorAttention's selector for RoPE (and other non-ALiBi) models: echo and induction scores on a
    random-token probe, top ``induction_ratio`` by induction united with top ``echo_ratio`` by echo.

    ``select`` takes a checkpoint dir or a loaded transformers model (probes it), or stored KV-head
    score tables ``{"induction": ..., "echo": ...}`` / a :class:`RazorProfile` holding them (only
    re-selects). ``tokens=None`` means the paper's 2,500, shortened so ``1 + tokens * repeats`` fits the
    model's context; ``vocab_range=None`` means :func:`probe.default_vocab_range`.
    """

    method: ClassVar[str] = "echo_induction"

    induction_ratio: float = 0.14
    echo_ratio: float = 0.01
    tokens: Optional[int] = None
    repeats: int = _probe.PAPER_REPEATS
    vocab_range: Optional[tuple[int, int]] = None
    seed: int = 0
    block_size: int = 512
    progress: bool = False
    # Where and how the model runs (checkpoint dirs only; a loaded model stays where it is).
    device: str = "cpu"
    dtype: Any = torch.float32  # a torch.dtype or "auto"/"float32"/"bfloat16"/"float16"
    device_map: Optional[str] = None
    key_block_size: Optional[int] = 1024  # None: exact full rows (the reference path)
    show_estimate: bool = False  # print the time/memory estimate (stderr) before loading

    def __post_init__(self) -> None:
        for name in ("induction_ratio", "echo_ratio"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if self.induction_ratio == 0.0 and self.echo_ratio == 0.0:
            raise ValueError("induction_ratio and echo_ratio are both 0: nothing would be selected")

    @property
    def ratios(self) -> dict[str, float]:
        return {"induction": self.induction_ratio, "echo": self.echo_ratio}

    def select(self, source: Any) -> HeadSelection:
        if isinstance(source, RazorProfile):
            return self._from_profile(source)
        if isinstance(source, Mapping):
            raise TypeError("pass stored scores as a RazorProfile (they need its model fingerprint)")
        return self._probe(source)

    def select_from_scores(self, scores: Mapping[str, ScoreTable]) -> list[list[int]]:
        """Global top ``induction_ratio`` by induction united with top ``echo_ratio`` by echo."""
        return select_union(scores, self.ratios)

    def _from_profile(self, profile: RazorProfile) -> HeadSelection:
        if profile.provenance.method != self.method:
            raise ProfileError(
                f"profile was produced by method '{profile.provenance.method}', it holds no echo/induction scores "
                "to re-select from"
            )
        heads = self.select_from_scores(profile.scores)
        keep = profile.provenance.model_dump(exclude={"command", "tool_version", "created", "note"})
        keep.update(induction_ratio=self.induction_ratio, echo_ratio=self.echo_ratio)
        return HeadSelection(profile.model, heads, dict(profile.scores), keep)

    def _probe(self, source: Union[str, Path, torch.nn.Module]) -> HeadSelection:
        if isinstance(source, torch.nn.Module):
            model, previous = source, source.config._attn_implementation
            scoring.use_probe_attention(model)
            try:
                return self._probe_loaded(model)
            finally:
                if previous != scoring.ATTN_IMPLEMENTATION:
                    model.set_attn_implementation(previous)
        if self.show_estimate:
            self._print_estimate(Path(source))
        return self._probe_loaded(
            scoring.load_model(str(source), dtype=self.dtype, device=self.device, device_map=self.device_map)
        )

    def probe_length(self, context: Optional[int]) -> int:
        return 1 + (self.tokens or _probe.default_tokens(self.repeats, context)) * self.repeats

    def _print_estimate(self, model_dir: Path) -> None:
        import sys

        from .estimate import estimate_for_checkpoint

        device = "cuda" if self.device_map == "auto" else scoring.resolve_device(self.device)
        dtype = scoring.resolve_dtype(self.dtype, device)
        length = self.probe_length(context_length_of(hf_config_of(model_dir)))
        est = estimate_for_checkpoint(model_dir, length, dtype, device, self.block_size, self.key_block_size)
        where = "the visible GPUs (device_map=auto)" if self.device_map == "auto" else device
        dtype_name = str(dtype).removeprefix("torch.")
        print(f"razor-vllm profile: {est.describe(length, f'{where}, {dtype_name}')}", file=sys.stderr)

    def _probe_loaded(self, model: torch.nn.Module) -> HeadSelection:
        import resource
        import time

        fingerprint = fingerprint_of(model)
        context = context_length_of(model.config)
        tokens = self.tokens or _probe.default_tokens(self.repeats, context)
        vocab_range = self.vocab_range or _probe.default_vocab_range(fingerprint.vocab_size, tokens)
        if vocab_range[1] > fingerprint.vocab_size:
            raise ValueError(f"probe vocab range {list(vocab_range)} exceeds the vocabulary ({fingerprint.vocab_size})")
        probe = _probe.make_probe(tokens, self.repeats, vocab_range, self.seed, prefix_id_of(model.config))
        if context is not None and probe.length > context:
            import warnings

            warnings.warn(
                f"probe of {probe.length} tokens is longer than the model's context ({context}); "
                "scores past the trained positions may not mean much",
                stacklevel=2,
            )
        start = time.perf_counter()
        per_query = scoring.score_probe(
            model,
            probe.input_ids,
            probe.scored_mask(),
            block_size=self.block_size,
            progress=self.progress,
            key_block_size=self.key_block_size,
        )
        elapsed = time.perf_counter() - start
        n_kv = fingerprint.num_kv_heads
        scores = {
            "induction": round_scores(scoring.kv_head_scores(per_query.induction, n_kv)),
            "echo": round_scores(scoring.kv_head_scores(per_query.echo, n_kv)),
        }
        heads = self.select_from_scores(scores)
        provenance = dict(
            method=self.method,
            seed=self.seed,
            probe_tokens=tokens,
            probe_repeats=self.repeats,
            probe_vocab_range=tuple(vocab_range),
            induction_ratio=self.induction_ratio,
            echo_ratio=self.echo_ratio,
            context_length=context,
        )
        stats = {
            "probe_length": probe.length,
            "probe_seconds": round(elapsed, 1),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
        }
        if torch.cuda.is_available() and any(p.is_cuda for p in model.parameters()):
            stats["peak_gpu_mib"] = sum(
                torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())
            ) // (1 << 20)
        return HeadSelection(fingerprint, heads, scores, provenance, stats=stats)
