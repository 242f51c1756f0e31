"""Tiny random models saved as loadable Hugging Face checkpoints (config + safetensors + tokenizer).

Seconds to build; deterministic for a given seed. Shared by the profiler tests and, later, the vLLM tests.
"""

from __future__ import annotations

from pathlib import Path

import torch

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0..3
UNK_ID, BOS_ID, EOS_ID, PAD_ID = range(4)


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


def build_tiny_llama(
    path: str | Path,
    *,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 32,
    hidden_size: int = 128,
    intermediate_size: int = 256,
    vocab_size: int = 512,
    max_position_embeddings: int = 4096,
    initializer_range: float = 0.02,
    seed: int = 0,
    with_tokenizer: bool = True,
) -> Path:
    """A random ``LlamaForCausalLM`` (GQA: ``num_heads`` query heads over ``num_kv_heads`` KV heads) in ``path``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        initializer_range=initializer_range,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"],
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    path = Path(path)
    model.save_pretrained(str(path), safe_serialization=True)
    if with_tokenizer:
        save_word_tokenizer(path, vocab_size)
    return path


def build_tiny_bloom(
    path: str | Path,
    *,
    num_layers: int = 2,
    num_heads: int = 4,
    hidden_size: int = 64,
    vocab_size: int = 512,
    initializer_range: float = 0.02,
    seed: int = 0,
    with_tokenizer: bool = False,
) -> Path:
    """A random ``BloomForCausalLM`` (ALiBi, LayerNorm with gamma = 1, b = 0 as initialised) in ``path``."""
    from transformers import BloomConfig, BloomForCausalLM

    config = BloomConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        n_layer=num_layers,
        n_head=num_heads,
        initializer_range=initializer_range,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        architectures=["BloomForCausalLM"],
    )
    torch.manual_seed(seed)
    model = BloomForCausalLM(config).to(torch.float32).eval()
    path = Path(path)
    model.save_pretrained(str(path), safe_serialization=True)
    if with_tokenizer:
        save_word_tokenizer(path, vocab_size)
    return path
