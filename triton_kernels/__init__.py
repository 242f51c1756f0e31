"""Triton GPU kernels for both KV pools, taking the kernel contract's objects (``razor_vllm.ops.api``).

Installed as ``razor_vllm.triton_kernels`` (``package_dir`` in setup.py); the layout and the
attention rule are documented in ``razor_vllm.ops``. Each op has the contract's signature with the
fp8 scales and an optional output buffer as keywords, e.g. ``local_attention(query, key_cache,
value_cache, tails, batch, heads, rule, scale, *, k_scale=None, v_scale=None, out=None)``; each module's
``plan`` (the same arguments) holds every check and returns the ``Launch`` the op runs.

- ``local_attention``: local heads (exact prompt queries, or sinks + window + count-weighted
  compensation from the block tails), varlen and chunked, one program per (query tile of one
  request, KV head); ours.
- ``write_block_tails``: the fp32 sums over [S, b*B) into the tail of every local block b started
  this step; ours.
- ``paged_attention``: retrieval heads; vLLM's own Triton ``unified_attention`` reads the
  retrieval pool through a strided view, so no kernel of ours.
- ``store_kv``: stores this step's K/V at vLLM's ``slot_mapping`` (negative slots skipped).

Every launch has a grid fixed by tensor shapes and reads its metadata from device tensors (no host
sync, no data-dependent allocation), so a decode batch can be captured in a CUDA graph.
"""

if __name__ != "razor_vllm.triton_kernels":
    # The source folder is named triton_kernels; when the repository root is on sys.path it would
    # otherwise shadow OpenAI's `triton_kernels` package, which vLLM probes for by importing it.
    raise ImportError(
        f"{__file__} is razor_vllm.triton_kernels, not the `triton_kernels` package; "
        "import it as razor_vllm.triton_kernels"
    )

from .cache_write import store_kv
from .local import local_attention
from .paged import paged_attention
from .tails import write_block_tails

__all__ = ["local_attention", "write_block_tails", "paged_attention", "store_kv"]
