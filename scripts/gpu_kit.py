"""Assemble the GPU check kit (``make gpu-kit``): what a bare CUDA machine needs beside this checkout.

The lent GPU machine has torch, Triton, pytest and transformers but no vLLM and no network. Our
retrieval heads run vLLM's own Triton ``unified_attention``, so the kit carries vLLM's Triton
attention files, copied at kit time from the *installed* vllm package (nothing of vLLM is
committed), under a small import shim that provides exactly the names those files import from the
rest of vLLM. The kit also carries, as wheels, the few pure-Python packages the profiler needs that
the machine lacks (pydantic and its dependencies; downloaded once with pip if the cache is empty).

    python scripts/gpu_kit.py [--kit .gpukit] [--no-wheels]

Layout of the kit (an ignored folder; carry it with the device tool's ``carry``):
    .gpukit/site/vllm/...          the shim and the copied files (put .gpukit/site first on PYTHONPATH)
    .gpukit/wheels/*.whl           cp312 manylinux wheels for the profiler (optional)
    .gpukit/MANIFEST.json          vLLM version, every file with its sha256 and origin, total size

The shim is checked here: every ``from vllm... import name`` at module level of the copied files must
resolve to a shim module that defines ``name`` (an AST walk), and the copied kernel must import
from the kit alone in a fresh interpreter (tests/kernels/test_gpu_kit.py).
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_KIT_BYTES = 40 * 2**20  # the device tool carries 64 MiB per call, checkout included

# vLLM's files, copied verbatim (relative to the vllm package).
COPIED = [
    "v1/attention/ops/triton_unified_attention.py",
    "v1/attention/ops/triton_attention_helpers.py",
]
# Imported lazily by the copied files, only on paths razor never takes (KVQuantMode.INT4_PER_TOKEN_HEAD).
NOT_CARRIED = {"vllm.v1.attention.ops.int4_per_token_head": "only for kv_quant_mode=INT4_PER_TOKEN_HEAD"}

# Profiler dependencies missing from the GPU image (KINDS.md lists what it has): name -> import name.
WHEELS = {
    "pydantic": "pydantic",
    "pydantic_core": "pydantic_core",
    "annotated-types": "annotated_types",
    "typing-inspection": "typing_inspection",
}

SHIM = {
    "__init__.py": '''"""Import shim for vLLM's Triton attention kernels on a machine without vLLM
(made by make gpu-kit).

Not vLLM: only the names vLLM's triton_unified_attention.py and triton_attention_helpers.py import.
"""

__version__ = {version!r}
SHIM = True
''',
    "envs.py": '''"""vllm.envs, as far as the copied kernels read it."""

VLLM_BATCH_INVARIANT = False
''',
    "logger.py": '''"""vllm.logger.init_logger: a plain logging logger."""

import logging


def init_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)
''',
    "platforms/__init__.py": '''"""vllm.platforms.current_platform: the CUDA questions the copied kernels ask
(CPU: the interpreter)."""

import torch


class _Platform:
    def is_cuda(self) -> bool:
        return torch.cuda.is_available()

    def is_rocm(self) -> bool:
        return False

    def fp8_dtype(self) -> torch.dtype:
        return torch.float8_e4m3fn  # vLLM's CUDA fp8 (ROCm's fnuz is not carried)

    def get_device_capability(self):
        if not torch.cuda.is_available():
            return None
        return torch.cuda.get_device_capability()

    def is_device_capability(self, capability) -> bool:
        current = self.get_device_capability()
        if current is None:
            return False
        if isinstance(capability, int):
            return current[0] * 10 + current[1] == capability
        return tuple(current) == tuple(capability)

    def is_device_capability_family(self, capability: int) -> bool:
        current = self.get_device_capability()
        return current is not None and (current[0] * 10 + current[1]) // 10 == capability // 10

    def num_compute_units(self) -> int:
        return torch.cuda.get_device_properties(0).multi_processor_count if torch.cuda.is_available() else 1


current_platform = _Platform()
''',
    "triton_utils/__init__.py": '''"""vllm.triton_utils: Triton itself
(the shim is only used where Triton is installed)."""

import triton
import triton.language as tl

HAS_TRITON = True
''',
    "v1/__init__.py": "",
    "v1/attention/__init__.py": "",
    "v1/attention/ops/__init__.py": "",
    "v1/kv_cache_interface.py": '''"""vllm.v1.kv_cache_interface.KVQuantMode, with the installed vLLM's members
(written at kit time)."""

from enum import IntEnum


class KVQuantMode(IntEnum):
{members}
''',
}


def vllm_package() -> Path:
    import vllm

    return Path(vllm.__file__).resolve().parent


def shim_sources(version: str) -> dict[str, str]:
    from vllm.v1.kv_cache_interface import KVQuantMode

    members = "\n".join(f"    {m.name} = {int(m.value)}" for m in KVQuantMode)
    return {path: text.format(version=version, members=members) for path, text in SHIM.items()}


def module_of(path: str) -> str:
    return "vllm." + path.removesuffix(".py").removesuffix("/__init__").replace("/", ".")


def imported_names(source: str) -> list[tuple[str, str, bool]]:
    """(module, name, at module level) for every ``import vllm...`` / ``from vllm... import name``."""
    tree = ast.parse(source)
    top = set(map(id, tree.body))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "vllm":
            found += [(node.module, alias.name, id(node) in top) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name, "", id(node) in top) for alias in node.names if alias.name.startswith("vllm")]
    return found


def defined_names(source: str) -> set[str]:
    tree = ast.parse(source)
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def check_imports(sources: dict[str, str]) -> list[str]:
    """Problems: imports of the copied files that the kit does not satisfy."""
    modules = {module_of(path): defined_names(text) for path, text in sources.items()}
    problems = []
    for path in COPIED:
        for module, name, top in imported_names(sources[path]):
            if module in NOT_CARRIED and not top:
                continue
            if module not in modules:
                problems.append(f"{path} imports {module} (not in the kit)")
            elif name and name not in modules[module] and f"{module}.{name}" not in modules:
                problems.append(f"{path} imports {name} from {module} (the kit's {module} lacks it)")
    return problems


def download_wheels(dest: Path) -> list[str]:
    """cp312 manylinux wheels of the installed versions (the GPU image runs Python 3.12)."""
    from importlib.metadata import version

    dest.mkdir(parents=True, exist_ok=True)
    pins = [f"{name}=={version(name)}" for name in WHEELS]
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        "3.12",
        "--implementation",
        "cp",
        "-d",
        str(dest),
        "-q",
        "--disable-pip-version-check",
    ]
    for tag in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"):
        cmd += ["--platform", tag]
    have = {p.name.split("-")[0].lower().replace("_", "-") for p in dest.glob("*.whl")}
    missing = [p for p in pins if p.split("==")[0].lower().replace("_", "-") not in have]
    if missing:
        subprocess.run(cmd + missing, check=True, timeout=300)
    return sorted(p.name for p in dest.glob("*.whl"))


def build(kit: Path, wheels: bool) -> dict:
    pkg = vllm_package()
    from importlib.metadata import version

    vllm_version = version("vllm")
    site = kit / "site" / "vllm"
    if site.exists():
        shutil.rmtree(site)
    sources = shim_sources(vllm_version)
    for path in COPIED:
        sources[path] = (pkg / path).read_text()
    problems = check_imports(sources)
    if problems:
        raise SystemExit("the kit's shim does not satisfy vLLM's kernel files:\n  " + "\n  ".join(problems))
    files = {}
    for path, text in sources.items():
        target = site / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        files[f"site/vllm/{path}"] = dict(
            sha256=hashlib.sha256(text.encode()).hexdigest(),
            origin=f"vllm {vllm_version}: {path}" if path in COPIED else "shim (scripts/gpu_kit.py)",
        )
    wheel_names = download_wheels(kit / "wheels") if wheels else []
    total = sum(p.stat().st_size for p in kit.rglob("*") if p.is_file())
    if total > MAX_KIT_BYTES:
        raise SystemExit(f"the kit is {total / 2**20:.1f} MiB, over {MAX_KIT_BYTES / 2**20:.0f} MiB")
    manifest = dict(vllm=vllm_version, files=files, wheels=wheel_names, not_carried=NOT_CARRIED, bytes=total)
    (kit / "MANIFEST.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kit", type=Path, default=ROOT / ".gpukit")
    parser.add_argument("--no-wheels", action="store_true", help="skip the profiler's wheels (no download)")
    args = parser.parse_args()
    manifest = build(args.kit, wheels=not args.no_wheels)
    print(
        f"GPU kit in {args.kit}: vLLM {manifest['vllm']}'s {len(COPIED)} Triton attention files + shim, "
        f"{len(manifest['wheels'])} wheels, {manifest['bytes'] / 2**20:.2f} MiB"
    )


if __name__ == "__main__":
    main()
