"""Capacity as vLLM itself sees it: how many long requests run at once in a fixed KV memory.

Submits more long requests than fit, steps the real engine, and records the peak of vLLM's own
scheduler statistics (running requests, KV usage, preemptions). Run razor and stock in the same
process with the same KV bytes and compare.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

from vllm.v1.metrics.loggers import StatLoggerBase


class PeakSchedulerStats(StatLoggerBase):
    """A vLLM stat logger that keeps the peaks of the scheduler's per-step statistics."""

    latest: Optional["PeakSchedulerStats"] = None

    def __init__(self, vllm_config, engine_index: int = 0):
        self.peak_running = 0
        self.peak_kv_usage = 0.0
        self.max_waiting = 0
        self.preemptions = 0
        self.steps = 0
        self.last_running = 0
        self.last_waiting = 0
        PeakSchedulerStats.latest = self

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
        if scheduler_stats is None:
            return
        self.steps += 1
        self.last_running = scheduler_stats.num_running_reqs
        self.last_waiting = scheduler_stats.num_waiting_reqs
        self.peak_running = max(self.peak_running, scheduler_stats.num_running_reqs)
        self.max_waiting = max(self.max_waiting, scheduler_stats.num_waiting_reqs)
        self.peak_kv_usage = max(self.peak_kv_usage, scheduler_stats.kv_cache_usage)
        if iteration_stats is not None:
            self.preemptions += getattr(iteration_stats, "num_preempted_reqs", 0)

    def log_engine_initialized(self):
        pass


@dataclass
class CapacityResult:
    backend: str
    kv_cache_bytes: int
    num_requests: int
    prompt_tokens: int
    max_tokens: int
    peak_running: int
    peak_kv_usage: float
    preemptions: int
    num_gpu_blocks: Optional[int]
    elapsed_s: float
    completed: int
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def random_prompts(
    num: int, length: int, vocab_low: int = 1000, vocab_high: int = 20000, seed: int = 0
) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab_low, vocab_high) for _ in range(length)] for _ in range(num)]


def measure_capacity(
    engine_kwargs: dict[str, Any],
    num_requests: int,
    prompt_tokens: int,
    max_tokens: int,
    backend_label: str,
    seed: int = 0,
    stop_at_first_finish: bool = True,
    stop_when_saturated: bool = False,
    saturation_steps: int = 4,
    on_step: Optional[Callable[[int, int], None]] = None,
) -> CapacityResult:
    """Run ``num_requests`` random-token prompts through a fresh LLMEngine; report peaks.

    With ``stop_at_first_finish`` the run ends (aborting the rest) when the first request
    completes: every request admitted by then is still running, so the peak is already seen.

    With ``stop_when_saturated`` it also ends once the KV cache is the only limit: requests are
    waiting, yet for ``saturation_steps`` steps in a row every running request has finished its
    prefill (the scheduler had token budget to spare and still admitted no one). Then long
    prompts need only enough ``max_tokens`` to outlast the others' prefill, not to finish.

    ``extra`` records vLLM's own start-up figures: ``vllm_max_concurrency`` (the logged "Maximum
    concurrency for max_model_len tokens per request"), ``kv_cache_size_tokens``, the engine's
    ``max_model_len``, ``block_size``, ``dtype`` and ``max_in_flight_tokens``, and ``saturated``.
    ``on_step(running, waiting)`` is called after every step (progress display).
    """
    from vllm import EngineArgs, SamplingParams
    from vllm.v1.engine.llm_engine import LLMEngine

    args = EngineArgs(**{"disable_log_stats": False, **engine_kwargs})
    engine = LLMEngine.from_engine_args(args, stat_loggers=[PeakSchedulerStats])
    try:
        stats = PeakSchedulerStats.latest
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        for i, ids in enumerate(random_prompts(num_requests, prompt_tokens, seed=seed)):
            engine.add_request(str(i), {"prompt_token_ids": ids}, params)
        completed = 0
        decoding: set[str] = set()  # unfinished requests that have produced a token (prefill done)
        saturated_for = 0
        saturated = False
        start = time.perf_counter()
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    completed += 1
                    decoding.discard(out.request_id)
                else:
                    decoding.add(out.request_id)
            if on_step is not None:
                on_step(stats.last_running, stats.last_waiting)
            if stop_when_saturated:
                waiting_on_kv = stats.last_waiting > 0 and 0 < stats.last_running <= len(decoding)
                saturated_for = saturated_for + 1 if waiting_on_kv else 0
                if saturated_for >= saturation_steps:
                    saturated = True
            if (stop_at_first_finish and completed) or saturated:
                engine.abort_request([str(i) for i in range(num_requests)])
                break
        elapsed = time.perf_counter() - start
        vc = engine.vllm_config
        extra = dict(
            vllm_max_concurrency=getattr(vc.cache_config, "kv_cache_max_concurrency", None),
            kv_cache_size_tokens=getattr(vc.cache_config, "kv_cache_size_tokens", None),
            max_model_len=vc.model_config.max_model_len,
            block_size=vc.cache_config.block_size,
            dtype=str(vc.model_config.dtype).removeprefix("torch."),
            max_in_flight_tokens=getattr(vc, "max_in_flight_tokens", vc.scheduler_config.max_num_batched_tokens),
            saturated=saturated,
        )
        return CapacityResult(
            backend=backend_label,
            kv_cache_bytes=engine_kwargs.get("kv_cache_memory_bytes", 0),
            num_requests=num_requests,
            prompt_tokens=prompt_tokens,
            max_tokens=max_tokens,
            peak_running=stats.peak_running,
            peak_kv_usage=stats.peak_kv_usage,
            preemptions=stats.preemptions,
            num_gpu_blocks=engine.vllm_config.cache_config.num_gpu_blocks,
            elapsed_s=elapsed,
            completed=completed,
            extra=extra,
        )
    finally:
        shutdown_engine(engine)


def shutdown_engine(engine) -> None:
    core = getattr(engine, "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
