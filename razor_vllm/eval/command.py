"""``razor-vllm eval``: razor vs the full cache vs StreamingLLM, through the real vLLM engine.

    razor-vllm eval [--modes full,razor,streaming,random] [--tasks passkey,niah_number,...]
                    [--contexts 1k,2k,4k] [--depths 0,0.25,0.5,0.75,1] [--samples N]
                    [--fidelity-contexts 2k,4k] [--fidelity-samples N] [--fidelity-tokens T]
                    [--sweep retrieval_share=5%,10%,15%,25% | window=64,128,256 | sink=0,4,16 | compensation=on,off]
                    [--window W] [--sink S] [--out out/eval.json] [--plot-dir out/eval]

Every mode is one vLLM engine over the same model and weights (``full``: stock attention;
``razor``: the head profile; ``streaming``: every head local with the same sink and window;
``random``: the profile's number of retrieval heads chosen at random). Tasks are generated locally
from a seed (RULER / needle-in-a-haystack style), greedy, scored by string match. Fidelity: on
Moby-Dick (installed at set-up from the npm registry), each mode is teacher-forced through the
same continuation after a long prefix and its next-token distributions compared with the full
cache's (KL, top-1 agreement, NLL), plus greedy-continuation agreement.

Prints tables, writes a JSON file and PNG plots (the needle heatmap per mode, accuracy and fidelity
against the KV budget). ``razor_vllm.cli`` calls :func:`add_arguments` and :func:`run`.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from razor_vllm.common import runinfo, tables
from razor_vllm.config import ProfileError

PROG = "razor-vllm eval"
DEFAULT_OUT = "out/eval.json"
DEFAULT_TASKS = ("passkey", "niah_number", "niah_uuid", "multikey", "variable_tracking", "common_words")

FULL = dict(
    contexts=[1024, 2048, 4096],
    depths=[0.0, 0.25, 0.5, 0.75, 1.0],
    samples=2,
    fidelity_contexts=[2048, 4096],
    fidelity_samples=4,
    fidelity_tokens=64,
    greedy_tokens=32,
)
QUICK = dict(
    contexts=[1024, 2048],
    depths=[0.25, 0.75],
    samples=1,
    fidelity_contexts=[1024],
    fidelity_samples=2,
    fidelity_tokens=32,
    greedy_tokens=16,
)


def _float_list(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"depths are fractions in [0, 1], got {text!r}")
    return values


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _sweep(text: str) -> tuple[str, list[str]]:
    name, sep, values = text.partition("=")
    if not sep or not values:
        raise argparse.ArgumentTypeError(f"--sweep takes NAME=V1,V2,... (e.g. window=64,128,256), got {text!r}")
    return name.strip().replace("-", "_"), _names(values)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    what = parser.add_argument_group("what to run")
    what.add_argument(
        "--quick",
        action="store_true",
        help="small grids: contexts 1k,2k, depths 0.25,0.75, 1 sample, fidelity at 1k (minutes)",
    )
    what.add_argument(
        "--modes",
        type=_names,
        metavar="M,M,...",
        help="engine modes among full, razor, streaming, random (default: full,razor,streaming; "
        "with --sweep: full,streaming)",
    )
    what.add_argument(
        "--tasks",
        type=_names,
        metavar="T,T,...",
        help=f"synthetic tasks (default: {','.join(DEFAULT_TASKS)}; 'none' for fidelity only)",
    )
    what.add_argument(
        "--sweep",
        type=_sweep,
        action="append",
        metavar="NAME=V,V,...",
        help="razor variants along one setting: retrieval_share (e.g. 5%%,10%%,15%%,25%%), window, "
        "sink, compensation (on,off), prefill; given twice (e.g. retrieval_share and window), every "
        "combination (the grid of the accuracy-vs-budget front)",
    )

    grid = parser.add_argument_group("task grid")
    grid.add_argument(
        "--contexts", type=runinfo.int_list, metavar="N,N,...", help="prompt lengths in tokens (default 1k,2k,4k)"
    )
    grid.add_argument(
        "--depths",
        type=_float_list,
        metavar="D,D,...",
        help="needle depths in [0, 1] for tasks with one needle (default 0,0.25,0.5,0.75,1)",
    )
    grid.add_argument("--samples", type=int, metavar="N", help="samples per task, context and depth (default 2)")
    grid.add_argument(
        "--haystack",
        choices=["noise", "text"],
        default="noise",
        help="filler around needles: RULER's repeated noise sentences or Moby-Dick (default: noise)",
    )
    grid.add_argument("--seed", type=int, default=0, help="seed of every generated sample (default 0)")
    grid.add_argument(
        "--split",
        choices=["evaluation", "calibration"],
        default="evaluation",
        help="calibration: tasks from other seeds and other wording than the evaluation set, to "
        "choose settings (retrieval share, window) on before reporting the evaluation set",
    )

    fid = parser.add_argument_group("fidelity on natural text")
    fid.add_argument(
        "--fidelity-contexts",
        type=runinfo.int_list,
        metavar="N,N,...",
        help="prefix lengths of the Moby-Dick slices (default 2k,4k)",
    )
    fid.add_argument("--fidelity-samples", type=int, metavar="N", help="slices per length (default 4; 0: skip)")
    fid.add_argument("--fidelity-tokens", type=int, metavar="T", help="teacher-forced tokens per slice (default 64)")
    fid.add_argument("--greedy-tokens", type=int, metavar="T", help="greedy continuation tokens (default 32)")

    model = parser.add_argument_group("model and razor")
    model.add_argument(
        "--model", default="default", help="Hugging Face checkpoint dir ('default': the embedded SmolLM2-135M-Instruct)"
    )
    runinfo.add_profile_option(model)
    model.add_argument("--window", type=int, help="window W of local heads (default: the profile's)")
    model.add_argument("--sink", type=int, help="sink S of local heads (default: the profile's)")
    model.add_argument("--no-compensation", action="store_true", help="razor/streaming without the compensation token")
    model.add_argument(
        "--prefill",
        type=_names,
        default=["exact"],
        metavar="M[,M]",
        help="razor's prefill mode(s): exact (the paper, default), compressed; two modes run every "
        "razor-backed variant in both",
    )
    model.add_argument(
        "--dtype",
        default="float32",
        choices=["auto", "bfloat16", "float16", "float32"],
        help="model and KV dtype (default float32: exact comparisons, and fastest on CPUs without bf16 units)",
    )
    model.add_argument("--kv-gib", type=float, default=2.0, metavar="G", help="KV cache of every engine (default 2)")
    model.add_argument("--chunk", type=int, default=2048, metavar="T", help="max_num_batched_tokens (default 2048)")
    model.add_argument("--max-num-seqs", type=int, default=16, metavar="N", help="requests batched (default 16)")
    model.add_argument(
        "--no-prefix-caching",
        action="store_true",
        help="engines without prefix caching (default: on, as vLLM serves; prompts of one task and depth share "
        "their text up to the needle, so each engine computes that part once)",
    )
    model.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="N",
        help="engines run at once, each in its own process (on a CPU: on its own cores; vLLM's CPU worker "
        "uses all but one core, so --jobs 2 on 2 cores uses both)",
    )

    out = parser.add_argument_group("output")
    out.add_argument("--out", default=DEFAULT_OUT, metavar="JSON", help=f"results file (default: {DEFAULT_OUT})")
    out.add_argument("--plot-dir", metavar="DIR", help="write heatmap.png and budget.png there (needs matplotlib)")
    out.add_argument("--format", default="auto", choices=tables.FORMATS)
    out.add_argument("--keep-logprobs", action="store_true", help="keep the teacher-forced log-prob files")
    runinfo.add_verbose_option(out)


@runinfo.quiet_unless_verbose
def run(args: argparse.Namespace) -> int:
    from razor_vllm.eval import report
    from razor_vllm.eval.evaluation import ContextTooLong, Evaluation, Grid

    preset = QUICK if args.quick else FULL
    try:
        grid = Grid(
            tasks=[] if args.tasks == ["none"] else list(args.tasks or DEFAULT_TASKS),
            contexts=args.contexts or preset["contexts"],
            depths=args.depths or preset["depths"],
            samples=args.samples if args.samples is not None else preset["samples"],
            haystack=args.haystack,
            seed=args.seed,
            fidelity_contexts=args.fidelity_contexts or preset["fidelity_contexts"],
            fidelity_samples=args.fidelity_samples if args.fidelity_samples is not None else preset["fidelity_samples"],
            fidelity_tokens=args.fidelity_tokens or preset["fidelity_tokens"],
            greedy_tokens=args.greedy_tokens if args.greedy_tokens is not None else preset["greedy_tokens"],
            split=args.split,
        )
        grid.check()
        model_dir, profile = runinfo.model_and_profile(args.model, args.profile, need_model=True)
        variants = _variants(args, profile)
    except (ProfileError, ValueError, FileNotFoundError, OSError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2

    out = Path(args.out)
    work_dir = out.parent / (out.stem + "-work")
    evaluation = Evaluation(
        model_dir=Path(model_dir),
        variants=variants,
        grid=grid,
        work_dir=work_dir,
        dtype=runinfo.resolve_dtype(args.dtype, model_dir),
        kv_bytes=int(args.kv_gib * (1 << 30)),
        chunk=args.chunk,
        max_num_seqs=args.max_num_seqs,
        prefix_caching=not args.no_prefix_caching,
        jobs=args.jobs,
    )
    meta = _meta(args, profile, model_dir, evaluation)
    try:
        results = evaluation.run()
    except ContextTooLong as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # the corpus missing, an engine failing: say what, keep the traceback in --verbose
        if args.verbose:
            raise
        print(f"{PROG}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        if not args.keep_logprobs:
            shutil.rmtree(work_dir / "logprobs", ignore_errors=True)
    runinfo.finish_meta(meta)
    results = dict(meta=meta, **results)
    runinfo.write_results(results, report.tables(results), args.format, out)
    if args.plot_dir:
        written = report.plots(results, Path(args.plot_dir))
        for path in written:
            print(f"wrote {path}", file=sys.stderr)
        if not written:
            print(f"{PROG}: --plot-dir needs matplotlib (pip install matplotlib); skipped", file=sys.stderr)
    return 0


def _variants(args: argparse.Namespace, profile) -> list:
    from razor_vllm.eval.variants import base_variants, grid_variants, with_prefill_modes

    runinfo.check_window_sink(args.window, args.sink)
    compensation = False if args.no_compensation else profile.compensation
    default_modes = ["full", "streaming"] if args.sweep else ["full", "razor", "streaming"]
    modes = args.modes or default_modes
    if "full" not in modes:
        modes = ["full"] + modes  # everything is measured against it
    variants = with_prefill_modes(
        base_variants(modes, profile, args.sink, args.window, compensation, seed=args.seed), args.prefill
    )
    if args.sweep:
        swept = grid_variants(args.sweep, profile, args.sink, args.window, compensation)
        prefill_swept = any(name == "prefill" for name, _ in args.sweep)
        variants += swept if prefill_swept else with_prefill_modes(swept, args.prefill)
    labels = [v.label for v in variants]
    if len(set(labels)) != len(labels):
        raise ValueError(f"two variants share a label: {labels}")
    return variants


def _meta(args, profile, model_dir, evaluation) -> dict[str, Any]:
    return runinfo.start_meta(
        args,
        "eval",
        model=str(model_dir),
        profile=args.profile or f"bundled ({profile.model.architecture})",
        profile_summary=profile.summary(),
        dtype=evaluation.dtype,
        kv_bytes=evaluation.kv_bytes,
        max_num_batched_tokens=evaluation.chunk,
        variants=[v.describe() for v in evaluation.variants],
        grid=evaluation.grid.describe(),
    )


def main(argv: Optional[Sequence[str]] = None) -> int:  # python -m razor_vllm.eval.command
    return runinfo.command_main(PROG, __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
