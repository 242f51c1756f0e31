"""Writing this step's keys and values into a pool's paged cache, in plain torch.

The readable definition of ``store_kv`` and the implementation wherever no compiled one applies
(``RAZOR_VLLM_KERNELS=reference``, or a dtype the C++ op does not take); CPU steps normally run the
C++ ``store_kv`` and CUDA steps the Triton one, both checked against this.
"""

from __future__ import annotations

import torch


def write_kv(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    slot_mapping: torch.Tensor,
    head_offset: int,
) -> None:
    """Store key/value [T, n, D] at pool heads [head_offset, head_offset + n) of their slots
    (``slot_mapping[:T]``: block * block_size + offset, negative = padding, skipped).

    Caches are [num_blocks, pool_heads, block_size, D] strided views of the pool.
    """
    slots = slot_mapping[: key.shape[0]].long()
    rows = (slots >= 0).nonzero().squeeze(1)
    slots = slots[rows]
    block, offset = slots // key_cache.shape[2], slots % key_cache.shape[2]
    heads = slice(head_offset, head_offset + key.shape[1])
    key_cache[:, heads][block, :, offset] = key[rows].to(key_cache.dtype)
    value_cache[:, heads][block, :, offset] = value[rows].to(value_cache.dtype)
