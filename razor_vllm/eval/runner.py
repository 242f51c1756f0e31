"""Run every variant's requests through one real vLLM engine each, one engine at a time.

All of a variant's requests (task prompts, teacher-forced text, greedy continuations) go in one
``LLM.generate`` call so vLLM batches them as a server would; the engine is shut down before the
next variant starts, so only one holds memory.
"""

from __future__ import annotations

import functools
import gc
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from razor_vllm.eval.tasks import Sample
from razor_vllm.eval.teacher import PROCESSOR, teacher_args
from razor_vllm.eval.variants import Variant


@dataclass(frozen=True)
class TextItem:
    """A slice of natural text: the model reads ``prefix`` and is scored on ``continuation``."""

    context: int
    index: int
    prefix: list[int]
    continuation: list[int]


@dataclass(frozen=True)
class EngineSettings:
    model: str
    dtype: str = "float32"
    max_model_len: int = 8192
    kv_cache_bytes: int = 2 << 30
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 2048
    seed: int = 0
    # vLLM's default. Prompts of one task and depth share their text up to the needle (eval/tasks.py), so each
    # engine computes that part once; a hit's output equals a recompute (tests/engine/test_engine_prefix_cache.py).
    prefix_caching: bool = True

    def kwargs(self, variant: Variant, profile_path: Optional[Path]) -> dict[str, Any]:
        kwargs: dict[str, Any] = dict(
            model=self.model,
            dtype=self.dtype,
            enforce_eager=True,
            max_model_len=self.max_model_len,
            kv_cache_memory_bytes=self.kv_cache_bytes,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            seed=self.seed,
            enable_prefix_caching=self.prefix_caching,
            logits_processors=[PROCESSOR],
        )
        if variant.mode != "full":
            kwargs.update(attention_backend="razor", additional_config={"razor": variant.razor_options(profile_path)})
        return kwargs


@dataclass
class VariantOutputs:
    variant: Variant
    task_texts: list[str]
    greedy_ids: list[list[int]]
    teacher_files: list[Path]
    seconds: float
    engine: dict[str, Any] = field(default_factory=dict)


def slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", label).strip("-").lower()


def run_variant(
    variant: Variant,
    settings: EngineSettings,
    samples: list[Sample],
    texts: list[TextItem],
    greedy_tokens: int,
    work_dir: Path,
    progress: Optional[str] = None,
) -> VariantOutputs:
    """Generate everything for one variant; teacher-forced log-probs land in ``work_dir``."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    work_dir.mkdir(parents=True, exist_ok=True)
    profile_path = None
    if variant.mode in ("razor", "random") and variant.profile is not None:
        profile_path = variant.profile.save(work_dir / f"profile-{slug(variant.label)}.yaml")

    prompts: list[Any] = []
    params: list[Any] = []
    for sample in samples:
        prompts.append(sample.prompt)
        params.append(SamplingParams(temperature=0.0, max_tokens=sample.max_tokens))
    teacher_files = []
    for item in texts:
        out = work_dir / f"teacher-{slug(variant.label)}-{item.context}-{item.index}.npy"
        teacher_files.append(out)
        prompts.append(TokensPrompt(prompt_token_ids=item.prefix))
        params.append(
            SamplingParams(
                temperature=0.0,
                max_tokens=len(item.continuation),
                ignore_eos=True,
                extra_args=teacher_args(item.continuation, out),
            )
        )
    if greedy_tokens > 0:
        for item in texts:
            prompts.append(TokensPrompt(prompt_token_ids=item.prefix))
            params.append(SamplingParams(temperature=0.0, max_tokens=greedy_tokens, ignore_eos=True))

    llm = LLM(**settings.kwargs(variant, profile_path))
    try:
        info = dict(num_gpu_blocks=llm.llm_engine.vllm_config.cache_config.num_gpu_blocks)
        start = time.perf_counter()
        outputs = _generate(llm, prompts, params, progress)
        seconds = time.perf_counter() - start
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()

    # What prefix caching saved: prompt tokens the engine found cached instead of computing.
    info.update(
        prompt_tokens=sum(len(o.prompt_token_ids or ()) for o in outputs),
        cached_prompt_tokens=sum(o.num_cached_tokens or 0 for o in outputs),
    )
    n_tasks, n_texts = len(samples), len(texts)
    task_texts = [o.outputs[0].text for o in outputs[:n_tasks]]
    forced = outputs[n_tasks : n_tasks + n_texts]
    for item, o in zip(texts, forced):
        if list(o.outputs[0].token_ids) != item.continuation:  # the processor must have forced every token
            raise RuntimeError(f"{variant.label}: teacher forcing failed for text item {item.context}/{item.index}")
    greedy_ids = [list(o.outputs[0].token_ids) for o in outputs[n_tasks + n_texts :]]
    return VariantOutputs(variant, task_texts, greedy_ids, teacher_files, seconds, info)


def _generate(llm, prompts, params, progress: Optional[str]):
    """``LLM.generate``; ``progress`` labels vLLM's own per-request bar (None: no bar)."""
    if progress is None:
        return llm.generate(prompts, params, use_tqdm=False)
    from tqdm.auto import tqdm

    return llm.generate(prompts, params, use_tqdm=functools.partial(tqdm, leave=False, desc=progress))
