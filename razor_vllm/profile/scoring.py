"""Echo and induction scores per layer and query head, without materialising the attention maps.

A custom attention function, registered with transformers' ``AttentionInterface`` under
``ATTN_IMPLEMENTATION``, receives every layer's post-RoPE query and key. It returns the layer's
ordinary output (transformers' own SDPA function, so later layers see the usual hidden states) and,
while a :class:`ProbeScorer` is active, recomputes ``softmax(q k^T * scaling + causal mask)`` for one
block of queries at a time (``block_size`` rows, all earlier keys) and adds up the attention each
scored query pays to

- echo:      every earlier position ``j < i`` holding the same token as ``i``;
- induction: the position ``j + 1`` right after each such ``j``.

Sums are divided by the number of scored queries. Peak extra memory is one block of
``num_heads x block_size x seq_len`` probabilities, never a whole map, let alone every layer's.
Grouped-query attention: each query head is scored against its own KV head (``h // group``);
:func:`kv_head_scores` then takes the max over the query heads that share a KV head.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch

ATTN_IMPLEMENTATION = "razor_probe"

_ACTIVE: contextvars.ContextVar[Optional["ProbeScorer"]] = contextvars.ContextVar("razor_probe_scorer", default=None)


@dataclass(frozen=True)
class QueryHeadScores:
    """Echo and induction score per (layer, query head), float64 tensors of shape (layers, heads)."""

    echo: torch.Tensor
    induction: torch.Tensor
    num_scored: int


def copy_pairs(input_ids: torch.Tensor, scored: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All ``(i, j)`` with ``i`` scored, ``j < i`` and ``input_ids[j] == input_ids[i]``, sorted by ``i`` then ``j``."""
    ids = input_ids.tolist()
    scored_list = scored.tolist()
    seen: dict[int, list[int]] = {}
    qpos: list[int] = []
    kpos: list[int] = []
    for i, tok in enumerate(ids):
        earlier = seen.setdefault(tok, [])
        if scored_list[i] and earlier:
            qpos.extend([i] * len(earlier))
            kpos.extend(earlier)
        earlier.append(i)
    return torch.tensor(qpos, dtype=torch.int64), torch.tensor(kpos, dtype=torch.int64)


class ProbeScorer:
    """Accumulates echo/induction attention for one forward pass over one sequence (batch size 1)."""

    def __init__(
        self,
        input_ids: torch.Tensor,
        scored: torch.Tensor,
        num_layers: int,
        num_heads: int,
        block_size: int = 512,
        progress: bool = False,
    ) -> None:
        if input_ids.dim() != 1 or scored.shape != input_ids.shape:
            raise ValueError("input_ids and scored must be 1-D tensors of the same length")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.seq_len = int(input_ids.numel())
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.block_size = block_size
        self.num_scored = int(scored.sum())
        if self.num_scored == 0:
            raise ValueError("no scored query positions")
        self.qpos, self.kpos = copy_pairs(input_ids, scored)
        self.echo_sum = torch.zeros(num_layers, num_heads, dtype=torch.float64)
        self.induction_sum = torch.zeros(num_layers, num_heads, dtype=torch.float64)
        self.layers_seen: list[int] = []
        first = int(torch.nonzero(scored)[0])
        self._blocks = [(a, min(a + block_size, self.seq_len)) for a in range(first, self.seq_len, block_size)]
        self._progress = None
        if progress:
            from tqdm.auto import tqdm

            self._progress = tqdm(total=num_layers, desc="probing layers", unit="layer")

    @contextlib.contextmanager
    def active(self) -> Iterator["ProbeScorer"]:
        token = _ACTIVE.set(self)
        try:
            yield self
        finally:
            _ACTIVE.reset(token)
            if self._progress is not None:
                self._progress.close()

    def result(self) -> QueryHeadScores:
        expected = list(range(self.num_layers))
        if sorted(self.layers_seen) != expected:
            raise RuntimeError(
                f"probe saw attention calls for layers {sorted(self.layers_seen)}, expected {expected}: the model "
                "does not route every layer's attention through transformers' AttentionInterface"
            )
        return QueryHeadScores(
            echo=self.echo_sum / self.num_scored,
            induction=self.induction_sum / self.num_scored,
            num_scored=self.num_scored,
        )

    def observe(
        self,
        layer: int,
        query: torch.Tensor,
        key: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        scaling: float,
    ) -> None:
        """Add one layer's echo/induction attention. ``query`` (1, H, L, d), ``key`` (1, Hkv, L, d), post-RoPE."""
        batch, n_heads, q_len, head_dim = query.shape
        n_kv, k_len = key.shape[1], key.shape[2]
        if batch != 1 or q_len != self.seq_len or k_len != self.seq_len:
            raise ValueError(
                f"probe scoring needs one sequence of {self.seq_len} tokens without a cache; "
                f"got query {tuple(query.shape)}, key {tuple(key.shape)}"
            )
        if n_heads != self.num_heads or n_heads % n_kv:
            raise ValueError(f"layer {layer}: {n_heads} query heads, {n_kv} KV heads, scorer expects {self.num_heads}")
        if layer in self.layers_seen:
            raise RuntimeError(f"layer {layer} observed twice in one probe pass")
        group = n_heads // n_kv
        dtype = torch.promote_types(query.dtype, torch.float32)
        q = query[0].to(dtype).reshape(n_kv, group, q_len, head_dim)
        k = key[0].to(dtype)
        mask = None if attention_mask is None else attention_mask[0]  # (1 or H, L, L)
        echo = torch.zeros(n_heads, dtype=torch.float64)
        induction = torch.zeros(n_heads, dtype=torch.float64)
        bounds = torch.searchsorted(self.qpos, torch.tensor([b for blk in self._blocks for b in blk]))
        for n, (a, b) in enumerate(self._blocks):
            lo, hi = int(bounds[2 * n]), int(bounds[2 * n + 1])
            if lo == hi:
                continue
            rows = self.qpos[lo:hi] - a
            cols = self.kpos[lo:hi]
            probs = self._block_probs(q[:, :, a:b], k[:, :b], mask, a, b, scaling)  # (H, b - a, b)
            echo += probs[:, rows, cols].sum(-1, dtype=torch.float64)
            induction += probs[:, rows, cols + 1].sum(-1, dtype=torch.float64)
        self.echo_sum[layer] += echo
        self.induction_sum[layer] += induction
        self.layers_seen.append(layer)
        if self._progress is not None:
            self._progress.update(1)

    @staticmethod
    def _block_probs(
        q: torch.Tensor, k: torch.Tensor, mask: Optional[torch.Tensor], a: int, b: int, scaling: float
    ) -> torch.Tensor:
        """softmax over keys [0, b) for queries [a, b); q (Hkv, G, B, d), k (Hkv, b, d) -> (Hkv * G, B, b)."""
        n_kv, group, rows, head_dim = q.shape
        logits = torch.bmm(q.reshape(n_kv, group * rows, head_dim), k.transpose(1, 2))
        logits = logits.view(n_kv * group, rows, b).mul_(scaling)
        future = torch.ones(rows, b, dtype=torch.bool).triu_(a + 1)
        logits.masked_fill_(future, -math.inf)
        if mask is not None:
            block_mask = mask[:, a:b, :b]
            if block_mask.dtype == torch.bool:
                logits.masked_fill_(~block_mask, -math.inf)
            else:
                logits.add_(block_mask.to(logits.dtype))
        return torch.softmax(logits, dim=-1)


def probe_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    scaling: Optional[float] = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """SDPA attention that also feeds the active :class:`ProbeScorer` (registered as ``razor_probe``)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    scorer = _ACTIVE.get()
    if scorer is not None:
        if kwargs.get("softcap") is not None:
            raise NotImplementedError("probe scoring does not support attention logit soft-capping")
        if attention_mask is not None and attention_mask.dim() != 4:
            raise ValueError(f"expected a 4-D attention mask or None, got shape {tuple(attention_mask.shape)}")
        scorer.observe(module.layer_idx, query, key, attention_mask, scaling)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def register() -> str:
    """Register ``razor_probe`` (attention function + SDPA's mask builder) with transformers; idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, probe_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
    return ATTN_IMPLEMENTATION


def load_model(model_dir: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A causal LM from ``model_dir`` on the CPU, in ``dtype``, with the probe attention installed."""
    from transformers import AutoModelForCausalLM

    register()
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, attn_implementation=ATTN_IMPLEMENTATION)
    return model.eval()


def use_probe_attention(model: torch.nn.Module) -> None:
    """Switch an already loaded transformers model to the probe attention."""
    register()
    model.set_attn_implementation(ATTN_IMPLEMENTATION)


def score_probe(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    scored: torch.Tensor,
    block_size: int = 512,
    progress: bool = False,
) -> QueryHeadScores:
    """Run ``model`` once over ``input_ids`` (1-D) and return echo/induction per (layer, query head).

    ``model`` must use the probe attention (:func:`load_model` or :func:`use_probe_attention`).
    Only the decoder stack runs (no LM head over every position), without a KV cache.
    """
    if getattr(model.config, "_attn_implementation", None) != ATTN_IMPLEMENTATION:
        raise ValueError(
            f"model uses attention implementation {model.config._attn_implementation!r}; "
            f"load it with profile.scoring.load_model or call use_probe_attention(model) first"
        )
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    scorer = ProbeScorer(
        input_ids,
        scored,
        num_layers=cfg.num_hidden_layers,
        num_heads=cfg.num_attention_heads,
        block_size=block_size,
        progress=progress,
    )
    with torch.inference_mode(), scorer.active():
        model.base_model(input_ids=input_ids[None], use_cache=False)
    return scorer.result()


def kv_head_scores(per_query_head: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """(layers, query heads) -> (layers, KV heads): max over the query heads sharing each KV head."""
    layers, heads = per_query_head.shape
    if heads % num_kv_heads:
        raise ValueError(f"{heads} query heads do not split into {num_kv_heads} KV heads")
    return per_query_head.view(layers, num_kv_heads, heads // num_kv_heads).amax(-1)
