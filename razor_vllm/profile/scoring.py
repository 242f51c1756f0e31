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
    """Accumulates echo/induction attention for one forward pass over one sequence (batch size 1).

    Two ways to get the attention each scored query pays to its echo/induction keys:

    - streaming (``key_block_size`` set, the default): for each block of ``block_size`` queries, walk
      the keys in blocks of ``key_block_size``, keep a running row maximum and softmax normaliser
      (as flash attention does) and pick out only the raw logits at the echo/induction positions;
      at the end ``p = exp(logit - max) / normaliser``. Nothing of size ``L`` per row is kept, so the
      largest tensor is one ``heads x block_size x key_block_size`` logit tile whatever the probe
      length (the paper's 10,001 tokens or more);
    - exact (``key_block_size=None``): one ``heads x block_size x L`` softmax per query block, as
      before; kept as the reference the streaming path is tested against.

    Every tensor lives on the device of the layer's query (with ``device_map="auto"`` layers sit
    on different GPUs; sums stay per layer on that device until :meth:`result`).
    ``max_tile_elements`` records the largest logit tile materialised (the peak-memory bound the
    tests check without timing or allocator statistics).
    """

    def __init__(
        self,
        input_ids: torch.Tensor,
        scored: torch.Tensor,
        num_layers: int,
        num_heads: int,
        block_size: int = 512,
        progress: bool = False,
        key_block_size: Optional[int] = 1024,
    ) -> None:
        if input_ids.dim() != 1 or scored.shape != input_ids.shape:
            raise ValueError("input_ids and scored must be 1-D tensors of the same length")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if key_block_size is not None and key_block_size < 1:
            raise ValueError(f"key_block_size must be >= 1 (or None: exact rows), got {key_block_size}")
        self.seq_len = int(input_ids.numel())
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.block_size = block_size
        self.key_block_size = key_block_size
        self.num_scored = int(scored.sum())
        if self.num_scored == 0:
            raise ValueError("no scored query positions")
        self.qpos, self.kpos = copy_pairs(input_ids.cpu(), scored.cpu())
        self._sums: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> (echo, induction) on its device
        self.layers_seen: list[int] = []
        self.max_tile_elements = 0
        first = int(torch.nonzero(scored.cpu())[0])
        self._blocks = [(a, min(a + block_size, self.seq_len)) for a in range(first, self.seq_len, block_size)]
        bounds = torch.searchsorted(
            self.qpos, torch.tensor([b for blk in self._blocks for b in blk], dtype=torch.int64)
        )
        # Per query block: (rows, echo cols, induction cols) of its copy pairs, CPU int64.
        self._pairs = [
            (self.qpos[lo:hi] - a, self.kpos[lo:hi], self.kpos[lo:hi] + 1)
            for (a, _), lo, hi in zip(self._blocks, bounds[0::2].tolist(), bounds[1::2].tolist())
        ]
        self._device_pairs: dict[torch.device, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
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
        echo = torch.stack([self._sums[layer][0].cpu() for layer in expected])
        induction = torch.stack([self._sums[layer][1].cpu() for layer in expected])
        return QueryHeadScores(
            echo=echo / self.num_scored, induction=induction / self.num_scored, num_scored=self.num_scored
        )

    def _pairs_on(self, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        if device not in self._device_pairs:
            self._device_pairs[device] = [tuple(t.to(device) for t in pair) for pair in self._pairs]
        return self._device_pairs[device]

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
        device = query.device
        group = n_heads // n_kv
        dtype = torch.promote_types(query.dtype, torch.float32)
        q = query[0].to(dtype).reshape(n_kv, group, q_len, head_dim)
        k = key[0].to(dtype)
        mask = None if attention_mask is None else attention_mask[0]  # (1 or H, L, L)
        echo = torch.zeros(n_heads, dtype=torch.float64, device=device)
        induction = torch.zeros(n_heads, dtype=torch.float64, device=device)
        for (a, b), (rows, echo_cols, ind_cols) in zip(self._blocks, self._pairs_on(device)):
            if rows.numel() == 0:
                continue
            if self.key_block_size is None:
                probs = self._block_probs(q[:, :, a:b], k[:, :b], mask, a, b, scaling)  # (H, b - a, b)
                self.max_tile_elements = max(self.max_tile_elements, probs.numel())
                echo += probs[:, rows, echo_cols].sum(-1, dtype=torch.float64)
                induction += probs[:, rows, ind_cols].sum(-1, dtype=torch.float64)
            else:
                e, i = self._block_streaming(q[:, :, a:b], k, mask, a, b, scaling, rows, echo_cols, ind_cols)
                echo += e
                induction += i
        self._sums[layer] = (echo, induction)
        self.layers_seen.append(layer)
        if self._progress is not None:
            self._progress.update(1)

    def _logits(self, q: torch.Tensor, k: torch.Tensor, mask: Optional[torch.Tensor], a: int, c: int, scaling: float):
        """Masked logits of queries ``[a, a + B)`` for keys ``[c, c + K)``.

        q (Hkv, G, B, d), k (Hkv, K, d) -> (H, B, K)."""
        n_kv, group, rows, head_dim = q.shape
        cols = k.shape[1]
        logits = torch.bmm(q.reshape(n_kv, group * rows, head_dim), k.transpose(1, 2))
        logits = logits.view(n_kv * group, rows, cols).mul_(scaling)
        self.max_tile_elements = max(self.max_tile_elements, logits.numel())
        if c + cols - 1 > a:  # the tile reaches past some query's own position
            future = torch.ones(rows, cols, dtype=torch.bool, device=q.device).triu_(a - c + 1)
            logits.masked_fill_(future, -math.inf)
        if mask is not None:
            tile_mask = mask[:, a : a + rows, c : c + cols]
            if tile_mask.dtype == torch.bool:
                logits.masked_fill_(~tile_mask, -math.inf)
            else:
                logits.add_(tile_mask.to(logits.dtype))
        return logits

    def _block_streaming(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        mask: Optional[torch.Tensor],
        a: int,
        b: int,
        scaling: float,
        rows: torch.Tensor,
        echo_cols: torch.Tensor,
        ind_cols: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Echo and induction attention summed over one query block, keys visited tile by tile."""
        n_heads = q.shape[0] * q.shape[1]
        width = self.key_block_size
        device = q.device
        running_max = torch.full((n_heads, b - a), -math.inf, dtype=q.dtype, device=device)
        normaliser = torch.zeros(n_heads, b - a, dtype=q.dtype, device=device)
        echo_logits = torch.full((n_heads, rows.numel()), -math.inf, dtype=q.dtype, device=device)
        ind_logits = torch.full_like(echo_logits, -math.inf)
        for c in range(0, b, width):
            d = min(c + width, b)
            logits = self._logits(q, k[:, c:d], mask, a, c, scaling)  # (H, B, d - c)
            new_max = torch.maximum(running_max, logits.amax(-1))
            shift = new_max.masked_fill(new_max == -math.inf, 0.0)  # rows with no key yet: nothing to rescale
            normaliser.mul_(torch.exp(running_max - shift)).add_(torch.exp(logits - shift[..., None]).sum(-1))
            running_max = new_max
            for cols, out in ((echo_cols, echo_logits), (ind_cols, ind_logits)):
                here = ((cols >= c) & (cols < d)).nonzero().squeeze(-1)
                if here.numel():
                    out[:, here] = logits[:, rows[here], cols[here] - c]
        shift = running_max.masked_fill(running_max == -math.inf, 0.0)[:, rows]
        total = normaliser[:, rows]
        echo = (torch.exp(echo_logits - shift) / total).sum(-1, dtype=torch.float64)
        induction = (torch.exp(ind_logits - shift) / total).sum(-1, dtype=torch.float64)
        return echo, induction

    @staticmethod
    def _block_probs(
        q: torch.Tensor, k: torch.Tensor, mask: Optional[torch.Tensor], a: int, b: int, scaling: float
    ) -> torch.Tensor:
        """softmax over keys [0, b) for queries [a, b); q (Hkv, G, B, d), k (Hkv, b, d) -> (Hkv * G, B, b)."""
        n_kv, group, rows, head_dim = q.shape
        logits = torch.bmm(q.reshape(n_kv, group * rows, head_dim), k.transpose(1, 2))
        logits = logits.view(n_kv * group, rows, b).mul_(scaling)
        future = torch.ones(rows, b, dtype=torch.bool, device=q.device).triu_(a + 1)
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


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str = "auto") -> str:
    """``auto``: ``cuda`` when a GPU is visible, else ``cpu``; ``cuda``/``cuda:N`` checked to exist."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is visible to torch")
    if not (device == "cpu" or device.startswith("cuda")):
        raise ValueError(f"--device must be cpu, cuda, cuda:N or auto, got {device!r}")
    return device


def resolve_dtype(dtype: str | torch.dtype, device: str) -> torch.dtype:
    """``auto``: bfloat16 on a GPU that supports it (else float16), float32 on the CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}")
    return DTYPES[dtype]


def load_model(
    model_dir: str,
    dtype: str | torch.dtype = torch.float32,
    device: str = "cpu",
    device_map: Optional[str] = None,
) -> torch.nn.Module:
    """A causal LM from ``model_dir`` in ``dtype`` with the probe attention installed.

    ``device_map="auto"`` spreads the layers over every visible GPU (and the CPU if they run out)
    through accelerate; otherwise the whole model goes to ``device``. The weights are loaded
    straight in ``dtype`` (never a float32 copy first), so an 8B model in bf16 takes ~16 GB.
    """
    from transformers import AutoModelForCausalLM

    register()
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    kwargs: dict[str, Any] = dict(dtype=torch_dtype, attn_implementation=ATTN_IMPLEMENTATION)
    if device_map is not None:
        if device_map != "auto":
            raise ValueError(f"--device-map must be 'auto' (or absent), got {device_map!r}")
        try:
            import accelerate  # noqa: F401
        except ImportError as exc:
            raise ValueError("--device-map auto needs the 'accelerate' package (pip install accelerate)") from exc
        kwargs["device_map"] = "auto"
    elif device != "cpu":
        kwargs["device_map"] = device  # load each tensor straight onto the GPU
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    return model.eval()


def input_device(model: torch.nn.Module) -> torch.device:
    """Where the token ids must go: the input embedding's device (the first GPU under device_map)."""
    return model.get_input_embeddings().weight.device


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
    key_block_size: Optional[int] = 1024,
) -> QueryHeadScores:
    """Run ``model`` once over ``input_ids`` (1-D) and return echo/induction per (layer, query head).

    ``model`` must use the probe attention (:func:`load_model` or :func:`use_probe_attention`).
    Only the decoder stack runs (no LM head over every position), without a KV cache, on the
    model's own device(s). ``key_block_size=None`` scores with exact full rows (the reference path).
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
        key_block_size=key_block_size,
    )
    with torch.inference_mode(), scorer.active():
        model.base_model(input_ids=input_ids[None].to(input_device(model)), use_cache=False)
    return scorer.result()


def kv_head_scores(per_query_head: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """(layers, query heads) -> (layers, KV heads): max over the query heads sharing each KV head."""
    layers, heads = per_query_head.shape
    if heads % num_kv_heads:
        raise ValueError(f"{heads} query heads do not split into {num_kv_heads} KV heads")
    return per_query_head.view(layers, num_kv_heads, heads // num_kv_heads).amax(-1)
