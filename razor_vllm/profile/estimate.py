"""What a probe run will take, from the model's config and the probe's size, printed before it starts.

Memory (peak, on the model's devices together):

- weights: the parameter count x bytes of ``--dtype`` (read from the checkpoint's safetensors sizes
  when present, else counted from the config: embeddings, attention, MLP, norms);
- one layer's activations at a time (no KV cache, ``inference_mode``): about four ``L x hidden``
  copies of the hidden state, q/k/v, the MLP's three ``L x intermediate`` tensors, and the float32
  copies of q and k the scorer works on;
- the scorer's tiles: a ``heads x block x key_block`` float32 logit tile, its exponential and a
  ``block x key_block`` causal mask. Independent of the probe length ``L``: the streaming softmax
  never holds a row of ``L`` logits (see scoring.py).

Time: the forward pass's matrix products (2 x parameters x L, plus causal attention
2 x heads x head_dim x L^2 per layer) and the scorer's own ``q k^T`` over the same causal half,
divided by a rate measured on the device in a fraction of a second (one scorer tile and one
``hidden x hidden`` product in ``--dtype``). Rough by design: it tells 2 minutes from 2 hours.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

DTYPE_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}
_CONFIG_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ModelSize:
    """The numbers of a config that the estimate needs."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "ModelSize":
        cfg = dict(cfg.get("text_config") or cfg)
        heads = int(cfg.get("num_attention_heads") or cfg.get("n_head"))
        hidden = int(cfg.get("hidden_size") or cfg.get("n_embd"))
        return cls(
            layers=int(cfg.get("num_hidden_layers") or cfg.get("n_layer")),
            hidden=hidden,
            intermediate=int(cfg.get("intermediate_size") or 4 * hidden),
            heads=heads,
            kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            vocab=int(cfg["vocab_size"]),
            tied=bool(cfg.get("tie_word_embeddings", False)),
        )

    @property
    def layer_params(self) -> int:
        attn = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        return attn + 3 * self.hidden * self.intermediate + 2 * self.hidden

    @property
    def params(self) -> int:
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return embeddings + self.layers * self.layer_params + self.hidden


@dataclass(frozen=True)
class Estimate:
    params: int
    weight_bytes: int
    activation_bytes: int
    scorer_bytes: int
    flops: float
    seconds: Optional[float]
    rate_note: str

    @property
    def peak_bytes(self) -> int:
        return self.weight_bytes + self.activation_bytes + self.scorer_bytes

    def describe(self, probe_length: int, where: str) -> str:
        gib = 1 << 30
        took = "unknown" if self.seconds is None else _duration(self.seconds)
        return (
            f"estimate for a {probe_length}-token probe on {where}: "
            f"~{self.params / 1e9:.2f}B parameters, peak memory ~{self.peak_bytes / gib:.1f} GiB "
            f"(weights {self.weight_bytes / gib:.1f}, one layer's activations {self.activation_bytes / gib:.2f}, "
            f"scorer tiles {self.scorer_bytes / gib:.3f}); ~{self.flops / 1e12:.0f} TFLOP, about {took} "
            f"({self.rate_note})"
        )


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def checkpoint_params(model_dir: Path, cfg: Mapping[str, Any]) -> Optional[int]:
    """Parameter count from the safetensors files' sizes and the checkpoint's dtype (None without them)."""
    files = list(Path(model_dir).glob("*.safetensors"))
    if not files:
        return None
    stored = str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32")
    return sum(f.stat().st_size for f in files) // _CONFIG_DTYPE_BYTES.get(stored, 4)


def estimate(
    size: ModelSize,
    probe_length: int,
    dtype: torch.dtype,
    block_size: int,
    key_block_size: Optional[int],
    params: Optional[int] = None,
    rates: Optional[tuple[float, float]] = None,
    rate_note: str = "no rate measured",
) -> Estimate:
    """The estimate for one probe of ``probe_length`` tokens; ``rates`` = (model FLOP/s, scorer FLOP/s)."""
    b = DTYPE_BYTES[dtype]
    L = probe_length
    params = params or size.params
    q_dim, kv_dim = size.heads * size.head_dim, size.kv_heads * size.head_dim
    activations = L * (4 * size.hidden + q_dim + 2 * kv_dim + 3 * size.intermediate) * b
    activations += L * (q_dim + kv_dim) * 4  # the scorer's float32 q and k
    width = L if key_block_size is None else min(key_block_size, L)
    rows = min(block_size, L)
    scorer = size.heads * rows * width * 4 * 2 + rows * width  # logits + exp (float32) + causal mask
    model_flops = 2.0 * (params - size.vocab * size.hidden * (1 if size.tied else 2)) * L
    model_flops += size.layers * 2.0 * size.heads * size.head_dim * L * L  # q k^T and p v, causal half each
    scorer_flops = size.layers * 2.0 * size.heads * size.head_dim * (L * L / 2 + L * rows / 2)
    seconds = None
    if rates is not None:
        seconds = model_flops / rates[0] + scorer_flops / rates[1]
    return Estimate(params, params * b, int(activations), int(scorer), model_flops + scorer_flops, seconds, rate_note)


def measure_rates(
    device: str, dtype: torch.dtype, size: ModelSize, block_size: int, key_block_size: int
) -> tuple[float, float]:
    """FLOP/s of one ``hidden x hidden`` product in ``dtype`` and of one float32 scorer tile on ``device``."""

    def rate(a: torch.Tensor, b_: torch.Tensor, flops: float) -> float:
        torch.matmul(a, b_)  # warm-up
        sync()
        reps, start = 0, time.perf_counter()
        while reps < 3 or time.perf_counter() - start < 0.2:
            torch.matmul(a, b_)
            sync()
            reps += 1
        return flops * reps / (time.perf_counter() - start)

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)

    n = min(size.hidden, 2048)
    x = torch.randn(512, n, dtype=dtype, device=device)
    w = torch.randn(n, n, dtype=dtype, device=device)
    model_rate = rate(x, w, 2.0 * 512 * n * n)
    q = torch.randn(size.kv_heads, (size.heads // size.kv_heads) * block_size, size.head_dim, device=device)
    k = torch.randn(size.kv_heads, size.head_dim, key_block_size, device=device)
    scorer_rate = rate(q, k, 2.0 * size.heads * block_size * size.head_dim * key_block_size)
    return model_rate, scorer_rate


def estimate_for_checkpoint(
    model_dir: Path,
    probe_length: int,
    dtype: torch.dtype,
    device: str,
    block_size: int,
    key_block_size: Optional[int],
    measure: bool = True,
) -> Estimate:
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    size = ModelSize.from_config(cfg)
    rates, note = None, "no rate measured"
    if measure:
        try:
            rates = measure_rates(device, dtype, size, min(block_size, probe_length), key_block_size or probe_length)
            note = f"measured here: {rates[0] / 1e12:.2f} TFLOP/s model, {rates[1] / 1e12:.2f} TFLOP/s scorer"
        except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:  # a busy device: print the memory part anyway
            note = f"rate not measured: {exc}"
    return estimate(
        size, probe_length, dtype, block_size, key_block_size, checkpoint_params(model_dir, cfg), rates, note
    )


__all__ = ["Estimate", "ModelSize", "estimate", "estimate_for_checkpoint", "measure_rates"]
