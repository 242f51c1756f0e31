"""The RAZOR backend in the real vLLM engine on the default model (CPU, fp32, greedy).

Each engine configuration runs once (module cache) and is shut down before the next starts.
"""

from __future__ import annotations

import functools

import pytest

from engine_runs import engine_kwargs, run_engine

pytestmark = [pytest.mark.engine, pytest.mark.default_model]

WINDOW = 128
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEYS = ["7481923", "3318842", "9051176", "2604417"]


def passkey_prompt(key: str, repeats: int) -> str:
    half = FILLER * (repeats // 2)
    return f"{half}The pass key is {key}. Remember it. {half}The pass key is"


# Needles far outside a 128-token window: prompts of ~1000-1900 tokens (8x-15x the window).
PASSKEY_PROMPTS = [passkey_prompt(key, n) for key, n in zip(PASSKEYS, (40, 52, 60, 76))]
GENERAL_PROMPTS = [
    "The quick brown fox",
    "Once upon a time, in a land far away,",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "Write a short poem about the sea.\n",
    FILLER * 30 + "Summarise the text above in one sentence:",
]


@functools.cache
def run(name: str):
    from razor_vllm.model import prepare_default_model

    model = prepare_default_model(progress=False)
    razor_w = {"window": WINDOW}
    configs = {
        "stock": (engine_kwargs(model), GENERAL_PROMPTS + PASSKEY_PROMPTS),
        "all_retrieval": (engine_kwargs(model, "razor", {"all_retrieval": True}), GENERAL_PROMPTS + PASSKEY_PROMPTS),
        "razor": (engine_kwargs(model, "razor", razor_w), PASSKEY_PROMPTS),
        "razor_chunked": (engine_kwargs(model, "razor", razor_w, max_num_batched_tokens=64), PASSKEY_PROMPTS),
        # A KV cache that holds about two of these requests. vLLM admits a request only when its
        # whole prompt fits (scheduler_reserve_full_isl); switched off, it over-admits chunked
        # prefills and must preempt (recompute) requests when the cache runs out.
        "razor_small_kv": (
            engine_kwargs(model, "razor", razor_w, kv_cache_memory_bytes=48 << 20, max_num_batched_tokens=256,
                          max_model_len=2048, scheduler_reserve_full_isl=False),
            PASSKEY_PROMPTS * 2,
        ),
        "streaming": (engine_kwargs(model, "razor", {**razor_w, "all_local": True}), PASSKEY_PROMPTS),
    }
    kwargs, prompts = configs[name]
    # The small-cache run decodes long enough for its requests to outgrow the cache together.
    return run_engine(kwargs, prompts, max_tokens=40 if name == "razor_small_kv" else 12)


def test_all_retrieval_equals_stock_token_for_token():
    stock, razor = run("stock"), run("all_retrieval")
    for i, (want, got) in enumerate(zip(stock.token_ids, razor.token_ids)):
        assert got == want, f"prompt {i}: stock {stock.texts[i]!r} vs razor {razor.texts[i]!r}"


def test_stock_answers_the_passkeys():
    # The premise of the quality check: the full cache finds every needle.
    stock = run("stock")
    answers = stock.texts[len(GENERAL_PROMPTS) :]
    for key, text in zip(PASSKEYS, answers):
        assert text.strip().startswith(key), (key, text)


# Razor answers these two (1460 and ~1850 tokens, 11x-15x the window). On the two shorter prompts
# it drops the key's last digit ("748192."); an independent HF float64 implementation of the same
# rule does exactly the same (test_engine_matches_hf_reference), so that is the method on this
# 135M model at W=128, not a kernel error. Recorded in NOTES.md.
RAZOR_ANSWERS = [2, 3]


def test_razor_finds_passkeys_far_outside_the_window():
    razor, streaming = run("razor"), run("streaming")
    print(f"\nrazor (W={WINDOW}): {razor.texts}\nstreaming (W={WINDOW}, no retrieval heads): {streaming.texts}")
    for i in RAZOR_ANSWERS:
        assert razor.texts[i].strip().startswith(PASSKEYS[i]), (PASSKEYS[i], razor.texts[i])
        # Same window, no retrieval heads (StreamingLLM): the needle is lost.
        assert not streaming.texts[i].strip().startswith(PASSKEYS[i]), streaming.texts[i]


def test_engine_matches_hf_reference():
    """The engine's greedy tokens equal an independent float64 HF implementation of the rule."""
    from hf_razor_reference import razor_greedy

    from razor_vllm.config import resolve_profile
    from razor_vllm.model import prepare_default_model

    profile = resolve_profile("smollm2-135m-instruct")
    for i in (0, 2):
        want = razor_greedy(prepare_default_model(progress=False), PASSKEY_PROMPTS[i], profile.retrieval_heads,
                            sink=profile.sink, window=WINDOW, max_new_tokens=8)
        assert run("razor").token_ids[i][:8] == want, (run("razor").texts[i], want)


def test_chunked_prefill_gives_the_same_tokens():
    assert run("razor_chunked").token_ids == run("razor").token_ids


def test_preemption_gives_the_same_tokens():
    """8 long requests in a cache that holds about two: vLLM preempts and recomputes; same tokens."""
    small = run("razor_small_kv")
    assert [ids[:12] for ids in small.token_ids] == run("razor").token_ids * 2
    assert small.metrics["vllm:num_preemptions"] > 0, "the cache was not small enough to force preemption"
