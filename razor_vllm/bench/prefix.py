"""The prefix-cache workload: one long document and N questions about it, with prefix caching on.

The workload razor's long contexts meet in practice (a RAG service asking several questions about one
document, a chat that re-sends its history): every request starts with the same document, so vLLM's
automatic prefix caching should compute it once. One fresh ``LLMEngine`` per backend (stock and
razor, both with ``enable_prefix_caching``) runs two phases on the same document (seeded random
tokens) with distinct questions:

- **concurrent**: N questions submitted at once, the document not cached yet (the first admitted
  request computes it; vLLM caches its blocks as they fill, so the others hit what is there);
- **turns**: N more questions one after another (each submitted when the previous one finished), the
  document cached by the first phase.

Per phase: time to first token of each request (submission to first output token; ``p50``/``max``),
prompt tokens computed (prompt minus vLLM's ``num_cached_tokens`` of each request: what prefill
really cost), the peak of running requests (vLLM's scheduler statistics), output tokens per second
over the phase, and preemptions. A short unrelated request warms each engine first.
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Optional

from razor_vllm.bench.capacity import PeakSchedulerStats, random_prompts, shutdown_engine


@dataclass
class PrefixPhase:
    backend: str
    phase: str  # "concurrent" | "turns"
    requests: int
    prompt_tokens: int  # summed over the requests
    cached_tokens: int  # served from the prefix cache (vLLM's num_cached_tokens)
    prefill_tokens: int  # computed: prompt_tokens - cached_tokens
    ttft_p50_s: float
    ttft_max_s: float
    peak_running: int
    output_tokens: int
    elapsed_s: float
    output_tok_s: float
    preemptions: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _run_phase(
    engine, stats, backend: str, phase: str, prompts: list[list[int]], params, concurrent: bool
) -> PrefixPhase:
    stats.peak_running = 0
    preempted_before = stats.preemptions
    submitted: dict[str, float] = {}
    first_token: dict[str, float] = {}
    final: dict[str, Any] = {}
    start = time.perf_counter()

    def drain(until_done: Optional[str] = None) -> None:
        while engine.has_unfinished_requests():
            for out in engine.step():
                now = time.perf_counter()
                if out.outputs and out.outputs[0].token_ids and out.request_id not in first_token:
                    first_token[out.request_id] = now
                if out.finished:
                    final[out.request_id] = out
            if until_done is not None and until_done in final:
                return

    ids = [f"{phase}-{i}" for i in range(len(prompts))]
    for rid, prompt in zip(ids, prompts):
        submitted[rid] = time.perf_counter()
        engine.add_request(rid, {"prompt_token_ids": prompt}, params)
        if not concurrent:
            drain(until_done=rid)
    drain()
    elapsed = time.perf_counter() - start
    prompt_tokens = sum(len(p) for p in prompts)
    cached = sum(int(final[r].num_cached_tokens or 0) for r in ids)
    ttft = [first_token[r] - submitted[r] for r in ids]
    output_tokens = sum(len(final[r].outputs[0].token_ids) for r in ids)
    return PrefixPhase(
        backend=backend,
        phase=phase,
        requests=len(prompts),
        prompt_tokens=prompt_tokens,
        cached_tokens=cached,
        prefill_tokens=prompt_tokens - cached,
        ttft_p50_s=statistics.median(ttft),
        ttft_max_s=max(ttft),
        peak_running=stats.peak_running,
        output_tokens=output_tokens,
        elapsed_s=elapsed,
        output_tok_s=output_tokens / elapsed if elapsed > 0 else float("nan"),
        preemptions=stats.preemptions - preempted_before,
    )


def measure_prefix_workload(
    engine_kwargs: dict[str, Any],
    backend: str,
    doc_tokens: int,
    questions: int,
    question_tokens: int,
    max_tokens: int,
    seed: int = 0,
) -> tuple[list[PrefixPhase], dict[str, Any]]:
    """Both phases on one fresh engine with prefix caching on; returns them and the engine's settings."""
    from vllm import EngineArgs, SamplingParams
    from vllm.v1.engine.llm_engine import LLMEngine

    kwargs = {"disable_log_stats": False, **engine_kwargs, "enable_prefix_caching": True}
    engine = LLMEngine.from_engine_args(EngineArgs(**kwargs), stat_loggers=[PeakSchedulerStats])
    try:
        stats = PeakSchedulerStats.latest
        vc = engine.vllm_config
        info = dict(
            kv_cache_bytes=engine_kwargs.get("kv_cache_memory_bytes"),
            num_gpu_blocks=vc.cache_config.num_gpu_blocks,
            block_size=vc.cache_config.block_size,
            enable_prefix_caching=vc.cache_config.enable_prefix_caching,
            max_num_batched_tokens=vc.scheduler_config.max_num_batched_tokens,
        )
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        warm = random_prompts(1, 64, seed=seed + 7)[0]
        _run_phase(engine, stats, backend, "warmup", [warm], SamplingParams(temperature=0, max_tokens=2), True)
        doc = random_prompts(1, doc_tokens, seed=seed)[0]
        asked = random_prompts(2 * questions, question_tokens, seed=seed + 1)
        phases = [
            _run_phase(engine, stats, backend, "concurrent", [doc + q for q in asked[:questions]], params, True),
            _run_phase(engine, stats, backend, "turns", [doc + q for q in asked[questions:]], params, False),
        ]
        return phases, info
    finally:
        shutdown_engine(engine)
        del engine
        gc.collect()


def compare(phases: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per phase: stock's and razor's figures side by side with razor/stock ratios."""
    rows = []
    by = {b: {p["phase"]: p for p in pts} for b, pts in phases.items()}
    for phase in ("concurrent", "turns"):
        s, r = by.get("stock", {}).get(phase), by.get("razor", {}).get(phase)

        def ratio(key: str, s=s, r=r) -> Optional[float]:
            return r[key] / s[key] if s and r and s[key] else None

        rows.append(
            {
                "phase": phase,
                "stock": s,
                "razor": r,
                "ratio_ttft_p50": ratio("ttft_p50_s"),
                "ratio_prefill_tokens": ratio("prefill_tokens"),
                "ratio_peak_running": ratio("peak_running"),
                "ratio_output_tok_s": ratio("output_tok_s"),
            }
        )
    return rows
