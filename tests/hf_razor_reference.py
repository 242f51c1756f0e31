"""An independent implementation of the razor rule inside HF transformers (float64, dense masks).

Written from the semantics, not from our kernels: local heads mask to sinks + window and add one
compensation logit from prefix sums of the keys/values; retrieval heads are plain causal. With
exact prefill (the paper) a local head's query at a position before the prompt's end is plain causal
too; only the answer's queries see sinks + window + compensation.
"""

from __future__ import annotations

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
    for h in range(num_q):
        if h // g in retrieval:
            out[:, h] = logits[:, h].masked_fill(~causal, float("-inf")).softmax(-1) @ v[:, h]
            continue
        k_hat = (prefix_k[:, h, dropped_end] - prefix_k[:, h, sink]) / count[None, :, None]
        v_hat = (prefix_v[:, h, dropped_end] - prefix_v[:, h, sink]) / count[None, :, None]
        comp = (q[:, h] * k_hat).sum(-1) * scaling + torch.log(count)[None]
        comp = torch.where(n_dropped[None] > 0, comp, torch.full_like(comp, float("-inf")))
        probs = torch.cat([comp[..., None], logits[:, h].masked_fill(~local, float("-inf"))], -1).softmax(-1)
        out[:, h] = probs[..., :1] * v_hat + probs[..., 1:] @ v[:, h]
        exact = logits[:, h].masked_fill(~causal, float("-inf")).softmax(-1) @ v[:, h]
        out[:, h] = torch.where(prompt_query[None, :, None], exact, out[:, h])
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


AttentionInterface.register("razor_reference", _razor_attention)
AttentionMaskInterface.register("razor_reference", sdpa_mask)


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
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="razor_reference")
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
