"""Time the reference and C++ attention kernels on realistic shapes; print a table, write JSON.

    .venv/bin/python benchmarks/bench_kernels.py [--out out/bench_kernels.json] [--repeat 20]

Shapes: SmolLM2-135M (9 query / 3 KV heads, D=64, the default model) and a Llama-3-8B-like layer
(32 / 8, D=128), at 2k context: 8 decodes, and one 512-token prefill chunk (the last chunk of a
2k prompt). Local heads use S=4, W=252 (the reference deploy code's 4 + 251 + compensation).
Times are the best of --repeat calls of one layer's kernel, in milliseconds.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import asdict
from pathlib import Path

import torch
from shapes import Shape

from razor_vllm import ops
from razor_vllm.ops import LocalRule, PagedBatch, PoolHeads

SINK, WINDOW, BLOCK_SIZE = 4, 252, 32


SHAPES = [
    Shape("smollm decode 8x2k", 9, 3, 64, 8, 1, 2048),
    Shape("smollm prefill 512@2k", 9, 3, 64, 1, 512, 2048),
    Shape("llama8b decode 8x2k", 32, 8, 128, 8, 1, 2048),
    Shape("llama8b prefill 512@2k", 32, 8, 128, 1, 512, 2048),
]


def make_inputs(shape: Shape, dtype: torch.dtype, gen: torch.Generator) -> dict:
    """A pool holding exactly this layer's heads plus one other layer's, shuffled blocks."""
    blocks_per_req = -(-shape.context // BLOCK_SIZE)
    num_blocks = shape.batch * blocks_per_req + 1
    d, pool_heads = shape.head_size, 2 * shape.num_kv_heads
    kv_cache = torch.randn(num_blocks, pool_heads, BLOCK_SIZE, 2 * d, generator=gen).to(dtype)
    tails = torch.randn(num_blocks, pool_heads, 2, d, generator=gen) * 100
    block_table = torch.randperm(num_blocks - 1, generator=gen)[: shape.batch * blocks_per_req] + 1
    block_table = block_table.view(shape.batch, blocks_per_req).to(torch.int32)
    query = torch.randn(shape.batch * shape.q_len, shape.num_q_heads, d, generator=gen).to(dtype)
    return dict(
        query=query,
        key_cache=kv_cache[..., :d],
        value_cache=kv_cache[..., d:],
        tails=tails,
        batch=PagedBatch(
            block_table=block_table,
            seq_lens=torch.full((shape.batch,), shape.context, dtype=torch.int32),
            query_start_loc=torch.arange(shape.batch + 1, dtype=torch.int32) * shape.q_len,
            # prompts end before this step: every query follows the compressed rule
            prompt_lens=torch.full((shape.batch,), shape.context - shape.q_len, dtype=torch.int32),
        ),
        heads=PoolHeads(shape.num_kv_heads, shape.num_kv_heads),
    )


def calls(kernels, x: dict, scale: float) -> dict:
    caches, batch, heads, rule = (x["key_cache"], x["value_cache"]), x["batch"], x["heads"], LocalRule(SINK, WINDOW)
    return {
        "paged_attention": lambda: kernels.paged_attention(x["query"], *caches, batch, heads, scale),
        "local_attention": lambda: kernels.local_attention(x["query"], *caches, x["tails"], batch, heads, rule, scale),
        # Rewrites the tails of the blocks the step started (none for decodes inside a block).
        "write_block_tails": lambda: kernels.write_block_tails(*caches, x["tails"], batch, heads, rule),
    }


def best_ms(fn, repeat: int, budget_s: float = 5.0) -> float:
    """Fastest of ``repeat`` calls: on a shared 2-core machine the median mostly measures the neighbours."""
    fn()  # warm-up
    times = []
    start = time.perf_counter()
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s and len(times) >= 3:
            break
    return 1e3 * min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/bench_kernels.json"))
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--shapes", default="", help="substring filter on shape names")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if ops.cpp is None:
        raise SystemExit("razor_vllm._C is not built: run `pip install --no-build-isolation -e .` first")

    rows = []
    gen = torch.Generator().manual_seed(0)
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        for shape in (s for s in SHAPES if args.shapes in s.name):
            x = make_inputs(shape, dtype, gen)
            scale = shape.head_size**-0.5
            ref_calls, cpp_calls = calls(ops.kernels("reference"), x, scale), calls(ops.kernels("cpp"), x, scale)
            for op in ref_calls:
                ref_ms = best_ms(ref_calls[op], args.repeat)
                cpp_ms = best_ms(cpp_calls[op], args.repeat)
                rows.append(
                    dict(
                        shape=asdict(shape),
                        dtype=dtype_name,
                        op=op,
                        reference_ms=ref_ms,
                        cpp_ms=cpp_ms,
                        speedup=ref_ms / cpp_ms,
                    )
                )
                print(
                    f"{shape.name:24s} {dtype_name:9s} {op:18s} reference {ref_ms:9.3f} ms   "
                    f"cpp {cpp_ms:8.3f} ms   x{ref_ms / cpp_ms:6.1f}",
                    flush=True,
                )

    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        machine=platform.processor() or platform.machine(),
        sink=SINK,
        window=WINDOW,
        block_size=BLOCK_SIZE,
    )
    args.out.write_text(json.dumps(dict(meta=meta, results=rows), indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
