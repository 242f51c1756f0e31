"""Prefix caching with razor through the real vLLM engine (default model, fp32, greedy): outputs with
cache hits equal the outputs with prefix caching off, in both prefill modes.

Per mode two engines run the same requests: caching off (whole prompts in one step, a large cache),
and caching on with chunked prefill (128-token chunks) and a cache small enough (80 pages) that vLLM
evicts cached blocks (``scheduler_reserve_full_isl`` off, so it may over-admit). Window
64, sink 4, local block 16 and the 14-head profile pinned below, so the hash-aligned layout lands
hits every 96 tokens (the retrieval block) and prompts of a few hundred tokens cross many blocks.
The requests, in phases:

1. one request computes a 400-token document;
2. many requests share it and diverge, concurrently: after the whole document, 10 tokens past an
   aligned boundary (the prefix ends inside the window of the hit's end), exactly at a boundary, 3
   tokens in (inside the sink block: no hit), and far past the window;
3. multi-turn: the second turn re-sends the first turn's prompt and its answer (exact mode must not
   hit the answer's positions, which decode queries computed);
4. four long requests at once in the small cache (evictions).
"""

from __future__ import annotations

import functools

import pytest

from engine_runs import engine_kwargs, in_engine_process

pytestmark = [pytest.mark.engine, pytest.mark.default_model]

RAZOR = {"window": 64, "sink": 4, "local_block_size": 16}
HIT_UNIT = 96  # the hash-aligned retrieval block (fp32, the pinned 14-head profile below, local block 16)
# Equal attention batched or chunked differently (fp32 sums in another order through 30 layers); the
# same bound as tests/engine/test_engine_razor.py's EQUAL_ATTENTION_TOL.
LOGPROB_TOL = 5e-5
MAX_TOKENS = 8
PAGE_BYTES = 14 * HIT_UNIT * 2 * 64 * 4  # 14 retrieval heads x 96 tokens x K,V x 64 x fp32


def _doc_tokens(tokenizer, n: int, seed: int) -> list[int]:
    colours = ["red", "blue", "green", "yellow", "black", "white", "grey", "orange"]
    text = " ".join(
        f"Room {i * 7 + seed} has a {colours[(i + seed) % 8]} door and {(i * 13 + seed) % 50} chairs."
        for i in range(200)
    )
    return tokenizer.encode(text)[:n]


def _question(tokenizer, i: int) -> list[int]:
    return tokenizer.encode(f" Question {i}: which room has {i % 50} chairs? Answer: Room")


def phases(tokenizer) -> list[list[list[int]]]:
    doc = _doc_tokens(tokenizer, 400, 0)
    q = [_question(tokenizer, i) for i in range(12)]
    other = _doc_tokens(tokenizer, 100, 3)
    boundary = 3 * HIT_UNIT  # 288
    sharing = [doc + q[1], doc + q[2], doc[: boundary + 10] + q[3], doc[:boundary] + q[4], doc[:3] + q[5]]
    sharing += [doc[:390] + other[:30] + q[6], doc + q[7] + q[8]]
    long_ones = [_doc_tokens(tokenizer, 500, s) + q[9] for s in range(10, 14)]
    return [[doc + q[0]], sharing, long_ones]


@functools.cache
def paper_share_profile() -> str:
    """The profile this test's geometry is built around, pinned: the 14 heads of the paper's 15% share
    of the shipped profile's scores (the default model's profile before its share was calibrated).
    The shipped 35-head profile lays out a 32-token retrieval block here, which would change every
    boundary and page count above; the property under test (hits give the outputs of no caching)
    does not depend on which heads are retrieval heads."""
    import tempfile
    from pathlib import Path

    from razor_vllm.config import resolve_profile
    from razor_vllm.eval.variants import share_profile

    profile = share_profile(resolve_profile("smollm2-135m-instruct"), 0.15)
    assert profile.num_retrieval_heads == 14
    return str(profile.save(Path(tempfile.mkdtemp(prefix="razor-prefix-cache-")) / "paper-share.yaml"))


@functools.cache
def run(mode: str, caching: bool):
    """Outputs of every phase (the multi-turn phase built from this engine's own first answer)."""
    # Turn 2 of the multi-turn phase is built from the caching-off engine's answer to turn 1, so both
    # engines see the same tokens; that engine runs (and shuts down) first.
    answer = None if not caching else run_answer(mode)
    return in_engine_process(run_phases, mode, caching, answer, paper_share_profile())


def run_phases(mode: str, caching: bool, answer: list[int] | None, profile: str):
    """One engine (in the engine process): every phase's outputs and vLLM's metrics."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from razor_vllm.model import prepare_default_model

    model = prepare_default_model(progress=False)
    razor = {**RAZOR, "prefill": mode, "profile": profile}
    if caching:
        kwargs = engine_kwargs(
            model,
            "razor",
            razor,
            enable_prefix_caching=True,
            max_num_batched_tokens=128,
            kv_cache_memory_bytes=80 * PAGE_BYTES,
            scheduler_reserve_full_isl=False,
            max_model_len=1024,
        )
    else:
        kwargs = engine_kwargs(model, "razor", razor, enable_prefix_caching=False, max_model_len=1024)
    llm = LLM(**kwargs)
    try:
        tokenizer = llm.get_tokenizer()
        params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logprobs=1)
        outputs = []
        steps = phases(tokenizer)
        for prompts in steps[:2]:
            outputs.append(llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False))
        # Multi-turn: turn 2 = turn 1's prompt + its answer + a new question.
        first_turn = steps[0][0]
        answer = answer if caching else list(outputs[0][0].outputs[0].token_ids)
        turn2 = first_turn + answer + _question(tokenizer, 11)
        outputs.append(llm.generate([TokensPrompt(prompt_token_ids=turn2)], params, use_tqdm=False))
        outputs.append(llm.generate([TokensPrompt(prompt_token_ids=p) for p in steps[2]], params, use_tqdm=False))
        metrics = {}
        for metric in llm.get_metrics():
            if isinstance(getattr(metric, "value", None), (int, float)):
                metrics[metric.name] = float(metric.value)
        return [[_summary(o) for o in phase] for phase in outputs], metrics
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm


def _summary(output) -> tuple[list[int], list[float], int, int]:
    """(tokens, their log-probabilities, prompt tokens served from the prefix cache, prompt length)."""
    out = output.outputs[0]
    logprobs = [step[token].logprob for step, token in zip(out.logprobs, out.token_ids)]
    return list(out.token_ids), logprobs, output.num_cached_tokens or 0, len(output.prompt_token_ids)


def run_answer(mode: str) -> list[int]:
    return run(mode, False)[0][0][0][0]


def assert_same_outputs(cached, reference):
    for phase_c, phase_r in zip(cached, reference, strict=True):
        for (tok_c, lp_c, _, _), (tok_r, lp_r, _, _) in zip(phase_c, phase_r, strict=True):
            assert tok_c == tok_r
            assert max(abs(a - b) for a, b in zip(lp_c, lp_r)) <= LOGPROB_TOL


@pytest.mark.parametrize("mode", ["exact", "compressed"])
def test_cache_hits_give_the_outputs_of_no_caching(mode):
    reference, ref_metrics = run(mode, False)
    cached, metrics = run(mode, True)
    assert_same_outputs(cached, reference)
    assert ref_metrics.get("vllm:prefix_cache_hits", 0) == 0

    # The hits happened and skipped prefill: num_cached_tokens on the outputs, vLLM's own counters.
    sharing = cached[1]
    cached_tokens = [c for _, _, c, _ in sharing]
    assert cached_tokens[0] == 4 * HIT_UNIT  # the whole document (400 tokens): 384
    assert cached_tokens[4] == 0  # 3 shared tokens, inside the sink block: nothing to hit
    assert cached_tokens[5] == 4 * HIT_UNIT  # diverges at 390, far past the window (64)
    if mode == "exact":  # every prompt block published: hits at 10 past a boundary / exactly at it
        assert cached_tokens[2] == cached_tokens[3] == 3 * HIT_UNIT
    else:
        # Compressed: only sinks + the window blocks before each 96-token boundary are published
        # (vLLM's sliding-window policy), and the document's early window blocks, freed first while
        # it was prefilled, are the first the 80-page cache reuses: the engine run found no hit at
        # 288 (0; tests/unit/test_prefix_cache.py shows 288 on a cache that does not evict).
        assert cached_tokens[2] in (0, 3 * HIT_UNIT) and cached_tokens[3] in (0, 3 * HIT_UNIT)
    assert all(c % HIT_UNIT == 0 for c in cached_tokens)
    assert metrics["vllm:prefix_cache_hits"] >= sum(cached_tokens)
    assert metrics["vllm:prefix_cache_queries"] > metrics["vllm:prefix_cache_hits"] > 0


@pytest.mark.parametrize("mode", ["exact", "compressed"])
def test_multi_turn_second_turn(mode):
    """Turn 2 re-sends turn 1's prompt and answer: equal to no caching; exact mode hits only the
    first prompt's part (the answer's positions were computed by decode queries), compressed mode
    may hit past it."""
    reference, _ = run(mode, False)
    cached, _ = run(mode, True)
    ((_, _, hit, _),) = cached[2]
    first_prompt = cached[0][0][3]
    assert hit > 0
    if mode == "exact":
        assert hit <= first_prompt // HIT_UNIT * HIT_UNIT
    assert_same_outputs([cached[2]], [reference[2]])


@pytest.mark.parametrize("mode", ["exact", "compressed"])
def test_outputs_through_evictions(mode):
    """Four 515-token requests after the phases above in an 80-page cache: in exact mode each holds
    39 pages at its peak and every freed prompt block is published, so serving them reuses (evicts)
    cached blocks; the outputs still equal those without caching. (This configuration did not make
    vLLM preempt: 0 preemptions in the exact-mode run; preemption with caching is exercised by
    tests/engine/test_engine_razor.py's small-cache run, which now runs with vLLM's default caching.)"""
    reference, _ = run(mode, False)
    cached, _ = run(mode, True)
    assert_same_outputs([cached[3]], [reference[3]])
