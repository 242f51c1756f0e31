"""Run the real vLLM engine once per configuration and keep its outputs (engines are slow to start).

Each run starts an LLM, generates, reads vLLM's own metrics, and shuts the engine down before the
next one starts, so only one engine holds memory at a time.

Where the engines run: in one process kept for the whole test session (``in_engine_process``), which
imports vLLM once and runs each engine in-process, one after another. A vLLM engine on CPU otherwise
starts two processes (the engine core, then its worker: the CPU platform turns the "uni" executor
into "mp"), each importing torch and vLLM again: about 25 of an engine's 30-35 seconds of start-up
here. In-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) vLLM runs the same scheduler, KV cache
manager, model runner and our backend through its ``InprocClient`` and ``UniProcExecutor`` (TP/PP
engines still start their workers through the "mp" executor); what is left out is the process
boundary between front end and engine core, which the serving tests cover (``vllm serve``). Not in
the test process itself: vLLM's CPU worker binds the process's threads to cores and replaces
``torch.set_num_threads`` process-wide.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import gc
import multiprocessing
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

# -- the prompts of tests/engine/test_engine_razor.py and test_gpu_engine.py -------------------------------

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEYS = ["7481923", "3318842", "9051176", "2604417"]


def passkey_prompt(key: str, repeats: int) -> str:
    half = FILLER * (repeats // 2)
    return f"{half}The pass key is {key}. Remember it. {half}The pass key is"


# Needles far outside a 128-token window: prompts of ~1000-1900 tokens (8x-15x the window).
PASSKEY_PROMPTS = [passkey_prompt(key, n) for key, n in zip(PASSKEYS, (40, 52, 60, 76))]
GENERAL_PROMPTS = [
    "The quick brown fox",
    "Once upon a time, in a land far away,",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "Write a short poem about the sea.\n",
    FILLER * 30 + "Summarise the text above in one sentence:",
]


# -- running an engine ------------------------------------------------------------------------------------

# A fixed KV size: vLLM's default sizing on CPU depends on one NUMA node's free memory.
KV_BYTES = 256 << 20


def engine_kwargs(model_dir, backend: str = "stock", razor: Optional[dict] = None, **overrides) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(
        model=str(model_dir),
        max_model_len=4096,
        enforce_eager=True,
        kv_cache_memory_bytes=KV_BYTES,
        dtype="float32",
        seed=0,
        max_num_seqs=16,
        max_num_batched_tokens=2048,
        disable_log_stats=False,  # keeps vLLM's metrics readable through llm.get_metrics()
    )
    if backend == "razor":
        kwargs.update(attention_backend="razor", additional_config={"razor": dict(razor or {})})
    kwargs.update(overrides)
    return kwargs


@dataclass
class EngineRun:
    token_ids: list[list[int]]
    texts: list[str]
    metrics: dict[str, float]
    chat_texts: list[str]
    logprobs: list[list[float]]  # of each generated token (empty unless asked for)
    first_logprobs: list[dict[int, float]]  # the first generated token's top-k log-probs (top_logprobs > 0)


def run_engine(*args, env: Optional[dict[str, str]] = None, **kwargs) -> EngineRun:
    """``_run_engine_here(*args, **kwargs)`` in the engine process, with ``env`` over the test's
    environment: start an engine, generate greedily, shut it down."""
    return in_engine_process(_run_engine_here, *args, engine_env=env, **kwargs)


def max_logprob_gap(a: EngineRun, b: EngineRun) -> float:
    """Largest difference between two runs' log-probs of their generated tokens, position by position."""
    assert [len(x) for x in a.logprobs] == [len(x) for x in b.logprobs]
    return max(abs(x - y) for la, lb in zip(a.logprobs, b.logprobs) for x, y in zip(la, lb))


def tiny_model_run(model, razor: Optional[dict], tp: int = 1, pp: int = 1, **overrides) -> EngineRun:
    """The scale-out tests' run on a tiny model (tests/tiny_models.py): stock (``razor=None``) or razor
    with ``razor`` options, TP x PP workers, greedy tokens and their log-probabilities for three prompts
    (40, 150 and 300 random tokens). Several workers: one core each (vLLM's CPU workers bind to a NUMA
    node unless told the cores; this machine has one node)."""
    import random

    workers = tp * pp
    env = {"VLLM_CPU_OMP_THREADS_BIND": "|".join(str(i % 2) for i in range(workers))} if workers > 1 else None
    kwargs = engine_kwargs(
        model,
        "stock" if razor is None else "razor",
        razor,
        tensor_parallel_size=tp,
        pipeline_parallel_size=pp,
        max_model_len=512,
        kv_cache_memory_bytes=32 << 20,
        max_num_batched_tokens=64,
        **overrides,
    )
    rng = random.Random(0)
    prompts = [{"prompt_token_ids": [rng.randrange(4, 500) for _ in range(n)]} for n in (40, 150, 300)]
    return run_engine(kwargs, prompts, max_tokens=16, logprobs=True, env=env)


def _run_engine_here(
    kwargs: dict[str, Any],
    prompts: list,
    max_tokens: int = 16,
    chats: Optional[list] = None,
    logprobs: bool = False,
    top_logprobs: int = 0,
) -> EngineRun:
    from vllm import LLM, SamplingParams

    llm = LLM(**kwargs)
    try:
        params = SamplingParams(
            temperature=0, max_tokens=max_tokens, logprobs=max(top_logprobs, 1) if logprobs or top_logprobs else None
        )
        outputs = llm.generate(prompts, params, use_tqdm=False) if prompts else []
        chat_texts = [llm.chat(msgs, params, use_tqdm=False)[0].outputs[0].text for msgs in (chats or [])]
        metrics = {}
        for metric in llm.get_metrics():
            value = getattr(metric, "value", None)
            if isinstance(value, (int, float)):
                metrics[metric.name] = float(value)
        return EngineRun(
            token_ids=[list(o.outputs[0].token_ids) for o in outputs],
            texts=[o.outputs[0].text for o in outputs],
            metrics=metrics,
            chat_texts=chat_texts,
            logprobs=[
                [step[token].logprob for step, token in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]
                for o in outputs
            ]
            if logprobs
            else [],
            first_logprobs=[{token: lp.logprob for token, lp in o.outputs[0].logprobs[0].items()} for o in outputs]
            if top_logprobs
            else [],
        )
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def cli(argv: list[str]) -> tuple[int, str]:
    """``razor-vllm ARGV`` (``razor_vllm.cli.main``) in the engine process: its exit code and what it printed."""
    return in_engine_process(_cli_here, argv)


def _cli_here(argv: list[str]) -> tuple[int, str]:
    import contextlib
    import io

    from razor_vllm.cli import main

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(argv)
    return code, printed.getvalue()


# -- the engine process -------------------------------------------------------------------------------------

# While it runs an engine, the process carries this title: the engine marker's check (conftest.py)
# looks for vLLM's process titles among the test process's descendants.
ENGINE_PROCESS_TITLE = "VLLM::TestEngineProcess"
# The test's environment that reaches the engine (a test may set e.g. VLLM_CPU_OMP_THREADS_BIND).
FORWARDED_ENV_PREFIXES = ("VLLM_", "RAZOR_")
_pool: Optional[concurrent.futures.ProcessPoolExecutor] = None


def in_engine_process(fn: Callable, *args, engine_env: Optional[dict[str, str]] = None, **kwargs):
    """``fn(*args, **kwargs)`` in the session's engine process; returns its result or raises its error.

    ``fn`` and its arguments travel by pickle: a module-level function of an importable module (this
    one, or a test module: the process starts with the test session's ``sys.path``). The test's
    ``VLLM_*``/``RAZOR_*`` environment, updated with ``engine_env``, applies for the call. A call that
    kills the process (a crash in native code) fails that test; the next call starts a fresh process.
    """
    global _pool
    if _pool is None:
        _pool = concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}
    env.update(engine_env or {})
    try:
        return _pool.submit(_call_in_engine_process, fn, env, args, kwargs).result()
    except concurrent.futures.process.BrokenProcessPool:
        _pool = None
        raise


def shutdown_engine_process() -> None:
    global _pool
    if _pool is not None:
        _pool.shutdown(wait=True, cancel_futures=True)
        _pool = None


atexit.register(shutdown_engine_process)


def _call_in_engine_process(fn: Callable, env: dict[str, str], args: tuple, kwargs: dict):
    import setproctitle

    for key in [k for k in os.environ if k.startswith(FORWARDED_ENV_PREFIXES)]:
        del os.environ[key]
    os.environ.update(env)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process
    setproctitle.setproctitle(f"{ENGINE_PROCESS_TITLE} {fn.__module__}.{fn.__qualname__}")
    try:
        return fn(*args, **kwargs)
    finally:
        setproctitle.setproctitle("razor-vllm test engine process (idle)")
        # What vLLM's own tests call between engines in one process: model-parallel groups and the
        # distributed environment torn down, the environment cache (frozen at engine start) dropped,
        # the heap the engine core froze for the garbage collector unfrozen and collected.
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        cleanup_dist_env_and_memory()
