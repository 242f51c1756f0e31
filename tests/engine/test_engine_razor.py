"""The RAZOR backend in the real vLLM engine on the default model (CPU, fp32, greedy).

Each engine configuration runs once (module cache) and is shut down before the next starts.
"""

from __future__ import annotations

import functools

import pytest

from engine_runs import GENERAL_PROMPTS, PASSKEY_PROMPTS, PASSKEYS, engine_kwargs, max_logprob_gap, run_engine

pytestmark = [pytest.mark.engine, pytest.mark.default_model]

WINDOW = 128


# Logprobs of the same attention through the same kernels in fp32 (the TP and all-retrieval checks).
LOGPROB_TOL = 1e-5
# Logprobs of equal attention computed by different kernels or batched differently (razor's exact
# prompt queries vs stock's CPU_ATTN; one 2048-token step vs 64-token chunks): fp32 sums in another
# order through 30 layers of a 1-1.9k-token prompt. Measured 1.2e-5 to 1.4e-5 with the reference
# kernels (first token's top-5 vs stock, all generated tokens chunked vs not); a changed rule moves
# them by more than 1e-3 (the compressed prefill's first token).
EQUAL_ATTENTION_TOL = 5e-5


def small_kv_bytes() -> int:
    """A KV cache of 7 pages more than one 2048-token request's exact-prefill peak (fp32, W=128): that
    request fits, two prompts being prefilled at once do not. With the shipped 35/90 profile: 103
    pages, the peak 96, decoding requests 22-36 pages (with the earlier 14/90 profile: 82, 75, 12-16)."""
    from razor_vllm.bench import analytic
    from razor_vllm.config import resolve_profile

    geo = analytic.geometry(resolve_profile("smollm2-135m-instruct"), "float32", window=WINDOW)
    return (geo.razor_admission_pages(2048, 256) + 7) * geo.page_bytes


@functools.cache
def run(name: str):
    from razor_vllm.model import prepare_default_model

    model = prepare_default_model(progress=False)
    razor_w = {"window": WINDOW}  # exact prefill: the default
    compressed = {"window": WINDOW, "prefill": "compressed"}
    configs = {
        "stock": (engine_kwargs(model), GENERAL_PROMPTS + PASSKEY_PROMPTS),
        "all_retrieval": (engine_kwargs(model, "razor", {"all_retrieval": True}), GENERAL_PROMPTS + PASSKEY_PROMPTS),
        "razor": (engine_kwargs(model, "razor", razor_w), PASSKEY_PROMPTS),
        "razor_chunked": (engine_kwargs(model, "razor", razor_w, max_num_batched_tokens=64), PASSKEY_PROMPTS),
        "razor_compressed": (engine_kwargs(model, "razor", compressed), PASSKEY_PROMPTS),
        "razor_compressed_chunked": (
            engine_kwargs(model, "razor", compressed, max_num_batched_tokens=64),
            PASSKEY_PROMPTS,
        ),
        # A KV cache that holds one prompt at its exact-prefill peak and a few decoding requests.
        # vLLM admits a request only when its whole prompt fits (scheduler_reserve_full_isl);
        # switched off, it over-admits chunked prefills and must preempt (recompute) requests when
        # the cache runs out.
        "razor_small_kv": (
            engine_kwargs(
                model,
                "razor",
                razor_w,
                kv_cache_memory_bytes=small_kv_bytes(),
                max_num_batched_tokens=256,
                max_model_len=2048,
                scheduler_reserve_full_isl=False,
            ),
            PASSKEY_PROMPTS * 2,
        ),
        "streaming": (engine_kwargs(model, "razor", {**razor_w, "all_local": True}), PASSKEY_PROMPTS),
    }
    kwargs, prompts = configs[name]
    # The small-cache run decodes long enough for its requests to outgrow the cache together.
    return run_engine(kwargs, prompts, max_tokens=40 if name == "razor_small_kv" else 12, logprobs=True, top_logprobs=5)


def same_tokens_logprob_gap(a, b) -> float:
    """Largest difference of the generated tokens' log-probs; the token ids must be equal."""
    assert a.token_ids == b.token_ids
    return max_logprob_gap(a, b)


def test_all_retrieval_equals_stock_token_for_token():
    stock, razor = run("stock"), run("all_retrieval")
    for i, (want, got) in enumerate(zip(stock.token_ids, razor.token_ids)):
        assert got == want, f"prompt {i}: stock {stock.texts[i]!r} vs razor {razor.texts[i]!r}"
    assert same_tokens_logprob_gap(stock, razor) < EQUAL_ATTENTION_TOL  # our paged kernel vs CPU_ATTN


def test_stock_answers_the_passkeys():
    # The premise of the quality check: the full cache finds every needle.
    stock = run("stock")
    answers = stock.texts[len(GENERAL_PROMPTS) :]
    for key, text in zip(PASSKEYS, answers):
        assert text.strip().startswith(key), (key, text)


def test_exact_prefill_first_token_equals_stock():
    """The first answer token comes from the last prompt query, which exact prefill computes with
    full attention in every head: its distribution equals stock's (top-5 log-probs)."""
    stock, razor, compressed = run("stock"), run("razor"), run("razor_compressed")
    stock_first = stock.first_logprobs[len(GENERAL_PROMPTS) :]
    compressed_gap = 0.0
    for i, (want, got) in enumerate(zip(stock_first, razor.first_logprobs)):
        assert set(got) == set(want), (i, want, got)
        assert max(abs(got[t] - want[t]) for t in want) < EQUAL_ATTENTION_TOL, (i, want, got)
        compressed_gap = max(compressed_gap, *(abs(compressed.first_logprobs[i].get(t, -1e9) - want[t]) for t in want))
    assert compressed_gap > 1e-3  # the compressed prefill's first token is not stock's: the test can tell


# Razor answers these two (1460 and ~1850 tokens, 11x-15x the window) in both prefill modes. On the
# two shorter prompts it drops the key's last digit ("748192."): exact prefill makes the first answer
# token stock's, but that token is the space before the key; every digit is a decode query through
# sinks + window + compensation on the local heads. The independent HF float64 implementation of
# the rule does exactly the same (test_engine_matches_hf_reference), so that is the method on this
# 135M model at W=128, not a kernel error.
RAZOR_ANSWERS = [2, 3]
COMPRESSED_ANSWERS = [2, 3]


def test_razor_finds_passkeys_far_outside_the_window():
    razor, compressed, streaming = run("razor"), run("razor_compressed"), run("streaming")
    print(
        f"\nrazor (W={WINDOW}): {razor.texts}\ncompressed prefill: {compressed.texts}"
        f"\nstreaming (W={WINDOW}, no retrieval heads): {streaming.texts}"
    )
    for i in RAZOR_ANSWERS:
        assert razor.texts[i].strip().startswith(PASSKEYS[i]), (PASSKEYS[i], razor.texts[i])
    for i in COMPRESSED_ANSWERS:
        assert compressed.texts[i].strip().startswith(PASSKEYS[i]), (PASSKEYS[i], compressed.texts[i])
    for i in range(len(PASSKEYS)):
        # Same window, no retrieval heads (StreamingLLM): the needle is lost.
        assert not streaming.texts[i].strip().startswith(PASSKEYS[i]), streaming.texts[i]


def test_engine_matches_hf_reference():
    """The engine's greedy tokens equal an independent float64 HF implementation of the rule, in
    both prefill modes."""
    from razor_vllm.config import resolve_profile
    from razor_vllm.model import prepare_default_model

    from hf_razor_reference import razor_greedy

    profile = resolve_profile("smollm2-135m-instruct")
    model = prepare_default_model(progress=False)
    for name, exact in (("razor", True), ("razor_compressed", False)):
        for i in (0, 2):
            want = razor_greedy(
                model,
                PASSKEY_PROMPTS[i],
                profile.retrieval_heads,
                sink=profile.sink,
                window=WINDOW,
                max_new_tokens=8,
                exact_prefill=exact,
            )
            assert run(name).token_ids[i][:8] == want, (name, run(name).texts[i], want)


@pytest.mark.parametrize("mode", ["razor", "razor_compressed"])
def test_chunked_prefill_gives_the_same_tokens(mode):
    """64-token chunks vs one 2048-token step: the same tokens and log-probs, in both modes."""
    assert same_tokens_logprob_gap(run(f"{mode}_chunked"), run(mode)) < EQUAL_ATTENTION_TOL


def test_preemption_gives_the_same_tokens():
    """8 long requests in a cache that holds one prompt at its exact-prefill peak: vLLM preempts
    and recomputes (prompt exactly, generated tokens by the window rule); same tokens."""
    small = run("razor_small_kv")
    assert [ids[:12] for ids in small.token_ids] == run("razor").token_ids * 2
    assert small.metrics["vllm:num_preemptions"] > 0, "the cache was not small enough to force preemption"
