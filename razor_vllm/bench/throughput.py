"""Prefill and decode throughput of one engine at several context lengths and batch sizes.

One fresh ``LLMEngine`` per backend serves every (context, batch) point, one point at a time
(the two engines one after the other, or both up at once with each point's runs alternating),
each with fresh random-token prompts (no prefix-cache hits; razor switches prefix caching off
and the benchmark switches it off for stock too). Per point:

- **prefill tokens/s** = ``batch x context`` prompt tokens / time from submitting the batch until
  every request has its first token (chunked prefill, ``max_num_batched_tokens`` per step; the
  first requests' early decode tokens ride along in the same steps);
- **decode tokens/s** = tokens generated while *all* ``batch`` requests are decoding (from the
  moment the last prefill finishes until the first request finishes) / that time. ``max_tokens``
  is sized so that this stretch lasts ``decode_tokens`` steps.

A short warm-up request runs first on each engine.
"""

from __future__ import annotations

import gc
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Optional, Sequence

from razor_vllm.bench.capacity import random_prompts, shutdown_engine


@dataclass
class ThroughputPoint:
    backend: str
    context: int
    batch: int
    prompt_tokens: int
    max_tokens: int
    prefill_s: float
    prefill_tok_s: float
    decode_s: float
    decode_tokens: int
    decode_tok_s: float
    decode_step_ms: float
    decode_steps: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def max_tokens_for(context: int, batch: int, chunk: int, decode_tokens: int) -> int:
    """Decode tokens the first request needs so that all ``batch`` decode together for ``decode_tokens`` steps.

    The first request starts decoding after its own prefill; the others' prefills then take about
    ``(batch-1) x context / (chunk - batch)`` more steps, one decode token each.
    """
    others = (batch - 1) * context
    return decode_tokens + 2 + (-(-others // max(1, chunk - batch)) if batch > 1 else 0)


def measure_point(
    engine, backend: str, context: int, batch: int, chunk: int, decode_tokens: int, seed: int
) -> ThroughputPoint:
    from vllm import SamplingParams

    max_tokens = max_tokens_for(context, batch, chunk, decode_tokens)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    ids = [f"tp-{seed}-{i}" for i in range(batch)]
    prompts = random_prompts(batch, context, seed=seed)
    produced: dict[str, int] = {}
    start = time.perf_counter()
    for rid, prompt in zip(ids, prompts):
        engine.add_request(rid, {"prompt_token_ids": prompt}, params)
    prefill_done: Optional[float] = None
    at_prefill_done: dict[str, int] = {}
    first_finish: Optional[float] = None
    decode_steps = 0
    while engine.has_unfinished_requests():
        outputs = engine.step()
        now = time.perf_counter()
        finished = False
        for out in outputs:
            produced[out.request_id] = len(out.outputs[0].token_ids)
            finished |= out.finished
        if prefill_done is None and len(produced) == batch:
            prefill_done = now
            at_prefill_done = dict(produced)
        elif prefill_done is not None:
            decode_steps += 1
        if finished and prefill_done is not None:
            first_finish = now
            break
    engine.abort_request(ids)
    while engine.has_unfinished_requests():  # drain the aborts
        engine.step()
    assert prefill_done is not None and first_finish is not None, "no request produced a token"
    decoded = sum(produced[r] - at_prefill_done[r] for r in ids)
    prefill_s = prefill_done - start
    decode_s = first_finish - prefill_done
    return ThroughputPoint(
        backend=backend,
        context=context,
        batch=batch,
        prompt_tokens=batch * context,
        max_tokens=max_tokens,
        prefill_s=prefill_s,
        prefill_tok_s=batch * context / prefill_s,
        decode_s=decode_s,
        decode_tokens=decoded,
        decode_tok_s=decoded / decode_s if decode_s > 0 else float("nan"),
        decode_step_ms=1000 * decode_s / decode_steps if decode_steps else float("nan"),
        decode_steps=decode_steps,
    )


def best_of(runs: Sequence[ThroughputPoint]) -> ThroughputPoint:
    """The best prefill run's prefill fields with the best decode run's decode fields."""
    best_prefill = max(runs, key=lambda p: p.prefill_tok_s)
    best_decode = max(runs, key=lambda p: p.decode_tok_s)
    decode_fields = ("decode_s", "decode_tokens", "decode_tok_s", "decode_step_ms", "decode_steps")
    return replace(best_prefill, **{name: getattr(best_decode, name) for name in decode_fields})


class ThroughputEngine:
    """One fresh engine for throughput points, warmed up (first-step allocations and kernel set-up,
    outside every measurement); ``info`` holds its settings. A context manager: leaving it shuts the
    engine down."""

    def __init__(self, engine_kwargs: dict[str, Any], backend: str, contexts: Sequence[int], seed: int) -> None:
        from vllm import EngineArgs, SamplingParams
        from vllm.v1.engine.llm_engine import LLMEngine

        self.backend = backend
        self.engine = LLMEngine.from_engine_args(EngineArgs(**engine_kwargs))
        try:
            vc = self.engine.vllm_config
            self.info = dict(
                max_model_len=vc.model_config.max_model_len,
                kv_cache_bytes=engine_kwargs.get("kv_cache_memory_bytes"),
                num_gpu_blocks=vc.cache_config.num_gpu_blocks,
                block_size=vc.cache_config.block_size,
                dtype=str(vc.model_config.dtype).removeprefix("torch."),
                max_num_batched_tokens=vc.scheduler_config.max_num_batched_tokens,
                skipped=[],
            )
            warm = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
            warm_prompt = random_prompts(1, min(256, min(contexts)), seed=seed - 1)[0]
            self.engine.add_request("warmup", {"prompt_token_ids": warm_prompt}, warm)
            while self.engine.has_unfinished_requests():
                self.engine.step()
        except BaseException:
            self.close()
            raise

    def point(self, context: int, batch: int, chunk: int, decode_tokens: int, seed: int) -> ThroughputPoint:
        return measure_point(self.engine, self.backend, context, batch, chunk, decode_tokens, seed=seed)

    def __enter__(self) -> "ThroughputEngine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if getattr(self, "engine", None) is not None:
            shutdown_engine(self.engine)
            self.engine = None
            gc.collect()


def measure_throughput(
    engines: Sequence[ThroughputEngine],
    contexts: Sequence[int],
    batches: Sequence[int],
    chunk: int,
    decode_tokens: int,
    seed: int = 1000,
    on_point: Optional[Callable[[ThroughputPoint], None]] = None,
    repeat: int = 1,
    fits: Optional[Callable[[ThroughputEngine, int, int, int], Optional[str]]] = None,
) -> dict[str, list[ThroughputPoint]]:
    """Every (context, batch) point on each of ``engines`` (started and warmed up): {backend: points}.

    With more than one engine, each point's runs alternate between them (stock, razor, stock, razor,
    ...), so a slow drift of the machine's speed (other load, clock) reaches both sides of a ratio
    alike instead of one engine's whole run. The same prompts (seeds) for every engine. With
    ``repeat > 1`` each point runs that many times (fresh prompts each) and keeps the best prefill and
    the best decode figure (the least disturbed by other load on the machine).
    ``fits(engine, context, batch, max_tokens)`` says why a point cannot run all its requests at once
    in that engine's KV cache (None: it can); such points are listed in the engine's
    ``info["skipped"]`` instead of measured (queued requests would make the figures meaningless).
    """
    points: dict[str, list[ThroughputPoint]] = {engine.backend: [] for engine in engines}
    for i, ctx in enumerate(contexts):
        for j, batch in enumerate(batches):
            max_tokens = max_tokens_for(ctx, batch, chunk, decode_tokens)
            runs: dict[ThroughputEngine, list[ThroughputPoint]] = {}
            for engine in engines:
                reason = fits(engine, ctx, batch, max_tokens) if fits else None
                if reason:
                    engine.info["skipped"].append(dict(context=ctx, batch=batch, reason=reason))
                else:
                    runs[engine] = []
            for r in range(max(1, repeat)):
                for engine, engine_runs in runs.items():
                    engine_runs.append(engine.point(ctx, batch, chunk, decode_tokens, seed + 10000 * r + 100 * i + j))
            for engine, engine_runs in runs.items():
                point = best_of(engine_runs)
                points[engine.backend].append(point)
                if on_point is not None:
                    on_point(point)
    return points
