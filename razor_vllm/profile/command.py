"""``razor-vllm profile``: find a model's retrieval heads and write its head profile (YAML).

    razor-vllm profile --model DIR [--out configs/NAME.yaml]          probe (or Theorem 1 for ALiBi)
    razor-vllm profile --from-scores PROFILE.yaml --induction-ratio R [--window W] [--note TEXT]
                                                                       re-select, no probe
    razor-vllm profile --model DIR --import-duo full_attention_heads.tsv [--threshold T | --ratio R]
    razor-vllm profile --model DIR --import-retrieval-head head_score.json [--threshold T | --ratio R]
    razor-vllm profile --model DIR --import-kvzip head_score/M-*.pt (--threshold T | --ratio R)
    razor-vllm profile list                                            the bundled profiles

``razor_vllm.cli`` calls :func:`add_arguments` and :func:`run`. The exact command line is recorded in
the profile's provenance (a ``--note`` text, stored in ``provenance.note``, as ``<provenance.note>``):
set ``args.argv`` to the arguments after ``profile`` to record them; without it they are taken from
``sys.argv``. ``--out`` may name the ``--from-scores`` file itself: it is read before anything is written.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Optional

from razor_vllm.common import runinfo
from razor_vllm.config import ProfileError, RazorProfile, check_profile_matches, resolve_profile

from . import DEFAULT_SINK, DEFAULT_WINDOW, reselect, selector_for
from .importers import DuoAttentionImport, KVzipImport, RetrievalHeadImport
from .probe import PAPER_REPEATS, default_tokens, default_vocab_range
from .selectors import context_length_of, fingerprint_of, hf_config_of

PROG = "razor-vllm profile"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "action", nargs="?", choices=["list"], help="list: show the bundled profiles (model, heads, share, source)"
    )
    src = parser.add_argument_group("what to profile")
    src.add_argument(
        "--model",
        metavar="DIR",
        help="Hugging Face checkpoint dir ('default': the embedded SmolLM2-135M-Instruct); "
        "required unless --from-scores",
    )
    how = src.add_mutually_exclusive_group()
    how.add_argument("--from-scores", metavar="PROFILE", help="re-select from a profile's stored scores (no probe)")
    how.add_argument("--import-duo", metavar="TSV", help="import DuoAttention's full_attention_heads.tsv")
    how.add_argument("--import-retrieval-head", metavar="JSON", help="import a Retrieval Head head_score/*.json")
    how.add_argument(
        "--import-kvzip",
        metavar="PT",
        nargs="+",
        help="import KVzip utils/head_score/*.pt (several: elementwise max); needs --ratio or --threshold",
    )
    parser.add_argument("--out", metavar="PATH", help="write the profile here (default: print the YAML to stdout)")

    probe = parser.add_argument_group("probe (echo/induction scores)")
    probe.add_argument(
        "--tokens",
        type=int,
        metavar="N",
        help="random tokens per repeat (default: the paper's 2500, fewer if 1 + N x R exceeds the model's context)",
    )
    probe.add_argument("--repeats", type=int, default=PAPER_REPEATS, metavar="R", help="repeats (default: 4)")
    probe.add_argument(
        "--vocab-low",
        type=int,
        metavar="ID",
        help="lowest random id (default: 10000 when the vocabulary has 12500 ids, else a band mid-vocabulary)",
    )
    probe.add_argument("--vocab-high", type=int, metavar="ID", help="random ids are < this (default: 12500, see above)")
    probe.add_argument("--seed", type=int, default=0, help="probe seed (default: 0)")
    probe.add_argument(
        "--block-size", type=int, default=512, metavar="Q", help="queries per scoring block (default: 512)"
    )
    probe.add_argument(
        "--key-block-size",
        type=int,
        default=1024,
        metavar="K",
        help="keys per scoring tile (streaming softmax; peak scorer memory heads x Q x K x 8 bytes; default: 1024; "
        "0: exact full rows, memory growing with the probe length)",
    )

    run = parser.add_argument_group("where the model runs")
    run.add_argument(
        "--device",
        default="auto",
        help="cpu, cuda, cuda:N or auto (default: auto = cuda when a GPU is visible, else cpu)",
    )
    run.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weights and activations (default: auto = bfloat16 on a GPU, float32 on the CPU); "
        "scores are always computed in float32",
    )
    run.add_argument(
        "--device-map",
        choices=["auto"],
        help="auto: spread the layers over every visible GPU with accelerate (for models larger than one GPU)",
    )

    sel = parser.add_argument_group("selection")
    sel.add_argument(
        "--induction-ratio",
        type=float,
        default=0.14,
        metavar="R",
        help="share of KV heads chosen by induction score (default: 0.14)",
    )
    sel.add_argument(
        "--echo-ratio", type=float, default=0.01, metavar="R", help="share of KV heads by echo (default: 0.01)"
    )
    sel.add_argument(
        "--threshold",
        type=float,
        metavar="T",
        help="imports: keep heads scoring >= T (default: 0.5 DuoAttention, 0.1 Retrieval Head; KVzip: none)",
    )
    sel.add_argument("--ratio", type=float, metavar="R", help="imports: keep this global share of KV heads instead")
    sel.add_argument(
        "--alibi-eps", type=float, default=1e-3, metavar="EPS", help="ALiBi models: Theorem 1's eps (default: 1e-3)"
    )
    sel.add_argument(
        "--context-length",
        type=int,
        metavar="N",
        help="ALiBi models: heads reaching N tokens are retrieval heads (default: the model config's)",
    )

    prof = parser.add_argument_group("profile defaults")
    prof.add_argument(
        "--sink",
        type=int,
        help=f"sink tokens of local heads (default: {DEFAULT_SINK}; --from-scores: the stored profile's)",
    )
    prof.add_argument(
        "--window",
        type=int,
        help=f"recent-token window of local heads (default: {DEFAULT_WINDOW}; ALiBi: the longest local range; "
        "--from-scores: the stored profile's)",
    )
    prof.add_argument(
        "--note",
        metavar="TEXT",
        help="why this profile is what it is (e.g. the calibration run that chose the ratios), kept in its provenance",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary on stderr")


def run(args: argparse.Namespace) -> int:
    if getattr(args, "action", None) == "list":
        sys.stdout.write(list_bundled())
        return 0
    try:
        profile, stats = _build(args, command_line(args))
    except (ProfileError, ValueError, NotImplementedError, FileNotFoundError, OSError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    if args.out:
        path = profile.save(args.out)
        RazorProfile.load(path)  # what we wrote must load
    else:
        sys.stdout.write(profile.to_yaml())
    if not args.quiet:
        extra = "".join(f", {k.replace('_', ' ')} {v}" for k, v in stats.items())
        where = f" -> {args.out}" if args.out else ""
        print(f"{profile.provenance.method}: {profile.summary()}{extra}{where}", file=sys.stderr)
    return 0


def list_bundled(search_dir: Optional[Path] = None) -> str:
    """A table of the bundled profiles: name, model, retrieval heads, share, sink/window, source."""
    from razor_vllm.config import bundled_profile_paths

    rows = [("profile", "model", "heads", "share", "sink/window", "source")]
    for path in bundled_profile_paths(search_dir):
        p = RazorProfile.load(path)
        prov = p.provenance
        if prov.repository:
            repository = prov.repository.removeprefix("https://github.com/")
            source = f"{prov.method}: {repository}@{(prov.commit or '')[:7]} ({prov.license})"
        else:
            source = prov.method
        model = p.model_names[0] if p.model_names else f"{p.model.architecture} ({p.model.num_layers} layers)"
        rows.append(
            (
                path.stem,
                model,
                f"{p.num_retrieval_heads}/{p.total_kv_heads}",
                f"{100 * p.retrieval_share:.1f}%",
                f"{p.sink}/{p.window}",
                source,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() + "\n" for r in rows)


NOTE_PLACEHOLDER = "<provenance.note>"


def command_line(args: argparse.Namespace) -> str:
    """The command as typed; a ``--note`` text is stored once, in ``provenance.note``, and named here."""
    shown, after_note = [], False
    for arg in runinfo.subcommand_argv(args, "profile"):
        if after_note:
            shown.append(NOTE_PLACEHOLDER)
        elif arg.startswith("--note="):
            shown.append("--note=" + NOTE_PLACEHOLDER)
        else:
            shown.append(arg)
        after_note = arg == "--note" and not after_note
    return "razor-vllm profile " + shlex.join(shown)


def _model_dir(args: argparse.Namespace) -> Optional[Path]:
    if args.model is None:
        return None
    if args.model == "default":
        from razor_vllm.model import prepare_default_model

        return prepare_default_model(progress=not args.quiet)
    path = Path(args.model)
    if not (path / "config.json").is_file():
        raise ProfileError(f"--model {args.model}: not a Hugging Face checkpoint dir (no config.json)")
    return path


def _build(args: argparse.Namespace, command: str) -> tuple[RazorProfile, dict]:
    model_dir = _model_dir(args)
    if args.from_scores:
        stored = resolve_profile(args.from_scores)  # a path or a bundled profile name
        if model_dir is not None:
            check_profile_matches(stored, fingerprint_of(model_dir), source=args.from_scores)
        profile = reselect(
            stored,
            args.induction_ratio,
            args.echo_ratio,
            sink=args.sink,
            window=args.window,
            command=command,
            note=args.note,
        )
        return profile, {}
    if model_dir is None:
        raise ProfileError("--model DIR is required (unless --from-scores)")
    if args.key_block_size < 0:
        raise ProfileError(f"--key-block-size must be >= 0 (0: exact rows), got {args.key_block_size}")
    if args.threshold is not None and args.ratio is not None:
        raise ProfileError("give --threshold or --ratio, not both")
    if args.import_duo or args.import_retrieval_head or args.import_kvzip:
        if args.import_duo:
            selector = DuoAttentionImport(args.import_duo, threshold=args.threshold, ratio=args.ratio)
        elif args.import_kvzip:
            selector = KVzipImport(args.import_kvzip, threshold=args.threshold, ratio=args.ratio)
        else:
            selector = RetrievalHeadImport(args.import_retrieval_head, threshold=args.threshold, ratio=args.ratio)
    else:
        if args.threshold is not None or args.ratio is not None:
            raise ProfileError("--threshold/--ratio apply to --import-duo/--import-retrieval-head/--import-kvzip only")
        selector = selector_for(
            model_dir,
            tokens=args.tokens,
            repeats=args.repeats,
            vocab_range=_vocab_range(args, model_dir),
            seed=args.seed,
            induction_ratio=args.induction_ratio,
            echo_ratio=args.echo_ratio,
            block_size=args.block_size,
            alibi_eps=args.alibi_eps,
            context_length=args.context_length,
            progress=not args.quiet,
            device=args.device,
            dtype=args.dtype,
            device_map=args.device_map,
            key_block_size=args.key_block_size or None,
            show_estimate=not args.quiet,
        )
    selection = selector.select(model_dir)
    sink = DEFAULT_SINK if args.sink is None else args.sink
    profile = selection.to_profile(sink=sink, window=args.window, command=command, note=args.note)
    return profile, selection.stats


def _vocab_range(args: argparse.Namespace, model_dir: Path) -> Optional[tuple[int, int]]:
    if args.vocab_low is None and args.vocab_high is None:
        return None
    hf_config = hf_config_of(model_dir)
    vocab = fingerprint_of(model_dir).vocab_size
    low, high = default_vocab_range(vocab, args.tokens or default_tokens(args.repeats, context_length_of(hf_config)))
    low = low if args.vocab_low is None else args.vocab_low
    high = high if args.vocab_high is None else args.vocab_high
    if not 0 <= low < high <= vocab:
        raise ProfileError(f"--vocab-low/--vocab-high: need 0 <= low < high <= vocab size {vocab}, got [{low}, {high})")
    return low, high
