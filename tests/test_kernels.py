"""The attention kernels (reference and C++) against the dense float64 oracle, through a simulated engine.

``PagedPool`` plays vLLM's part for one layer of one pool: shuffled physical blocks, every step's K/V
written before attention, blocks behind the window freed (and poisoned with NaN) in the local pool,
garbage ids in unused block-table entries. A kernel that reads a position it must not, mixes up
requests, heads or blocks, or mis-tracks the compensation sums across steps gives NaN or a wrong
row, and the comparison with the oracle (computed on whole sequences, no paging) fails.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import pytest
import torch

from razor_vllm import ops
from razor_vllm.ops import reference
from razor_vllm.ops.dense import dense_causal_attention, dense_local_attention, dense_razor_attention

IMPLS = [
    "reference",
    pytest.param("cpp", marks=pytest.mark.skipif(ops.cpp is None, reason="razor_vllm._C is not built")),
]

# Bound on max|out - oracle| / max|oracle| per request. The oracle runs on the same rounded inputs,
# so for bf16/fp16 the error is dominated by rounding the output (unit roundoff 2^-8 / 2^-11).
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 2e-3}

POISON = 0  # a physical block that is never allocated: always NaN


@pytest.fixture(autouse=True)
def one_thread():
    """These tests run thousands of tiny ops; on a shared 2-core machine intra-op threads make them
    ~10x slower. Parallel C++ execution is covered by test_cpp_threads_do_not_change_results."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass(frozen=True)
class Case:
    block_size: int
    sink: int
    window: int
    num_kv_heads: int
    g: int  # query heads per KV head
    pool_heads: int  # heads of the pool across all layers; this layer uses [head_offset, +num_kv_heads)
    head_offset: int
    head_size: int = 32

    def __str__(self) -> str:
        return (
            f"bs{self.block_size}-S{self.sink}-W{self.window}-kv{self.num_kv_heads}x{self.g}"
            f"-heads{self.head_offset}of{self.pool_heads}-D{self.head_size}"
        )

    @property
    def scale(self) -> float:
        return self.head_size**-0.5

    def boundary_lengths(self) -> list[int]:
        """Short, around the first compensated query (t = S+W), and several windows past it."""
        s, w = self.sink, self.window
        return [3, s + w - 1, s + w, s + w + 1, s + w + 2, s + 4 * w + 5, s + w + 3 * self.block_size + 1]


LOCAL_CASES = [
    Case(block_size=16, sink=4, window=20, num_kv_heads=2, g=2, pool_heads=5, head_offset=2),
    Case(block_size=32, sink=0, window=37, num_kv_heads=1, g=3, pool_heads=3, head_offset=1, head_size=64),
    Case(block_size=16, sink=3, window=1, num_kv_heads=2, g=1, pool_heads=2, head_offset=0),
    Case(block_size=16, sink=16, window=16, num_kv_heads=1, g=4, pool_heads=4, head_offset=3),
    Case(block_size=32, sink=5, window=45, num_kv_heads=3, g=3, pool_heads=7, head_offset=4),
    Case(block_size=32, sink=2, window=33, num_kv_heads=1, g=5, pool_heads=1, head_offset=0, head_size=40),
]


# ---------------------------------------------------------------------------------------------
# The simulated engine


def random_request(gen: torch.Generator, length: int, case: Case, dtype: torch.dtype):
    """q [L, Hq, D], k/v [L, n_kv, D], rounded to ``dtype``. Keys and values carry a per-head offset
    so the mean of the dropped ones (the compensation) is far from zero."""
    n, d = case.num_kv_heads, case.head_size
    q = torch.randn(length, n * case.g, d, generator=gen, dtype=torch.float64)
    k = torch.randn(length, n, d, generator=gen, dtype=torch.float64) + torch.randn(n, d, generator=gen)
    v = torch.randn(length, n, d, generator=gen, dtype=torch.float64) + torch.randn(n, d, generator=gen)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def make_schedule(lengths: list[int], rng: random.Random, max_chunk: int, style: str) -> list[list[tuple]]:
    """Steps of (request, first position, end position), as a chunked-prefill scheduler would batch them.

    style: "prefill" (whole prompt in one chunk), "chunked" (random chunk sizes), "decode" (one token
    per step), or "mixed" (a random one per request). Staggered arrivals mix prefills with decodes.
    """
    requests = []
    for rid, length in enumerate(lengths):
        kind = rng.choice(["prefill", "chunked", "decode"]) if style == "mixed" else style
        prompt = {"prefill": rng.randint(max(1, length - 4), length), "chunked": length, "decode": 1}[kind]
        requests.append(dict(rid=rid, length=length, prompt=prompt, kind=kind, start=rng.randint(0, 6), done=0))
    steps, step = [], 0
    while any(r["done"] < r["length"] for r in requests):
        batch = []
        for r in requests:
            if r["start"] > step or r["done"] == r["length"]:
                continue
            if r["done"] < r["prompt"]:
                chunk = r["prompt"] if r["kind"] == "prefill" else rng.randint(1, max_chunk)
                n = min(chunk, r["prompt"] - r["done"])
            else:
                n = 1
            batch.append((r["rid"], r["done"], r["done"] + n))
            r["done"] += n
        rng.shuffle(batch)
        if batch:
            steps.append(batch)
        step += 1
    return steps


class PagedPool:
    """One layer's slice of a KV pool, with blocks managed the way vLLM's KV-cache manager would."""

    def __init__(self, case: Case, dtype: torch.dtype, lengths: list[int], sliding: bool, rng: random.Random):
        self.case, self.sliding, self.rng = case, sliding, rng
        d, bs = case.head_size, case.block_size
        self.width = max(math.ceil(n / bs) for n in lengths) + 1
        num_blocks = sum(math.ceil(n / bs) for n in lengths) + 4
        nan = float("nan")
        self.kv_cache = torch.full((num_blocks, case.pool_heads, bs, 2 * d), nan, dtype=dtype)
        self.key_cache, self.value_cache = self.kv_cache[..., :d], self.kv_cache[..., d:]
        comp_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        # A strided view (block stride != H_pool * 2 * D), as when comp shares a page with other data.
        self.comp = torch.full((num_blocks, case.pool_heads + 1, 2, d), nan, dtype=comp_dtype)[:, : case.pool_heads]
        self.free = [b for b in range(num_blocks) if b != POISON]
        rng.shuffle(self.free)
        self.tables: dict[int, list[int | None]] = {}
        self.recycled = 0  # blocks freed behind the window while their request was running

    def write(self, rid: int, k: torch.Tensor, v: torch.Tensor, lo: int, hi: int) -> None:
        """Allocate blocks up to position hi and store K/V of [lo, hi), as the engine does before attention."""
        c, bs, d = self.case, self.case.block_size, self.case.head_size
        table = self.tables.setdefault(rid, [])
        while len(table) * bs < hi:
            table.append(self.free.pop())
        positions = torch.arange(lo, hi)
        blocks = torch.tensor([table[p // bs] for p in range(lo, hi)])[:, None]
        heads = torch.arange(c.head_offset, c.head_offset + c.num_kv_heads)[None, :]
        slots = (positions % bs)[:, None]
        self.kv_cache[blocks, heads, slots, :d] = k[lo:hi]
        self.kv_cache[blocks, heads, slots, d:] = v[lo:hi]

    def block_table(self, rids: list[int]) -> torch.Tensor:
        """Rows for this step's requests plus one padding row; unallocated or freed entries are garbage."""
        table = torch.tensor([[self.rng.choice([POISON, -1]) for _ in range(self.width)] for _ in range(len(rids) + 1)])
        for row, rid in enumerate(rids):
            for i, block in enumerate(self.tables[rid]):
                if block is not None:
                    table[row, i] = block
        return table.to(torch.int32)

    def release(self, rid: int, next_position: int, finished: bool) -> None:
        """Free what no later step may read: everything when finished; in the local pool, blocks
        (other than block 0, which holds the compensation slot) wholly past the sinks and before
        the next step's window start next_position + 1 - W."""
        c, bs = self.case, self.case.block_size
        table = self.tables[rid]
        for i, block in enumerate(table):
            old = i > 0 and i * bs >= c.sink and (i + 1) * bs <= next_position + 1 - c.window
            if block is not None and (finished or (self.sliding and old)):
                self.recycled += not finished
                self.kv_cache[block] = float("nan")
                self.comp[block] = float("nan")
                self.free.insert(self.rng.randint(0, len(self.free)), block)
                table[i] = None


def run_engine(impl, case, dtype, data, schedule, sliding: bool, rng: random.Random, before_step=None,
               compensation: bool = True):
    """Drive one pool through the schedule; returns each request's outputs [L, Hq, D] in float64,
    and the pool."""
    kernels = ops.kernels(impl)
    lengths = [q.shape[0] for q, _, _ in data]
    pool = PagedPool(case, dtype, lengths, sliding, rng)
    outputs = [torch.full(q.shape, float("nan"), dtype=torch.float64) for q, _, _ in data]
    for batch in schedule:
        for rid, lo, hi in batch:
            pool.write(rid, data[rid][1], data[rid][2], lo, hi)
        rids = [rid for rid, _, _ in batch]
        block_table = pool.block_table(rids)
        seq_lens = torch.tensor([hi for _, _, hi in batch], dtype=torch.int32)
        query_start_loc = torch.tensor([0] + [hi - lo for _, lo, hi in batch], dtype=torch.int32).cumsum(0)
        query_start_loc = query_start_loc.to(torch.int32)
        query = torch.cat([data[rid][0][lo:hi] for rid, lo, hi in batch])
        meta = (block_table, seq_lens, query_start_loc, case.head_offset, case.num_kv_heads)
        if before_step is not None:
            before_step(pool)
        if sliding:
            out = kernels.local_attention(
                query, pool.key_cache, pool.value_cache, pool.comp, *meta, case.sink, case.window, case.scale,
                compensation=compensation,
            )
            if compensation:
                kernels.fold_compensation(pool.key_cache, pool.value_cache, pool.comp, *meta, case.sink, case.window)
        else:
            out = kernels.paged_attention(query, pool.key_cache, pool.value_cache, *meta, case.scale)
        assert out.dtype == query.dtype and out.shape == query.shape
        for row, (rid, lo, hi) in zip(query_start_loc.tolist(), batch):
            outputs[rid][lo:hi] = out[row : row + hi - lo].double()
        for rid, lo, hi in batch:
            pool.release(rid, hi, finished=hi == lengths[rid])
    return outputs, pool


def relative_error(out: torch.Tensor, expected: torch.Tensor) -> float:
    """max|out - expected| / max|expected|; NaN (a read of poisoned memory) counts as infinite."""
    err = ((out - expected).abs().max() / expected.abs().max()).item()
    return math.inf if math.isnan(err) else err


def local_oracle(case, data, compensation="weighted"):
    return [
        dense_local_attention(q, k, v, range(q.shape[0]), case.sink, case.window, case.scale, compensation)
        for q, k, v in data
    ]


def causal_oracle(case, data):
    return [dense_causal_attention(q, k, v, range(q.shape[0]), case.scale) for q, k, v in data]


def assert_close(outputs, expected, tolerance):
    for rid, (out, ref) in enumerate(zip(outputs, expected)):
        err = relative_error(out, ref)
        assert err < tolerance, f"request {rid} (length {ref.shape[0]}): relative error {err:.3g} >= {tolerance}"


def make_data(case: Case, dtype: torch.dtype, seed: int, lengths: list[int]):
    gen = torch.Generator().manual_seed(seed)
    return [random_request(gen, n, case, dtype) for n in lengths]


# ---------------------------------------------------------------------------------------------
# The oracle itself


def test_oracle_compensation_is_exact_for_equal_dropped_keys():
    """If every dropped key is the same vector, n_d * exp(q.k_hat) * v_hat equals the sum of the
    dropped terms, so the count-weighted rule reproduces full causal attention exactly; the
    unweighted one does not. With a window covering everything, local is causal attention."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(40, h, 16, generator=gen) for h in (4, 2, 2))
    sink, window = 3, 8
    k[sink:] = k[sink]  # every key that can be dropped is equal
    causal = dense_causal_attention(q, k, v, range(40), 0.25)
    assert relative_error(dense_local_attention(q, k, v, range(40), sink, window, 0.25), causal) < 1e-12
    assert relative_error(dense_local_attention(q, k, v, range(40), sink, window, 0.25, "unweighted"), causal) > 1e-2
    q, k, v = (torch.randn(20, h, 16, generator=gen) for h in (4, 2, 2))
    wide = dense_local_attention(q, k, v, range(20), 2, 18, 0.25)
    assert relative_error(wide, dense_causal_attention(q, k, v, range(20), 0.25)) < 1e-12


# ---------------------------------------------------------------------------------------------
# Local heads


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", LOCAL_CASES, ids=str)
@pytest.mark.parametrize("style,seed", [("mixed", 0), ("mixed", 1), ("prefill", 2), ("chunked", 3), ("decode", 4)])
def test_local_attention_matches_oracle(impl, case, style, seed):
    rng = random.Random(seed)
    lengths = case.boundary_lengths() + [rng.randint(1, 3 * case.window + case.sink) for _ in range(2)]
    data = make_data(case, torch.float32, seed, lengths)
    schedule = make_schedule(lengths, rng, max_chunk=case.window + 7, style=style)
    if style == "mixed":  # the point of the style: prefill chunks batched with decodes
        assert any(len({hi - lo == 1 for _, lo, hi in batch}) == 2 for batch in schedule)
    outputs, pool = run_engine(impl, case, torch.float32, data, schedule, sliding=True, rng=rng)
    assert pool.recycled > 0  # old window blocks were freed (and poisoned) under running requests
    assert_close(outputs, local_oracle(case, data), TOLERANCE[torch.float32])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_local_attention_half_precision(impl, dtype):
    case = LOCAL_CASES[4]
    rng = random.Random(7)
    lengths = case.boundary_lengths()
    data = make_data(case, dtype, 7, lengths)
    schedule = make_schedule(lengths, rng, max_chunk=40, style="mixed")
    outputs, _ = run_engine(impl, case, dtype, data, schedule, sliding=True, rng=rng)
    assert_close(outputs, local_oracle(case, data), TOLERANCE[dtype])


def test_reference_is_exact_in_float64():
    """In float64 (sums included) the reference must agree with the oracle to rounding."""
    case = LOCAL_CASES[0]
    rng = random.Random(11)
    lengths = case.boundary_lengths()
    data = make_data(case, torch.float64, 11, lengths)
    schedule = make_schedule(lengths, rng, max_chunk=30, style="mixed")
    outputs, _ = run_engine("reference", case, torch.float64, data, schedule, sliding=True, rng=rng)
    assert_close(outputs, local_oracle(case, data), TOLERANCE[torch.float64])


@pytest.mark.parametrize("impl", IMPLS)
def test_compensation_matters(impl):
    """Dropping the compensation, its ln(n_d) weight, or the stored sums is caught by the tolerance."""
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
        pool.comp.zero_()

    outputs, _ = run_engine(
        impl, case, torch.float32, data, schedule, sliding=True, rng=random.Random(5), before_step=forget_stored_sums
    )
    for out, ref in zip(outputs, expected):
        assert relative_error(out, ref) > 100 * tolerance


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("style,seed", [("mixed", 12), ("chunked", 13)])
def test_local_attention_without_compensation(impl, style, seed):
    """The ablation (razor option compensation=false): sinks + window only, and the sums are never
    read (they stay NaN-poisoned here)."""
    case = LOCAL_CASES[1]
    rng = random.Random(seed)
    lengths = case.boundary_lengths() + [case.sink + 4 * case.window + 1]
    data = make_data(case, torch.float32, seed, lengths)
    schedule = make_schedule(lengths, rng, max_chunk=case.window + 7, style=style)

    def poison_sums(pool):
        pool.comp.fill_(float("nan"))

    outputs, _ = run_engine(impl, case, torch.float32, data, schedule, sliding=True, rng=rng,
                            before_step=poison_sums, compensation=False)
    assert_close(outputs, local_oracle(case, data, "none"), TOLERANCE[torch.float32])


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
def test_layer_split_across_pools(impl):
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
    schedule = make_schedule(lengths, random.Random(9), max_chunk=32, style="mixed")

    def pool_part(heads):  # the slice of every request that one pool holds
        q_heads = [h * g + j for h in heads for j in range(g)]
        return [(q[:, q_heads], k[:, heads], v[:, heads]) for q, k, v in full]

    full_heads, local_heads = [0], [1, 2]
    full_case = Case(block_size=16, sink=0, window=1, num_kv_heads=1, g=g, pool_heads=2, head_offset=1, head_size=d)
    local_case = Case(
        block_size=32, sink=sink, window=window, num_kv_heads=2, g=g, pool_heads=4, head_offset=2, head_size=d
    )
    out_full, _ = run_engine(impl, full_case, torch.float32, pool_part(full_heads), schedule, False, random.Random(1))
    out_local, _ = run_engine(impl, local_case, torch.float32, pool_part(local_heads), schedule, True, random.Random(2))
    for rid, (q, k, v) in enumerate(full):
        expected = dense_razor_attention(q, k, v, range(q.shape[0]), retrieval, sink, window, full_case.scale)
        layer = torch.cat([out_full[rid], out_local[rid]], dim=1)  # heads 0..2 in KV-head order
        assert relative_error(layer, expected) < TOLERANCE[torch.float32]


@pytest.mark.skipif(ops.cpp is None, reason="razor_vllm._C is not built")
def test_cpp_threads_do_not_change_results():
    """Tasks are scheduled dynamically, but each output row is computed by one task: bitwise equal."""
    case = LOCAL_CASES[4]
    lengths = [300, 90, 1, 160]
    data = make_data(case, torch.float32, 13, lengths)
    schedule = make_schedule(lengths, random.Random(13), max_chunk=200, style="mixed")
    results = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        local, _ = run_engine("cpp", case, torch.float32, data, schedule, True, random.Random(13))
        full, _ = run_engine("cpp", case, torch.float32, data, schedule, False, random.Random(13))
        results[threads] = local + full
    assert all(torch.equal(a, b) for a, b in zip(results[1], results[2]))


# ---------------------------------------------------------------------------------------------
# Dispatch


def test_dispatch_honours_env(monkeypatch):
    case = PAGED_CASES[0]
    lengths = [20]
    data = make_data(case, torch.float32, 0, lengths)
    pool = PagedPool(case, torch.float32, lengths, sliding=False, rng=random.Random(0))
    pool.write(0, data[0][1], data[0][2], 0, 20)
    args = (
        data[0][0], pool.key_cache, pool.value_cache, pool.block_table([0]),
        torch.tensor([20], dtype=torch.int32), torch.tensor([0, 20], dtype=torch.int32),
        case.head_offset, case.num_kv_heads, case.scale,
    )  # fmt: skip
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
    assert ops._choose(torch.float32, cache[..., :32], cache[..., 32:]) is ops.cpp
    assert ops._choose(torch.float64, cache[..., :32], cache[..., 32:]) is reference
