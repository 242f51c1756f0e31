"""Triton GPU kernels for both KV pools, with the positional signatures of ``razor_vllm.ops._unpack``.

Installed as ``razor_vllm.triton_kernels`` (``package_dir`` in setup.py); the layout and the
attention rule are documented in ``razor_vllm.ops``.

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
