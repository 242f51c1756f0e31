"""The bundled profiles of 7-8B models in a real engine: their real layer shapes (head size, GQA group,
vocabulary, RoPE scaling) with dummy weights, cut to two layers, through razor's pools and kernels.
The checks without an engine (selection, provenance, layouts at every tensor-parallel size):
tests/unit/test_bundled_profiles.py."""

from __future__ import annotations

import pytest

from razor_vllm.config import RazorProfile, resolve_profile
from razor_vllm.profile.selectors import fingerprint_of


@pytest.mark.engine
@pytest.mark.parametrize("name", ["llama-3.1-8b-instruct", "mistral-7b-instruct-v0.3"])
def test_engine_runs_the_real_layer_shapes_with_dummy_weights(name, tmp_path, default_model_dir):
    """A real engine (CPU, bf16, dummy weights) at the model's real configuration cut to two of its
    layers (all 32 need ~16 GB): real head size, GQA group, vocabulary and RoPE scaling, and those two
    layers' retrieval heads from the bundled profile, through razor's pools and kernels."""
    from razor_vllm.bench import synthetic
    from razor_vllm.config import Provenance, utc_now

    from engine_runs import engine_kwargs, run_engine

    model_dir = synthetic.make_checkpoint(name, tmp_path, default_model_dir)
    bundled = resolve_profile(name)
    layers = [i for i, heads in enumerate(bundled.retrieval_heads) if heads][:2]
    served = fingerprint_of(model_dir).model_copy(update={"num_layers": 2})
    profile = RazorProfile(
        model=served,
        sink=bundled.sink,
        window=bundled.window,
        retrieval_heads=[bundled.retrieval_heads[i] for i in layers],
        provenance=Provenance(
            method="manual", command=f"layers {layers} of {name}", tool_version="0", created=utc_now()
        ),
    )
    path = profile.save(tmp_path / "two-layers.yaml")
    kwargs = engine_kwargs(
        model_dir,
        "razor",
        {"profile": str(path)},
        load_format="dummy",
        dtype="bfloat16",
        hf_overrides={"num_hidden_layers": 2},
        max_model_len=1024,
        kv_cache_memory_bytes=64 << 20,
        max_num_batched_tokens=256,
        max_num_seqs=4,
    )
    prompts = [{"prompt_token_ids": [(7 * i) % 40000 + 100 for i in range(n)]} for n in (40, 600)]  # past sink + window
    run = run_engine(kwargs, prompts, max_tokens=4)
    assert [len(t) for t in run.token_ids] == [4, 4]
    assert all(0 <= t < served.vocab_size for tokens in run.token_ids for t in tokens)
