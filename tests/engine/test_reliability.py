"""Seeded sampling while a prompt is prefilled in chunks, with razor on CPU (one offline engine, ~40 s).

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

from engine_runs import engine_kwargs

pytestmark = [pytest.mark.engine, pytest.mark.default_model]

BUDGET = 64  # max_num_batched_tokens: tokens per engine step
SHORT = 40  # fits one step alone; split over two steps when queued behind LONG
LONG = 100  # takes a full step, then leaves BUDGET - (LONG - BUDGET) = 28 tokens of the next one to SHORT


def token_prompts() -> tuple[dict, dict]:
    # Random tokens: the next-token distribution is flat, so samples at temperature 1 follow the seed
    # (on repetitive text the model is so sure that a shifted random stream often picks the same tokens).
    ids = random.Random(0).sample(range(1000, 20000), SHORT + LONG)
    return {"prompt_token_ids": ids[:SHORT]}, {"prompt_token_ids": ids[SHORT:]}


def test_seeded_sampling_does_not_depend_on_prompt_chunking(default_model_dir):
    from vllm import LLM, SamplingParams

    # "uni": the worker runs inside the engine-core process (one process fewer to start).
    kwargs = engine_kwargs(default_model_dir, "razor", max_num_batched_tokens=BUDGET, max_model_len=512)
    llm = LLM(**kwargs, distributed_executor_backend="uni")
    try:
        short, long = token_prompts()
        seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=16)
        greedy = SamplingParams(temperature=0, max_tokens=4)

        alone = llm.generate([short], seeded, use_tqdm=False)[0]
        # LONG takes step 1 whole; step 2 gives SHORT its first 28 tokens (a discarded sample), step 3 the rest.
        behind = llm.generate([long, short], [greedy, seeded], use_tqdm=False)[1]
        again = llm.generate([short], seeded, use_tqdm=False)[0]

        tokens = list(alone.outputs[0].token_ids)
        assert len(tokens) == 16
        assert list(behind.outputs[0].token_ids) == tokens, (behind.outputs[0].text, alone.outputs[0].text)
        assert list(again.outputs[0].token_ids) == tokens  # the seed, not the engine's state, decides
        other_seed = llm.generate([short], SamplingParams(temperature=1.0, seed=99, max_tokens=16), use_tqdm=False)
        assert list(other_seed[0].outputs[0].token_ids) != tokens  # the seed does matter at temperature 1
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
