"""An independent implementation of the razor rule inside HF transformers (float64, dense masks).

Written from the semantics, not from our kernels: local heads mask to sinks + window and add one
compensation logit from prefix sums of the keys/values; retrieval heads are plain causal. With
exact prefill (the paper) a local head's query at a position before the prompt's end is plain causal
too; only the answer's queries see sinks + window + compensation.
"""

from __future__ import annotations

import functools
import math

import torch
from transformers import AttentionInterface, AttentionMaskInterface, AutoModelForCausalLM, AutoTokenizer
from transformers.masking_utils import sdpa_mask

_CONFIG: dict = {}


def _razor_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    retrieval = set(_CONFIG["retrieval_heads"][module.layer_idx])
    sink, window = _CONFIG["sink"], _CONFIG["window"]
    batch, num_q, len_q, _ = query.shape
    g = num_q // key.shape[1]
    len_k = key.shape[2]
    q = query.double()
    k = key.double().repeat_interleave(g, 1)
    v = value.double().repeat_interleave(g, 1)
    pos_q = torch.arange(len_k - len_q, len_k)
    pos_k = torch.arange(len_k)
    logits = torch.einsum("bhqd,bhkd->bhqk", q, k) * scaling
    causal = pos_k[None, :] <= pos_q[:, None]
    local = causal & ((pos_k[None, :] < sink) | (pos_k[None, :] >= pos_q[:, None] - window + 1))
    prefix_k = torch.cat([torch.zeros_like(k[:, :, :1]), k.cumsum(2)], 2)
    prefix_v = torch.cat([torch.zeros_like(v[:, :, :1]), v.cumsum(2)], 2)
    n_dropped = (pos_q - window + 1 - sink).clamp(min=0)
    dropped_end = (pos_q - window + 1).clamp(min=sink)
    count = n_dropped.clamp(min=1).double()
    out = torch.empty_like(q)
    prompt_query = pos_q < _CONFIG["prompt_len"] if _CONFIG["exact_prefill"] else torch.zeros_like(causal[:, 0])
    # Which queries follow which rule: plain causal (retrieval heads; local heads' prompt queries
    # under exact prefill), or sinks + window + compensation. Only the rows a rule applies to are
    # computed (a prompt's rows under exact prefill never need the compressed rule).
    rule_rows = (~prompt_query).nonzero().squeeze(1)
    for h in range(num_q):
        causal_out = None
        if h // g in retrieval or bool(prompt_query.any()):
            causal_out = logits[:, h].masked_fill(~causal, float("-inf")).softmax(-1) @ v[:, h]
        if h // g in retrieval or rule_rows.numel() == 0:
            out[:, h] = causal_out
            continue
        rows = rule_rows
        k_hat = (prefix_k[:, h, dropped_end[rows]] - prefix_k[:, h, sink]) / count[None, rows, None]
        v_hat = (prefix_v[:, h, dropped_end[rows]] - prefix_v[:, h, sink]) / count[None, rows, None]
        comp = (q[:, h, rows] * k_hat).sum(-1) * scaling + torch.log(count[rows])[None]
        comp = torch.where(n_dropped[rows][None] > 0, comp, torch.full_like(comp, float("-inf")))
        local_logits = logits[:, h, rows].masked_fill(~local[rows], float("-inf"))
        probs = torch.cat([comp[..., None], local_logits], -1).softmax(-1)
        if causal_out is not None:
            out[:, h] = causal_out
        out[:, h, rows] = probs[..., :1] * v_hat + probs[..., 1:] @ v[:, h]
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


AttentionInterface.register("razor_reference", _razor_attention)
AttentionMaskInterface.register("razor_reference", sdpa_mask)


@functools.cache
def _load(model_dir: str):
    """The tokenizer and the float32 model with the reference attention (loaded once per model)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="razor_reference")
    return tokenizer, model


def razor_greedy(
    model_dir,
    prompt: str,
    retrieval_heads,
    sink: int,
    window: int,
    max_new_tokens: int,
    exact_prefill: bool = True,
    compression_ratio=None,
) -> list[int]:
    """Greedy continuation token ids of ``prompt`` under the razor rule (float32 weights, float64 attention).

    ``compression_ratio``: the paper's window rule, max(window, ceil(N / C)) for an N-token prompt.
    """
    tokenizer, model = _load(str(model_dir))
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    prompt_len = ids.shape[1]
    if compression_ratio is not None:
        window = max(window, math.ceil(prompt_len / compression_ratio))
    _CONFIG.update(
        retrieval_heads=retrieval_heads, sink=sink, window=window, prompt_len=prompt_len, exact_prefill=exact_prefill
    )
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, ids.shape[1] :].tolist()
