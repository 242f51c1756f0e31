"""Published head files, imported as profiles.

- DuoAttention (mit-han-lab/duo-attention) ships ``full_attention_heads.tsv``: one line per layer, one
  tab-separated float per KV head (the learned gate; near 1 = needs the full cache). Selection: gate
  ``>= threshold`` (default 0.5), or the global top ``ratio`` of KV heads.
- KVzip (snu-mllab/KVzip) ships ``utils/head_score/<model>-<task>-<idx>.pt``: one torch tensor of
  shape [layers, KV heads] (KVzip's head-level importance, max-pooled over the context). Several files
  for one model are combined with an elementwise max, as KVzip's own ``load_head_score`` does.
  Selection: score ``>= threshold`` (no default cut-off is published: give one) or the global top
  ``ratio``.
- Retrieval Head (nightdessert/Retrieval_Head) ships ``head_score/<model>.json``: ``{"layer-head": [scores]}``
  over *query* heads. A head's score is the mean of its list (as in that repo); a KV head takes the max
  over the query heads of its group (query head ``h`` reads KV head ``h // (heads / kv_heads)``).
  Selection: score ``>= threshold`` (default 0.1, the paper's cut-off), or the global top ``ratio``.

Both need the target model's fingerprint (a checkpoint dir: only its config.json is read).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Optional, Sequence, Union

from razor_vllm.config import ModelFingerprint, ProfileError

from .selectors import (
    HeadSelection,
    HeadSelector,
    ModelSource,
    ScoreTable,
    fingerprint_of,
    global_top_k,
    round_scores,
    select_threshold,
    top_k_count,
)


def select_ratio_with_ties(table: ScoreTable, ratio: float) -> list[list[int]]:
    """The global top ``ratio`` of KV heads, and every head scoring the same as the last one kept.

    Published scores tie a lot (DuoAttention's learned gates saturate: 22-43% of the 8B models' KV
    heads sit at exactly 1.0), and a cut inside a tie would be an arbitrary choice (DuoAttention's own
    code adds random noise; a lower-layer-first tie-break piles every pick into the first layers).
    Keeping the whole tie never drops a head the source rates as high as a kept one; the share can
    then exceed ``ratio``.
    """
    total = sum(len(row) for row in table)
    k = top_k_count(ratio, total)
    if k == 0:
        return [[] for _ in table]
    layer, head = global_top_k(table, k)[-1]
    return select_threshold(table, table[layer][head])


@dataclass
class _ImportSelector(HeadSelector):
    path: Union[str, Path, Sequence[Union[str, Path]]]
    threshold: Optional[float] = None
    ratio: Optional[float] = None

    default_threshold: ClassVar[Optional[float]]
    score_name: ClassVar[str]

    def __post_init__(self) -> None:
        if self.default_threshold is None and self.threshold is None and self.ratio is None:
            raise ValueError(f"{self.method}: give a threshold or a ratio (the source publishes no cut-off)")
        if self.threshold is not None and self.ratio is not None:
            raise ValueError("give a threshold or a ratio, not both")
        if self.ratio is not None and not 0.0 <= self.ratio <= 1.0:
            raise ValueError(f"ratio must be in [0, 1], got {self.ratio}")

    def select(self, source: ModelSource) -> HeadSelection:
        fingerprint = fingerprint_of(source)
        paths = [Path(p) for p in (self.path if isinstance(self.path, (list, tuple)) else [self.path])]
        for path in paths:
            if not path.is_file():
                raise ProfileError(f"{path}: no such file")
        table = round_scores(self.read_all(paths, fingerprint))
        provenance: dict[str, Any] = dict(method=self.method, source=", ".join(str(p) for p in paths))
        if self.ratio is not None:
            heads = select_ratio_with_ties(table, self.ratio)
            provenance["ratio"] = self.ratio
        else:
            threshold = self.default_threshold if self.threshold is None else self.threshold
            heads = select_threshold(table, threshold)
            provenance["threshold"] = threshold
        return HeadSelection(fingerprint, heads, {self.score_name: table}, provenance)

    def read_scores(self, path: Path, model: ModelFingerprint) -> ScoreTable:
        raise NotImplementedError

    def read_all(self, paths: list[Path], model: ModelFingerprint) -> ScoreTable:
        """One file's table; several files: the elementwise max (a head important for any of them)."""
        tables = [self.read_scores(path, model) for path in paths]
        return [[max(values) for values in zip(*rows)] for rows in zip(*tables)]


@dataclass
class DuoAttentionImport(_ImportSelector):
    """DuoAttention's ``full_attention_heads.tsv`` (layers x KV heads of gate values)."""

    method: ClassVar[str] = "duo_attention"
    default_threshold: ClassVar[float] = 0.5
    score_name: ClassVar[str] = "duo_attention"

    def read_scores(self, path: Path, model: ModelFingerprint) -> ScoreTable:
        rows = []
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = [float(x) for x in line.split()]
            except ValueError as exc:
                raise ProfileError(f"{path} line {lineno}: not a row of numbers ({exc})") from exc
            if any(not math.isfinite(x) for x in row):
                raise ProfileError(f"{path} line {lineno}: non-finite value")
            rows.append(row)
        shape = (len(rows), sorted({len(r) for r in rows}))
        if len(rows) != model.num_layers or any(len(r) != model.num_kv_heads for r in rows):
            raise ProfileError(
                f"{path}: {shape[0]} rows of {'/'.join(map(str, shape[1])) or 0} values, the model has "
                f"{model.num_layers} layers x {model.num_kv_heads} KV heads"
            )
        return rows


@dataclass
class KVzipImport(_ImportSelector):
    """KVzip's ``utils/head_score/*.pt`` (a [layers, KV heads] tensor); several files: elementwise max."""

    method: ClassVar[str] = "kvzip"
    default_threshold: ClassVar[Optional[float]] = None
    score_name: ClassVar[str] = "kvzip"

    def read_scores(self, path: Path, model: ModelFingerprint) -> ScoreTable:
        import torch

        try:
            # weights_only: a plain tensor, no pickled code; saved from CUDA, hence map_location
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
            raise ProfileError(f"{path}: not a torch tensor file: {exc}") from exc
        if not isinstance(data, torch.Tensor):
            raise ProfileError(f"{path}: expected one tensor [layers, KV heads], got {type(data).__name__}")
        table = data.squeeze().double()
        if table.shape != (model.num_layers, model.num_kv_heads):
            raise ProfileError(
                f"{path}: a tensor of shape {list(data.shape)}, the model has "
                f"{model.num_layers} layers x {model.num_kv_heads} KV heads"
            )
        if not torch.isfinite(table).all():
            raise ProfileError(f"{path}: non-finite value")
        return table.tolist()


@dataclass
class RetrievalHeadImport(_ImportSelector):
    """Retrieval Head's ``head_score/*.json`` (``{"layer-head": [scores]}`` over query heads)."""

    method: ClassVar[str] = "retrieval_head"
    default_threshold: ClassVar[float] = 0.1
    score_name: ClassVar[str] = "retrieval_head"

    def read_scores(self, path: Path, model: ModelFingerprint) -> ScoreTable:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ProfileError(f"{path}: not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ProfileError(f'{path}: expected an object {{"layer-head": [scores]}}, got {type(data).__name__}')
        group = model.num_attention_heads // model.num_kv_heads
        best: list[list[Optional[float]]] = [[None] * model.num_kv_heads for _ in range(model.num_layers)]
        for key, values in data.items():
            try:
                layer, head = (int(x) for x in key.split("-"))
            except ValueError:
                raise ProfileError(f"{path}: key '{key}' is not 'layer-head'") from None
            if not (0 <= layer < model.num_layers and 0 <= head < model.num_attention_heads):
                raise ProfileError(
                    f"{path}: key '{key}' outside the model ({model.num_layers} layers x "
                    f"{model.num_attention_heads} query heads)"
                )
            values = values if isinstance(values, list) else [values]
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                raise ProfileError(f"{path}: key '{key}' holds non-numeric scores")
            score = sum(values) / len(values) if values else 0.0
            kv = head // group
            current = best[layer][kv]
            best[layer][kv] = float(score) if current is None else max(current, float(score))
        # Heads the file does not list score 0.
        return [[0.0 if s is None else s for s in row] for row in best]
