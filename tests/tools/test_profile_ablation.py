"""Evidence that the shipped profile's scores name the heads that matter (the paper's Table 1 ablation, in small).

On the real default model, a copy task (BOS + random tokens, the same tokens again; teacher-forced
next-token accuracy on the second copy) needs attention to the first copy, 200+ tokens back. Restricting
the top-scoring heads (the paper's 15% share of the shipped profile's scores, 14 heads; all of them among
the shipped profile's 35) to sink 4 + window 16 should break it; restricting as many randomly chosen
other heads should hurt far less.
"""

from __future__ import annotations

import random

import pytest
import torch

from razor_vllm.config import RazorProfile, bundled_profiles_dir
from razor_vllm.eval.variants import share_profile
from razor_vllm.model import DEFAULT_PROFILE_NAME

ATTN = "razor_test_local_heads"
SINK, WINDOW = 4, 16
COPY_LEN, NUM_SEQS, RANDOM_DRAWS = 200, 4, 3

# which KV heads of which layer are restricted to sink + window (None: none)
_restricted: dict[str, list[list[int]] | None] = {"heads": None}


def local_heads_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """SDPA where the query heads of the restricted KV heads see only [0, SINK) and the last WINDOW tokens."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    heads = _restricted["heads"]
    kv_heads = heads[module.layer_idx] if heads else []
    if kv_heads:
        n_heads, q_len, k_len = query.shape[1], query.shape[2], key.shape[2]
        group = n_heads // key.shape[1]
        i = torch.arange(q_len)[:, None] + (k_len - q_len)
        j = torch.arange(k_len)[None]
        causal = j <= i
        local = causal & ((j < SINK) | (i - j < WINDOW))
        allowed = causal.expand(n_heads, q_len, k_len).clone()
        for h in kv_heads:
            allowed[h * group : (h + 1) * group] = local
        assert attention_mask is None  # one unpadded batch: SDPA's mask builder returns None
        attention_mask = allowed[None]
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


@pytest.fixture(scope="module")
def model(default_model_dir):
    from transformers import AttentionInterface, AutoModelForCausalLM
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN, local_heads_attention)
    AttentionMaskInterface.register(ATTN, sdpa_mask)
    model = AutoModelForCausalLM.from_pretrained(str(default_model_dir), dtype=torch.float32, attn_implementation=ATTN)
    return model.eval()


def copy_accuracy(model, ids, heads):
    """Teacher-forced next-token accuracy on the second copy (its first token is not predictable)."""
    _restricted["heads"] = heads
    try:
        with torch.inference_mode():
            logits = model(ids, use_cache=False).logits
    finally:
        _restricted["heads"] = None
    pred = logits[:, COPY_LEN + 1 : 2 * COPY_LEN].argmax(-1)  # predictions for positions COPY_LEN+2 .. 2*COPY_LEN
    return (pred == ids[:, COPY_LEN + 2 :]).float().mean().item()


@pytest.mark.default_model
def test_restricting_retrieval_heads_breaks_copying_random_heads_do_not(model):
    shipped = RazorProfile.load(bundled_profiles_dir() / f"{DEFAULT_PROFILE_NAME}.yaml")
    # Pinned to the paper's share (14% induction + 1% echo) re-selected from the shipped profile's scores:
    # its 14 top-scoring heads. The shipped profile keeps 35 of 90 heads whole (its share was calibrated
    # for accuracy, see its provenance); 35 random heads would be most of the 55 others, so the ablation
    # needs the small selection. The shipped heads contain it (selection by score is nested).
    profile = share_profile(shipped, 0.15)
    n_layers, n_kv = profile.model.num_layers, profile.model.num_kv_heads
    count = profile.num_retrieval_heads
    assert count == 14
    assert all(set(small) <= set(big) for small, big in zip(profile.retrieval_heads, shipped.retrieval_heads))

    # tokens from a wider range than the probe's [10000, 12500): the heads must generalise
    gen = torch.Generator().manual_seed(1234)
    tokens = torch.randint(1000, 40000, (NUM_SEQS, COPY_LEN), generator=gen)
    ids = torch.cat([torch.full((NUM_SEQS, 1), 1), tokens, tokens], dim=1)

    baseline = copy_accuracy(model, ids, None)
    retrieval = copy_accuracy(model, ids, profile.retrieval_heads)
    others = [(l, h) for l in range(n_layers) for h in range(n_kv) if h not in profile.retrieval_heads[l]]
    rng = random.Random(0)
    randoms = []
    for _ in range(RANDOM_DRAWS):
        pick = set(rng.sample(others, count))
        randoms.append(copy_accuracy(model, ids, [sorted(h for l2, h in pick if l2 == l) for l in range(n_layers)]))
    print(
        f"copy accuracy: full {baseline:.3f}, {count} retrieval heads local {retrieval:.3f}, "
        f"{count} random other heads local {', '.join(f'{r:.3f}' for r in randoms)}"
    )

    # measured (seed 1234, 4 x 200 tokens): full 0.668, retrieval heads local 0.000, random 0.45-0.64
    assert baseline >= 0.5
    assert retrieval <= 0.15
    assert min(randoms) >= retrieval + 0.25
    assert sum(randoms) / len(randoms) >= 0.5 * baseline
