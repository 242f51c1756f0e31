"""The attention kernels (reference and C++) against the dense float64 oracle, through the simulated
engine of tests/kernel_sim.py (``PagedPool``: shuffled, freed and poisoned blocks, garbage block-table
entries, CUDA-graph padding; every block tail checked against the sums recomputed from scratch).
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from razor_vllm import ops
from razor_vllm.ops import LocalRule, reference
from razor_vllm.ops.cache import write_kv
from razor_vllm.ops.dense import (
    dense_block_tail,
    dense_causal_attention,
    dense_local_attention,
    dense_razor_attention,
)

from kernel_sim import (
    PAD_TOKENS,
    TOLERANCE,
    Case,
    PagedPool,
    TailChecker,
    assert_close,
    causal_oracle,
    local_oracle,
    make_batch,
    make_data,
    make_schedule,
    random_request,
    relative_error,
    run_engine,
    run_local,
    tail_started_in_chunk,
)

IMPLS = [
    "reference",
    pytest.param("cpp", marks=pytest.mark.skipif(ops.cpp is None, reason="razor_vllm._C is not built")),
]
MODES = ["exact", "compressed"]


@pytest.fixture(autouse=True)
def one_thread():
    """These tests run thousands of tiny ops; on a shared 2-core machine intra-op threads make them
    ~10x slower. Parallel C++ execution is covered by test_cpp_threads_do_not_change_results."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


LOCAL_CASES = [
    Case(block_size=16, sink=4, window=20, num_kv_heads=2, g=2, pool_heads=5, head_offset=2),
    Case(block_size=32, sink=0, window=37, num_kv_heads=1, g=3, pool_heads=3, head_offset=1, head_size=64),
    Case(block_size=16, sink=3, window=1, num_kv_heads=2, g=1, pool_heads=2, head_offset=0),
    Case(block_size=16, sink=16, window=16, num_kv_heads=1, g=4, pool_heads=4, head_offset=3),
    Case(block_size=32, sink=5, window=45, num_kv_heads=3, g=3, pool_heads=7, head_offset=4),
    Case(block_size=32, sink=2, window=33, num_kv_heads=1, g=5, pool_heads=1, head_offset=0, head_size=40),
    # sinks spanning more than two blocks; a window shorter than a block
    Case(block_size=8, sink=19, window=6, num_kv_heads=2, g=2, pool_heads=3, head_offset=1),
]


# ---------------------------------------------------------------------------------------------
# The oracle itself


def test_oracle_compensation_is_exact_for_equal_dropped_keys():
    """If every dropped key is the same vector, n_d * exp(q.k_hat) * v_hat equals the sum of the
    dropped terms, so the count-weighted rule reproduces full causal attention exactly; the
    unweighted one does not. With a window covering everything, local is causal attention; with
    exact prefill, so is every prompt query."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(40, h, 16, generator=gen) for h in (4, 2, 2))
    sink, window = 3, 8
    k[sink:] = k[sink]  # every key that can be dropped is equal
    causal = dense_causal_attention(q, k, v, range(40), 0.25)
    assert relative_error(dense_local_attention(q, k, v, range(40), sink, window, 0.25), causal) < 1e-12
    assert relative_error(dense_local_attention(q, k, v, range(40), sink, window, 0.25, "unweighted"), causal) > 1e-2
    q, k, v = (torch.randn(20, h, 16, generator=gen) for h in (4, 2, 2))
    causal = dense_causal_attention(q, k, v, range(20), 0.25)
    assert relative_error(dense_local_attention(q, k, v, range(20), 2, 18, 0.25), causal) < 1e-12
    exact = dense_local_attention(q, k, v, range(20), 2, 4, 0.25, prompt_len=12)
    assert relative_error(exact[:12], causal[:12]) < 1e-12
    assert relative_error(exact[12:], dense_local_attention(q[12:], k, v, range(12, 20), 2, 4, 0.25)) < 1e-12
    assert relative_error(exact[12:], causal[12:]) > 1e-2


def test_oracle_block_tail():
    k, v = torch.randn(50, 2, 8), torch.randn(50, 2, 8)
    assert torch.equal(dense_block_tail(k, v, 1, 16, 16), torch.zeros(2, 2, 8, dtype=torch.float64))
    tail = dense_block_tail(k, v, 3, 16, 5)
    assert torch.allclose(tail[:, 0], k[5:48].double().sum(0)) and torch.allclose(tail[:, 1], v[5:48].double().sum(0))


# ---------------------------------------------------------------------------------------------
# Local heads


ORACLE_RUNS = [
    ("mixed", 0, "compressed"),
    ("mixed", 1, "exact"),
    ("prefill", 2, "exact"),
    ("chunked", 3, "compressed"),
    ("chunked", 5, "exact"),
    ("decode", 4, "compressed"),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", LOCAL_CASES, ids=str)
@pytest.mark.parametrize("style,seed,mode", ORACLE_RUNS)
def test_local_attention_matches_oracle(impl, case, style, seed, mode):
    rng = random.Random(seed)
    lengths = case.boundary_lengths() + [rng.randint(1, 3 * case.window + case.sink) for _ in range(2)]
    data = make_data(case, torch.float32, seed, lengths)
    schedule = make_schedule(lengths, rng, max_chunk=case.window + 7, style=style, recompute=True)
    if style == "mixed":  # the point of the style: prefill chunks batched with decodes
        assert any(len({hi - lo == 1 for _, lo, hi in batch}) == 2 for batch in schedule)
    pool = run_local(impl, case, data, schedule, mode, rng)
    assert pool.recycled > 0  # old window blocks were freed (and poisoned) under running requests
    assert pool.tail_checker.checked > 0


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", [LOCAL_CASES[0], LOCAL_CASES[2], LOCAL_CASES[6]], ids=str)
def test_chunks_spanning_several_blocks(impl, mode, case):
    """Chunks of 3 blocks and more: later queries of a chunk read the tail of a block the same chunk
    started. In exact mode the prompts end early, as when vLLM recomputes generated tokens."""
    rng = random.Random(21)
    bs = case.block_size
    lengths = [case.sink + case.window + 6 * bs + 3, case.sink + 9 * bs, 4 * bs + 1]
    data = make_data(case, torch.float32, 21, lengths)
    schedule = make_schedule(lengths, rng, max_chunk=4 * bs + 5, min_chunk=3 * bs + 1, style="chunked")
    schedule.prompts = [min(n, case.sink + case.window + bs // 2) for n in lengths]
    assert tail_started_in_chunk(schedule, case, prompts=schedule.prompts if mode == "exact" else None)
    run_local(impl, case, data, schedule, mode, rng)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
def test_many_requests_per_request_windows(impl, mode):
    """Fourteen requests with their own windows (the paper's max(S0, N/C) rule), mixed prefill /
    decode batches, CUDA-graph padding, prefills past the prompt."""
    case = LOCAL_CASES[0]
    rng = random.Random(31)
    lengths = [rng.randint(1, 160) for _ in range(14)]
    windows = [rng.choice([1, 2, 7, case.block_size, 33, 64, 200]) for _ in lengths]
    data = make_data(case, torch.float32, 31, lengths)
    schedule = make_schedule(lengths, rng, max_chunk=50, style="mixed", recompute=True)
    assert max(len(batch) for batch in schedule) >= 8
    pool = run_local(impl, case, data, schedule, mode, rng, windows=windows)
    assert pool.recycled > 0


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", [LOCAL_CASES[0], LOCAL_CASES[1], LOCAL_CASES[6]], ids=str)
def test_exact_prompt_queries_are_causal_attention(impl, case):
    """Exact prefill, every position a prompt position: plain causal attention, however chunked."""
    rng = random.Random(41)
    lengths = case.boundary_lengths()
    data = make_data(case, torch.float32, 41, lengths)
    schedule = make_schedule(lengths, rng, max_chunk=2 * case.block_size + 3, style="chunked")
    schedule.prompts = lengths
    outputs, _ = run_engine(impl, case, torch.float32, data, schedule, True, rng, exact=True)
    assert_close(outputs, causal_oracle(case, data), TOLERANCE[torch.float32])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("sink", [0, 5])
def test_window_covering_everything_is_causal_attention(impl, sink):
    case = Case(block_size=16, sink=sink, window=200, num_kv_heads=2, g=2, pool_heads=3, head_offset=1)
    rng = random.Random(43)
    lengths = [1, 17, 90, 200]
    data = make_data(case, torch.float32, 43, lengths)
    schedule = make_schedule(lengths, rng, max_chunk=40, style="mixed")
    outputs, _ = run_engine(impl, case, torch.float32, data, schedule, True, rng)
    assert_close(outputs, causal_oracle(case, data), TOLERANCE[torch.float32])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", [LOCAL_CASES[0], LOCAL_CASES[1], LOCAL_CASES[6]], ids=str)
@pytest.mark.parametrize("where", ["sinks", "window", "far"])
def test_prefix_cache_hit_equals_computing_from_zero(impl, mode, case, where):
    """Request 0 computes a document; request 1 shares its first m blocks (their tokens and tails,
    as a prefix-cache hit hands them over) and computes from position m*B on. Its outputs equal
    the oracle's from position 0, and the shared blocks are never written."""
    kernels = ops.kernels(impl)
    bs, sink, window = case.block_size, case.sink, case.window
    m = {"sinks": max(1, sink // bs), "window": (sink + window) // bs, "far": (sink + window) // bs + 4}[where]
    shared = m * bs
    lengths = [shared + 2 * bs + 3, shared + window + 2 * bs + 9]
    gen = torch.Generator().manual_seed(51)
    data = [random_request(gen, n, case, torch.float32) for n in lengths]
    q1, k1, v1 = data[1]
    k1[:shared], v1[:shared] = data[0][1][:shared], data[0][2][:shared]  # the same prefix tokens
    rng = random.Random(51)
    exact = mode == "exact"
    prompts = [lengths[0], lengths[1] - 4]
    rule = LocalRule(sink, window, exact_prefill=exact)
    pool = PagedPool(case, torch.float32, lengths, sliding=True, rng=rng)
    checker = TailChecker(case, data, pool)
    outputs = torch.full(q1.shape, float("nan"), dtype=torch.float64)

    def step(rid, lo, hi):
        pool.write(rid, data[rid][1], data[rid][2], lo, hi)
        paged = make_batch(pool, [(rid, lo, hi)], [rid], prompts if exact else None)
        kernels.write_block_tails(pool.key_cache, pool.value_cache, pool.tails, paged, case.heads, rule)
        checker.after_write([(rid, lo, hi)])
        query = data[rid][0][lo:hi]
        return kernels.local_attention(
            query, pool.key_cache, pool.value_cache, pool.tails, paged, case.heads, rule, case.scale
        )

    for lo in range(0, lengths[0], 2 * bs - 3):  # the document, in chunks; its blocks stay cached
        step(0, lo, min(lengths[0], lo + 2 * bs - 3))
    pool.tables[1] = pool.tables[0][:m]
    shared_blocks = torch.tensor(pool.tables[0][:m])
    before = pool.kv_cache[shared_blocks].clone(), pool.tails[shared_blocks].clone()
    position = shared
    while position < lengths[1]:
        n = rng.randint(1, bs + 5) if position < prompts[1] else 1
        hi = min(lengths[1], position + n)
        outputs[position:hi] = step(1, position, hi).double()
        position = hi
    for after, was in zip((pool.kv_cache[shared_blocks], pool.tails[shared_blocks]), before):
        assert torch.allclose(after, was, rtol=0, atol=0, equal_nan=True)  # bitwise, NaN padding included
    expected = local_oracle(case, [data[1]], prompts=[prompts[1]] if exact else None)[0]
    assert relative_error(outputs[shared:], expected[shared:]) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", MODES)
def test_local_attention_half_precision(impl, dtype, mode):
    case = LOCAL_CASES[4]
    rng = random.Random(7)
    lengths = case.boundary_lengths()
    data = make_data(case, dtype, 7, lengths)
    schedule = make_schedule(lengths, rng, max_chunk=40, style="mixed", recompute=True)
    run_local(impl, case, data, schedule, mode, rng, dtype=dtype)


@pytest.mark.parametrize("mode", MODES)
def test_reference_is_exact_in_float64(mode):
    """In float64 (tails included) the reference must agree with the oracle to rounding."""
    case = LOCAL_CASES[0]
    rng = random.Random(11)
    lengths = case.boundary_lengths()
    data = make_data(case, torch.float64, 11, lengths)
    schedule = make_schedule(lengths, rng, max_chunk=30, style="mixed", recompute=True)
    run_local("reference", case, data, schedule, mode, rng, dtype=torch.float64)


@pytest.mark.parametrize("impl", IMPLS)
def test_compensation_matters(impl):
    """Dropping the compensation, its ln(n_d) weight, or the stored tails is caught by the tolerance."""
    case = LOCAL_CASES[0]
    rng = random.Random(5)
    lengths = [case.sink + 5 * case.window, case.sink + 3 * case.window + 3]
    data = make_data(case, torch.float32, 5, lengths)
    schedule = make_schedule(lengths, rng, max_chunk=25, style="mixed")
    expected = local_oracle(case, data)
    tolerance = TOLERANCE[torch.float32]
    for variant in ("none", "unweighted"):
        for ref, other in zip(expected, local_oracle(case, data, variant)):
            assert relative_error(other, ref) > 100 * tolerance, variant

    def forget_stored_sums(pool):
        pool.tails.zero_()

    outputs, _ = run_engine(
        impl,
        case,
        torch.float32,
        data,
        schedule,
        sliding=True,
        rng=random.Random(5),
        before_step=forget_stored_sums,
        check_tails=False,
    )
    for out, ref in zip(outputs, expected):
        assert relative_error(out, ref) > 100 * tolerance


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("style,seed,mode", [("mixed", 12, "compressed"), ("chunked", 13, "exact")])
def test_local_attention_without_compensation(impl, style, seed, mode):
    """The ablation (razor option compensation=false): sinks + window only, and the tails are never
    read (they are NaN-poisoned before every step here)."""
    case = LOCAL_CASES[1]
    rng = random.Random(seed)
    lengths = case.boundary_lengths() + [case.sink + 4 * case.window + 1]
    data = make_data(case, torch.float32, seed, lengths)
    schedule = make_schedule(lengths, rng, max_chunk=case.window + 7, style=style)

    def poison_tails(pool):
        pool.tails.fill_(float("nan"))

    run_local(impl, case, data, schedule, mode, rng, before_step=poison_tails, compensation=False, check_tails=False)


def test_exact_prefill_needs_prompt_lens():
    case = LOCAL_CASES[0]
    pool = PagedPool(case, torch.float32, [4], sliding=True, rng=random.Random(0))
    data = make_data(case, torch.float32, 0, [4])
    pool.write(0, data[0][1], data[0][2], 0, 4)
    batch = make_batch(pool, [(0, 0, 4)], [0])
    with pytest.raises(ValueError, match="prompt_lens"):
        ops.local_attention(
            data[0][0], pool.key_cache, pool.value_cache, pool.tails, batch, case.heads, LocalRule(4, 20), case.scale
        )
    with pytest.raises(ValueError, match="window"):
        LocalRule(4, 0)


# ---------------------------------------------------------------------------------------------
# Retrieval heads and whole layers

PAGED_CASES = [
    Case(block_size=16, sink=0, window=1, num_kv_heads=2, g=2, pool_heads=3, head_offset=1),
    Case(block_size=32, sink=0, window=1, num_kv_heads=1, g=3, pool_heads=1, head_offset=0, head_size=64),
    # head_size not a multiple of the SIMD width; more query rows per KV head than one register block
    Case(block_size=16, sink=0, window=1, num_kv_heads=1, g=72, pool_heads=2, head_offset=1, head_size=40),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", PAGED_CASES, ids=str)
@pytest.mark.parametrize("style,seed", [("mixed", 0), ("decode", 1), ("chunked", 2)])
def test_paged_attention_matches_causal(impl, case, style, seed):
    rng = random.Random(seed)
    lengths = [1, 15, 16, 17, 33, 70, 97, rng.randint(1, 120)]
    data = make_data(case, torch.float32, seed, lengths)
    schedule = make_schedule(lengths, rng, max_chunk=40, style=style)
    outputs, _ = run_engine(impl, case, torch.float32, data, schedule, sliding=False, rng=rng)
    assert_close(outputs, causal_oracle(case, data), TOLERANCE[torch.float32])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_paged_attention_half_precision(impl, dtype):
    case = PAGED_CASES[0]
    rng = random.Random(3)
    lengths = [5, 40, 81]
    data = make_data(case, dtype, 3, lengths)
    schedule = make_schedule(lengths, rng, max_chunk=30, style="mixed")
    outputs, _ = run_engine(impl, case, dtype, data, schedule, sliding=False, rng=rng)
    assert_close(outputs, causal_oracle(case, data), TOLERANCE[dtype])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
def test_layer_split_across_pools(impl, mode):
    """A layer as the backend runs it (SmolLM-like: 3 KV heads, g=3, head 0 retrieval): retrieval
    heads through the full pool, local heads through the local pool, versus the dense whole-layer rule."""
    retrieval = [True, False, False]
    sink, window, g, d = 4, 24, 3, 32
    lengths = [10, sink + window + 1, 90, 130]
    gen = torch.Generator().manual_seed(9)
    full = [
        (
            torch.randn(n, 3 * g, d, generator=gen),
            torch.randn(n, 3, d, generator=gen) + 0.5,
            torch.randn(n, 3, d, generator=gen) - 0.5,
        )
        for n in lengths
    ]
    schedule = make_schedule(lengths, random.Random(9), max_chunk=32, style="mixed", recompute=True)
    exact = mode == "exact"

    def pool_part(heads):  # the slice of every request that one pool holds
        q_heads = [h * g + j for h in heads for j in range(g)]
        return [(q[:, q_heads], k[:, heads], v[:, heads]) for q, k, v in full]

    full_heads, local_heads = [0], [1, 2]
    full_case = Case(block_size=16, sink=0, window=1, num_kv_heads=1, g=g, pool_heads=2, head_offset=1, head_size=d)
    local_case = Case(
        block_size=32, sink=sink, window=window, num_kv_heads=2, g=g, pool_heads=4, head_offset=2, head_size=d
    )
    out_full, _ = run_engine(impl, full_case, torch.float32, pool_part(full_heads), schedule, False, random.Random(1))
    out_local, _ = run_engine(
        impl, local_case, torch.float32, pool_part(local_heads), schedule, True, random.Random(2), exact=exact
    )
    for rid, (q, k, v) in enumerate(full):
        prompt_len = schedule.prompts[rid] if exact else None
        expected = dense_razor_attention(
            q, k, v, range(q.shape[0]), retrieval, sink, window, full_case.scale, prompt_len=prompt_len
        )
        layer = torch.cat([out_full[rid], out_local[rid]], dim=1)  # heads 0..2 in KV-head order
        assert relative_error(layer, expected) < TOLERANCE[torch.float32]


@pytest.mark.skipif(ops.cpp is None, reason="razor_vllm._C is not built")
def test_cpp_threads_do_not_change_results():
    """Tasks are scheduled dynamically, but each output row is computed by one task: bitwise equal."""
    case = LOCAL_CASES[4]
    lengths = [300, 90, 1, 160]
    data = make_data(case, torch.float32, 13, lengths)
    schedule = make_schedule(lengths, random.Random(13), max_chunk=200, style="mixed", recompute=True)
    results = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        tails = []
        for exact in (False, True):
            local, pool = run_engine("cpp", case, torch.float32, data, schedule, True, random.Random(13), exact=exact)
            tails.append(pool.tails.nan_to_num(0.5))
        full, _ = run_engine("cpp", case, torch.float32, data, schedule, False, random.Random(13))
        results[threads] = local + full + tails
    assert all(torch.equal(a, b) for a, b in zip(results[1], results[2]))


# ---------------------------------------------------------------------------------------------
# store_kv: the C++ op against the torch reference (ops.cache.write_kv)

CPP_ONLY = pytest.mark.skipif(ops.cpp is None, reason="razor_vllm._C is not built")
STORE_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def pool_cache(num_blocks: int, heads: int, block_size: int, head_size: int, dtype: torch.dtype) -> torch.Tensor:
    """A pool cache as vLLM binds it: [num_blocks, heads, block_size, 2*D] over NaN pages padded past
    the token slots (block stride > heads * block_size * 2D, as the local pool's page tails make it)."""
    page = heads * block_size * 2 * head_size + 3 * 2 * head_size
    pages = torch.full((num_blocks, page), math.nan, dtype=dtype)
    return pages.as_strided(
        (num_blocks, heads, block_size, 2 * head_size), (page, block_size * 2 * head_size, 2 * head_size, 1)
    )


def store_inputs(seed: int, dtype: torch.dtype, tokens: int = 70, layer_heads: int = 4, head_size: int = 40):
    """Key/value rows as the model hands them: [T, layer_heads, D] views of one fused qkv row per token
    (row stride past both), with random slots of a 9-block pool of block size 11 (many tokens per
    block, crossing blocks, in no order) and a few -1 padding slots."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(tokens, (2 * layer_heads + 3) * head_size, generator=gen).to(dtype)
    key = qkv[:, 3 * head_size : (3 + layer_heads) * head_size].unflatten(1, (layer_heads, head_size))
    value = qkv[:, (3 + layer_heads) * head_size :].unflatten(1, (layer_heads, head_size))
    slots = torch.randperm(9 * 11, generator=gen)[:tokens]
    slots[torch.randperm(tokens, generator=gen)[:5]] = -1
    return key, value, slots


@CPP_ONLY
@pytest.mark.parametrize("cache_dtype", STORE_DTYPES)
@pytest.mark.parametrize("key_dtype", STORE_DTYPES)
@pytest.mark.parametrize("select", ["all", "slice", "index"])
def test_cpp_store_kv_matches_reference(cache_dtype, key_dtype, select):
    """Bit-exact against write_kv (padding skipped, every other slot untouched: NaN), for every pair of
    dtypes (the conversion rounds once, as torch's .to does), with the layer's heads taken in place:
    all of them, a contiguous slice (strided key), or an index tensor (heads 3 and 1, out of order)."""
    key, value, slots = store_inputs(7, key_dtype)
    kv_select = {"all": None, "slice": slice(1, 3), "index": torch.tensor([3, 1])}[select]
    picked = {"all": [0, 1, 2, 3], "slice": [1, 2], "index": [3, 1]}[select]
    got, expected = pool_cache(9, 6, 11, 40, cache_dtype), pool_cache(9, 6, 11, 40, cache_dtype)
    ops.store_kv(got[..., :40], got[..., 40:], key, value, slots, ops.PoolHeads(1, len(picked)), kv_select=kv_select)
    write_kv(expected[..., :40], expected[..., 40:], key[:, picked], value[:, picked], slots, 1)
    torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)
    # and by hand: every stored row where its slot says, the other heads and slots untouched
    written = 0
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            block, offset = divmod(slot, 11)
            rows = got[block, 1 : 1 + len(picked), offset]
            assert torch.equal(rows[:, :40], key[t, picked].to(cache_dtype)), t
            assert torch.equal(rows[:, 40:], value[t, picked].to(cache_dtype)), t
            written += len(picked)
    assert written == 65 * len(picked) and int((~got.isnan()).all(-1).sum()) == written


@CPP_ONLY
def test_cpp_store_kv_threads_and_checks():
    """A chunk long enough to copy on every thread stores what one thread stores; slots past the pool
    and mismatched shapes stop with a message instead of writing out of bounds."""
    gen = torch.Generator().manual_seed(9)
    key, value = torch.randn(3000, 3, 64, generator=gen), torch.randn(3000, 3, 64, generator=gen)
    slots = torch.randperm(200 * 16, generator=gen)[:3000]
    slots[::7] = -1
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        cache = pool_cache(200, 3, 16, 64, torch.bfloat16)
        ops.cpp.store_kv(cache[..., :64], cache[..., 64:], key, value, slots, 0, None)
        results.append(cache)
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0, equal_nan=True)
    cache = pool_cache(2, 3, 16, 64, torch.float32)
    with pytest.raises(RuntimeError, match="outside the pool"):
        ops.cpp.store_kv(cache[..., :64], cache[..., 64:], key[:2], value[:2], torch.tensor([0, 32]), 0, None)
    with pytest.raises(RuntimeError, match="outside the pool's 3 heads"):
        ops.cpp.store_kv(cache[..., :64], cache[..., 64:], key[:2], value[:2], torch.tensor([0, 1]), 1, None)
    with pytest.raises(RuntimeError, match="kv_heads"):
        ops.cpp.store_kv(
            cache[..., :64], cache[..., 64:], key[:2], value[:2], torch.tensor([0, 1]), 0, torch.tensor([3])
        )
    assert cache.isnan().all()


# ---------------------------------------------------------------------------------------------
# One layer's step in one pool (ops.retrieval_step / ops.local_step)

LAYER_KV_HEADS, LAYER_G = 4, 2
STEP_SELECTIONS = {"all": (0, 1, 2, 3), "slice": (1, 2), "index": (3, 0, 2)}


def layer_step_inputs(gen: torch.Generator, tokens: int, dtype: torch.dtype, head_size: int):
    """A layer's query, key and value for ``tokens`` rows as the model hands them: strided views of one
    fused qkv row per token."""
    q_width, kv_width = LAYER_KV_HEADS * LAYER_G * head_size, LAYER_KV_HEADS * head_size
    qkv = (torch.randn(tokens, q_width + 2 * kv_width, generator=gen) + 0.5).to(dtype)
    query = qkv[:, :q_width].unflatten(1, (LAYER_KV_HEADS * LAYER_G, head_size))
    key = qkv[:, q_width : q_width + kv_width].unflatten(1, (LAYER_KV_HEADS, head_size))
    value = qkv[:, q_width + kv_width :].unflatten(1, (LAYER_KV_HEADS, head_size))
    return query, key, value


def run_layer_steps(how: str, pool_kind: str, select: str, dtype: torch.dtype, mode: str):
    """A chunked, mixed prefill/decode schedule of three requests through one layer's heads ``select``
    in one pool (pool heads from 1 of 6), CUDA-graph padding rows (slot -1) and requests included.
    ``how``: "step" (ops.*_step, the C++ call on the CPU), "kernels" (the C++ kernels one after
    another, the output heads copied in Python) or "reference" (the torch reference). Returns each
    step's output and the pool (caches, tails)."""
    kv_heads = STEP_SELECTIONS[select]
    case = Case(block_size=16, sink=4, window=20, num_kv_heads=len(kv_heads), g=LAYER_G, pool_heads=6, head_offset=1)
    lengths = [150, 70, 33]
    rng, gen = random.Random(5), torch.Generator().manual_seed(5)
    schedule = make_schedule(lengths, random.Random(5), max_chunk=40, style="mixed")
    local = pool_kind == "local"
    pool = PagedPool(case, dtype, lengths, sliding=local, rng=rng)
    pool.tails.fill_(math.nan)
    heads = ops.LayerPoolHeads.of(kv_heads, case.head_offset, LAYER_G, LAYER_KV_HEADS)
    rule = LocalRule(case.sink, case.window, exact_prefill=mode == "exact")
    prompts = schedule.prompts if mode == "exact" else None
    outputs = []
    for batch in schedule:
        slots = []
        for rid, lo, hi in batch:
            table = pool.tables.setdefault(rid, [])
            while len(table) * case.block_size < hi:
                table.append(pool.free.pop())
            slots += [table[p // case.block_size] * case.block_size + p % case.block_size for p in range(lo, hi)]
        slot_mapping = torch.tensor(slots + [-1] * PAD_TOKENS)
        query, key, value = layer_step_inputs(gen, len(slot_mapping), dtype, case.head_size)
        paged = make_batch(pool, batch, [rid for rid, _, _ in batch], prompts if local else None)
        out = torch.full(query.shape, 7.0, dtype=dtype)
        kc, vc = pool.key_cache, pool.value_cache
        if how == "kernels":
            cpp = ops.kernels("cpp")
            ops.store_kv(kc, vc, key, value, slot_mapping, heads.pool, kv_select=heads.kv_select)
            if local:
                cpp.write_block_tails(kc, vc, pool.tails, paged, heads.pool, rule)
                result = cpp.local_attention(heads.select_q(query), kc, vc, pool.tails, paged, heads.pool, rule, 0.3)
            else:
                result = cpp.paged_attention(heads.select_q(query), kc, vc, paged, heads.pool, 0.3)
            heads.scatter_q(out, result)
        elif local:
            ops.local_step(query, key, value, slot_mapping, out, kc, vc, pool.tails, paged, heads, rule, 0.3)
        else:
            ops.retrieval_step(query, key, value, slot_mapping, out, kc, vc, paged, heads, 0.3)
        outputs.append(out)
        for rid, _lo, hi in batch:
            pool.release(rid, hi, hi == lengths[rid], prompt_len=prompts[rid] if prompts else None)
    return outputs, pool, heads


@CPP_ONLY
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("select", list(STEP_SELECTIONS))
@pytest.mark.parametrize("pool_kind,mode", [("retrieval", None), ("local", "exact"), ("local", "compressed")])
def test_cpp_layer_step_equals_the_kernels_one_after_another(monkeypatch, pool_kind, mode, select, dtype):
    """The C++ per-layer step (store, tails, attention, written into the layer's own output heads) is
    bit-for-bit the C++ kernels called one by one with the heads gathered and scattered in Python,
    over a chunked mixed schedule with padding; it leaves the layer's other heads alone, zeroes its
    heads' padding rows, and agrees with the torch reference."""
    outputs, pool, heads = run_layer_steps("step", pool_kind, select, dtype, mode)
    expected, expected_pool, _ = run_layer_steps("kernels", pool_kind, select, dtype, mode)
    monkeypatch.setenv(ops.KERNELS_ENV, "reference")
    reference_outputs, _, _ = run_layer_steps("step", pool_kind, select, dtype, mode)
    torch.testing.assert_close(pool.kv_cache, expected_pool.kv_cache, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(pool.tails, expected_pool.tails, rtol=0, atol=0, equal_nan=True)
    q_heads = [h * LAYER_G + j for h in heads.kv_heads for j in range(LAYER_G)]
    others = [h for h in range(LAYER_KV_HEADS * LAYER_G) if h not in q_heads]
    for out, want, ref in zip(outputs, expected, reference_outputs):
        assert torch.equal(out, want)
        assert (out[:, others] == 7.0).all()
        assert (out[-PAD_TOKENS:, q_heads] == 0).all()
        computed = out[:-PAD_TOKENS, q_heads]
        assert computed.isfinite().all() and not (computed == 7.0).any()
        assert relative_error(computed.double(), ref[:-PAD_TOKENS, q_heads].double()) < TOLERANCE[dtype]


@CPP_ONLY
def test_cpp_layer_step_checks_heads_before_writing():
    """A head index outside the layer, or a pool that does not hold every head when no index is given,
    stops with a message and leaves the cache as it was."""
    cache = pool_cache(4, 6, 16, 32, torch.float32)
    tokens = 2
    query, key, value = layer_step_inputs(torch.Generator().manual_seed(1), tokens, torch.float32, 32)
    table, lens = torch.tensor([[1]], dtype=torch.int32), torch.tensor([2], dtype=torch.int32)
    starts = torch.tensor([0, 2], dtype=torch.int32)
    out = torch.zeros(query.shape)
    args = (cache[..., :32], cache[..., 32:], query, key, value, torch.tensor([16, 17]), out, table, lens, starts, 1, 2)
    with pytest.raises(RuntimeError, match="outside the layer's 4 KV heads"):
        ops.cpp.retrieval_step(*args, torch.tensor([1, 4]), 0.3)
    with pytest.raises(RuntimeError, match="without kv_heads the query must hold the pool's 2 KV heads"):
        ops.cpp.retrieval_step(*args, None, 0.3)
    assert cache.isnan().all() and (out == 0).all()


# ---------------------------------------------------------------------------------------------
# Dispatch


def test_dispatch_honours_env(monkeypatch):
    case = PAGED_CASES[0]
    lengths = [20]
    data = make_data(case, torch.float32, 0, lengths)
    pool = PagedPool(case, torch.float32, lengths, sliding=False, rng=random.Random(0))
    pool.write(0, data[0][1], data[0][2], 0, 20)
    batch = make_batch(pool, [(0, 0, 20)], [0])
    args = (data[0][0], pool.key_cache, pool.value_cache, batch, case.heads, case.scale)
    monkeypatch.setenv(ops.KERNELS_ENV, "reference")
    assert torch.equal(ops.paged_attention(*args), reference.paged_attention(*args))
    monkeypatch.setenv(ops.KERNELS_ENV, "triton")
    with pytest.raises(ValueError, match=ops.KERNELS_ENV):
        ops.paged_attention(*args)
    monkeypatch.delenv(ops.KERNELS_ENV)
    expected = causal_oracle(case, data)[0]
    assert relative_error(ops.paged_attention(*args).double(), expected) < TOLERANCE[torch.float32]


@pytest.mark.skipif(ops.cpp is None, reason="razor_vllm._C is not built")
def test_cpp_is_the_default_on_cpu(monkeypatch):
    monkeypatch.delenv(ops.KERNELS_ENV, raising=False)
    cache = torch.zeros(2, 1, 16, 64)
    caches = (cache[..., :32], cache[..., 32:])
    assert ops._choose("local_attention", torch.float32, caches) is ops.kernels("cpp")
    assert ops._choose("local_attention", torch.float64, caches) is reference
    assert ops._choose("local_attention", torch.float32, (cache[..., :32].transpose(2, 3),)) is reference


class _OnMetaByDefault:
    """The reference's kernels, each call run with "meta" as the default device."""

    def __getattr__(self, name):
        kernel = getattr(reference, name)

        def call(*args, **kwargs):
            with torch.device("meta"):
                assert torch.zeros(1).is_meta  # the default device is in force
                return kernel(*args, **kwargs)

        return call


@pytest.mark.parametrize("mode", MODES)
def test_reference_makes_its_tensors_on_the_caches_device(mode, monkeypatch):
    """RAZOR_VLLM_KERNELS=reference must run on a GPU: every tensor the reference makes must be on the
    caches' device. With the default device set to "meta", a tensor made without ``device=`` would be
    a meta tensor and the first op mixing it with the CPU caches raises."""
    case = LOCAL_CASES[0]
    rng = random.Random(61)
    lengths = case.boundary_lengths()
    data = make_data(case, torch.float32, 61, lengths)
    schedule = make_schedule(lengths, rng, max_chunk=30, style="mixed", recompute=True)
    monkeypatch.setattr(ops, "kernels", lambda name: _OnMetaByDefault())
    outputs, _ = run_engine("reference", case, torch.float32, data, schedule, True, rng, exact=mode == "exact")
    expected = local_oracle(case, data, prompts=schedule.prompts if mode == "exact" else None)
    assert_close(outputs, expected, TOLERANCE[torch.float32])
    paged, _ = run_engine("reference", case, torch.float32, data, schedule, False, rng)
    assert_close(paged, causal_oracle(case, data), TOLERANCE[torch.float32])
