"""Teacher forcing through vLLM's decode path, recording every step's next-token distribution.

Fidelity is measured where razor matters, in decode steps after a long prompt: a request carrying
``extra_args={"razor_teacher": {"targets": [...], "out": path}}`` has, at decode step i, its
log-probabilities (fp32, whole vocabulary) written to row i of the ``.npy`` file ``out`` and its
next token forced to ``targets[i]``, so every mode decodes the same text and the distributions
can be compared position by position. The processor runs inside the engine process (vLLM calls it
on each step's logits); requests without the key are left alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

TEACHER_KEY = "razor_teacher"
PROCESSOR = f"{__name__}:TeacherForcing"  # how engines are told to load it


def teacher_args(targets: list[int], out: Path) -> dict[str, Any]:
    """``SamplingParams.extra_args`` for a teacher-forced request (use max_tokens=len(targets))."""
    return {TEACHER_KEY: {"targets": [int(t) for t in targets], "out": str(out)}}


@dataclass
class _Forced:
    targets: list[int]
    out: str
    output_ids: list[int]  # vLLM's live list of this request's generated tokens
    rows: Optional[np.ndarray] = field(default=None, repr=False)

    def record(self, step: int, logprobs: torch.Tensor) -> None:
        if self.rows is None:
            self.rows = np.lib.format.open_memmap(
                self.out, mode="w+", dtype=np.float32, shape=(len(self.targets), logprobs.shape[-1])
            )
        self.rows[step] = logprobs.numpy()

    def close(self) -> None:
        if self.rows is not None:
            self.rows.flush()
            self.rows = None


class TeacherForcing(LogitsProcessor):
    """Record log_softmax of each step's logits, then force the request's next target token."""

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool):
        self.active: dict[int, _Forced] = {}

    def is_argmax_invariant(self) -> bool:
        return False  # it picks the token

    def update_state(self, batch_update: Optional[BatchUpdate]) -> None:
        if batch_update is not None:
            for index in batch_update.removed:
                if index in self.active:
                    self.active[index].close()
        process_dict_updates(self.active, batch_update, self._start)

    @staticmethod
    def _start(params, _prompt_ids, output_ids) -> Optional[_Forced]:
        spec = (params.extra_args or {}).get(TEACHER_KEY)
        if not spec:
            return None
        return _Forced(targets=list(spec["targets"]), out=spec["out"], output_ids=output_ids)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        for row, forced in self.active.items():
            # Rows of requests still prefilling are sampled and discarded by vLLM; their output list
            # is still empty, so the real first step later overwrites row 0.
            step = len(forced.output_ids)
            if step >= len(forced.targets):
                continue
            forced.record(step, torch.log_softmax(logits[row].float(), dim=-1).cpu())
            if step == len(forced.targets) - 1:
                forced.rows.flush()
            target = forced.targets[step]
            logits[row].fill_(-float("inf"))
            logits[row, target] = 0.0
        return logits
