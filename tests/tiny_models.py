"""Tiny random models saved as loadable Hugging Face checkpoints (config + safetensors + tokenizer).

Seconds to build; deterministic for a given seed. Each model is a config.json in ``model_configs/``
(``tiny-<kind>.json``); ``build_tiny`` gives it random weights and a word tokenizer. Used by the profiler,
scale-out and refusal tests (the refused kinds: MLA, encoder-only, encoder-decoder, state-space, hybrid,
a sliding window of its own, ALiBi; each a model stock vLLM accepts).

The bench's ``synthetic:tiny`` shape (razor_vllm/bench/synthetic.py) is not used here: it writes a
config without weights over the default model's 49k vocabulary for vLLM's dummy loader, while these
tests run the models' forward passes in Hugging Face transformers and need real weights and a small
vocabulary.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

CONFIGS = Path(__file__).parent / "model_configs"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0..3
UNK_ID, BOS_ID, EOS_ID, PAD_ID = range(4)


def model_config(name: str) -> dict:
    """The config.json values in ``model_configs/<name>.json`` (tiny random models and public models' configs)."""
    return json.loads((CONFIGS / f"{name}.json").read_text())


def save_word_tokenizer(path: str | Path, vocab_size: int) -> None:
    """A whitespace word-level tokenizer: 4 special tokens, then ``t4`` ... ``t{vocab_size-1}``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({f"t{i}": i for i in range(len(SPECIAL_TOKENS), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins word tokens with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.save_pretrained(str(path))


def build_tiny(kind: str, path: str | Path, *, seed: int = 0, with_tokenizer: bool = True, **config) -> Path:
    """A random float32 ``model_configs/tiny-<kind>.json`` model (``config`` overrides its values) in ``path``."""
    import transformers

    values = model_config(f"tiny-{kind}")
    values.update(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    values.update(config)
    hf_config = transformers.AutoConfig.for_model(values.pop("model_type"), **values)
    model_cls = getattr(transformers, hf_config.architectures[0])
    torch.manual_seed(seed)
    model = model_cls(hf_config).to(torch.float32).eval()
    path = Path(path)
    model.save_pretrained(str(path), safe_serialization=True)
    if with_tokenizer:
        save_word_tokenizer(path, hf_config.vocab_size)
    return path


def build_tiny_llama(path: str | Path, *, num_layers: int = 4, num_kv_heads: int = 2, **kwargs) -> Path:
    """A random ``LlamaForCausalLM``: 4 query heads over ``num_kv_heads`` KV heads (GQA) of 32 dims."""
    return build_tiny("llama", path, num_hidden_layers=num_layers, num_key_value_heads=num_kv_heads, **kwargs)


# -- the unbalanced scale-out case (unit/test_balance.py, engine/test_ray.py) -------------------------------
# 6 layers x 2 KV heads; at TP=2 rank 0 holds head 0, rank 1 head 1. The profile puts 4 retrieval heads on
# rank 0 and 1 on rank 1 (a global top-5 rarely splits evenly).
UNBALANCED_HEADS = [[0], [0], [1], [0], [], [0]]
# One score (induction-like); rank 1's best remaining heads are layer 4, then 0, then 5.
UNBALANCED_SCORES = {"induction": [[0.9, 0.30], [0.8, 0.01], [0.1, 0.7], [0.6, 0.02], [0.05, 0.50], [0.5, 0.20]]}


def unbalanced_tp2_config(path: str | Path, **razor):
    """vLLM's config (no engine) at TP=2 of a 6-layer tiny Llama with the unbalanced heads and scores in a
    manual profile (sink 4, window 16; ``razor`` adds options)."""
    from vllm import EngineArgs

    from razor_vllm.config import Provenance, RazorProfile, utc_now
    from razor_vllm.profile.selectors import fingerprint_of

    path = build_tiny_llama(path, num_layers=6)
    profile = RazorProfile(
        model=fingerprint_of(path),
        sink=4,
        window=16,
        retrieval_heads=UNBALANCED_HEADS,
        scores=UNBALANCED_SCORES,
        provenance=Provenance(method="manual", command="t", tool_version="0", created=utc_now()),
    )
    return EngineArgs(
        model=str(path),
        attention_backend="razor",
        tensor_parallel_size=2,
        max_model_len=512,
        kv_cache_memory_bytes=32 << 20,
        enforce_eager=True,
        dtype="float32",
        additional_config={"razor": {"profile": str(profile.save(path / "p.yaml")), **razor}},
    ).create_engine_config()
