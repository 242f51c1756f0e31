"""The GPU check: prove or disprove razor's GPU path in one command on a bare CUDA machine; one JSON report.

    scripts/gpu_check.sh [--dry] [--out out/gpu_check.json] [--only SECTION,...]

Runs on a machine with torch, Triton, pytest and transformers but no vLLM (``make gpu-kit`` carries
vLLM's Triton attention files under an import shim; see scripts/gpu_kit.py). Sections, each timed and
reported on its own (a failure is recorded and the next section runs):

- ``environment``: device, versions, and that ``vllm`` is the kit's shim (not an installed vLLM).
- ``kernel_checks``: every check of tests/kernels/test_triton_kernels.py (store, local attention in both prefill
  modes with per-request windows, block tails, retrieval through vLLM's ``unified_attention`` 2D and
  split-key paths, fp8) against the float64 oracle, on the device.
- ``model_shapes``: retrieval and local kernels against the oracle at the per-rank head shapes of the
  default model (SmolLM2-135M: 9 q / 3 KV heads, D=64), Llama-3-8B (32 / 8, D=128) and Llama-3-70B at
  TP=8 (8 / 1, D=128), in bf16, fp16 and fp32, with chunked prefill, decode, padding and freed blocks.
- ``cuda_graphs``: decode steps of both pools captured once in a CUDA graph and replayed with padding
  requests/tokens while requests finish and blocks are recycled (the retrieval pool on the split path).
- ``profiler``: the head profiler on a tiny random Llama with the model on the device.
- ``timings``: one layer's attention at 8k/32k/128k context, decode (batch 8) and a 512-token prefill
  chunk: razor (retrieval heads through vLLM's kernel on our pool + local heads through ours) against
  what stock vLLM runs for every head (vLLM's ``unified_attention`` over the full cache in its own
  layout, and torch's flash SDPA); medians of ``triton.testing.do_bench``, and razor/stock ratios.

``--dry``: the same code on CPU in Triton's interpreter at small shapes and contexts (no timings are
meaningful there), so CI proves the kit and this script work (tests/kernels/test_gpu_kit.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DRY_CONTEXTS = [64, 160]
# the interpreter is slow: a few (model, kind) pairs
DRY_SHAPES = {("smollm2-135m", "retrieval"), ("llama3-70b-tp8", "local"), ("llama3-70b-tp8", "retrieval")}
SECTIONS = ["environment", "kernel_checks", "model_shapes", "cuda_graphs", "profiler", "timings"]


@dataclass(frozen=True)
class ModelShape:
    """One layer's attention heads on one tensor-parallel rank."""

    name: str
    num_q_heads: int
    num_kv_heads: int
    head_size: int

    @property
    def g(self) -> int:
        return self.num_q_heads // self.num_kv_heads


MODELS = [
    ModelShape("smollm2-135m", 9, 3, 64),
    ModelShape("llama3-8b", 32, 8, 128),
    ModelShape("llama3-70b-tp8", 8, 1, 128),
]


# ---------------------------------------------------------------------------------------------
# Sections


def environment(device: str, dry: bool) -> dict:
    import torch
    import triton
    import vllm

    info = dict(
        torch=torch.__version__,
        triton=triton.__version__,
        python=platform.python_version(),
        vllm_module=vllm.__file__,
        vllm_version=getattr(vllm, "__version__", "?"),
        kit_shim=bool(getattr(vllm, "SHIM", False)),
        interpreter=os.environ.get("TRITON_INTERPRET") == "1",
        host=platform.node(),
        device=device,
    )
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=props.name,
            capability=f"{props.major}.{props.minor}",
            sms=props.multi_processor_count,
            memory_gib=round(props.total_memory / 2**30, 1),
        )
    if not info["kit_shim"]:
        raise RuntimeError(f"vllm is {vllm.__file__}, not the kit's shim: put .gpukit/site first on PYTHONPATH")
    return info


def kernel_checks(device: str, dry: bool) -> dict:
    import test_triton_kernels as ttk

    names = ttk.CPU_CHECKS
    if dry:  # the interpreter is slow: one check per kind proves the wiring (CI runs all of them elsewhere)
        names = [n for n in names if n in DRY_CHECKS]
    results, failed = {}, []
    for name in names:
        start = time.perf_counter()
        try:
            ttk.CHECKS[name](device)
            results[name] = dict(ok=True, seconds=round(time.perf_counter() - start, 2))
        except Exception:  # noqa: BLE001  (every check is reported)
            results[name] = dict(ok=False, seconds=round(time.perf_counter() - start, 2), error=traceback.format_exc())
            failed.append(name)
    if failed:
        raise CheckFailed(f"{len(failed)} of {len(names)} kernel checks failed: {failed}", results)
    return results


# one_step_against_reference: block tails, local attention (both modes) and paged attention against
# the PyTorch reference in one mixed step.
DRY_CHECKS = {"paged_float8_e4m3fn_2d", "store_kv_matches_write_kv", "one_step_against_reference"}


def model_shapes(device: str, dry: bool) -> dict:
    import test_triton_kernels as ttk
    import torch

    from kernel_sim import Case

    dtypes = [torch.bfloat16, torch.float16, torch.float32]
    # Lengths cross block boundaries, S + W and several windows (blocks are freed behind the window);
    # chunks of up to 300 queries; seed 4 gives schedules (with recomputed prompts, as local_run makes
    # them) that mix prefill chunks with decodes at both sizes (local_run asserts it).
    lengths, max_chunk, window, block = ([7, 60], 24, 16, 16) if dry else ([1, 150, 333, 600], 300, 128, 32)
    if dry:
        dtypes = [torch.bfloat16]
    results, failed = {}, []
    for model in MODELS:
        n_kv = min(model.num_kv_heads, 1 if dry else model.num_kv_heads)
        for dtype in dtypes:
            for kind in ("retrieval", "local"):
                if dry and (model.name, kind) not in DRY_SHAPES:
                    continue
                key = f"{model.name}/{str(dtype)[6:]}/{kind}"
                start = time.perf_counter()
                try:
                    if kind == "retrieval":
                        case = Case(
                            block_size=187 if not dry else 23,
                            sink=0,
                            window=1,
                            num_kv_heads=n_kv,
                            g=model.g,
                            pool_heads=n_kv + 1,
                            head_offset=1,
                            head_size=model.head_size,
                        )
                        ttk.paged_run(device, case, dtype, seed=1, lengths=lengths, max_chunk=max_chunk)
                    else:
                        case = Case(
                            block_size=block,
                            sink=4,
                            window=window,
                            num_kv_heads=n_kv,
                            g=model.g,
                            pool_heads=n_kv + 1,
                            head_offset=1,
                            head_size=model.head_size,
                        )
                        # exact prefill (the default) always; the compressed mode too on a GPU
                        for mode in ("exact",) if dry else ("exact", "compressed"):
                            ttk.local_run(
                                device,
                                case,
                                dtype,
                                seed=4,
                                lengths=lengths,
                                max_chunk=max_chunk,
                                mode=mode,
                            )
                    results[key] = dict(ok=True, seconds=round(time.perf_counter() - start, 2))
                except Exception:  # noqa: BLE001
                    results[key] = dict(
                        ok=False, seconds=round(time.perf_counter() - start, 2), error=traceback.format_exc()
                    )
                    failed.append(key)
    if failed:
        raise CheckFailed(f"{len(failed)} of {len(results)} model-shape checks failed: {failed}", results)
    return results


def cuda_graphs(device: str, dry: bool) -> dict:
    if device != "cuda":
        return dict(skipped="needs CUDA (capture and replay are CUDA graphs)")
    import test_triton_kernels as ttk

    start = time.perf_counter()
    ttk.cuda_graph_decode(device)
    return dict(ok=True, seconds=round(time.perf_counter() - start, 2))


def profiler(device: str, dry: bool) -> dict:
    import torch

    from razor_vllm.profile import selector_for
    from razor_vllm.profile.scoring import load_model

    from tiny_models import build_tiny_llama

    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny_llama(Path(tmp) / "tiny", num_layers=2 if dry else 4, seed=0)
        model = load_model(str(path), dtype=torch.float32).to(device)
        tokens = 128 if dry else 2048
        selection = selector_for(path, tokens=tokens, block_size=128).select(model)
        profile = selection.to_profile(window=64)
    return dict(ok=True, device=device, tokens=tokens, retrieval_heads=profile.retrieval_heads)


def timings(device: str, dry: bool) -> dict:
    """Razor's layer against stock vLLM's at long context; see benchmarks/bench_triton.py."""
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_triton

    contexts = DRY_CONTEXTS if dry else [8192, 32768, 131072]
    models = [ModelShape("dry-gqa", 4, 2, 32)] if dry else MODELS[1:]
    rows = []
    gen = torch.Generator().manual_seed(0)
    for model in models:
        for context in contexts:
            for batch, q_len in ((2, 1), (1, 8)) if dry else ((8, 1), (1, 512)):
                rows += bench_triton.long_context(model, context, batch, q_len, torch.bfloat16, gen, device)
    return dict(rows=rows, ratios=bench_triton.ratios(rows))


class CheckFailed(Exception):
    def __init__(self, message: str, details: dict):
        super().__init__(message)
        self.details = details


# ---------------------------------------------------------------------------------------------
# Driver


def run(sections: list[str], device: str, dry: bool, out: Path, budget_s: float) -> dict:
    report = dict(dry=dry, device=device, started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), sections={})
    start = time.perf_counter()
    for name in sections:
        if time.perf_counter() - start > budget_s:
            report["sections"][name] = dict(status="skipped", reason=f"over the {budget_s:.0f} s budget")
            continue
        t0 = time.perf_counter()
        try:
            result = globals()[name](device, dry)
            status = "skipped" if isinstance(result, dict) and "skipped" in result else "ok"
            entry = dict(status=status, result=result)
        except CheckFailed as exc:
            entry = dict(status="failed", error=str(exc), result=exc.details)
        except Exception:  # noqa: BLE001
            entry = dict(status="failed", error=traceback.format_exc())
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        report["sections"][name] = entry
        print(f"[gpu-check] {name}: {entry['status']} ({entry['seconds']} s)", flush=True)
        if entry["status"] == "failed":
            print(str(entry.get("error"))[-2000:], flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1, default=str))  # after every section: a kill keeps the rest
    report["seconds"] = round(time.perf_counter() - start, 1)
    report["ok"] = all(s["status"] != "failed" for s in report["sections"].values())
    out.write_text(json.dumps(report, indent=1, default=str))
    return report


def summary(report: dict) -> str:
    lines = [
        f"GPU check ({'dry, interpreter' if report['dry'] else report['device']}): "
        f"{'PASS' if report['ok'] else 'FAIL'} in {report['seconds']} s"
    ]
    for name, entry in report["sections"].items():
        lines.append(f"  {name:14s} {entry['status']:8s} {entry.get('seconds', '')}")
    timing = report["sections"].get("timings", {}).get("result") or {}
    for ratio in timing.get("ratios", []):
        lines.append(
            f"  {ratio['model']:15s} {ratio['phase']:8s} {ratio['context']:>7d}  razor/stock-vllm "
            f"{ratio['razor_over_stock_vllm']:.3f}  razor/flash-sdpa {ratio['razor_over_flash_sdpa']:.3f}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry", action="store_true", help="CPU, Triton interpreter, small shapes")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out")) / "gpu_check.json")
    parser.add_argument("--only", default="", help="comma-separated sections (default: all)")
    parser.add_argument("--budget-s", type=float, default=270.0, help="skip sections that would start later")
    args = parser.parse_args()
    if args.dry:
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel is decorated
    sys.path[:0] = [str(ROOT / "tests" / "kernels"), str(ROOT / "tests"), str(ROOT)]
    import torch

    if args.dry:
        torch.set_num_threads(1)
        import test_triton_kernels as ttk

        ttk._interpret_bf16_as_a_gpu_does()
        ttk._interpret_helper_calls_without_repatching()
        device = "cpu"
    elif not torch.cuda.is_available():
        print("gpu_check needs a CUDA GPU (or --dry for the CPU interpreter run)", file=sys.stderr)
        raise SystemExit(2)
    else:
        device = "cuda"
    sections = [s for s in args.only.split(",") if s] or SECTIONS
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"--only: unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    report = run(sections, device, args.dry, args.out, args.budget_s)
    print(summary(report))
    print(f"wrote {args.out}")
    raise SystemExit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
