"""Rebuild the bundled head profiles (configs/<name>.yaml) from public head files.

    python scripts/build_bundled_profiles.py --duo-attention DUO_GIT_DIR --kvzip KVZIP_GIT_DIR

One rule for every bundled profile: the global top 15% of KV heads by the source's own score
(RazorAttention's share: 14% by induction + 1% by echo), plus every head tied with the last one kept
(importers.select_ratio_with_ties), through the importers that ``razor-vllm profile --import-duo /
--import-kvzip ... --ratio 0.15`` use. Where both sources cover a model (Llama-3.1-8B-Instruct,
Llama-3-8B-Instruct-Gradient-1048k) KVzip's is used: its scores are continuous, while DuoAttention's
learned gates saturate at 1.0 for 22-43% of the heads, so 15% cannot be told apart inside them.

The model's fingerprint comes from its public config.json values, kept in configs/models/<name>.json
(where each value comes from: docs/profiling.md). Each source file is read from a git checkout or
bare mirror of its repository at a pinned commit (``git show COMMIT:PATH``); the profile records
repository, commit, path and licence.

Local heads keep sink 128 and window 256 (DuoAttention's streaming heads: its attn_patterns
config.json sink_size/recent_size; KVzip publishes no streaming configuration, the same is used).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from razor_vllm.config import RazorProfile, bundled_profiles_dir
from razor_vllm.profile.importers import DuoAttentionImport, KVzipImport
from razor_vllm.profile.selectors import fingerprint_of

RATIO = 0.15
SINK, WINDOW = 128, 256
CREATED = "2026-12-01T00:00:00+00:00"  # fixed, so that a rebuild reproduces the files byte for byte

SOURCES = {
    "duo": dict(
        repository="https://github.com/mit-han-lab/duo-attention",
        commit="fe93c314ae87306ef6629dc16713250b4718ffe7",
        license="MIT",
        importer=DuoAttentionImport,
    ),
    "kvzip": dict(
        repository="https://github.com/snu-mllab/KVzip",
        commit="5d8472975d286e3da6b52178af39d18904330c0d",
        license="MIT",
        importer=KVzipImport,
    ),
}
_DUO = "attn_patterns/{}/lr=0.02-reg=0.05-ctx=1000_{}-multi_passkey10/full_attention_heads.tsv"

# bundled name -> (Hugging Face id, source, path of the head file in the source repository)
MODELS = {
    "llama-2-7b-32k-instruct": (
        "togethercomputer/Llama-2-7B-32K-Instruct",
        "duo",
        _DUO.format("Llama-2-7B-32K-Instruct", 32000),
    ),
    "llama-3-8b-instruct-gradient-1048k": (
        "gradientai/Llama-3-8B-Instruct-Gradient-1048k",
        "kvzip",
        "utils/head_score/duo-scbench_qa_eng-0.pt",
    ),
    "llama-3-8b-instruct-gradient-4194k": (
        "gradientai/Llama-3-8B-Instruct-Gradient-4194k",
        "duo",
        _DUO.format("Llama-3-8B-Instruct-Gradient-4194k", 32000),
    ),
    "llama-3.1-8b-instruct": (
        "meta-llama/Llama-3.1-8B-Instruct",
        "kvzip",
        "utils/head_score/llama3.1-8b-scbench_qa_eng-0.pt",
    ),
    "mistral-7b-instruct-v0.2": (
        "mistralai/Mistral-7B-Instruct-v0.2",
        "duo",
        _DUO.format("Mistral-7B-Instruct-v0.2", 32000),
    ),
    "mistral-7b-instruct-v0.3": (
        "mistralai/Mistral-7B-Instruct-v0.3",
        "duo",
        _DUO.format("Mistral-7B-Instruct-v0.3", 32000),
    ),
}


def git_show(git_dir: Path, commit: str, path: str) -> bytes:
    return subprocess.run(
        ["git", "-C", str(git_dir), "show", f"{commit}:{path}"], check=True, capture_output=True
    ).stdout


def model_dir_for(name: str, root: Path) -> Path:
    """A config-only checkpoint dir holding the model's public config.json (the fingerprint's source)."""
    target = root / name
    target.mkdir(parents=True, exist_ok=True)
    (target / "config.json").write_bytes((bundled_profiles_dir() / "models" / f"{name}.json").read_bytes())
    return target


def build(git_dirs: dict[str, Path], out_dir: Path, work: Path) -> list[Path]:
    written = []
    for name, (hf_id, source, path) in MODELS.items():
        src = SOURCES[source]
        head_file = work / f"{name}{Path(path).suffix}"
        head_file.write_bytes(git_show(git_dirs[source], src["commit"], path))
        fingerprint = fingerprint_of(model_dir_for(name, work))
        selection = src["importer"](head_file, ratio=RATIO).select(fingerprint)
        command = "python scripts/build_bundled_profiles.py --duo-attention DIR --kvzip DIR"
        data = selection.to_profile(sink=SINK, window=WINDOW, command=command).model_dump()
        data["model_names"] = [hf_id]
        data["provenance"].update(
            source=path, repository=src["repository"], commit=src["commit"], license=src["license"], created=CREATED
        )
        profile = RazorProfile.model_validate(data)
        written.append(profile.save(out_dir / f"{name}.yaml"))
        print(f"{name}: {profile.summary()}", file=sys.stderr)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duo-attention", required=True, type=Path, help="git dir of mit-han-lab/duo-attention")
    parser.add_argument("--kvzip", required=True, type=Path, help="git dir of snu-mllab/KVzip")
    parser.add_argument("--out", type=Path, default=bundled_profiles_dir(), help="where the YAML files go")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        build({"duo": args.duo_attention, "kvzip": args.kvzip}, args.out, Path(work))
    return 0


if __name__ == "__main__":
    sys.exit(main())
