"""Realistic model shapes without their weights, for benchmarks: a checkpoint dir that holds only a
config (the engine runs with vLLM's ``load_format="dummy"``, random weights) and a synthetic head
profile that keeps a seeded random share of KV heads as retrieval heads.

Attention time and KV-cache size depend on shapes alone, so razor can be measured on 8B-class
models where no weights can be downloaded. The tokenizer (and so the vocabulary) is the default
model's: Llama-3's real 128k vocabulary would only grow the embedding and LM head, which neither
pool touches. Benchmarks use random token ids and ``ignore_eos``, so generated text never matters.

    razor-vllm bench --model synthetic:llama-3-8b --retrieval-share 0.15 --contexts 8192,32768

``synthetic:<bundled profile>`` (``synthetic:llama-3.1-8b-instruct``, ...) instead takes that model's
real public config (``configs/models/<name>.json``, vocabulary included) and the profile that razor
picks for it automatically (``config.find_profile_for``), so a bundled profile is checked against
its model's real shapes without the weights.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

PREFIX = "synthetic:"


def _llama(
    hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, head_dim: int, rope_theta: float, tied: bool
) -> dict:
    return dict(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rope_theta=rope_theta,
        tie_word_embeddings=tied,
    )


# Only what differs from the default model's Llama config. ``tiny`` is for CPU tests of the machinery.
SHAPES: dict[str, dict] = {
    # name: hidden size, MLP size, layers, attention heads, KV heads, head_dim, rope_theta, tied embeddings
    "llama-3-8b": _llama(4096, 14336, 32, 32, 8, 128, 500000.0, False),
    "llama-3-70b": _llama(8192, 28672, 80, 64, 8, 128, 500000.0, False),
    "llama-3.2-1b": _llama(2048, 8192, 16, 32, 8, 64, 500000.0, True),
    "tiny": _llama(128, 256, 4, 4, 2, 32, 10000.0, True),
}
MAX_POSITIONS = 131072
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def is_synthetic(model: str) -> bool:
    return model.startswith(PREFIX)


def bundled_model_configs() -> dict[str, Path]:
    """Bundled profile name -> its model's public config.json values (configs/models/<name>.json)."""
    from razor_vllm.config import bundled_profiles_dir

    return {p.stem: p for p in sorted((bundled_profiles_dir() / "models").glob("*.json"))}


def shape_name(model: str) -> str:
    name = model.removeprefix(PREFIX)
    if name not in SHAPES and name not in bundled_model_configs():
        choices = ", ".join([*SHAPES, *bundled_model_configs()])
        raise ValueError(f"--model {model}: unknown synthetic shape {name!r}; choose from {choices}")
    return name


def is_bundled(model: str) -> bool:
    return model.removeprefix(PREFIX) in bundled_model_configs()


def make_checkpoint(name: str, root: Path, tokenizer_dir: Path) -> Path:
    """``root/<name>``: the default model's config with ``name``'s shapes (a bundled model: its own
    public config), and the default model's tokenizer (no weights)."""
    if name in bundled_model_configs():
        config = json.loads(bundled_model_configs()[name].read_text())
    else:
        shape = dict(SHAPES[name])
        config = json.loads((tokenizer_dir / "config.json").read_text())
        config.pop("_model_name_or_path", None)
        rope_theta = shape.pop("rope_theta")
        config.update(
            shape,
            max_position_embeddings=MAX_POSITIONS,
            dtype="bfloat16",
            rope_parameters={"rope_theta": rope_theta, "rope_type": "default"},
        )
    target = root / name
    target.mkdir(parents=True, exist_ok=True)
    for file in TOKENIZER_FILES:
        if (tokenizer_dir / file).is_file():
            shutil.copyfile(tokenizer_dir / file, target / file)
    (target / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return target


def make_profile(model_dir: Path, share: float, seed: int, sink: int, window: int, command: str):
    """round(share x all KV heads) retrieval heads drawn uniformly at random (seeded)."""
    import razor_vllm
    from razor_vllm.config import Provenance, RazorProfile, utc_now
    from razor_vllm.profile.selectors import fingerprint_of

    if not 0.0 <= share <= 1.0:
        raise ValueError(f"--retrieval-share must be in [0, 1], got {share}")
    model = fingerprint_of(model_dir)
    every = [(layer, head) for layer in range(model.num_layers) for head in range(model.num_kv_heads)]
    chosen = random.Random(seed).sample(every, round(share * len(every)))
    heads = [sorted(h for layer_id, h in chosen if layer_id == layer) for layer in range(model.num_layers)]
    provenance = Provenance(
        method="manual", command=command, tool_version=razor_vllm.__version__, created=utc_now(), seed=seed, ratio=share
    )
    return RazorProfile(model=model, sink=sink, window=window, retrieval_heads=heads, provenance=provenance)


def bundled_profile_path(profile) -> Path:
    """The bundled YAML file a loaded bundled profile came from."""
    from razor_vllm.config import RazorProfile, bundled_profile_paths

    for path in bundled_profile_paths():
        if RazorProfile.load(path) == profile:
            return path
    raise ValueError("profile is not one of the bundled profiles")


def prepare(model: str, share: float, seed: int, sink: int, window: int, command: str) -> tuple[Path, Path]:
    """The checkpoint dir and the saved profile YAML for ``synthetic:<name>``, under the model cache."""
    from razor_vllm.model import cache_root, prepare_default_model

    name = shape_name(model)
    model_dir = make_checkpoint(name, cache_root() / "synthetic", prepare_default_model(progress=True))
    if name in bundled_model_configs():
        from razor_vllm.config import find_profile_for
        from razor_vllm.profile.selectors import fingerprint_of

        return model_dir, bundled_profile_path(find_profile_for(fingerprint_of(model_dir)))
    profile = make_profile(model_dir, share, seed, sink, window, command)
    return model_dir, profile.save(model_dir / f"razor-profile-share{share:g}-seed{seed}.yaml")
