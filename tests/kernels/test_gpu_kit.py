"""The GPU check kit works: assembled from the installed vLLM, the shim satisfies vLLM's kernel files,
and the whole check runs end to end in its dry mode (CPU, Triton interpreter, small shapes).

The real check runs on a lent GPU (docs/benchmarks.md, "GPU check"); this proves the kit and the
script themselves, so a lent machine's few minutes are not spent on an import error.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import gpu_kit  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402

DRY_TIMEOUT_S = 900


@pytest.fixture(scope="module")
def kit(tmp_path_factory) -> Path:
    pytest.importorskip("triton")
    path = tmp_path_factory.mktemp("gpukit")
    gpu_kit.build(path, wheels=False)
    return path


def test_kit_holds_vllms_kernel_files_under_a_shim(kit):
    manifest = json.loads((kit / "MANIFEST.json").read_text())
    import vllm

    installed = Path(vllm.__file__).parent
    for path in gpu_kit.COPIED:  # copied verbatim from the installed package
        assert (kit / "site" / "vllm" / path).read_text() == (installed / path).read_text()
        assert manifest["files"][f"site/vllm/{path}"]["origin"].startswith("vllm ")
    assert manifest["vllm"] == __import__("importlib.metadata").metadata.version("vllm")
    assert manifest["bytes"] < gpu_kit.MAX_KIT_BYTES
    # The shim's KVQuantMode is the installed one, member for member.
    from vllm.v1.kv_cache_interface import KVQuantMode

    text = (kit / "site/vllm/v1/kv_cache_interface.py").read_text()
    assert all(f"    {m.name} = {int(m.value)}" in text for m in KVQuantMode)


def test_kernel_imports_from_the_kit_alone(kit):
    """A fresh interpreter with the kit first on the path imports vLLM's kernel from the kit, and
    razor's retrieval wrapper finds it there."""
    code = (
        "import vllm, razor_vllm.triton_kernels.paged as p; assert vllm.SHIM, vllm.__file__; "
        "f = p._unified_attention(); print(vllm.__file__, f.__module__)"
    )
    env = {**os.environ, "PYTHONPATH": f"{kit / 'site'}:{ROOT}", "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert str(kit) in proc.stdout and "triton_unified_attention" in proc.stdout


def test_import_check_names_what_the_shim_lacks():
    """The kit refuses to build when vLLM's files import something the shim does not define (as
    after a vLLM upgrade): shown by checking a source that imports one more name."""
    sources = gpu_kit.shim_sources("test")
    for path in gpu_kit.COPIED:
        sources[path] = (Path(gpu_kit.vllm_package()) / path).read_text()
    assert gpu_kit.check_imports(sources) == []
    first = gpu_kit.COPIED[0]
    sources[first] = (
        "from vllm.platforms import current_platform, new_thing\nimport vllm.distributed\n" + sources[first]
    )
    problems = gpu_kit.check_imports(sources)
    assert any("new_thing" in p for p in problems) and any("vllm.distributed" in p for p in problems), problems


def test_gpu_check_refuses_without_a_gpu_unless_dry(kit):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the check would run")
    env = {**os.environ, "GPU_CHECK_KIT": str(kit), "GPU_CHECK_PYTHON": sys.executable}
    proc = subprocess.run([str(ROOT / "scripts/gpu_check.sh")], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "needs a CUDA GPU" in proc.stderr
    env["GPU_CHECK_KIT"] = str(kit / "missing")
    proc = subprocess.run([str(ROOT / "scripts/gpu_check.sh")], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "make gpu-kit" in proc.stderr


def test_gpu_check_dry_run(kit, tmp_path):
    """The whole check in its dry mode: every section runs (CUDA graphs skip without CUDA) and the
    JSON report says what ran, with timings rows and razor/stock ratios for each context."""
    out = tmp_path / "report.json"
    env = {**os.environ, "GPU_CHECK_KIT": str(kit), "GPU_CHECK_PYTHON": sys.executable}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(
        [str(ROOT / "scripts/gpu_check.sh"), "--dry", "--out", str(out), "--budget-s", "800"],
        env=env,
        capture_output=True,
        text=True,
        timeout=DRY_TIMEOUT_S,
    )
    report = json.loads(out.read_text()) if out.exists() else {}
    sections = report.get("sections", {})
    failures = {k: v.get("error") for k, v in sections.items() if v["status"] == "failed"}
    assert proc.returncode == 0 and report.get("ok"), (failures, proc.stdout[-3000:], proc.stderr[-3000:])
    assert [k for k, v in sections.items() if v["status"] == "ok"] == [
        "environment",
        "kernel_checks",
        "model_shapes",
        "profiler",
        "timings",
    ]
    assert sections["cuda_graphs"]["status"] == "skipped"
    env_info = sections["environment"]["result"]
    assert env_info["kit_shim"] and env_info["vllm_module"].startswith(str(kit)) and env_info["interpreter"]
    assert all(r["ok"] for r in sections["kernel_checks"]["result"].values())
    shapes = sections["model_shapes"]["result"]
    ran = {(k.split("/")[0], k.split("/")[2]) for k in shapes if "/" in k}
    assert ran == gpu_check.DRY_SHAPES and all(v["ok"] for v in shapes.values())
    assert gpu_check.DRY_CHECKS <= sections["kernel_checks"]["result"].keys()
    timing = sections["timings"]["result"]
    ops = {r["op"] for r in timing["rows"]}
    assert {"stock_vllm", "flash_sdpa", "razor_retrieval", "razor_local"} <= ops, ops
    assert {(r["phase"], r["context"]) for r in timing["ratios"]} == {
        (phase, context) for phase in ("decode", "prefill") for context in gpu_check.DRY_CONTEXTS
    }
    assert all(r["razor_over_stock_vllm"] > 0 for r in timing["ratios"])
    assert "GPU check (dry, interpreter): PASS" in proc.stdout


def test_kernels_come_from_this_checkout():
    """With PYTHONPATH=<checkout> (worktrees, the GPU machine with nothing installed), the Triton
    kernels are this checkout's triton_kernels/, not those of wherever an editable install points."""
    import razor_vllm.triton_kernels as tk

    assert Path(tk.__file__).resolve().parent == ROOT / "triton_kernels"
