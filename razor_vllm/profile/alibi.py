"""Retrieval heads of ALiBi models from the weights alone (RazorAttention, Theorem 1).

With ALiBi the logit of query ``m`` for key ``n`` is ``S = q_m . k_n - l_h (m - n)``. The content term is
bounded by ``|q_m . k_n| <= ||M_h||_2 ||x_m|| ||x_n||`` with ``M_h`` the head's bilinear form (including
the softmax scaling) and ``x`` the output of the norm before attention, whose squared length is about
``||gamma||^2 + ||b||^2`` (exactly ``||gamma||^2`` for gamma = 1, b = 0, since LayerNorm makes the
normalised vector's squared length the hidden size). So a key more than

    L_h = (2 ||M_h||_2 (||gamma||^2 + ||b||^2) - ln eps) / l_h

tokens back gets less than ``eps`` times the weight of the query's own position: the head never looks
further than ``L_h``. Heads whose ``L_h`` covers the context are retrieval heads; the others are local
and need only their last ``L_h`` tokens (the profile stores every ``L_h`` as the ``alibi_range`` scores,
and suggests the longest local range as the window).

Where the query/key projections have a bias we fold it in as one more input coordinate that is always 1
(``x~ = [x; 1]``, ``W~ = [W | b]``), which adds 1 to the squared length. ``||M_h||_2`` is computed from two
small QR factors, never from the hidden x hidden matrix. Supported layout: BLOOM (``query_key_value``
fused per head, ``input_layernorm``); other ALiBi families raise ``NotImplementedError``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterator, Optional, Union

import torch

from razor_vllm.config import ProfileError

from .selectors import HeadSelection, HeadSelector, context_length_of, fingerprint_of, round_scores


@dataclass(frozen=True)
class AlibiLayerParams:
    """One layer's per-head query/key maps and the norm feeding them (all float64)."""

    w_q: torch.Tensor  # (heads, head_dim, hidden)
    w_k: torch.Tensor
    b_q: Optional[torch.Tensor]  # (heads, head_dim) or None
    b_k: Optional[torch.Tensor]
    gamma: torch.Tensor  # (hidden,)
    beta: Optional[torch.Tensor]  # (hidden,) or None (RMSNorm)
    scaling: float


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """The standard ALiBi slopes (Press et al.; as BLOOM's ``build_alibi_tensor``), float64."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
    slopes = [base ** (i + 1) for i in range(closest)]
    if closest != num_heads:
        extra_base = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
        slopes += [extra_base**p for p in range(1, 1 + 2 * min(closest, num_heads - closest), 2)]
    return torch.tensor(slopes, dtype=torch.float64)


def bloom_layer_params(model: torch.nn.Module) -> Iterator[AlibiLayerParams]:
    """Per-layer parameters of a BLOOM model (``BloomForCausalLM`` or ``BloomModel``)."""
    base = getattr(model, "transformer", model)
    for block in base.h:
        attn = block.self_attention
        heads, head_dim = attn.num_heads, attn.head_dim
        weight = attn.query_key_value.weight.detach().double().view(heads, 3, head_dim, -1)
        bias = attn.query_key_value.bias
        bias = None if bias is None else bias.detach().double().view(heads, 3, head_dim)
        norm = block.input_layernorm
        yield AlibiLayerParams(
            w_q=weight[:, 0],
            w_k=weight[:, 1],
            b_q=None if bias is None else bias[:, 0],
            b_k=None if bias is None else bias[:, 1],
            gamma=norm.weight.detach().double(),
            beta=None if getattr(norm, "bias", None) is None else norm.bias.detach().double(),
            scaling=float(attn.inv_norm_factor),
        )


def qk_spectral_norms(params: AlibiLayerParams) -> torch.Tensor:
    """``||scaling * W~_q,h^T W~_k,h||_2`` per head, from the QR factors of the two (hidden+1) x head_dim maps."""
    w_q, w_k = params.w_q, params.w_k
    if params.b_q is not None or params.b_k is not None:
        zeros = torch.zeros(w_q.shape[:2], dtype=w_q.dtype)
        b_q = params.b_q if params.b_q is not None else zeros
        b_k = params.b_k if params.b_k is not None else zeros
        w_q = torch.cat([w_q, b_q[..., None]], dim=-1)
        w_k = torch.cat([w_k, b_k[..., None]], dim=-1)
    r_q = torch.linalg.qr(w_q.transpose(1, 2), mode="r").R  # (heads, head_dim, head_dim)
    r_k = torch.linalg.qr(w_k.transpose(1, 2), mode="r").R
    return params.scaling * torch.linalg.matrix_norm(r_q @ r_k.transpose(1, 2), ord=2)


def input_norm_sq(params: AlibiLayerParams) -> float:
    """``||gamma||^2 + ||b||^2`` (+1 for the bias coordinate when the projections have a bias)."""
    value = float(params.gamma.square().sum())
    if params.beta is not None:
        value += float(params.beta.square().sum())
    if params.b_q is not None or params.b_k is not None:
        value += 1.0
    return value


def head_range(qk_norm: torch.Tensor, norm_sq: float, slopes: torch.Tensor, eps: float) -> torch.Tensor:
    """Theorem 1: ``L_h = (2 ||M_h||_2 R^2 - ln eps) / l_h``."""
    return (2.0 * qk_norm * norm_sq - math.log(eps)) / slopes


def alibi_head_ranges(model: torch.nn.Module, eps: float = 1e-3) -> torch.Tensor:
    """``L_h`` for every (layer, head) of an ALiBi model, float64 (layers, heads)."""
    if not 0.0 < eps < 1.0:
        raise ValueError(f"eps must be in (0, 1), got {eps}")
    model_type = getattr(model.config, "model_type", "")
    if model_type != "bloom":
        raise NotImplementedError(f"ALiBi head ranges: only the BLOOM layout is supported, not '{model_type}'")
    rows = []
    for params in bloom_layer_params(model):
        slopes = alibi_slopes(params.w_q.shape[0])
        rows.append(head_range(qk_spectral_norms(params), input_norm_sq(params), slopes, eps))
    return torch.stack(rows)


@dataclass
class AlibiRangeSelector(HeadSelector):
    """Retrieval heads of an ALiBi model: those whose Theorem-1 range ``L_h`` reaches ``context_length``.

    ``context_length=None`` takes the model config's context length (an error if it names none).
    """

    method: ClassVar[str] = "alibi_range"

    eps: float = 1e-3
    context_length: Optional[int] = None

    def select(self, source: Union[str, Path, torch.nn.Module]) -> HeadSelection:
        if isinstance(source, torch.nn.Module):
            model = source
        else:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32)
        fingerprint = fingerprint_of(model)
        context = self.context_length or context_length_of(model.config)
        if context is None:
            raise ProfileError("the model config names no context length; give one (--context-length)")
        with torch.inference_mode():
            ranges = alibi_head_ranges(model, self.eps)
        scores = {"alibi_range": round_scores(ranges)}
        heads = [[h for h, r in enumerate(row) if r >= context] for row in scores["alibi_range"]]
        local = [r for row, keep in zip(scores["alibi_range"], heads) for h, r in enumerate(row) if h not in keep]
        window = min(context, math.ceil(max(local))) if local else None
        provenance: dict[str, Any] = dict(method=self.method, alibi_eps=self.eps, context_length=context)
        return HeadSelection(fingerprint, heads, scores, provenance, suggested_window=window)
