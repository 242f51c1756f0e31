"""Writing this step's keys and values into a pool's paged cache."""

import torch


def write_kv(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    slot_mapping: torch.Tensor,
    head_offset: int,
) -> None:
    """Store key/value [T, n, D] at pool heads [head_offset, head_offset + n) of their slots.

    Caches are [num_blocks, pool_heads, block_size, D] (strided views); slot s is token
    s % block_size of block s // block_size. Negative slots (padding) are skipped.
    """
    num_heads = key.shape[1]
    block_size = key_cache.shape[2]
    slots = slot_mapping[: key.shape[0]].long()
    valid = slots >= 0
    if not bool(valid.all()):
        slots, key, value = slots[valid], key[valid], value[valid]
    blocks, offsets = slots // block_size, slots % block_size
    heads = slice(head_offset, head_offset + num_heads)
    key_cache[:, heads][blocks, :, offsets] = key.to(key_cache.dtype)
    value_cache[:, heads][blocks, :, offsets] = value.to(value_cache.dtype)
