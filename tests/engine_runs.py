"""Run the real vLLM engine once per configuration and keep its outputs (engines are slow to start).

Each run starts an LLM, generates, reads vLLM's own metrics, and shuts the engine down before the
next one starts, so only one engine holds memory at a time.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import Any, Optional

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


def run_engine(
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
