"""``razor-vllm bench``: razor vs stock vLLM in one run: KV bytes, capacity and throughput.

    razor-vllm bench [--quick] [--skip-engine] [--contexts 2048,4096,8192] [--kv-gib G | --kv-bytes B]
                     [--window W] [--sink S] [--dtype float32] [--out out/bench.json] [--plot out/bench.png]

Three parts, one table each (printed) and one section each in the JSON file:

1. analytic (no engine): KV bytes per token of each razor pool and of stock; KV bytes per request
   at each context, steady state and as vLLM's admission reserves it; the max-concurrency figures
   that follow for a KV size, from the head profile, window, sink and dtype;
2. capacity (one engine per backend and context): vLLM's logged "Maximum concurrency" and the
   real peak of running requests (vLLM's scheduler stats) with razor and stock in the same KV
   bytes (default: enough for stock to hold 2 full requests), max_model_len = context;
3. throughput (one engine per backend): prefill and decode tokens/s at a few context lengths and
   batch sizes, razor/stock ratios.

``razor_vllm.cli`` calls :func:`add_arguments` and :func:`run`.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from razor_vllm.bench import analytic, report, synthetic
from razor_vllm.common import runinfo, tables
from razor_vllm.config import ProfileError

PROG = "razor-vllm bench"
DEFAULT_OUT = "out/bench.json"

FULL = dict(contexts=[2048, 4096, 8192], tp_contexts=[1024, 4096], batches=[1, 8], decode_tokens=32)
QUICK = dict(contexts=[1024, 2048], tp_contexts=[512, 1024], batches=[1, 4], decode_tokens=16)
BACKENDS = ("stock", "razor")  # measured in this order: razor's block plan reads stock's engine
STOCK_REQUESTS = 2.5  # default capacity KV size: stock holds floor(2.5) = 2 full requests
SYNTHETIC_SHARE, SYNTHETIC_SINK, SYNTHETIC_WINDOW = 0.15, 4, 1024


def add_arguments(parser: argparse.ArgumentParser) -> None:
    what = parser.add_argument_group("what to run")
    what.add_argument(
        "--quick",
        action="store_true",
        help="smaller sizes: contexts 1k,2k; throughput at 512,1k with batches 1,4 (a few minutes)",
    )
    what.add_argument("--skip-engine", action="store_true", help="analytic part only (no engine, seconds)")
    what.add_argument("--skip-capacity", action="store_true", help="no capacity engines")
    what.add_argument("--skip-throughput", action="store_true", help="no throughput engines")
    what.add_argument(
        "--prefix-workload",
        action="store_true",
        help="instead of capacity and throughput: one long document and --questions questions about "
        "it, concurrently and in turns, stock vs razor with prefix caching on (TTFT, prefill "
        "tokens computed, requests held at once, throughput)",
    )

    model = parser.add_argument_group("model and razor")
    model.add_argument(
        "--model",
        default="default",
        help="Hugging Face checkpoint dir ('default': the embedded SmolLM2-135M-Instruct), or "
        f"synthetic:NAME, a model shape with random weights ({', '.join(synthetic.SHAPES)})",
    )
    model.add_argument(
        "--retrieval-share",
        type=float,
        default=SYNTHETIC_SHARE,
        metavar="F",
        help=f"synthetic models: share of KV heads drawn (seeded) as retrieval heads (default: {SYNTHETIC_SHARE})",
    )
    runinfo.add_profile_option(model)
    model.add_argument("--window", type=int, help="razor window W (default: the profile's)")
    model.add_argument("--sink", type=int, help="razor sink S (default: the profile's)")
    model.add_argument(
        "--prefill",
        default="exact",
        choices=["exact", "compressed"],
        help="razor's prefill mode (default: exact, the paper's)",
    )
    model.add_argument(
        "--compression-ratio",
        type=float,
        default=None,
        metavar="C",
        help="serve razor with the paper's window rule max(window, N/C) (default: the fixed "
        f"window); the bytes-per-rule table uses C={analytic.PAPER_RATIO:g} without it",
    )
    model.add_argument(
        "--tp",
        type=int,
        default=1,
        metavar="N",
        help="analytic part: tensor-parallel size (per-rank heads and what balancing costs)",
    )
    model.add_argument(
        "--tp-balance",
        choices=["promote", "pad"],
        help="razor option tp_balance for --tp (default: promote when the profile has scores)",
    )
    model.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bfloat16", "float16", "float32"],
        help="model and KV dtype for every engine and the analytic part (default: auto, as vLLM "
        "picks it; on CPUs without avx512_bf16/AMX float32 runs several times faster)",
    )

    engine = parser.add_argument_group("engines")
    engine.add_argument(
        "--stock-backend",
        metavar="NAME",
        help="attention backend of the stock engines, e.g. FLASH_ATTN (default: vLLM's choice)",
    )
    engine.add_argument(
        "--eager", action="store_true", help="no torch.compile / CUDA graphs on a GPU (always eager on CPU)"
    )

    sizes = parser.add_argument_group("sizes")
    sizes.add_argument(
        "--contexts",
        type=runinfo.int_list,
        metavar="N,N,...",
        help="request lengths (prompt + generated) for the analytic and capacity parts; each "
        "capacity engine runs with max_model_len = N (default: 2k,4k,8k; --quick: 1k,2k)",
    )
    kv = sizes.add_mutually_exclusive_group()
    kv.add_argument(
        "--kv-gib",
        type=float,
        metavar="G",
        help="KV cache size of every engine, GiB (default: capacity: stock holds 2 full requests; "
        "throughput: stock holds the widest batch at the longest context)",
    )
    kv.add_argument("--kv-bytes", type=int, metavar="B", help="the same in bytes")
    sizes.add_argument(
        "--throughput-contexts",
        type=runinfo.int_list,
        metavar="N,N,...",
        help="prompt lengths of the throughput part (default: 1k,4k; --quick: 512,1k)",
    )
    sizes.add_argument(
        "--batches",
        type=runinfo.int_list,
        metavar="B,B,...",
        help="requests decoded together in the throughput part (default: 1,8; --quick: 1,4)",
    )
    sizes.add_argument(
        "--decode-tokens",
        type=int,
        metavar="N",
        help="decode steps timed with the whole batch decoding (default: 32; --quick: 16)",
    )
    sizes.add_argument(
        "--repeat",
        type=int,
        default=1,
        metavar="N",
        help="throughput: run each point N times, keep the best (default: 1)",
    )
    sizes.add_argument(
        "--interleave",
        action="store_true",
        help="throughput: keep the stock and razor engines up at once and alternate each point's runs "
        "between them, so a machine whose speed drifts (shared, noisy) slows both sides of a ratio alike; "
        "needs memory for both engines (default: one engine after the other)",
    )
    sizes.add_argument(
        "--chunk",
        type=int,
        default=512,
        metavar="T",
        help="max_num_batched_tokens (chunked prefill) of every engine (default: 512)",
    )
    sizes.add_argument("--seed", type=int, default=0, help="seed of the random-token prompts (default: 0)")
    sizes.add_argument(
        "--doc-tokens",
        type=int,
        default=6000,
        metavar="N",
        help="--prefix-workload: tokens of the shared document (default: 6000)",
    )
    sizes.add_argument(
        "--questions", type=int, default=8, metavar="N", help="--prefix-workload: questions per phase (default: 8)"
    )
    sizes.add_argument(
        "--question-tokens",
        type=int,
        default=32,
        metavar="N",
        help="--prefix-workload: tokens of each question (default: 32)",
    )
    sizes.add_argument(
        "--answer-tokens",
        type=int,
        default=32,
        metavar="N",
        help="--prefix-workload: tokens generated per question (default: 32)",
    )

    out = parser.add_argument_group("output")
    out.add_argument("--out", default=DEFAULT_OUT, metavar="JSON", help=f"results file (default: {DEFAULT_OUT})")
    out.add_argument("--plot", metavar="PNG", help="also draw the results (needs matplotlib)")
    out.add_argument(
        "--format",
        default="auto",
        choices=tables.FORMATS,
        help="table style (default: rich when installed)",
    )
    runinfo.add_verbose_option(out)


# --------------------------------------------------------------------------------------------------
@runinfo.quiet_unless_verbose
def run(args: argparse.Namespace) -> int:
    preset = QUICK if args.quick else FULL
    contexts = args.contexts or preset["contexts"]
    tp_contexts = args.throughput_contexts or preset["tp_contexts"]
    batches = args.batches or preset["batches"]
    decode_tokens = args.decode_tokens or preset["decode_tokens"]
    kv_fixed = _kv_fixed(args)
    args.load_format = args.synthetic = None
    try:
        runinfo.check_window_sink(args.window, args.sink)
        if args.stock_backend:
            _check_stock_backend(args.stock_backend)
        if synthetic.is_synthetic(args.model):
            _prepare_synthetic(args)
        model_dir, profile = runinfo.model_and_profile(args.model, args.profile, need_model=not args.skip_engine)
        dtype = runinfo.resolve_dtype(args.dtype, model_dir)
        if args.compression_ratio is not None and args.compression_ratio <= 1:
            raise ValueError("--compression-ratio must be > 1")
        geo = analytic.geometry(
            profile,
            dtype,
            window=args.window,
            sink=args.sink,
            tp_size=args.tp,
            tp_balance=args.tp_balance,
            **_rule(args),
        )
        if args.tp > 1 and not args.skip_engine:
            raise ValueError("--tp > 1 is analytic only: add --skip-engine")
    except (ProfileError, ValueError, FileNotFoundError, OSError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2

    args.eager = args.eager or args.skip_engine or not _has_cuda()  # graphs only where engines run on a GPU
    kv_for = {c: kv_fixed or analytic.default_kv_bytes(geo, c, STOCK_REQUESTS) for c in contexts}
    results: dict[str, Any] = dict(
        meta=_meta(args, dtype, profile, model_dir, contexts, tp_contexts, batches, decode_tokens, kv_fixed),
        analytic=analytic.analytic_report(geo, contexts, args.chunk, kv_for, **_paper_ratio(args)),
    )
    failures = 0
    if args.prefix_workload and not args.skip_engine:
        results["prefix_workload"], failures = _prefix_workload(args, model_dir, geo)
    elif not args.skip_engine:
        engine_results, failures = _engine_parts(
            args, model_dir, geo, contexts, kv_for, tp_contexts, batches, decode_tokens
        )
        results.update(engine_results)
        # Redo the arithmetic with what the engines reported (block size, in-flight tokens).
        seen = results.pop("_engine_geometry", None)
        if seen and (seen["block_size"] != geo.stock_block_size or seen["in_flight"] != args.chunk):
            geo = geo.with_stock_block_size(seen["block_size"])
            results["analytic"] = analytic.analytic_report(
                geo, contexts, seen["in_flight"], kv_for, **_paper_ratio(args)
            )
    runinfo.finish_meta(results["meta"])
    runinfo.write_results(results, report.tables(results), args.format, Path(args.out))
    if args.plot:
        png = report.plot(results, Path(args.plot))
        print(
            f"wrote {png}" if png else f"{PROG}: --plot needs matplotlib (pip install matplotlib); skipped",
            file=sys.stderr,
        )
    return 1 if failures else 0


def _rule(args: argparse.Namespace) -> dict[str, Any]:
    return dict(exact_prefill=args.prefill == "exact", compression_ratio=args.compression_ratio)


def _paper_ratio(args: argparse.Namespace) -> dict[str, Any]:
    return {} if args.compression_ratio is None else dict(paper_ratio=args.compression_ratio)


def _kv_fixed(args: argparse.Namespace) -> Optional[int]:
    return args.kv_bytes if args.kv_bytes is not None else (int(args.kv_gib * (1 << 30)) if args.kv_gib else None)


def _prepare_synthetic(args: argparse.Namespace) -> None:
    """Point ``args`` at a synthetic checkpoint and its saved profile; engines load dummy weights."""
    sink = args.sink if args.sink is not None else SYNTHETIC_SINK
    window = args.window if args.window is not None else SYNTHETIC_WINDOW
    if args.profile:
        raise ValueError(
            "--profile cannot be combined with a synthetic model (its profile is drawn at random, "
            "or for synthetic:<bundled profile> the bundled one)"
        )
    if synthetic.is_bundled(args.model):
        args.retrieval_share = None  # the bundled profile's heads, not a drawn share
    command = runinfo.command_line(args, "bench")
    model_dir, profile_path = synthetic.prepare(args.model, args.retrieval_share, args.seed, sink, window, command)
    args.synthetic, args.model, args.profile, args.load_format = args.model, str(model_dir), str(profile_path), "dummy"


def _check_stock_backend(name: str) -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    if name.upper() not in AttentionBackendEnum.__members__ or name.upper() == "RAZOR":
        known = ", ".join(m for m in AttentionBackendEnum.__members__ if "MLA" not in m and m != "RAZOR")
        raise ValueError(f"--stock-backend {name}: not one of vLLM's attention backends ({known})")


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _engine_kwargs(args, model_dir: Path, dtype: str, backend: str, **overrides) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(
        model=str(model_dir),
        enforce_eager=args.eager,
        dtype=dtype,
        seed=args.seed,
        max_num_batched_tokens=args.chunk,
        enable_prefix_caching=False,  # fresh random prompts would not hit (--prefix-workload turns it on)
    )
    if args.load_format:
        kwargs["load_format"] = args.load_format
    if backend == "stock" and args.stock_backend:
        kwargs["attention_backend"] = args.stock_backend
    if backend == "razor":
        razor = {k: v for k, v in (("window", args.window), ("sink", args.sink)) if v is not None}
        razor["prefill"] = args.prefill
        if args.compression_ratio is not None:
            razor.update(window_rule="paper", compression_ratio=args.compression_ratio)
        if args.profile:
            razor["profile"] = args.profile
        kwargs.update(attention_backend="razor", additional_config={"razor": razor})
    kwargs.update(overrides)
    return kwargs


def _each_backend(
    what: str,
    args,
    model_dir: Path,
    dtype: str,
    sizes: dict[str, Any],
    measure: Callable[[dict[str, dict[str, Any]]], dict[str, Any]],
    bar=None,
    together: bool = False,
) -> tuple[dict[str, Any], int]:
    """``measure({backend: engine_kwargs})`` for stock, then for razor, or (``together``) once for
    both engines up at once; each engine sized by ``sizes`` (``max_model_len``, KV bytes,
    ``max_num_seqs``). ``measure`` returns {backend: result}; this returns every backend's result, or
    ``{"error": ...}`` where its call failed, and how many failed. A failure is reported and recorded,
    and the other backend still runs; ``bar`` (tqdm) shows which engine runs and counts it done,
    without it each start is printed."""
    results: dict[str, Any] = {}
    failures = 0
    for group in [BACKENDS] if together else [(backend,) for backend in BACKENDS]:
        label = " and ".join(group)
        if bar is not None:
            bar.set_description(f"{what} {label}")
        else:
            print(f"{PROG}: {what}, {label}", file=sys.stderr)
        try:
            results.update(measure({b: _engine_kwargs(args, model_dir, dtype, b, **sizes) for b in group}))
        except Exception as exc:  # noqa: BLE001 - record and go on with the other runs
            results.update({b: dict(error=f"{type(exc).__name__}: {exc}") for b in group})
            failures += len(group)
            print(f"{PROG}: {what} {label} failed: {exc}", file=sys.stderr)
        if bar is not None:
            bar.update(len(group))
    return results, failures


def _per_engine(measure_one: Callable[[str, dict[str, Any]], Any]):
    """An ``_each_backend`` measure from ``measure_one(backend, engine_kwargs)`` (one engine at a time)."""
    return lambda kwargs_by_backend: {b: measure_one(b, kwargs) for b, kwargs in kwargs_by_backend.items()}


def _engine_parts(args, model_dir, geo, contexts, kv_for, tp_contexts, batches, decode_tokens):
    from tqdm import tqdm

    results: dict[str, Any] = {}
    failures = 0
    units = (0 if args.skip_capacity else 2 * len(contexts)) + (0 if args.skip_throughput else 2)
    bar = tqdm(total=units, desc="bench", unit="engine", dynamic_ncols=True, file=sys.stderr)
    seen_geometry: dict[str, int] = {}
    try:
        if not args.skip_capacity:
            results["capacity"] = []
            for ctx in contexts:
                entry, bad = _capacity_at(args, model_dir, geo, ctx, kv_for[ctx], bar, seen_geometry)
                results["capacity"].append(entry)
                failures += bad
        if not args.skip_throughput:
            results["throughput"], results["throughput_engines"], bad = _throughput(
                args, model_dir, geo, tp_contexts, batches, decode_tokens, bar
            )
            failures += bad
    finally:
        bar.close()
    if seen_geometry:
        results["_engine_geometry"] = seen_geometry
    return results, failures


def _capacity_at(args, model_dir, geo, ctx, kv_bytes, bar, seen_geometry) -> tuple[dict[str, Any], int]:
    from razor_vllm.bench.capacity import measure_capacity

    max_tokens = max(32, min(256, ctx // 8))
    prompt = ctx - max_tokens
    razor_blocks = geo.razor_num_blocks(kv_bytes)
    steady = razor_blocks / geo.razor_steady_pages(ctx)
    num_requests = int((razor_blocks - 1) // geo.razor_steady_pages(ctx)) + 3  # more than razor can hold
    entry: dict[str, Any] = dict(
        context=ctx,
        kv_bytes=kv_bytes,
        prompt_tokens=prompt,
        max_tokens=max_tokens,
        num_requests=num_requests,
        razor_steady_concurrency=steady,
    )

    def measure(backend: str, kwargs: dict[str, Any]) -> dict[str, Any]:
        res = measure_capacity(
            kwargs,
            num_requests,
            prompt,
            max_tokens,
            backend,
            seed=args.seed + ctx,
            stop_at_first_finish=True,
            stop_when_saturated=True,
            on_step=lambda running, waiting: bar.set_postfix(running=running, waiting=waiting, refresh=False),
        )
        d = res.as_dict()
        d.update(d.pop("extra"))
        if backend == "stock":
            seen_geometry.update(block_size=d["block_size"], in_flight=d["max_in_flight_tokens"])
        return d

    measured, failures = _each_backend(
        f"capacity {ctx}",
        args,
        model_dir,
        geo.dtype,
        dict(max_model_len=ctx, kv_cache_memory_bytes=kv_bytes, max_num_seqs=num_requests + 1),
        _per_engine(measure),
        bar,
    )
    entry.update(measured)
    s, r = entry.get("stock", {}), entry.get("razor", {})
    if "peak_running" in s and "peak_running" in r:
        entry["ratio_measured"] = r["peak_running"] / s["peak_running"] if s["peak_running"] else None
        sc, rc = s.get("vllm_max_concurrency"), r.get("vllm_max_concurrency")
        entry["ratio_vllm_logged"] = rc / sc if sc and rc else None
        stock_conc = s["num_gpu_blocks"] / geo.stock_blocks(ctx)
        entry["ratio_theory_steady"] = steady / stock_conc
    return entry, failures


def _fits(geo: analytic.KVGeometry, backend: str, chunk: int, vllm_block_size: Optional[int] = None):
    """Why ``batch`` requests of ``context + max_tokens`` cannot all be in flight in an engine's KV
    cache (None when they can): stock holds every block; razor holds the steady pages of the
    requests already decoding plus one admission (window + a prefill chunk in the local pool).

    Blocks are counted in the engine's units: stock's block size is the one its engine reports;
    razor's engine reports the smaller of its pools' blocks (``KVGeometry.reported_block_size``), planned
    from vLLM's block size (``vllm_block_size``, read from the stock engine), so razor's check runs
    only when that plan matches the engine."""

    def check(context: int, batch: int, max_tokens: int, info: dict[str, Any]) -> Optional[str]:
        tokens = context + max_tokens
        if backend == "stock":
            need = batch * geo.with_stock_block_size(info["block_size"]).stock_blocks(tokens)
        else:
            engine = geo.with_stock_block_size(vllm_block_size or geo.stock_block_size)
            if engine.reported_block_size != info["block_size"]:
                return None  # not the layout this engine planned: run the point rather than guess
            need = engine.pool.batch_pages(batch, tokens, chunk)
        have = info["num_gpu_blocks"]
        return f"needs {need} blocks, the KV cache has {have}" if need > have else None

    return check


def _throughput(args, model_dir, geo, contexts, batches, decode_tokens, bar):
    """Throughput points of stock and razor: one engine after the other, or (``--interleave``) both
    up at once with each point's runs alternating; rows with razor/stock ratios, each engine's
    settings, failures."""
    from razor_vllm.bench.throughput import ThroughputEngine, max_tokens_for, measure_throughput

    longest, widest = max(contexts), max(batches)
    max_model_len = longest + max_tokens_for(longest, widest, args.chunk, decode_tokens) + 8
    # Room for the widest batch at the longest context in stock (razor needs far less), plus 10%.
    kv_bytes = _kv_fixed(args) or int(1.1 * widest * geo.stock_blocks(max_model_len) * geo.stock_block_bytes)
    points: dict[str, dict[tuple[int, int], dict]] = {}
    started: dict[str, dict[str, Any]] = {}  # engine settings by backend: razor's layout is planned from stock's

    def fits(engine: ThroughputEngine, context: int, batch: int, max_tokens: int) -> Optional[str]:
        stock_block = started.get("stock", {}).get("block_size")
        return _fits(geo, engine.backend, args.chunk, vllm_block_size=stock_block)(
            context, batch, max_tokens, engine.info
        )

    def measure(kwargs_by_backend: dict[str, dict[str, Any]]) -> dict[str, Any]:
        with contextlib.ExitStack() as stack:
            engines = [
                stack.enter_context(ThroughputEngine(kwargs, backend, contexts, args.seed + 1000))
                for backend, kwargs in kwargs_by_backend.items()
            ]
            started.update({e.backend: e.info for e in engines})
            measured = measure_throughput(
                engines,
                contexts,
                batches,
                args.chunk,
                decode_tokens,
                seed=args.seed + 1000,
                on_point=lambda p: bar.set_postfix(
                    ctx=p.context, batch=p.batch, prefill=f"{p.prefill_tok_s:.0f}", decode=f"{p.decode_tok_s:.1f}"
                ),
                repeat=args.repeat,
                fits=fits,
            )
        for backend, pts in measured.items():
            points[backend] = {(p.context, p.batch): p.as_dict() for p in pts}
        return {e.backend: e.info for e in engines}

    sizes = dict(max_model_len=max_model_len, kv_cache_memory_bytes=kv_bytes, max_num_seqs=widest)
    engines, failures = _each_backend(
        "throughput", args, model_dir, geo.dtype, sizes, measure, bar, together=args.interleave
    )
    rows = []
    if "stock" in points and "razor" in points:
        for key in sorted(points["stock"].keys() | points["razor"].keys()):
            s, r = points["stock"].get(key), points["razor"].get(key)
            both = s is not None and r is not None
            rows.append(
                dict(
                    context=key[0],
                    batch=key[1],
                    stock=s,
                    razor=r,
                    ratio_prefill=r["prefill_tok_s"] / s["prefill_tok_s"] if both else None,
                    ratio_decode=r["decode_tok_s"] / s["decode_tok_s"] if both else None,
                )
            )
    return rows, engines, failures


def _prefix_workload(args, model_dir, geo) -> tuple[dict[str, Any], int]:
    """Stock, then razor, on the prefix-cache workload (``bench/prefix.py``), in the same KV bytes."""
    from razor_vllm.bench.prefix import compare, measure_prefix_workload

    if min(args.doc_tokens, args.questions, args.question_tokens, args.answer_tokens) < 1:
        raise ValueError("--doc-tokens, --questions, --question-tokens and --answer-tokens must be >= 1")
    request_tokens = args.doc_tokens + args.question_tokens + args.answer_tokens
    max_model_len = request_tokens + 16
    # Default: stock holds STOCK_REQUESTS whole requests without sharing; with the document shared
    # it holds many more, so both backends can show how many they run at once.
    kv_bytes = _kv_fixed(args) or analytic.default_kv_bytes(geo, request_tokens, STOCK_REQUESTS)
    phases: dict[str, list[dict[str, Any]]] = {}

    def measure(backend: str, kwargs: dict[str, Any]) -> dict[str, Any]:
        pts, info = measure_prefix_workload(
            kwargs,
            backend,
            args.doc_tokens,
            args.questions,
            args.question_tokens,
            args.answer_tokens,
            seed=args.seed + 2000,
        )
        phases[backend] = [p.as_dict() for p in pts]
        return info

    engines, failures = _each_backend(
        "prefix workload",
        args,
        model_dir,
        geo.dtype,
        dict(max_model_len=max_model_len, kv_cache_memory_bytes=kv_bytes, max_num_seqs=max(2 * args.questions, 8)),
        _per_engine(measure),
    )
    workload = dict(
        doc_tokens=args.doc_tokens,
        questions=args.questions,
        question_tokens=args.question_tokens,
        answer_tokens=args.answer_tokens,
        kv_cache_bytes=kv_bytes,
    )
    return dict(workload=workload, engines=engines, phases=phases, rows=compare(phases)), failures


# --------------------------------------------------------------------------------------------------
def _meta(args, dtype, profile, model_dir, contexts, tp_contexts, batches, decode_tokens, kv_fixed) -> dict[str, Any]:
    return runinfo.start_meta(
        args,
        "bench",
        model=str(model_dir) if model_dir else args.model,
        synthetic=args.synthetic
        and dict(shape=args.synthetic, retrieval_share=args.retrieval_share, load_format=args.load_format),
        stock_backend=args.stock_backend or "vLLM's choice",
        cuda_graphs=not args.eager,
        profile=args.profile or f"bundled ({profile.model.architecture})",
        dtype=dtype,
        window=args.window if args.window is not None else profile.window,
        sink=args.sink if args.sink is not None else profile.sink,
        contexts=list(contexts),
        kv_bytes="per context: stock holds 2 full requests" if kv_fixed is None else kv_fixed,
        throughput=dict(
            contexts=list(tp_contexts),
            batches=list(batches),
            decode_tokens=decode_tokens,
            repeat=args.repeat,
            interleave=args.interleave,
        ),
        max_num_batched_tokens=args.chunk,
    )


def main(argv: Optional[Sequence[str]] = None) -> int:  # for `python -m razor_vllm.bench.command`
    return runinfo.command_main(PROG, __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
