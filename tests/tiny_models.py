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


# -- models razor refuses (tests/unit/test_startup_errors.py) ---------------------------------------------
# Small enough to build in a second or two; each is a model stock vLLM accepts.


def _save_random(path: str | Path, model_cls, config, seed: int, with_tokenizer: bool) -> Path:
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32).eval()
    path = Path(path)
    model.save_pretrained(str(path), safe_serialization=True)
    if with_tokenizer:
        save_word_tokenizer(path, config.vocab_size)
    return path


_SMALL = dict(vocab_size=512, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)


def build_tiny_deepseek_v2(path: str | Path, *, seed: int = 0, with_tokenizer: bool = True) -> Path:
    """A random ``DeepseekV2ForCausalLM``: multi-head latent attention (MLA), one dense layer, one MoE layer."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    config = DeepseekV2Config(
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        kv_lora_rank=32,
        q_lora_rank=None,
        qk_rope_head_dim=16,
        qk_nope_head_dim=16,
        v_head_dim=32,
        n_routed_experts=4,
        n_shared_experts=1,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        n_group=1,
        topk_group=1,
        max_position_embeddings=2048,
        architectures=["DeepseekV2ForCausalLM"],
        **_SMALL,
    )
    return _save_random(path, DeepseekV2ForCausalLM, config, seed, with_tokenizer)


def build_tiny_bert(path: str | Path, *, seed: int = 0, with_tokenizer: bool = True) -> Path:
    """A random ``BertModel``: encoder-only (bidirectional) attention; vLLM serves it as an embedding model."""
    from transformers import BertConfig, BertModel

    config = BertConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
        architectures=["BertModel"],
        **_SMALL,
    )
    return _save_random(path, BertModel, config, seed, with_tokenizer)


def build_tiny_mistral(
    path: str | Path, *, sliding_window: int = 64, seed: int = 0, with_tokenizer: bool = True
) -> Path:
    """A random ``MistralForCausalLM`` whose layers attend over a ``sliding_window`` of their own."""
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=sliding_window,
        max_position_embeddings=2048,
        architectures=["MistralForCausalLM"],
        **_SMALL,
    )
    return _save_random(path, MistralForCausalLM, config, seed, with_tokenizer)


def build_tiny_mamba(path: str | Path, *, seed: int = 0, with_tokenizer: bool = True) -> Path:
    """A random ``MambaForCausalLM``: state-space layers, no attention at all."""
    from transformers import MambaConfig, MambaForCausalLM

    config = MambaConfig(
        hidden_size=64,
        state_size=8,
        num_hidden_layers=2,
        expand=2,
        conv_kernel=4,
        architectures=["MambaForCausalLM"],
        **_SMALL,
    )
    return _save_random(path, MambaForCausalLM, config, seed, with_tokenizer)


def build_tiny_whisper(path: str | Path, *, seed: int = 0, with_tokenizer: bool = True) -> Path:
    """A random ``WhisperForConditionalGeneration``: an encoder-decoder whose decoder cross-attends to the encoder."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    config = WhisperConfig(
        d_model=64,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        num_mel_bins=80,
        max_source_positions=1500,
        max_target_positions=448,
        decoder_start_token_id=BOS_ID,
        architectures=["WhisperForConditionalGeneration"],
        **_SMALL,
    )
    return _save_random(path, WhisperForConditionalGeneration, config, seed, with_tokenizer)


def build_tiny_jamba(path: str | Path, *, seed: int = 0, with_tokenizer: bool = True) -> Path:
    """A random ``JambaForCausalLM``: a Mamba layer, then an attention layer with a mixture of experts."""
    from transformers import JambaConfig, JambaForCausalLM

    config = JambaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attn_layer_period=2,
        attn_layer_offset=1,
        expert_layer_period=2,
        expert_layer_offset=1,
        num_experts=2,
        num_experts_per_tok=1,
        mamba_d_state=8,
        mamba_d_conv=4,
        mamba_expand=2,
        mamba_dt_rank=8,
        use_mamba_kernels=False,
        architectures=["JambaForCausalLM"],
        **_SMALL,
    )
    return _save_random(path, JambaForCausalLM, config, seed, with_tokenizer)
