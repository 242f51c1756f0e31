"""Writing this step's keys and values into a pool's paged cache."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class SlotIndex:
    """Where this step's new tokens go in one pool; computed once per step, shared by all layers."""

    block: torch.Tensor  # [n] int64 physical block of each written token
    offset: torch.Tensor  # [n] int64 slot inside the block
    rows: Optional[torch.Tensor]  # token rows that are written; None = all rows

    @classmethod
    def from_slot_mapping(cls, slot_mapping: torch.Tensor, block_size: int) -> "SlotIndex":
        slots = slot_mapping.long()
        valid = slots >= 0  # vLLM marks padding tokens with -1
        rows = None
        if not bool(valid.all()):
            rows = valid.nonzero().squeeze(1)
            slots = slots[rows]
        return cls(block=slots // block_size, offset=slots % block_size, rows=rows)


def write_kv(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    index: SlotIndex,
    head_offset: int,
) -> None:
    """Store key/value [T, n, D] at pool heads [head_offset, head_offset + n) of their slots.

    Caches are [num_blocks, pool_heads, block_size, D] strided views of the pool.
    """
    if index.rows is not None:
        key, value = key[index.rows], value[index.rows]
    heads = slice(head_offset, head_offset + key.shape[1])
    key_cache[:, heads][index.block, :, index.offset] = key.to(key_cache.dtype)
    value_cache[:, heads][index.block, :, index.offset] = value.to(value_cache.dtype)
