"""A prompt's attention, razor's per-layer steps against stock vLLM's CPU kernel, on the calls the real
engines make; print one line, write JSON.

    .venv/bin/python benchmarks/bench_prompt_attention.py [--context 1024] [--chunk 512] [--repeat 5]

Both engines (the default model, fp32, eager, in this process) prefill one random-token prompt in
chunks of ``--chunk``; every attention call of that prompt is recorded with its inputs copied
(razor: ``ops.retrieval_step`` / ``ops.local_step``; stock: vLLM's ``cpu_attn_reshape_and_cache`` and
``cpu_attention_with_kv_cache``, its scheduler metadata made again for the copied step), then each
set is replayed ``--repeat`` times, alternating stock and razor, best kept. The attention only, none
of the model's matmuls: what ``razor-vllm bench`` cannot separate from a prefill's ~1.5 s on this
machine, and the same for both sides of the ratio whatever the machine's load does meanwhile.
Set ``OMP_NUM_THREADS=1`` for the one-thread figures in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engines' layers in this process

import torch  # noqa: E402

COPY_LIMIT = 1 << 22  # elements: smaller tensors are per-step inputs (copied), larger ones are KV caches


def _copy(x):
    from razor_vllm.ops.api import PagedBatch

    if isinstance(x, torch.Tensor):
        return x.clone() if x.numel() < COPY_LIMIT else x
    if isinstance(x, PagedBatch):  # the builder reuses its buffers step after step
        return dataclasses.replace(x, **{f.name: _copy(getattr(x, f.name)) for f in dataclasses.fields(x)})
    return x


def record(backend: str, context: int, chunk: int) -> tuple[object, list]:
    """A fresh engine and the attention calls of one prompt in it, as (function, args, kwargs) to
    replay (the engine holds the KV caches the calls read)."""
    from vllm import EngineArgs, SamplingParams, envs
    from vllm import _custom_ops as vllm_ops
    from vllm.v1.engine.llm_engine import LLMEngine

    from razor_vllm import ops
    from razor_vllm.bench.capacity import random_prompts
    from razor_vllm.model import prepare_default_model

    kwargs = dict(
        model=str(prepare_default_model(progress=False)),
        enforce_eager=True,
        dtype="float32",
        max_model_len=max(4096, context + 16),
        kv_cache_memory_bytes=256 << 20,
        max_num_batched_tokens=chunk,
        enable_prefix_caching=False,
        seed=0,
    )
    if backend == "razor":
        kwargs["attention_backend"] = "razor"
    engine = LLMEngine.from_engine_args(EngineArgs(**kwargs))
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)

    def prefill(seed: int) -> None:
        engine.add_request(str(seed), {"prompt_token_ids": random_prompts(1, context, seed=seed)[0]}, params)
        while engine.has_unfinished_requests():
            engine.step()

    prefill(1)  # warm-up
    module, names = (
        (ops, ("retrieval_step", "local_step"))
        if backend == "razor"
        else (vllm_ops, ("cpu_attn_reshape_and_cache", "cpu_attention_with_kv_cache"))
    )
    originals = {name: getattr(module, name) for name in names}
    calls: list = []

    def recorder(name: str):
        def call(*args, **kw):
            args2, kw2 = [_copy(a) for a in args], {k: _copy(v) for k, v in kw.items()}
            if name == "cpu_attention_with_kv_cache":  # made from the step's own seq_lens / query starts
                q = kw2["query"]
                kw2["scheduler_metadata"] = vllm_ops.cpu_attn_get_scheduler_metadata(
                    num_reqs=kw2["seq_lens"].shape[0],
                    num_heads=q.shape[1],
                    num_kv_heads=kw2["key_cache"].shape[1],
                    head_dim=q.shape[2],
                    seq_lens=kw2["seq_lens"],
                    dtype=q.dtype,
                    query_start_loc=kw2["query_start_loc"],
                    causal=True,
                    sliding_window_size=-1,
                    isa=engine_isa(kw2["key_cache"], q.dtype),
                    enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,  # as vLLM's builder
                )
            calls.append((originals[name], args2, kw2))
            return originals[name](*args, **kw)

        return call

    for name in names:
        setattr(module, name, recorder(name))
    try:
        prefill(2)
    finally:
        for name, fn in originals.items():
            setattr(module, name, fn)
    return engine, calls


def engine_isa(key_cache: torch.Tensor, dtype: torch.dtype) -> str:
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    return _get_attn_isa(dtype, key_cache.shape[2], key_cache.shape[3])


def replay_ms(calls: list) -> float:
    start = time.perf_counter()
    for fn, args, kw in calls:
        fn(*args, **kw)
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--context", type=int, default=1024, help="prompt tokens (default: 1024)")
    parser.add_argument("--chunk", type=int, default=512, help="prefill chunk, max_num_batched_tokens (default: 512)")
    parser.add_argument("--repeat", type=int, default=5, help="replays of each set, best kept (default: 5)")
    parser.add_argument("--out", default="out/bench_prompt_attention.json")
    args = parser.parse_args()
    recorded = {backend: record(backend, args.context, args.chunk) for backend in ("razor", "stock")}
    best = {backend: float("inf") for backend in recorded}
    for _ in range(args.repeat):
        for backend, (_engine, calls) in recorded.items():
            best[backend] = min(best[backend], replay_ms(calls))
    result = dict(
        context=args.context,
        chunk=args.chunk,
        threads=torch.get_num_threads(),
        calls={backend: len(calls) for backend, (_engine, calls) in recorded.items()},
        stock_ms=best["stock"],
        razor_ms=best["razor"],
        razor_over_stock=best["razor"] / best["stock"],
    )
    print(
        f"attention of one {args.context}-token prompt (chunks of {args.chunk}, {result['threads']} thread(s)): "
        f"stock {best['stock']:.1f} ms, razor {best['razor']:.1f} ms, razor/stock time {result['razor_over_stock']:.2f}"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
