"""The embedded default model: prepared once, idempotently, and answering through vLLM."""

from __future__ import annotations

import time

import pytest

from razor_vllm.model import is_prepared, prepare_default_model

from engine_runs import engine_kwargs, run_engine

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_prepare_is_idempotent_and_instant_the_second_time(default_model_dir):
    assert is_prepared(default_model_dir)
    start = time.perf_counter()
    assert prepare_default_model(progress=False) == default_model_dir
    assert time.perf_counter() - start < 1.0
    assert (default_model_dir / "model.safetensors").is_file()
    assert (default_model_dir / "tokenizer.json").is_file()


def test_checkpoint_is_plain_not_quantised(default_model_dir):
    import json

    config = json.loads((default_model_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["num_key_value_heads"], config["head_dim"]) == (30, 3, 64)


@pytest.mark.engine
@pytest.mark.default_model
@pytest.mark.parametrize("backend", ["stock", "razor"])
def test_paris_through_generate_with_chat_template_and_through_chat(default_model_dir, backend):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    prompt = tokenizer.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    # fp32: the first answer token is a near-tie ("The" -> "...Paris." vs "L" -> "L'Etoile, la
    # Marseillaise..."; 0.08 nats in fp32, 0.25 in bf16). bf16 CPU kernels vary from run to run by
    # more than that (we saw the French branch once in ~8 bf16 runs); fp32 noise is far below it.
    kwargs = engine_kwargs(default_model_dir, backend, dtype="float32")
    run = run_engine(kwargs, [prompt], max_tokens=24, chats=[QUESTION])
    assert "Paris" in run.texts[0], run.texts
    assert "Paris" in run.chat_texts[0], run.chat_texts


@pytest.mark.default_model
def test_generation_config_carries_the_model_cards_sampling(default_model_dir):
    """Without it vLLM samples at temperature 1.0 and `LLM.chat` without parameters rambles."""
    import json

    config = json.loads((default_model_dir / "generation_config.json").read_text())
    assert config["temperature"] == pytest.approx(0.2) and config["top_p"] == pytest.approx(0.9)
