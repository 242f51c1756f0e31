"""The backend's metadata builder and impl, driven directly (no engine) against the dense oracle.

Step by step through a chunked, mixed prefill/decode schedule of several requests, with two pools
laid out as ``install_pools`` lays them out, shuffled NaN-poisoned blocks, non-contiguous head
selections, and the padding vLLM adds to full CUDA-graph batches (a request without queries,
seq_len 0, NULL block-table row, tokens with slot -1). The impl stores K/V from vLLM's
``slot_mapping`` with ``ops.store_kv`` on every device: here through the C++ ops and through the
torch reference (``RAZOR_VLLM_KERNELS``), and through Triton on a GPU."""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import pytest
import torch
from vllm.forward_context import ForwardContext, override_forward_context
from vllm.v1.attention.backend import AttentionCGSupport, CommonAttentionMetadata

from razor_vllm import ops
from razor_vllm.backend import (
    LayerRazorState,
    RazorAttentionBackend,
    RazorAttentionImpl,
    RazorMetadataBuilder,
)
from razor_vllm.layout import plan_layout
from razor_vllm.ops.api import LayerPoolHeads, LocalRule
from razor_vllm.ops.dense import dense_block_tail, dense_razor_attention
from razor_vllm.pools import LOCAL_POOL_NAME, RETRIEVAL_POOL_NAME, RazorPoolLayer, build_specs

from kernel_sim import make_schedule, relative_error

NUM_KV_HEADS, G, HEAD_SIZE, SINK, WINDOW, LOCAL_BLOCK = 3, 3, 32, 4, 24, 16
# Layer 0 keeps KV head 1 in full, layer 1 heads 0 and 2: both leave a non-contiguous set somewhere
# (index tensors) beside a contiguous one (slices); layer 2 has only local heads and layer 3 only
# retrieval heads (one pool holds all the layer's heads: no selection).
RETRIEVAL = [[1], [0, 2], [], [0, 1, 2]]
NULL_BLOCK = 0  # vLLM's null block: never allocated here, so NaN


class Pool:
    """One pool as vLLM allocates it (raw pages of ``page_bytes``, viewed per the spec) with a
    shuffled block manager. Blocks are never freed: the kernel tests cover freed window blocks."""

    def __init__(self, spec, page_elems: int, num_blocks: int, rng: random.Random, device: str = "cpu"):
        self.block_size = spec.block_size
        heads, width = spec.num_kv_heads, 2 * spec.head_size
        nan = 0x7F if spec.dtype == torch.uint8 else math.nan  # 0x7F: NaN in both float8 formats
        pages = torch.full((num_blocks, page_elems), nan, device=device, dtype=spec.dtype)
        self.kv_cache = pages.as_strided(
            (num_blocks, heads, spec.block_size, width), (page_elems, spec.block_size * width, width, 1)
        )
        self.free = [b for b in range(num_blocks) if b != NULL_BLOCK]
        rng.shuffle(self.free)
        self.tables: dict[int, list[int]] = {}

    def allocate(self, rid: int, end: int) -> None:
        table = self.tables.setdefault(rid, [])
        while len(table) * self.block_size < end:
            table.append(self.free.pop())

    def slot(self, rid: int, pos: int) -> int:
        return self.tables[rid][pos // self.block_size] * self.block_size + pos % self.block_size

    def block_table(self, rids: list[int], width: int) -> torch.Tensor:
        table = torch.full((len(rids), width), NULL_BLOCK, dtype=torch.int32)
        for row, rid in enumerate(rids):
            blocks = self.tables.get(rid, [])
            table[row, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        return table


def build_layer_states(
    exact_prefill: bool = True, compression_ratio=None, dtype=torch.float32, kv_cache_dtype="auto", device="cpu"
):
    """Two layers' states as ``install_pools`` builds them (head index tensors on ``device``),
    reading two pool layers with no cache bound yet (``bind``)."""
    layout = plan_layout(RETRIEVAL, NUM_KV_HEADS, LOCAL_BLOCK, dtype.itemsize)
    retrieval_spec, local_spec = build_specs(
        layout,
        HEAD_SIZE,
        dtype,
        SINK,
        WINDOW,
        exact_prefill=exact_prefill,
        compression_ratio=compression_ratio,
        max_model_len=1024,
    )
    retrieval_pool, local_pool = (
        RazorPoolLayer(name, spec, RazorAttentionBackend, layout, kv_cache_dtype)
        for name, spec in ((RETRIEVAL_POOL_NAME, retrieval_spec), (LOCAL_POOL_NAME, local_spec))
    )
    rule = LocalRule(SINK, WINDOW, compensation=True, exact_prefill=exact_prefill)
    states = [
        LayerRazorState(
            retrieval=LayerPoolHeads.of(heads.retrieval, heads.retrieval_offset, G, NUM_KV_HEADS, device),
            local=LayerPoolHeads.of(heads.local, heads.local_offset, G, NUM_KV_HEADS, device),
            rule=rule,
            layout=layout,
            retrieval_pool=retrieval_pool,
            local_pool=local_pool,
        )
        for heads in layout.layers
    ]
    return states, retrieval_spec, local_spec


def bind(states, pools: dict) -> ForwardContext:
    """Bind each pool's cache to its pool layer, as vLLM's runner does (``layer.kv_cache = ...``),
    and return a forward context holding the pool layers (``attn_metadata`` is set per step)."""
    layers = {layer.layer_name: layer for layer in (states[0].retrieval_pool, states[0].local_pool)}
    for name, pool in pools.items():
        layers[name].kv_cache = pool.kv_cache
    return ForwardContext(no_compile_layers=layers, attn_metadata={}, slot_mapping={})


def common_metadata(batch, pool: Pool, pad_tokens: int, device: str = "cpu") -> CommonAttentionMetadata:
    """What vLLM's runner hands the builder: int32 metadata, int64 slots; one padding request and
    ``pad_tokens`` padding tokens, as a full CUDA graph pads a batch."""
    rids = [rid for rid, _, _ in batch] + [-1]
    q_lens = [hi - lo for _, lo, hi in batch] + [0]
    query_start_loc = torch.tensor([0, *q_lens], dtype=torch.int32).cumsum(0).to(torch.int32)
    seq_lens = torch.tensor([hi for _, _, hi in batch] + [0], dtype=torch.int32)
    slots = [pool.slot(rid, p) for rid, lo, hi in batch for p in range(lo, hi)] + [-1] * pad_tokens
    width = max(len(t) for t in pool.tables.values()) + 1
    return CommonAttentionMetadata(
        query_start_loc=query_start_loc.to(device),
        query_start_loc_cpu=query_start_loc,
        seq_lens=seq_lens.to(device),
        num_reqs=len(rids),
        num_actual_tokens=len(slots),
        max_query_len=max(q_lens),
        max_seq_len=int(seq_lens.max()),
        block_table_tensor=pool.block_table(rids, width).to(device),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
    )


def step_rows(layer_data, batch, index: int, pad_tokens: int, device: str) -> torch.Tensor:
    """This step's rows of q (index 0), k (1) or v (2), then ``pad_tokens`` rows of noise."""
    rows = [layer_data[rid][index][lo:hi] for rid, lo, hi in batch]
    return torch.cat(rows + [torch.randn(pad_tokens, *rows[0].shape[1:])]).to(device)


def test_builder_supports_full_cuda_graphs_of_decode_batches():
    states, retrieval_spec, _ = build_layer_states()
    assert RazorMetadataBuilder.get_cudagraph_support(None, retrieval_spec) == (
        AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
    )


def test_metadata_aliases_the_runner_buffers():
    """A CUDA graph replays on the addresses it captured: every tensor the kernels read must be a
    view of the runner's persistent buffers, never a per-step copy."""
    _, retrieval_spec, _ = build_layer_states()
    pool = Pool(retrieval_spec, retrieval_spec.page_size_bytes // 4, 8, random.Random(0))
    pool.allocate(0, 5)
    cm = common_metadata([(0, 0, 5)], pool, pad_tokens=3)
    md = RazorMetadataBuilder(retrieval_spec, [], None, torch.device("cpu")).build(0, cm)
    assert md.query_start_loc.data_ptr() == cm.query_start_loc.data_ptr()
    assert md.seq_lens.data_ptr() == cm.seq_lens.data_ptr()
    assert md.block_table.data_ptr() == cm.block_table_tensor.data_ptr()
    assert md.slot_mapping.data_ptr() == cm.slot_mapping.data_ptr()


# CPU: the C++ kernels and the torch reference (the store included); CUDA: Triton kernels, device
# head indices. vLLM's unified_attention (retrieval heads) takes fp32 through TF32 on NVIDIA.
PATHS = [
    pytest.param("cpu", "cpp", 1e-4, marks=pytest.mark.skipif(ops.cpp is None, reason="razor_vllm._C is not built")),
    ("cpu", "reference", 1e-4),
    pytest.param(
        "cuda", None, 5e-3, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
    ),
]


# exact: the paper's prefill; compressed: every query by the window rule; paper: exact prefill and
# the paper's window max(W, N / C) per request (C = 4: 75- and 131-token prompts get larger windows).
MODES = {"exact": (True, None), "compressed": (False, None), "paper": (True, 4.0)}


@pytest.mark.parametrize("device, kernels, tolerance", PATHS)
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("mode", list(MODES))
def test_impl_matches_dense_oracle(device, kernels, tolerance, seed, mode, monkeypatch):
    if kernels:
        monkeypatch.setenv(ops.KERNELS_ENV, kernels)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    exact, ratio = MODES[mode]
    states, retrieval_spec, local_spec = build_layer_states(exact, ratio, device=device)
    lengths = [9, SINK + WINDOW + 1, 75, 131]
    # Prompt lengths the builder hands the kernels (what the runner's InputBatch holds): a chunk may
    # cross a prompt's end, as when vLLM recomputes a preempted request's prompt and answer at once.
    prompt_lens = [9, SINK + WINDOW - 3, 75, 100]
    rule = local_spec.geometry
    schedule = make_schedule(lengths, rng, max_chunk=24, style="mixed")
    total = sum(lengths) + 4 * len(lengths)
    page_elems = retrieval_spec.page_size_bytes // 4
    assert local_spec.page_size_bytes == retrieval_spec.page_size_bytes
    pools = {
        RETRIEVAL_POOL_NAME: Pool(retrieval_spec, page_elems, total // retrieval_spec.block_size + 8, rng, device),
        LOCAL_POOL_NAME: Pool(local_spec, page_elems, total // local_spec.block_size + 8, rng, device),
    }
    ctx = bind(states, pools)
    impl = RazorAttentionImpl(NUM_KV_HEADS * G, HEAD_SIZE, HEAD_SIZE**-0.5, NUM_KV_HEADS, None, None, "auto")
    data = [
        [
            (
                torch.randn(n, NUM_KV_HEADS * G, HEAD_SIZE),
                torch.randn(n, NUM_KV_HEADS, HEAD_SIZE) + 0.5,
                torch.randn(n, NUM_KV_HEADS, HEAD_SIZE) - 0.5,
            )
            for n in lengths
        ]
        for _ in states
    ]
    outputs = [[torch.full(q.shape, math.nan) for q, _, _ in layer_data] for layer_data in data]

    for batch in schedule:
        pad_tokens = rng.randint(0, 3)
        metadata = {}
        for name, pool in pools.items():
            for rid, _, hi in batch:
                pool.allocate(rid, hi)
            spec = retrieval_spec if name == RETRIEVAL_POOL_NAME else local_spec
            builder = RazorMetadataBuilder(spec, [], None, torch.device(device))
            rows = [prompt_lens[rid] for rid, _, _ in batch] + [0]  # the padding row: stale, never read
            builder.bind_prompt_lengths(lambda rows=rows: torch.tensor(rows, dtype=torch.int32))
            metadata[name] = builder.build(0, common_metadata(batch, pool, pad_tokens, device))
        ctx.attn_metadata = metadata
        for layer_index, state in enumerate(states):
            q, k, v = (step_rows(data[layer_index], batch, i, pad_tokens, device) for i in range(3))
            out = torch.full_like(q, math.nan)
            with override_forward_context(ctx):
                impl.forward(SimpleNamespace(razor_state=state), q, k, v, None, metadata[LOCAL_POOL_NAME], out)
            row = 0
            for rid, lo, hi in batch:
                outputs[layer_index][rid][lo:hi] = out[row : row + hi - lo].cpu()
                row += hi - lo

    for layer_index, retrieval in enumerate(RETRIEVAL):
        flags = [h in retrieval for h in range(NUM_KV_HEADS)]
        for rid, (q, k, v) in enumerate(data[layer_index]):
            expected = dense_razor_attention(
                q.double(),
                k.double(),
                v.double(),
                range(q.shape[0]),
                flags,
                SINK,
                rule.request_window(prompt_lens[rid]),
                HEAD_SIZE**-0.5,
                prompt_len=prompt_lens[rid] if exact else None,
            )
            err = relative_error(outputs[layer_index][rid].double(), expected)
            assert err < tolerance, f"layer {layer_index} request {rid}: relative error {err:.3g}"
    # every selection path was taken: index tensors, slices, all the layer's heads
    assert isinstance(states[0].local.q_select, torch.Tensor) and isinstance(states[1].retrieval.q_select, torch.Tensor)
    assert isinstance(states[0].retrieval.q_select, slice) and isinstance(states[1].local.q_select, slice)
    assert states[2].local.q_select is None and states[3].retrieval.q_select is None
    assert states[0].local.q_select.device.type == device and states[1].retrieval.kv_select.device.type == device

    # Every local block's page tail holds the sums over [S, b*B) of its layer's local heads.
    local_pool = pools[LOCAL_POOL_NAME]
    for layer_index, state in enumerate(states):
        tails = state.local_pool.views.tails.cpu()
        heads = list(state.local.kv_heads)
        if not heads:
            continue
        for rid, (_, k, v) in enumerate(data[layer_index]):
            for b, block in enumerate(local_pool.tables[rid]):
                got = tails[block, state.local.offset : state.local.offset + len(heads)].double()
                want = dense_block_tail(k[:, heads], v[:, heads], b, LOCAL_BLOCK, SINK)
                err = ((got - want).abs().max() / want.abs().max().clamp(min=1)).item()
                assert err < 1e-5, f"layer {layer_index} request {rid} block {b}: tail error {err:.3g}"


def test_exact_builder_refuses_to_run_without_prompt_lengths():
    """Exact prefill without the runner's prompt lengths (vllm_compat hook 9 missing) stops loudly."""
    _, _, local_spec = build_layer_states(True)
    builder = RazorMetadataBuilder(local_spec, [], None, torch.device("cpu"))
    pool = Pool(local_spec, local_spec.page_size_bytes // 4, 8, random.Random(0))
    pool.allocate(0, 5)
    with pytest.raises(RuntimeError, match="no prompt lengths"):
        builder.build(0, common_metadata([(0, 0, 5)], pool, pad_tokens=0))


def test_impl_hands_fp8_views_and_the_layers_scales_to_the_kernels(monkeypatch):
    """An fp8 cache (vLLM stores it as uint8): the impl hands every kernel float8 views of the pool's
    pages, the fp32 tails, the layer's ``_k_scale``/``_v_scale`` and the step's batch (whose
    max_query_len selects the retrieval kernel's split-key path). The kernels are recorded here (their
    fp8 reads are checked against the oracle in tests/kernels/test_triton_kernels.py); on CPU the impl refuses."""

    states, retrieval_spec, local_spec = build_layer_states(dtype=torch.uint8, kv_cache_dtype="fp8_e5m2")
    rng = random.Random(0)
    page = retrieval_spec.page_size_bytes
    pools = {
        name: Pool(spec, page, 12, rng)
        for name, spec in ((RETRIEVAL_POOL_NAME, retrieval_spec), (LOCAL_POOL_NAME, local_spec))
    }
    batch = [(0, 0, 40), (1, 7, 8)]
    metadata = {}
    for name, pool in pools.items():
        for rid, _, hi in batch:
            pool.allocate(rid, hi)
        builder = RazorMetadataBuilder(
            pool_spec := retrieval_spec if name == RETRIEVAL_POOL_NAME else local_spec, [], None, torch.device("cpu")
        )
        assert pool_spec.dtype == torch.uint8
        builder.bind_prompt_lengths(lambda: torch.tensor([40, 8, 0], dtype=torch.int32))
        metadata[name] = builder.build(0, common_metadata(batch, pool, pad_tokens=2))
    ctx = bind(states, pools)
    ctx.attn_metadata = metadata
    layer = SimpleNamespace(razor_state=states[1], _k_scale=torch.tensor([0.5]), _v_scale=torch.tensor([0.25]))
    impl = RazorAttentionImpl(NUM_KV_HEADS * G, HEAD_SIZE, HEAD_SIZE**-0.5, NUM_KV_HEADS, None, None, "fp8_e5m2")
    q = torch.randn(43, NUM_KV_HEADS * G, HEAD_SIZE)
    k, v = torch.randn(43, NUM_KV_HEADS, HEAD_SIZE), torch.randn(43, NUM_KV_HEADS, HEAD_SIZE)
    with override_forward_context(ctx), pytest.raises(NotImplementedError, match="only on CUDA"):
        impl.forward(layer, q, k, v, None, metadata[LOCAL_POOL_NAME], torch.zeros_like(q))

    # As on CUDA (where ops picks the Triton kernels for every step: here a recorder in their place),
    # each layer step is the kernels one after another, K/V stored from slot_mapping by store_kv.
    calls = []

    class Recorder:
        def __getattr__(self, kernel):
            def record(*args, **kwargs):
                calls.append((kernel, args, kwargs))
                if kernel.endswith("attention"):
                    return torch.zeros_like(args[0])

            return record

    monkeypatch.setattr(ops, "_choose", lambda *args, **kwargs: Recorder())
    with override_forward_context(ctx):
        impl.forward(layer, q, k, v, None, metadata[LOCAL_POOL_NAME], torch.zeros_like(q))
    kernels = [kernel for kernel, _, _ in calls]
    assert kernels == ["store_kv", "paged_attention", "store_kv", "write_block_tails", "local_attention"], kernels
    for kernel, args, kwargs in calls:
        caches = args[:2] if kernel in ("store_kv", "write_block_tails") else args[1:3]
        assert all(c.dtype == torch.float8_e5m2 for c in caches), kernel
        assert kwargs == {"k_scale": layer._k_scale, "v_scale": layer._v_scale}, kernel
    (_, store_r, _), (_, paged, _), (_, store_l, _), (_, tails_args, _), (_, local, _) = calls
    assert tails_args[2].dtype == torch.float32 and local[3] is tails_args[2]
