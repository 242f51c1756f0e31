"""The simulated engine the kernel tests drive, and the float64 oracle they compare with (shared by
tests/kernels/test_kernels.py, tests/kernels/test_triton_kernels.py, tests/unit/test_backend_impl.py and
benchmarks/gpu_check.py).

``PagedPool`` plays vLLM's part for one layer of one pool: shuffled physical blocks, every step's K/V
written before the block tails and attention, blocks no later step may read freed (and poisoned with
NaN) in the local pool, garbage ids in unused block-table entries, CUDA-graph padding requests and
token rows. A kernel that reads a position it must not, mixes up requests, heads or blocks, or gets
the block tails wrong gives NaN or a wrong row, and the comparison with the oracle (computed on whole
sequences, no paging, no tails) fails. Every tail a step writes is also compared with the sums
recomputed from scratch, and checked unchanged in every later step.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from typing import Optional

import torch

from razor_vllm import ops
from razor_vllm.ops import LocalRule, PagedBatch, PoolHeads
from razor_vllm.ops.dense import dense_block_tail, dense_causal_attention, dense_local_attention

# Bound on max|out - oracle| / max|oracle| per request. The oracle runs on the same rounded inputs,
# so for bf16/fp16 the error is dominated by rounding the output (unit roundoff 2^-8 / 2^-11).
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 2e-3}
# Bound on max|tail - sums| / max(1, max|sums|): fp32 sums of at most a few hundred O(1) values.
TAIL_TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5}

POISON = 0  # a physical block that is never allocated: always NaN
PAD_REQUESTS, PAD_TOKENS = 2, 3  # CUDA-graph padding added to every step


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

    @classmethod
    def parse(cls, text: str) -> "Case":
        """The case ``str(case)`` names, e.g. "bs16-S4-W20-kv2x2-heads2of5-D32"."""
        pattern = r"bs(\d+)-S(\d+)-W(\d+)-kv(\d+)x(\d+)-heads(\d+)of(\d+)-D(\d+)"
        bs, sink, window, n_kv, g, offset, pool, d = map(int, re.fullmatch(pattern, text).groups())
        return cls(bs, sink, window, n_kv, g, pool_heads=pool, head_offset=offset, head_size=d)

    @property
    def scale(self) -> float:
        return self.head_size**-0.5

    @property
    def heads(self) -> PoolHeads:
        return PoolHeads(self.head_offset, self.num_kv_heads)

    def boundary_lengths(self) -> list[int]:
        """Short, around the first compensated query (t = S+W), and several windows past it."""
        s, w = self.sink, self.window
        return [3, s + w - 1, s + w, s + w + 1, s + w + 2, s + 4 * w + 5, s + w + 3 * self.block_size + 1]


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


class Schedule(list):
    """Steps of (request, first position, end position); ``prompts[r]``: request r's prompt length
    (its positions computed as prefill; with ``recompute`` some prefills run past it, as vLLM
    recomputes generated tokens after a preemption)."""

    prompts: list[int]


def make_schedule(
    lengths: list[int], rng: random.Random, max_chunk: int, style: str, recompute: bool = False, min_chunk: int = 1
) -> Schedule:
    """Steps as a chunked-prefill scheduler would batch them.

    style: "prefill" (whole prompt in one chunk), "chunked" (random chunk sizes), "decode" (one token
    per step), or "mixed" (a random one per request). Staggered arrivals mix prefills with decodes.
    """
    requests = []
    for rid, length in enumerate(lengths):
        kind = rng.choice(["prefill", "chunked", "decode"]) if style == "mixed" else style
        prefill = {"prefill": rng.randint(max(1, length - 4), length), "chunked": length, "decode": 1}[kind]
        prompt = rng.randint(1, prefill) if recompute and rng.random() < 0.5 else prefill
        requests.append(
            dict(rid=rid, length=length, prefill=prefill, prompt=prompt, kind=kind, start=rng.randint(0, 6), done=0)
        )
    steps, step = Schedule(), 0
    steps.prompts = [r["prompt"] for r in requests]
    while any(r["done"] < r["length"] for r in requests):
        batch = []
        for r in requests:
            if r["start"] > step or r["done"] == r["length"]:
                continue
            if r["done"] < r["prefill"]:
                chunk = r["prefill"] if r["kind"] == "prefill" else rng.randint(min_chunk, max_chunk)
                n = min(chunk, r["prefill"] - r["done"])
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
        tail_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        # A strided view (block stride != H_pool * 2 * D), as the real page tail.
        self.tails = torch.full((num_blocks, case.pool_heads + 1, 2, d), nan, dtype=tail_dtype)[:, : case.pool_heads]
        self.free = [b for b in range(num_blocks) if b != POISON]
        rng.shuffle(self.free)
        self.tables: dict[int, list[Optional[int]]] = {}
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

    def block_table(self, rids: list[int], pad: int = 0) -> torch.Tensor:
        """Rows for this step's requests, then ``pad`` padding rows of the null block; unallocated or
        freed entries of real rows are garbage."""
        table = torch.tensor([[self.rng.choice([POISON, -1]) for _ in range(self.width)] for _ in rids])
        table = torch.cat([table.reshape(len(rids), self.width), torch.full((pad, self.width), POISON)])
        for row, rid in enumerate(rids):
            for i, block in enumerate(self.tables[rid]):
                if block is not None:
                    table[row, i] = block
        return table.to(torch.int32)

    def release(
        self,
        rid: int,
        next_position: int,
        finished: bool,
        window: Optional[int] = None,
        prompt_len: Optional[int] = None,
    ) -> None:
        """Free what no later step may read: everything when finished; in the local pool (unless exact
        prefill keeps a prefilling request's blocks) every block past the sink blocks and before both
        block c of the next step's first query p (c = (p-W+1) // B) and the block of p - 1 (read
        for the tail of a block started at p)."""
        c, bs = self.case, self.case.block_size
        table = self.tables[rid]
        window = c.window if window is None else window
        prefilling = prompt_len is not None and next_position < prompt_len
        keep_from = min((next_position - window + 1) // bs, (next_position - 1) // bs)
        for i, block in enumerate(table):
            old = i * bs >= c.sink and i < keep_from and not prefilling
            if block is not None and (finished or (self.sliding and old)):
                self.recycled += not finished
                self.kv_cache[block] = float("nan")
                self.tails[block] = float("nan")
                self.free.insert(self.rng.randint(0, len(self.free)), block)
                table[i] = None


class TailChecker:
    """Every tail written in a step equals the from-scratch sums (``dense_block_tail``), and stays
    bitwise unchanged afterwards while its block is allocated."""

    def __init__(self, case: Case, data, pool: PagedPool) -> None:
        self.case, self.data, self.pool = case, data, pool
        self.written: dict[tuple[int, int], torch.Tensor] = {}  # (rid, block index) -> tail as written
        self.checked = 0

    def _tail(self, rid: int, b: int) -> torch.Tensor:
        block = self.pool.tables[rid][b]
        c = self.case
        return self.pool.tails[block, c.head_offset : c.head_offset + c.num_kv_heads].to("cpu", copy=True)

    def after_write(self, batch) -> None:
        c, bs = self.case, self.case.block_size
        tolerance = TAIL_TOLERANCE[self.pool.tails.dtype]
        for (rid, b), written in list(self.written.items()):
            if self.pool.tables[rid][b] is None:
                del self.written[(rid, b)]
            else:
                assert torch.equal(self._tail(rid, b), written), f"request {rid}: tail of block {b} changed"
        for rid, lo, hi in batch:
            _, k, v = self.data[rid]
            for b in range(-(-lo // bs), (hi - 1) // bs + 1):
                got, want = self._tail(rid, b), dense_block_tail(k, v, b, bs, c.sink)
                if b * bs <= c.sink:
                    assert torch.equal(got, torch.zeros_like(got)), f"request {rid}: tail of block {b} not zero"
                err = ((got.double() - want).abs().max() / want.abs().max().clamp(min=1)).item()
                assert err < tolerance, f"request {rid}: tail of block {b}: relative error {err:.3g}"
                self.written[(rid, b)] = got
                self.checked += 1


def make_batch(pool: PagedPool, batch, rids, prompts=None, windows=None) -> PagedBatch:
    """This step's PagedBatch with ``PAD_REQUESTS`` padding requests (no queries, seq_len 0)."""
    pad = [0] * PAD_REQUESTS
    q_lens = [hi - lo for _, lo, hi in batch] + pad
    query_start_loc = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32)

    def per_request(values):
        return torch.tensor([values[rid] for rid in rids] + pad, dtype=torch.int32)

    return PagedBatch(
        block_table=pool.block_table(rids, pad=PAD_REQUESTS),
        seq_lens=torch.tensor([hi for _, _, hi in batch] + pad, dtype=torch.int32),
        query_start_loc=query_start_loc,
        prompt_lens=None if prompts is None else per_request(prompts),
        windows=None if windows is None else per_request(windows),
        max_query_len=max(q_lens),
        max_seq_len=max(hi for _, _, hi in batch),
    )


def run_engine(
    impl,
    case,
    dtype,
    data,
    schedule,
    sliding: bool,
    rng: random.Random,
    before_step=None,
    compensation: bool = True,
    exact: bool = False,
    windows: Optional[list[int]] = None,
    check_tails: bool = True,
):
    """Drive one pool through the schedule; returns each request's outputs [L, Hq, D] in float64,
    and the pool (with its ``tail_checker`` for the local pool)."""
    kernels = ops.kernels(impl)
    lengths = [q.shape[0] for q, _, _ in data]
    pool = PagedPool(case, dtype, lengths, sliding, rng)
    rule = LocalRule(case.sink, case.window, compensation=compensation, exact_prefill=exact)
    prompts = schedule.prompts if exact else None
    checker = pool.tail_checker = TailChecker(case, data, pool)
    outputs = [torch.full(q.shape, float("nan"), dtype=torch.float64) for q, _, _ in data]
    for batch in schedule:
        for rid, lo, hi in batch:
            pool.write(rid, data[rid][1], data[rid][2], lo, hi)
        rids = [rid for rid, _, _ in batch]
        paged = make_batch(pool, batch, rids, prompts, windows)
        pad_rows = torch.full((PAD_TOKENS, *data[0][0].shape[1:]), float("nan"), dtype=dtype)
        query = torch.cat([data[rid][0][lo:hi] for rid, lo, hi in batch] + [pad_rows])
        if before_step is not None:
            before_step(pool)
        if sliding:
            kernels.write_block_tails(pool.key_cache, pool.value_cache, pool.tails, paged, case.heads, rule)
            if check_tails:
                checker.after_write(batch)
            out = kernels.local_attention(
                query, pool.key_cache, pool.value_cache, pool.tails, paged, case.heads, rule, case.scale
            )
        else:
            out = kernels.paged_attention(query, pool.key_cache, pool.value_cache, paged, case.heads, case.scale)
        assert out.dtype == query.dtype and out.shape == query.shape
        for row, (rid, lo, hi) in zip(paged.query_start_loc.tolist(), batch):
            outputs[rid][lo:hi] = out[row : row + hi - lo].double()
        for rid, _lo, hi in batch:
            window = case.window if windows is None else windows[rid]
            pool.release(rid, hi, hi == lengths[rid], window, prompts[rid] if prompts else None)
    return outputs, pool


def relative_error(out: torch.Tensor, expected: torch.Tensor) -> float:
    """max|out - expected| / max|expected|; NaN (a read of poisoned memory) counts as infinite."""
    err = ((out - expected).abs().max() / expected.abs().max()).item()
    return math.inf if math.isnan(err) else err


def local_oracle(case, data, compensation="weighted", prompts=None, windows=None):
    expected = []
    for rid, (q, k, v) in enumerate(data):
        window = case.window if windows is None else windows[rid]
        prompt_len = None if prompts is None else prompts[rid]
        positions = range(q.shape[0])
        out = dense_local_attention(q, k, v, positions, case.sink, window, case.scale, compensation, prompt_len)
        expected.append(out)
    return expected


def causal_oracle(case, data):
    return [dense_causal_attention(q, k, v, range(q.shape[0]), case.scale) for q, k, v in data]


def assert_close(outputs, expected, tolerance):
    for rid, (out, ref) in enumerate(zip(outputs, expected)):
        err = relative_error(out, ref)
        assert err < tolerance, f"request {rid} (length {ref.shape[0]}): relative error {err:.3g} >= {tolerance}"


def make_data(case: Case, dtype: torch.dtype, seed: int, lengths: list[int]):
    gen = torch.Generator().manual_seed(seed)
    return [random_request(gen, n, case, dtype) for n in lengths]


def run_local(impl, case, data, schedule, mode, rng, dtype=torch.float32, windows=None, **kwargs):
    """The local pool through ``schedule`` in ``mode``; checks against the oracle and returns the pool."""
    exact = mode == "exact"
    outputs, pool = run_engine(impl, case, dtype, data, schedule, True, rng, exact=exact, windows=windows, **kwargs)
    compensation = "weighted" if kwargs.get("compensation", True) else "none"
    expected = local_oracle(case, data, compensation, schedule.prompts if exact else None, windows)
    assert_close(outputs, expected, TOLERANCE[dtype])
    return pool


def tail_started_in_chunk(schedule, case, windows=None, prompts=None) -> bool:
    """Some chunk starting more than two blocks holds a compressed query whose block c was started in
    that same chunk (so its tail must be written before attention)."""
    bs = case.block_size
    for batch in schedule:
        for rid, lo, hi in batch:
            window = case.window if windows is None else windows[rid]
            first_compressed = lo if prompts is None else max(lo, prompts[rid])
            if (hi - 1) // bs - -(-lo // bs) < 2:
                continue
            for t in range(first_compressed, hi):
                c = (t - window + 1) // bs
                if t - window + 1 - case.sink > 0 and c * bs >= lo:
                    return True
    return False
