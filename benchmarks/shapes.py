"""The layer shapes the kernel benchmarks time (bench_kernels.py on the CPU, bench_triton.py on a GPU)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    name: str
    num_q_heads: int
    num_kv_heads: int
    head_size: int
    batch: int  # requests
    q_len: int  # queries per request this step
    context: int  # seq_len including this step's queries

    @property
    def decode(self) -> bool:
        return self.q_len == 1
