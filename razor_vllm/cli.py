"""``razor-vllm``: the things vLLM itself does not do (prepare the default model, profile heads, ...).

Serving is plain vLLM: ``vllm serve MODEL --attention-backend razor``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import ModuleType
from typing import Callable, Optional


def _model_prepare(args: argparse.Namespace) -> int:
    from razor_vllm.model import prepare_default_model

    path = prepare_default_model(Path(args.dir) if args.dir else None, force=args.force)
    print(path)
    return 0


def _model_path(args: argparse.Namespace) -> int:
    from razor_vllm.model import default_model_dir, is_prepared

    path = default_model_dir()
    if not is_prepared(path):
        print(f"{path} (not prepared yet: run `razor-vllm model prepare`)", file=sys.stderr)
        return 1
    print(path)
    return 0


def _add_model_commands(sub: argparse._SubParsersAction) -> None:
    model = sub.add_parser("model", help="the embedded default model (SmolLM2-135M-Instruct)")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    prepare = model_sub.add_parser(
        "prepare", help="convert the packaged GGUF into a safetensors checkpoint vLLM can serve (once)"
    )
    prepare.add_argument("--dir", help="target directory (default: $RAZOR_VLLM_CACHE/models/SmolLM2-135M-Instruct)")
    prepare.add_argument("--force", action="store_true", help="convert again even if already prepared")
    prepare.set_defaults(func=_model_prepare)
    path = model_sub.add_parser("path", help="print the prepared checkpoint's directory")
    path.set_defaults(func=_model_path)


def _add_tool_command(
    sub: argparse._SubParsersAction, name: str, command: ModuleType, help: str, raw_description: bool = True
) -> None:
    """``razor-vllm NAME``: ``command`` (a ``razor_vllm.*.command`` module) declares its arguments and runs."""
    extra = dict(formatter_class=argparse.RawDescriptionHelpFormatter) if raw_description else {}
    parser = sub.add_parser(name, help=help, description=command.__doc__, **extra)
    command.add_arguments(parser)
    parser.set_defaults(func=command.run)


def build_parser() -> argparse.ArgumentParser:
    from razor_vllm.bench import command as bench
    from razor_vllm.eval import command as evaluate
    from razor_vllm.profile import command as profile

    parser = argparse.ArgumentParser(prog="razor-vllm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_model_commands(sub)
    _add_tool_command(
        sub,
        "profile",
        profile,
        "find a model's retrieval heads and write its head profile (YAML)",
        raw_description=False,
    )
    _add_tool_command(
        sub, "bench", bench, "razor vs stock: KV bytes per token/request, max concurrency, prefill/decode throughput"
    )
    _add_tool_command(
        sub, "eval", evaluate, "razor vs full cache vs StreamingLLM through vLLM: long-context tasks, fidelity, plots"
    )
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv[1:]  # the subcommand's own arguments, recorded in profile provenance
    func: Callable[[argparse.Namespace], int] = args.func
    return func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
