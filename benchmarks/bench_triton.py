"""Time the Triton kernels on a GPU against what stock vLLM pays; print a table, write JSON.

    .venv/bin/python benchmarks/bench_triton.py [--out out/bench_triton.json] [--dtypes bfloat16,float16]

For each shape (SmolLM2-135M: 9 query / 3 KV heads, D=64; Llama-3-8B-like: 32 / 8, D=128; decode
batches and one 512-token prefill chunk at 2k-8k context) it times one layer's kernels:
``local_attention`` (our kernel; sinks S=4 + window W=252 + compensation), ``write_block_tails`` and
``store_kv`` (ours), ``paged_attention`` (vLLM's unified_attention on the retrieval pool's layout,
block 187), and ``stock_full_attention``: the same vLLM kernel on stock vLLM's own cache layout
(block 16) over the whole context, i.e. what each of these heads costs without razor. Times are
triton.testing.do_bench medians in ms (decode shapes also replayed from a CUDA graph); GB/s counts the
K/V bytes each attention kernel must read.
Needs a CUDA GPU: without one it says so and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from shapes import Shape

from razor_vllm.ops import LocalRule, PagedBatch, PoolHeads

SINK, WINDOW, LOCAL_BLOCK, RETRIEVAL_BLOCK = 4, 252, 32, 187
# Every query follows the compressed rule: a prefill chunk at long context in exact mode is plain
# causal attention over the whole prompt, i.e. what the retrieval rows time.
RULE = LocalRule(SINK, WINDOW, compensation=True, exact_prefill=False)


SHAPES = [
    Shape("smollm decode 64x2k", 9, 3, 64, 64, 1, 2048),
    Shape("smollm decode 256x4k", 9, 3, 64, 256, 1, 4096),
    Shape("smollm prefill 512@2k", 9, 3, 64, 1, 512, 2048),
    Shape("llama8b decode 64x4k", 32, 8, 128, 64, 1, 4096),
    Shape("llama8b decode 16x8k", 32, 8, 128, 16, 1, 8192),
    Shape("llama8b prefill 512@4k", 32, 8, 128, 1, 512, 4096),
]


def paged_cache(
    num_blocks: int, block_size: int, shape: Shape, dtype: torch.dtype, gen: torch.Generator, device: str = "cuda"
):
    """Key and value views [num_blocks, H_pool, block_size, D] of one razor pool page layout; this
    layer's heads sit after another layer's (head_offset = num_kv_heads)."""
    d = shape.head_size
    kv = torch.randn(num_blocks, 2 * shape.num_kv_heads, block_size, 2 * d, generator=gen).to(dtype).to(device)
    return kv[..., :d], kv[..., d:]


def shuffled_table(rows: int, cols: int, gen: torch.Generator, device: str = "cuda") -> torch.Tensor:
    return (torch.randperm(rows * cols, generator=gen) + 1).view(rows, cols).to(torch.int32).to(device)


def local_pool(shape: Shape, dtype: torch.dtype, gen: torch.Generator, device: str = "cuda") -> dict:
    """Local pool as razor leaves it: per request block 0 (sinks + sums) and the blocks of the last
    W + q_len tokens; block-table entries of freed blocks point at block 0 of the pool (never read)."""
    blocks = -(-shape.context // LOCAL_BLOCK)
    first_live = max(1, (shape.context - shape.q_len + 1 - WINDOW) // LOCAL_BLOCK)
    live = [0] + list(range(first_live, blocks))
    ids = shuffled_table(shape.batch, len(live), gen, "cpu")
    table = torch.zeros(shape.batch, blocks, dtype=torch.int32)
    table[:, live] = ids
    key_cache, value_cache = paged_cache(shape.batch * len(live) + 1, LOCAL_BLOCK, shape, dtype, gen, device)
    tails = torch.randn(key_cache.shape[0], key_cache.shape[1], 2, shape.head_size, generator=gen).to(device) * 10
    return dict(key_cache=key_cache, value_cache=value_cache, tails=tails, block_table=table.to(device))


def kv_bytes(shape: Shape, dtype: torch.dtype, tokens: int) -> int:
    return 2 * shape.batch * shape.num_kv_heads * tokens * shape.head_size * torch.finfo(dtype).bits // 8


def bench(shape: Shape, dtype: torch.dtype, gen: torch.Generator, cudagraph: bool) -> list[dict]:
    import triton.testing

    from razor_vllm import triton_kernels as tk

    d, n_kv, scale = shape.head_size, shape.num_kv_heads, shape.head_size**-0.5
    tokens = shape.batch * shape.q_len
    query = torch.randn(tokens, shape.num_q_heads, d, generator=gen).to(dtype).cuda()
    key = torch.randn(tokens, n_kv, d, generator=gen).to(dtype).cuda()
    seq_lens = torch.full((shape.batch,), shape.context, dtype=torch.int32, device="cuda")
    qsl = (torch.arange(shape.batch + 1, dtype=torch.int32) * shape.q_len).cuda()
    out = torch.empty_like(query)
    heads = PoolHeads(n_kv, n_kv)  # this layer's heads sit after another layer's

    def step(table):  # max_query_len 0 (unknown): the retrieval kernel's 2D path, as always timed here
        return PagedBatch(table, seq_lens, qsl)

    local = local_pool(shape, dtype, gen)
    local_step = step(local["block_table"])
    pos = torch.arange(shape.context - shape.q_len, shape.context, device="cuda")
    slots = (local["block_table"][:, pos // LOCAL_BLOCK].long() * LOCAL_BLOCK + pos % LOCAL_BLOCK).flatten()

    full_blocks = -(-shape.context // RETRIEVAL_BLOCK)
    full_key, full_value = paged_cache(shape.batch * full_blocks + 1, RETRIEVAL_BLOCK, shape, dtype, gen)
    full_step = step(shuffled_table(shape.batch, full_blocks, gen))

    # Stock vLLM: its own cache layout [num_blocks, 16, kv_heads, D] per K and V, block size 16, read by
    # the same unified_attention (given here as the [num_blocks, heads, 16, D] view our wrapper expects).
    stock_blocks = -(-shape.context // 16)
    stock = torch.randn(2, shape.batch * stock_blocks + 1, 16, n_kv, d, generator=gen).to(dtype).cuda()
    stock_step = step(shuffled_table(shape.batch, stock_blocks, gen))
    stock_key, stock_value = stock[0].permute(0, 2, 1, 3), stock[1].permute(0, 2, 1, 3)

    local_tokens = min(shape.context, SINK + WINDOW + shape.q_len)
    caches, tails = (local["key_cache"], local["value_cache"]), local["tails"]
    ops = {
        "local_attention": (_local_call(tk, query, local, local_step, heads, scale, out), local_tokens),
        "paged_attention": (
            lambda: tk.paged_attention(query, full_key, full_value, full_step, heads, scale, out=out),
            shape.context,
        ),
        "stock_full_attention": (
            lambda: tk.paged_attention(query, stock_key, stock_value, stock_step, PoolHeads(0, n_kv), scale, out=out),
            shape.context,
        ),
        "write_block_tails": (lambda: tk.write_block_tails(*caches, tails, local_step, heads, RULE), shape.q_len),
        "store_kv": (lambda: tk.store_kv(*caches, key, key, slots, heads), 0),
    }
    rows = []
    for op, (fn, read_tokens) in ops.items():
        fn()
        torch.cuda.synchronize()
        ms = triton.testing.do_bench(fn, warmup=25, rep=100)
        graph_ms = triton.testing.do_bench_cudagraph(fn, rep=100) if cudagraph and shape.decode else None
        gbps = kv_bytes(shape, dtype, read_tokens) / (ms * 1e-3) / 1e9 if read_tokens else None
        rows.append(dict(shape=asdict(shape), dtype=str(dtype)[6:], op=op, ms=ms, cudagraph_ms=graph_ms, gbps=gbps))
        graph = f"{graph_ms:8.4f}" if graph_ms is not None else "       -"
        rate = f"{gbps:7.0f}" if gbps is not None else "      -"
        print(f"{shape.name:24s} {str(dtype)[6:]:9s} {op:22s} {ms:8.4f} ms  graph {graph} ms  {rate} GB/s", flush=True)
    return rows


# ---------------------------------------------------------------------------------------------
# Long context: one layer of razor against the stock baselines (used by benchmarks/gpu_check.py)

RETRIEVAL_FRACTION = 0.15  # the paper's share of retrieval heads (at least one KV head per layer here)


def _timer(device: str):
    """triton.testing.do_bench's median on CUDA; one untimed-quality wall-clock run in the interpreter."""
    if device == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")

    def wall(fn):
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    return wall


def _local_call(tk, query, local: dict, batch: PagedBatch, heads: PoolHeads, scale: float, out):
    """The Triton local kernel on ``local_pool``'s pool (which keeps the sinks and the window only)."""
    caches = (local["key_cache"], local["value_cache"])
    return lambda: tk.local_attention(query, *caches, local["tails"], batch, heads, RULE, scale, out=out)


def long_context(model, context: int, batch: int, q_len: int, dtype, gen, device: str) -> list[dict]:
    """Time one layer at ``context`` (the last ``q_len`` positions are this step's queries).

    stock_vllm: vLLM's unified_attention over every KV head in vLLM's own cache layout (block 16),
    choosing 2D or split-key exactly as vLLM's TRITON_ATTN does (max_query_len, grid size).
    flash_sdpa: torch's flash SDPA over contiguous K/V (GQA expanded beforehand), the stock
    FLASH_ATTN stand-in: no paging at all, so a lower bound for what stock pays.
    razor: retrieval heads (15%, at least one) through vLLM's kernel on the razor pool (block 187,
    split-key by shape) plus the other heads through our local kernel (sinks + window + compensation).
    """
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from razor_vllm import triton_kernels as tk

    timer = _timer(device)
    d, n_kv, g = model.head_size, model.num_kv_heads, model.g
    n_ret = max(1, round(RETRIEVAL_FRACTION * n_kv))
    n_loc = n_kv - n_ret
    scale = d**-0.5
    tokens = batch * q_len
    dev = torch.device(device)
    dgen = torch.Generator(device=dev).manual_seed(int(torch.randint(2**31, (1,), generator=gen)))

    def rand(*shape):  # drawn on the device: 128k-token caches are gigabytes
        return torch.randn(*shape, generator=dgen, device=dev, dtype=dtype)

    def table(rows, cols):
        return (torch.randperm(rows * cols, generator=gen) + 1).view(rows, cols).to(torch.int32).to(dev)

    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=dev)
    qsl = (torch.arange(batch + 1, dtype=torch.int32) * q_len).to(dev)
    rows = []

    def record(name, fn, heads):
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        ms = timer(fn)
        rows.append(
            dict(
                model=model.name,
                context=context,
                batch=batch,
                q_len=q_len,
                dtype=str(dtype)[6:],
                op=name,
                kv_heads=heads,
                ms=ms,
            )
        )

    # Stock: all heads, vLLM's layout [blocks, 16, kv_heads, D] (given as our [blocks, heads, 16, D] view).
    query = rand(tokens, n_kv * g, d)
    out = torch.empty_like(query)
    blocks = -(-context // 16)
    stock = rand(2, batch * blocks + 1, 16, n_kv, d)
    stock_table = table(batch, blocks)
    sk, sv = stock[0].permute(0, 2, 1, 3), stock[1].permute(0, 2, 1, 3)
    stock_step = PagedBatch(stock_table, seq_lens, qsl, max_query_len=q_len)
    record(
        "stock_vllm", lambda: tk.paged_attention(query, sk, sv, stock_step, PoolHeads(0, n_kv), scale, out=out), n_kv
    )
    # Flash SDPA over contiguous K/V: [batch, heads, len, D], causal over the last q_len positions.
    q4 = query.view(batch, q_len, n_kv * g, d).transpose(1, 2)
    k4 = rand(batch, n_kv, context, d).repeat_interleave(g, dim=1)
    v4 = rand(batch, n_kv, context, d).repeat_interleave(g, dim=1)
    mask = None
    if q_len > 1:  # bottom-right causal: query i sees keys [0, context - q_len + i]
        from torch.nn.attention.bias import causal_lower_right

        mask = causal_lower_right(q_len, context)
    backends = [SDPBackend.FLASH_ATTENTION] if device == "cuda" else [SDPBackend.MATH]
    with sdpa_kernel(backends):
        record("flash_sdpa", lambda: F.scaled_dot_product_attention(q4, k4, v4, attn_mask=mask, scale=scale), n_kv)
    # Razor: retrieval heads over the razor pool (block 187), split-key chosen by the kernel.
    q_ret, out_ret = query[:, : n_ret * g], torch.empty_like(query[:, : n_ret * g])
    rblocks = -(-context // RETRIEVAL_BLOCK)
    rkv = rand(batch * rblocks + 1, n_ret, RETRIEVAL_BLOCK, 2 * d)
    rtable = table(batch, rblocks)
    rstep, rheads = PagedBatch(rtable, seq_lens, qsl, max_query_len=q_len), PoolHeads(0, n_ret)

    def retrieval(**split):
        return lambda: tk.paged_attention(q_ret, rkv[..., :d], rkv[..., d:], rstep, rheads, scale, out=out_ret, **split)

    record("razor_retrieval", retrieval(), n_ret)
    if q_len == 1 and device == "cuda":
        record("razor_retrieval_2d_only", retrieval(split_keys=False), n_ret)
    # Local heads: this layer's others; a rank with one KV head (70B at TP=8) holds either kind in a
    # given layer, so there the local kernel is timed on that head and ratios() weighs the two kinds.
    heads = n_loc or n_kv
    shape = Shape("", heads * g, heads, d, batch, q_len, context)
    local = local_pool(shape, dtype, gen, device)
    local_step = PagedBatch(local["block_table"], seq_lens, qsl, max_query_len=q_len)
    q_loc = query[:, n_ret * g :] if n_loc else query
    out_loc = torch.empty_like(q_loc)
    record(
        "razor_local" if n_loc else "razor_local_all_heads",
        _local_call(tk, q_loc, local, local_step, PoolHeads(0, heads), scale, out_loc),
        heads,
    )
    return rows


def ratios(rows: list[dict]) -> list[dict]:
    """razor (retrieval + local) over each stock baseline, per (model, phase, context)."""
    out = []
    keys = sorted({(r["model"], r["q_len"], r["context"], r["batch"]) for r in rows})
    for model, q_len, context, batch in keys:
        ms = {
            r["op"]: r["ms"]
            for r in rows
            if (r["model"], r["q_len"], r["context"], r["batch"]) == (model, q_len, context, batch)
        }
        if "razor_local" in ms:  # this layer's retrieval heads + its local heads
            razor = ms["razor_retrieval"] + ms["razor_local"]
        else:  # one KV head per rank: a layer is retrieval with probability RETRIEVAL_FRACTION
            razor = RETRIEVAL_FRACTION * ms["razor_retrieval"] + (1 - RETRIEVAL_FRACTION) * ms["razor_local_all_heads"]
        out.append(
            dict(
                model=model,
                phase="decode" if q_len == 1 else "prefill",
                context=context,
                batch=batch,
                q_len=q_len,
                razor_ms=razor,
                stock_vllm_ms=ms.get("stock_vllm"),
                flash_sdpa_ms=ms.get("flash_sdpa"),
                razor_over_stock_vllm=razor / ms["stock_vllm"],
                razor_over_flash_sdpa=razor / ms["flash_sdpa"],
                split_speedup=(
                    ms["razor_retrieval_2d_only"] / ms["razor_retrieval"] if "razor_retrieval_2d_only" in ms else None
                ),
            )
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/bench_triton.json"))
    parser.add_argument("--dtypes", default="bfloat16,float16")
    parser.add_argument("--shapes", default="", help="substring filter on shape names")
    parser.add_argument("--no-cudagraph", action="store_true", help="skip the CUDA-graph replay timings")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(
            "bench_triton.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing was timed", file=sys.stderr
        )
        raise SystemExit(2)

    gen = torch.Generator().manual_seed(0)
    print(f"{'shape':24s} {'dtype':9s} {'op':22s} {'median':>11s}  {'graph replay':>17s}  {'K/V read':>9s}")
    rows = []
    for dtype_name in args.dtypes.split(","):
        for shape in (s for s in SHAPES if args.shapes in s.name):
            rows += bench(shape, getattr(torch, dtype_name), gen, cudagraph=not args.no_cudagraph)

    import triton
    import vllm

    meta = dict(
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
        triton=triton.__version__,
        vllm=vllm.__version__,
        host=platform.node(),
        sink=SINK,
        window=WINDOW,
        local_block=LOCAL_BLOCK,
        retrieval_block=RETRIEVAL_BLOCK,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(meta=meta, results=rows), indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
