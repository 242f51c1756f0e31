"""One evaluation: build the samples and text slices, run every variant, score against ``full``."""

from __future__ import annotations

import functools
import os
import sys
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from razor_vllm.eval import metrics
from razor_vllm.eval.runner import EngineSettings, TextItem, VariantOutputs, run_variant
from razor_vllm.eval.tasks import TASKS, Sample, make_samples, score
from razor_vllm.eval.variants import Variant

MAX_LEN_MARGIN = 64


class ContextTooLong(ValueError):
    """A grid whose prompts plus answers do not fit the model's context window."""


def cell_seed(seed: int, *parts: Any) -> int:
    """A seed per grid cell that does not depend on which other cells run."""
    return (seed * 1_000_003 + zlib.crc32("/".join(map(str, parts)).encode())) % (2**31)


@dataclass(frozen=True)
class Grid:
    tasks: list[str]
    contexts: list[int]
    depths: list[float]
    samples: int
    haystack: str = "noise"
    seed: int = 0
    fidelity_contexts: list[int] = field(default_factory=list)
    fidelity_samples: int = 0
    fidelity_tokens: int = 64
    greedy_tokens: int = 32
    split: str = "evaluation"  # "calibration": other seeds and wording, for choosing settings

    def check(self) -> None:
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown task(s) {', '.join(unknown)}; tasks: {', '.join(TASKS)}")
        if self.samples < 0 or self.fidelity_samples < 0:
            raise ValueError("sample counts must be >= 0")
        if self.fidelity_tokens < 1 or self.greedy_tokens < 0:
            raise ValueError("--fidelity-tokens must be >= 1 and --greedy-tokens >= 0")
        if not (self.tasks and self.samples) and not self.fidelity_samples:
            raise ValueError("nothing to evaluate: no task samples and no fidelity slices")

    def describe(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Evaluation:
    model_dir: Path
    variants: list[Variant]
    grid: Grid
    work_dir: Path
    dtype: str = "float32"
    kv_bytes: int = 2 << 30
    chunk: int = 2048
    max_num_seqs: int = 16
    prefix_caching: bool = True
    progress: bool = True
    jobs: int = 1  # engines run at once (each in its own process, on its own CPU cores when on a CPU)

    def samples(self, tokenizer) -> list[Sample]:
        made = []
        for task in self.grid.tasks:
            depths = self.grid.depths if TASKS[task].uses_depth else [None]
            for context in self.grid.contexts:
                for depth in depths:
                    seed = cell_seed(self.grid.seed, task, context, depth)
                    made += make_samples(
                        task,
                        tokenizer,
                        context,
                        self.grid.samples,
                        seed,
                        depth,
                        haystack=self.grid.haystack,
                        split=self.grid.split,
                    )
        return made

    def texts(self, tokenizer) -> list[TextItem]:
        """Moby-Dick slices: ``context`` tokens of prefix and the next ``fidelity_tokens`` of the book."""
        from razor_vllm.eval.corpus import load_chapters, natural_text

        if not self.grid.fidelity_samples:
            return []
        chapters = len(load_chapters())
        items = []
        for context in self.grid.fidelity_contexts:
            need = context + self.grid.fidelity_tokens
            for index in range(self.grid.fidelity_samples):
                # Spread the slices over the book (chapter 1 is the best-known page; skip it).
                start = 2 + (index * (chapters - 10)) // max(self.grid.fidelity_samples, 1)
                ids = tokenizer(
                    natural_text(tokenizer, need + 256, start_chapter=start),  # sentences run long
                    add_special_tokens=False,
                ).input_ids
                if len(ids) < need:
                    raise ValueError(f"Moby-Dick from chapter {start} is shorter than {need} tokens")
                items.append(TextItem(context, index, ids[:context], ids[context:need]))
        return items

    def max_model_len(self, samples: list[Sample], texts: list[TextItem]) -> int:
        """Room for the longest prompt and its answer; refuses (before any engine starts) a grid
        the model's own context window cannot hold, saying which contexts would fit."""
        from razor_vllm.profile.selectors import context_length_of, hf_config_of

        # (prompt, answer) tokens of every prompt the engines will see
        lengths = [(s.context_tokens, s.max_tokens) for s in samples]
        lengths += [(len(t.prefix), max(len(t.continuation), self.grid.greedy_tokens)) for t in texts]
        needed = max(prompt + answer for prompt, answer in lengths) + MAX_LEN_MARGIN
        limit = context_length_of(hf_config_of(self.model_dir))
        if limit is not None and needed > limit:
            longest_answer = max(answer for _, answer in lengths)
            raise ContextTooLong(
                f"the longest prompt plus its answer needs max_model_len {needed}, past the model's {limit} "
                f"tokens; use contexts of at most {limit - longest_answer - MAX_LEN_MARGIN} tokens"
            )
        return needed

    def run(self) -> dict[str, Any]:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
        samples = self.samples(tokenizer)
        texts = self.texts(tokenizer)
        settings = EngineSettings(
            model=str(self.model_dir),
            dtype=self.dtype,
            max_model_len=self.max_model_len(samples, texts),
            kv_cache_bytes=self.kv_bytes,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.chunk,
            prefix_caching=self.prefix_caching,
        )
        task_rows: list[dict[str, Any]] = []
        fidelity_rows: list[dict[str, Any]] = []
        engines: dict[str, Any] = {}
        full: Optional[VariantOutputs] = None
        logprob_dir = self.work_dir / "logprobs"
        ordered = sorted(self.variants, key=lambda v: v.mode != "full")  # the reference first
        if self.progress:
            print(
                f"eval: {len(ordered)} engines, {len(samples)} task prompts and {len(texts)} text slices each",
                file=sys.stderr,
            )
        run = functools.partial(
            run_variant,
            settings=settings,
            samples=samples,
            texts=texts,
            greedy_tokens=self.grid.greedy_tokens,
            work_dir=logprob_dir,
        )
        for variant, outputs in zip(ordered, _run_all(ordered, run, self.jobs, self.progress)):
            engines[variant.label] = dict(outputs.engine, seconds=round(outputs.seconds, 1))
            for sample, text in zip(samples, outputs.task_texts):
                task_rows.append(
                    dict(
                        variant=variant.label,
                        mode=variant.mode,
                        task=sample.task,
                        context=_bucket(sample, self.grid.contexts),
                        context_tokens=sample.context_tokens,
                        depth=sample.depth,
                        seed=sample.seed,
                        score=score(sample, text),
                        partial=metrics.prefix_credit(sample.answers, text),
                        answers=list(sample.answers),
                        output=text,
                    )
                )
            if variant.mode == "full":
                full = outputs
            elif full is not None:
                fidelity_rows += self._fidelity(variant, full, outputs, texts)
                for path in outputs.teacher_files:
                    path.unlink(missing_ok=True)
        return dict(
            settings=dict(max_model_len=settings.max_model_len, engines=engines),
            budgets=self._budgets(texts),
            tasks=task_rows,
            fidelity=fidelity_rows,
        )

    def _fidelity(
        self, variant: Variant, full: VariantOutputs, outputs: VariantOutputs, texts: list[TextItem]
    ) -> list[dict[str, Any]]:
        rows = []
        for i, item in enumerate(texts):
            f = metrics.fidelity(
                full.teacher_files[i],
                outputs.teacher_files[i],
                item.continuation,
                item.context,
                item.index,
                full.greedy_ids[i] if full.greedy_ids else None,
                outputs.greedy_ids[i] if outputs.greedy_ids else None,
            )
            rows.append(dict(variant=variant.label, mode=variant.mode, **f.as_dict()))
        return rows

    def _budgets(self, texts: list[TextItem]) -> dict[str, dict[str, float]]:
        contexts = sorted(set(self.grid.contexts) | {t.context for t in texts})
        return {v.label: {str(c): v.kv_budget(c) for c in contexts} for v in self.variants}


def cpu_groups(jobs: int, cpus: Optional[list[int]] = None) -> list[str]:
    """``jobs`` disjoint CPU lists (vLLM's ``VLLM_CPU_OMP_THREADS_BIND`` syntax), one per engine run at once.

    vLLM's CPU worker binds its OpenMP threads to the NUMA node's cores minus one reserved for the scheduler;
    two engines started side by side would bind the same cores. Each gets its own share instead.
    """
    cpus = sorted(os.sched_getaffinity(0)) if cpus is None else sorted(cpus)
    if not 1 <= jobs <= len(cpus):
        raise ValueError(f"--jobs must be between 1 and the {len(cpus)} CPUs this process may use, got {jobs}")
    share = len(cpus) // jobs
    return [",".join(map(str, cpus[i * share : (i + 1) * share])) for i in range(jobs)]


def _run_in_worker(run: Callable[..., VariantOutputs], variant: Variant, cpus: Optional[str]) -> VariantOutputs:
    """One variant in a spawned job process. With CPUs assigned (a CPU engine), the engine runs inside
    this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: vLLM's in-process engine core and executor)
    on those cores: a CPU engine otherwise starts an engine-core and a worker process, each importing
    torch and vLLM again (about 20 of an engine's 30 s of start-up on a 2-core machine). vLLM binds
    only the workers it starts, so this process binds itself, as vLLM would bind the worker."""
    if cpus is not None:
        import torch

        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpus
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        cores = [int(c) for c in cpus.split(",")]
        os.sched_setaffinity(0, cores)
        torch.set_num_threads(len(cores))
    return run(variant, progress=None)


def _run_all(
    variants: list[Variant], run: Callable[..., VariantOutputs], jobs: int, progress: bool
) -> list[VariantOutputs]:
    """Every variant's outputs, in order: one after the other in this process (``jobs`` 1, with vLLM's
    progress bars), or ``jobs`` at a time in spawned worker processes, each engine on its own CPU cores."""
    total = len(variants)
    if jobs <= 1:
        outputs = []
        for number, variant in enumerate(variants, 1):
            label = f"[{number}/{total}] {variant.label}" if progress else None
            outputs.append(run(variant, progress=label))
        return outputs

    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    from vllm.platforms import current_platform

    own_binding = not current_platform.is_cpu() or "VLLM_CPU_OMP_THREADS_BIND" in os.environ
    free = [None] * jobs if own_binding else cpu_groups(jobs)
    results: dict[int, VariantOutputs] = {}
    pending: dict[Any, tuple[int, Optional[str]]] = {}
    queue = list(enumerate(variants))
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        while queue or pending:
            while queue and free:
                index, variant = queue.pop(0)
                cpus = free.pop(0)
                pending[pool.submit(_run_in_worker, run, variant, cpus)] = (index, cpus)
                if progress:
                    where = f" on CPUs {cpus}" if cpus else ""
                    print(f"eval [{index + 1}/{total}] {variant.label}: started{where}", file=sys.stderr)
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                index, cpus = pending.pop(future)
                results[index] = future.result()
                free.append(cpus)
                if progress:
                    print(
                        f"eval [{index + 1}/{total}] {variants[index].label}: done in {results[index].seconds:.0f} s "
                        f"({time.perf_counter() - started:.0f} s since the start)",
                        file=sys.stderr,
                    )
    return [results[i] for i in range(total)]


def _bucket(sample: Sample, contexts: list[int]) -> int:
    """The grid context a sample was made for (its measured length is within a few tokens of it)."""
    return min(contexts, key=lambda c: abs(c - sample.context_tokens))
