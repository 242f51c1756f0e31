"""Seeded sampling while a prompt is prefilled in chunks, with razor on CPU (one offline engine).

Stock vLLM 0.32's CPU runner kills the engine core on the first seeded request whose prompt is split
over several steps (it rewinds a CPU ``torch.Generator`` with ``set_offset``; see
``vllm_compat.wrap_runner_discarded_sample_rewind``). Razor restores the generator's state instead,
so the engine survives and, as with CUDA's rewind, the tokens do not depend on how the prompt was
chunked. Scheduling in an offline ``LLM.generate`` call is deterministic (first come, first served
within a fixed token budget), which lets one engine run the same seeded request both ways.
The live-server side (seeded long prompt, then the server still answers) is in
tests/serving/test_server_status.py.
"""

from __future__ import annotations

import gc
import random

import pytest

from engine_runs import engine_kwargs, in_engine_process

pytestmark = [pytest.mark.engine, pytest.mark.default_model]

BUDGET = 64  # max_num_batched_tokens: tokens per engine step
SHORT = 40  # fits one step alone; split over two steps when queued behind LONG
LONG = 100  # takes a full step, then leaves BUDGET - (LONG - BUDGET) = 28 tokens of the next one to SHORT


def token_prompts() -> tuple[dict, dict]:
    # Random tokens: the next-token distribution is flat, so samples at temperature 1 follow the seed
    # (on repetitive text the model is so sure that a shifted random stream often picks the same tokens).
    ids = random.Random(0).sample(range(1000, 20000), SHORT + LONG)
    return {"prompt_token_ids": ids[:SHORT]}, {"prompt_token_ids": ids[SHORT:]}


def seeded_runs(model_dir) -> dict[str, list[int]]:
    """Tokens of SHORT sampled with seed 1234 alone, behind LONG (chunked), alone again, and with seed 99."""
    from vllm import LLM, SamplingParams

    kwargs = engine_kwargs(model_dir, "razor", max_num_batched_tokens=BUDGET, max_model_len=512)
    llm = LLM(**kwargs)
    try:
        short, long = token_prompts()
        seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=16)
        greedy = SamplingParams(temperature=0, max_tokens=4)
        other = SamplingParams(temperature=1.0, seed=99, max_tokens=16)

        def tokens(output) -> list[int]:
            return list(output.outputs[0].token_ids)

        alone = tokens(llm.generate([short], seeded, use_tqdm=False)[0])
        # LONG takes step 1 whole; step 2 gives SHORT its first 28 tokens (a discarded sample), step 3 the rest.
        behind = tokens(llm.generate([long, short], [greedy, seeded], use_tqdm=False)[1])
        again = tokens(llm.generate([short], seeded, use_tqdm=False)[0])
        other_seed = tokens(llm.generate([short], other, use_tqdm=False)[0])
        return dict(alone=alone, behind=behind, again=again, other_seed=other_seed)
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def test_seeded_sampling_does_not_depend_on_prompt_chunking(default_model_dir):
    runs = in_engine_process(seeded_runs, default_model_dir)
    tokens = runs["alone"]
    assert len(tokens) == 16
    assert runs["behind"] == tokens
    assert runs["again"] == tokens  # the seed, not the engine's state, decides
    assert runs["other_seed"] != tokens  # the seed does matter at temperature 1
