"""``GET /razor/status`` and razor's Prometheus gauges, as a vLLM ``endpoint_plugins`` entry point.

vLLM loads endpoint plugins in the API server process only, and only those named in
``VLLM_PLUGINS``; that variable then filters the general plugins too, so serve with
``VLLM_PLUGINS=razor,razor_status``. The plugin reads the engine's ``VllmConfig`` from the
``EngineClient`` it is handed in ``init_state`` and derives the configuration part from it the way
the workers do (``options.resolve_for_vllm_config`` -> ``balance.plan_for_resolved`` ->
``ScaleoutPlan.rank_layout``) and computes the figures with ``geometry.PoolGeometry`` /
``geometry.StockGeometry``, as the worker's "RAZOR: ..." start-up line and the bench do.

Bytes per token are summed over all workers (tensor-parallel ranks x pipeline stages); every worker
sizes its pools for the heaviest one (``balance.py``), and ``balance`` says what each holds and what
that costs against each worker sized for its own profile heads. The
compression ratio compares one ``max_model_len``-token sequence: stock vLLM's paged cache
(``ceil(L / block_size)`` blocks of every layer) against razor's steady state (every retrieval
page of the sequence plus the local pool's sink block(s) and the blocks spanning the window).

Blocks in use per pool live in the engine core's scheduler, which this process cannot see. The
general plugin adds a read-only engine-core utility (``vllm_compat.add_pool_usage_utility``); this
plugin calls it on every ``GET /razor/status`` (the ``usage`` section: blocks per pool, and the
bytes they take against what stock vLLM's paging would take for the same requests) and, from a
small ASGI middleware, just before each ``/metrics`` scrape renders ``razor_blocks_in_use{pool}``.
"""

from __future__ import annotations

import asyncio
from argparse import Namespace
from typing import Any, Optional

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from vllm.logger import init_logger

from razor_vllm.geometry import PoolGeometry, StockGeometry, head_token_bytes, paged_bytes

logger = init_logger("vllm." + __name__)  # under "vllm" so it shares vLLM's log handlers

PLUGIN_NAME = "razor_status"
ROUTE = "/razor/status"
METRICS_PATH = "/metrics"  # vLLM's Prometheus route
STATE_KEY = "razor_status"  # app.state attribute: the status document
ENGINE_KEY = "razor_status_engine"  # app.state attribute: the EngineClient handed to init_state
USAGE_TIMEOUT_S = 10.0  # the engine core answers between steps; a step on CPU takes well under this


# -- the status document ----------------------------------------------------------------------------


def compute_status(vllm_config: Any) -> dict[str, Any]:
    """Razor's resolved configuration and KV saving for ``vllm_config``; ``{"razor": False}`` if not razor."""
    from razor_vllm.vllm_compat import is_razor_config

    if vllm_config is None or not is_razor_config(vllm_config) or vllm_config.model_config is None:
        return {"razor": False}

    import torch
    from vllm.utils.torch_utils import kv_cache_dtype_str_to_dtype

    from razor_vllm.balance import plan_for_resolved
    from razor_vllm.config import ModelFingerprint
    from razor_vllm.options import resolve_for_vllm_config

    model_config = vllm_config.model_config
    resolved = resolve_for_vllm_config(vllm_config)
    served = ModelFingerprint.from_hf_config(model_config.hf_config)
    dtype = kv_cache_dtype_str_to_dtype(vllm_config.cache_config.cache_dtype, model_config)
    elem = torch.tensor([], dtype=dtype).element_size()
    stock_block = int(vllm_config.cache_config.block_size or 128)
    tp = int(getattr(vllm_config.parallel_config, "tensor_parallel_size", 1) or 1)
    pp = int(getattr(vllm_config.parallel_config, "pipeline_parallel_size", 1) or 1)
    max_len = int(model_config.max_model_len)
    # The workers' plan (install.py): every rank of every stage sizes its pools alike (balance.py).
    plan = plan_for_resolved(resolved, served.num_kv_heads, tp, pp)

    in_flight = int(vllm_config.max_in_flight_tokens)
    retrieval_bpt = local_bpt = razor_bytes = admission_bytes = all_ranks_page_bytes = 0
    pools: dict[str, dict[str, int]] = {}
    for worker in plan.ranks:
        layout = plan.rank_layout(
            worker,
            resolved.local_block_size,
            elem,
            default_block_size=stock_block,
            hash_aligned=bool(vllm_config.cache_config.enable_prefix_caching),
        )
        pool = PoolGeometry.for_resolved(layout, served.head_size, elem, resolved)
        retrieval_bpt += pool.retrieval_bytes_per_token
        local_bpt += int(pool.local_bytes_per_token)  # whole bytes, as the start-up line prints them
        # What a request of max_model_len holds once its prompt is done (RazorLocalManager), and its
        # peak, which admission reserves (exact prefill: the prefill transient).
        razor_bytes += pool.steady_pages(max_len) * pool.page_bytes
        admission_bytes += pool.admission_pages(max_len, in_flight, max_len) * pool.page_bytes
        all_ranks_page_bytes += pool.page_bytes
        if worker is plan.ranks[0]:
            if layout.has_retrieval_pool:
                pools["retrieval"] = dict(
                    heads=layout.num_retrieval_heads,
                    pool_heads=layout.retrieval_pool_heads,
                    block_size=layout.retrieval_block_size,
                    page_bytes=pool.page_bytes,
                )
            if layout.has_local_pool:
                pools["local"] = dict(
                    heads=layout.num_local_heads,
                    pool_heads=layout.local_pool_heads,
                    block_size=layout.local_block_size,
                    page_bytes=pool.page_bytes,
                    tail_slots=layout.tail_slots,
                    page_padding_slots=layout.page_padding_slots,  # hash-aligned layouts (prefix caching)
                )
    pooled, ideal = plan.retrieval_heads_all_ranks()

    token_bytes = head_token_bytes(served.head_size, elem)
    stock = StockGeometry.of(served.num_layers, served.num_kv_heads, token_bytes, stock_block, tp)
    stock_bpt, stock_bytes = stock.bytes_per_token, stock.request_bytes(max_len)
    count = sum(len(h) for h in resolved.retrieval_heads)
    total = served.num_layers * served.num_kv_heads
    return {
        "razor": True,
        "model": model_config.served_model_name or model_config.model,
        "profile": {
            "source": resolved.profile_source,
            "fingerprint": resolved.profile.model.model_dump(),
        },
        "served_fingerprint": served.model_dump(),
        "retrieval_heads": {
            "per_layer": [sorted(h) for h in resolved.retrieval_heads],
            "served_per_layer": plan.served_global_heads(),  # with promoted heads (tp <= KV heads)
            "count": count,
            "total": total,
            "share": count / total,
        },
        "sink": resolved.sink,
        "window": resolved.window,
        "window_rule": "fixed" if resolved.compression_ratio is None else "paper",
        "window_compression_ratio": resolved.compression_ratio,
        "prefill": "exact" if resolved.exact_prefill else "compressed",
        "local_block_size": resolved.local_block_size,
        "kv_cache_dtype": str(dtype).removeprefix("torch."),
        "tensor_parallel_size": tp,
        "pipeline_parallel_size": pp,
        "balance": {
            "mode": plan.mode,
            # retrieval heads per worker: from the profile, promoted into spare pool slots, local
            "per_rank": plan.per_rank(),
            # retrieval-pool bytes per token over all workers vs each worker sized for its own profile heads
            "retrieval_bytes_per_token": {"pools": pooled * token_bytes, "unbalanced": ideal * token_bytes},
        },
        "stock_block_size": stock_block,
        "pools": pools,
        "page_bytes_all_ranks": all_ranks_page_bytes,  # what one block id holds, summed over TP ranks
        "kv_bytes_per_token": {"retrieval": retrieval_bpt, "local": local_bpt, "stock": stock_bpt},
        "max_model_len": max_len,
        # razor: what a request of max_model_len holds once its prompt is done; razor_admission: its
        # peak, which admission reserves (exact prefill: every prompt block while it prefills).
        "kv_bytes_at_max_model_len": {"razor": razor_bytes, "razor_admission": admission_bytes, "stock": stock_bytes},
        "compression_ratio": stock_bytes / razor_bytes if razor_bytes else None,
    }


def describe_usage(status: dict[str, Any], usage: dict[str, Any]) -> dict[str, Any]:
    """The ``usage`` section from ``vllm_compat.query_pool_usage``'s counts.

    ``kv_bytes.razor`` is the blocks in use times the (shared) page size; ``kv_bytes.stock`` is what
    stock vLLM's paged cache would hold for the same requests' computed tokens (whole blocks of
    ``stock_block_size`` tokens, every layer and head); ``saving`` is their ratio while requests run.
    """
    blocks = dict(usage["blocks_in_use"])
    stock_block, stock_bpt = status["stock_block_size"], status["kv_bytes_per_token"]["stock"]
    stock = sum(paged_bytes(n, stock_block, stock_bpt) for n in usage["tokens"])
    razor = sum(blocks.values()) * status["page_bytes_all_ranks"]
    described = {
        "blocks_in_use": blocks,
        "shared_blocks": dict(usage.get("shared_blocks", {})),  # held by more than one request (prefix caching)
        "prefix_cache_hits": dict(usage.get("prefix_cache_hits", {})),  # per pool since start-up
        "num_blocks": usage["num_blocks"],
        "free_blocks": usage["free_blocks"],
        "requests": len(usage["tokens"]),
        "tokens": sum(usage["tokens"]),
        "kv_bytes": {"razor": razor, "stock": stock},
        "saving": stock / razor if razor and stock else None,
    }
    engines = usage.get("engines") or []
    if engines:  # each engine core (data-parallel rank) has its own block pool
        described["engines"] = [
            {**describe_usage(status, {**e, "engines": None}), "engine": e["engine"]} for e in engines
        ]
    return described


async def refresh_usage(state: Any) -> Optional[dict[str, Any]]:
    """Ask the engine core for the pools' usage, set the gauges, return the ``usage`` section.

    ``None`` when not serving razor; ``{"error": ...}`` (gauges left as they were) when the engine
    cannot answer, so neither the status route nor /metrics fails with it.
    """
    from razor_vllm.vllm_compat import query_pool_usage

    status = getattr(state, STATE_KEY, None) or {}
    engine_client = getattr(state, ENGINE_KEY, None)
    if not status.get("razor") or engine_client is None:
        return None
    try:
        usage = await asyncio.wait_for(query_pool_usage(engine_client), USAGE_TIMEOUT_S)
    except Exception as exc:  # a dead or stuck engine: report it, never fail the route
        logger.warning("razor_status: pool usage unavailable: %s: %s", type(exc).__name__, exc)
        return {"error": f"{type(exc).__name__}: {exc}"}
    if usage is None:
        return {"error": "the engine core reports no razor pools"}
    described = describe_usage(status, usage)
    for pool, blocks in described["blocks_in_use"].items():
        _metrics()["blocks"].labels(pool=pool).set(blocks)
    for engine in described.get("engines", []):
        for pool, blocks in engine["blocks_in_use"].items():
            _metrics()["engine_blocks"].labels(engine=str(engine["engine"]), pool=pool).set(blocks)
    return described


class RefreshUsageOnScrape:
    """ASGI middleware: brings razor's usage gauges up to date just before vLLM renders ``/metrics``."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("path", "").rstrip("/") == METRICS_PATH and "app" in scope:
            await refresh_usage(scope["app"].state)
        await self.app(scope, receive, send)


# -- Prometheus -------------------------------------------------------------------------------------

_METRICS: Optional[dict[str, Any]] = None


def _metrics() -> dict[str, Any]:
    """razor's collectors, created once per process in prometheus_client's default registry.

    That is the registry vLLM's /metrics serves with one API server; with several
    (``PROMETHEUS_MULTIPROC_DIR`` set) vLLM reads every process's values from the multiprocess
    directory, so the gauges use ``multiprocess_mode="mostrecent"`` and the info metric is a gauge
    fixed at 1, as vLLM does for its own ``*_info`` metrics (multiprocess mode has no Info type).
    """
    global _METRICS
    if _METRICS is None:
        from prometheus_client import Gauge

        mode = dict(multiprocess_mode="mostrecent")
        _METRICS = {
            "bytes": Gauge(
                "razor_kv_bytes_per_token",
                "KV-cache bytes per token of each razor pool and of stock vLLM (summed over TP ranks)",
                labelnames=["pool"],
                **mode,
            ),
            "ratio": Gauge(
                "razor_compression_ratio",
                "Stock KV bytes / razor steady-state KV bytes for one max_model_len sequence",
                **mode,
            ),
            "heads": Gauge("razor_retrieval_heads", "Retrieval KV heads (full cache), all layers", **mode),
            "info": Gauge(
                "razor_profile_info", "The razor head profile being served", labelnames=["source", "model"], **mode
            ),
            "blocks": Gauge(
                "razor_blocks_in_use",
                "KV blocks each razor pool holds now (read from the engine core when /metrics is scraped)",
                labelnames=["pool"],
                **mode,
            ),
            "engine_blocks": Gauge(
                "razor_engine_blocks_in_use",
                "KV blocks each razor pool holds now in each engine core (data-parallel rank)",
                labelnames=["engine", "pool"],
                **mode,
            ),
        }
    return _METRICS


def set_metrics(status: dict[str, Any]) -> None:
    if not status.get("razor"):
        return
    m = _metrics()
    for pool, value in status["kv_bytes_per_token"].items():
        m["bytes"].labels(pool=pool).set(value)
    if status["compression_ratio"] is not None:
        m["ratio"].set(status["compression_ratio"])
    m["heads"].set(status["retrieval_heads"]["count"])
    m["info"].labels(source=status["profile"]["source"], model=str(status["model"])).set(1)


# -- the plugin ------------------------------------------------------------------------------------


class RazorStatusPlugin:
    """vLLM ``EndpointPlugin``: ``GET /razor/status`` and razor's gauges, usage read from the engine core."""

    name = PLUGIN_NAME
    required_tasks = None  # no task needed; on the engine-less render server the route says razor: false

    def attach_router(self, app: FastAPI) -> None:
        router = APIRouter()

        @router.get(ROUTE)
        async def razor_status(request: Request) -> JSONResponse:
            status = getattr(request.app.state, STATE_KEY, None) or {"razor": False}
            usage = await refresh_usage(request.app.state)
            return JSONResponse(status if usage is None else {**status, "usage": usage})

        app.include_router(router)
        app.add_middleware(RefreshUsageOnScrape)

    async def init_state(self, engine_client: Any, state: Any, args: Namespace) -> None:
        vllm_config = getattr(engine_client, "vllm_config", None) if engine_client is not None else None
        try:
            status = compute_status(vllm_config)
        except Exception as exc:  # never take the server down for a status page
            logger.exception("razor_status: cannot compute razor status")
            status = {"razor": False, "error": f"{type(exc).__name__}: {exc}"}
        setattr(state, STATE_KEY, status)
        setattr(state, ENGINE_KEY, engine_client)
        set_metrics(status)
        await refresh_usage(state)  # the usage gauges exist before the first scrape
        if status.get("razor"):
            logger.info(
                "razor_status: GET %s ready; KV compression %sx at max_model_len %d",
                ROUTE,
                round(status["compression_ratio"] or 0, 2),
                status["max_model_len"],
            )


def make_plugin() -> RazorStatusPlugin:
    """The ``vllm.endpoint_plugins`` entry point (a zero-argument factory)."""
    return RazorStatusPlugin()
