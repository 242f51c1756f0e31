"""The bundled head profiles of popular models: each matches its model's real config (fingerprint
from configs/models/<name>.json, the public config.json values), is the one razor picks for that
model and no other, carries its provenance and licence, and lays out at every tensor-parallel size
the model's KV heads allow, so a bundled profile cannot fail at start-up.

The 7-8B models do not fit this shared 24 GiB machine even with dummy weights, so their check is the
analytic path (`razor-vllm bench --model synthetic:<name> --skip-engine`) and the layout planner
that the engine runs (razor_vllm.layout.plan_layout, per rank as install.py calls it); two of their real layers
run in an engine with dummy weights in tests/engine/test_bundled_profiles_engine.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from razor_vllm.balance import plan_scaleout, profile_ratios, promotion_priority
from razor_vllm.bench import analytic
from razor_vllm.cli import main
from razor_vllm.config import (
    ProfileError,
    RazorProfile,
    bundled_profile_paths,
    bundled_profiles_dir,
    check_profile_matches,
    find_profile_for,
    resolve_profile,
)
from razor_vllm.layout import plan_layout, shard_kv_heads
from razor_vllm.profile.importers import select_ratio_with_ties
from razor_vllm.profile.selectors import fingerprint_of

from tiny_models import model_config

MODELS_DIR = bundled_profiles_dir() / "models"
BUNDLED = sorted(p.stem for p in MODELS_DIR.glob("*.json"))
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


def test_at_least_six_popular_models_are_bundled():
    assert len(BUNDLED) >= 6
    assert {p.stem for p in bundled_profile_paths()} >= set(BUNDLED)


def checkpoint(tmp_path: Path, name: str, **changes) -> Path:
    """A config-only checkpoint dir: the model's public config.json values (plus ``changes``)."""
    config = json.loads((MODELS_DIR / f"{name}.json").read_text())
    config.update(changes)
    target = tmp_path / name
    target.mkdir(parents=True, exist_ok=True)
    (target / "config.json").write_text(json.dumps(config))
    return target


def tp_sizes(num_kv_heads: int) -> list[int]:
    """The tensor-parallel sizes among 1/2/4/8 that vLLM accepts for this many KV heads."""
    return [tp for tp in (1, 2, 4, 8) if num_kv_heads % tp == 0 or tp % num_kv_heads == 0]


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_profile_is_picked_for_its_model(name, tmp_path):
    profile = resolve_profile(name)
    served = fingerprint_of(checkpoint(tmp_path, name))
    assert profile.model == served  # shape and identity (context length, RoPE scaling) alike
    assert served.context_length is not None and served.rope_scaling is not None
    assert find_profile_for(served) == profile  # what `vllm serve MODEL --attention-backend razor` picks
    assert find_profile_for(served, name_hint=profile.model_names[0]) == profile


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_profile_provenance_and_selection_rule(name):
    profile = resolve_profile(name)
    prov = profile.provenance
    assert prov.method in ("duo_attention", "kvzip") and prov.license == "MIT"
    assert prov.repository in ("https://github.com/mit-han-lab/duo-attention", "https://github.com/snu-mllab/KVzip")
    assert re.fullmatch(r"[0-9a-f]{40}", prov.commit) and prov.source
    assert profile.model_names and "/" in profile.model_names[0]
    # one rule for all: the global top 15% by the source's score, ties at the cut included
    (table,) = profile.scores.values()
    assert prov.ratio == 0.15
    assert profile.retrieval_heads == select_ratio_with_ties(table, 0.15)
    assert 0.15 - 1 / profile.total_kv_heads < profile.retrieval_share < 0.5
    assert (profile.sink, profile.window) == (128, 256)


def test_no_two_bundled_profiles_claim_one_model(tmp_path):
    for name in BUNDLED:
        served = fingerprint_of(checkpoint(tmp_path, name))
        fits = [
            p.stem for p in bundled_profile_paths() if not RazorProfile.load(p).model.mismatches(served, identity=True)
        ]
        assert fits == [name]


def test_third_party_notices_cover_every_bundled_source():
    text = (bundled_profiles_dir() / "THIRD_PARTY.md").read_text()
    for name in BUNDLED:
        prov = resolve_profile(name).provenance
        assert prov.repository in text and prov.commit in text and prov.source in text
    assert text.count("Permission is hereby granted, free of charge") >= 2  # both MIT licence texts
    assert "Copyright (c) 2024 MIT HAN Lab" in text and "Copyright (c) 2025 snu-mllab" in text


# -- models of one shape: picked by context length and RoPE scaling, then by name ------------------------


def test_llama_3_8b_instruct_does_not_get_llama_3_1s_profile(tmp_path):
    # meta-llama/Meta-Llama-3-8B-Instruct: Llama-3.1's shapes, but 8192 positions and plain RoPE
    llama3 = checkpoint(
        tmp_path, "llama-3.1-8b-instruct", max_position_embeddings=8192, rope_scaling=None, rope_theta=500000.0
    )
    served = fingerprint_of(llama3)
    assert served.rope_scaling == "default" and served.context_length == 8192
    with pytest.raises(ProfileError, match=r"context 8192, RoPE default\); nearest is .*context_length: profile has"):
        find_profile_for(served)
    # naming the profile explicitly is allowed: its heads fit the shapes
    check_profile_matches(resolve_profile("llama-3.1-8b-instruct"), served)


def test_gradient_1m_and_4m_are_told_apart(tmp_path):
    short = fingerprint_of(checkpoint(tmp_path, "llama-3-8b-instruct-gradient-1048k"))
    long = fingerprint_of(checkpoint(tmp_path, "llama-3-8b-instruct-gradient-4194k"))
    assert short.model_dump(exclude={"context_length"}) == long.model_dump(exclude={"context_length"})
    assert find_profile_for(short) == resolve_profile("llama-3-8b-instruct-gradient-1048k")
    assert find_profile_for(long) == resolve_profile("llama-3-8b-instruct-gradient-4194k")


def test_a_user_override_of_rope_scaling_is_not_silently_matched(tmp_path):
    yarn = checkpoint(
        tmp_path,
        "mistral-7b-instruct-v0.2",
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
    )
    with pytest.raises(ProfileError, match="rope_scaling: profile has 'default', model has 'yarn x4'"):
        find_profile_for(fingerprint_of(yarn))


def test_same_fingerprint_is_settled_by_the_model_name(tmp_path):
    base = resolve_profile("llama-3.1-8b-instruct")
    search = tmp_path / "configs"
    search.mkdir()
    for stem, hf_id in (("a-other", "example/Other-8B"), ("b-llama", "meta-llama/Llama-3.1-8B-Instruct")):
        RazorProfile.model_validate({**base.model_dump(), "model_names": [hf_id]}).save(search / f"{stem}.yaml")
    served = base.model
    assert find_profile_for(served, search, name_hint="/models/Llama-3.1-8B-Instruct").model_names == [
        "meta-llama/Llama-3.1-8B-Instruct"
    ]
    assert find_profile_for(served, search, name_hint="example/Other-8B").model_names == ["example/Other-8B"]
    assert find_profile_for(served, search).model_names == ["example/Other-8B"]  # no hint: file order


def test_profiles_without_identity_fields_still_load_and_match(tmp_path):
    # the default model's profile predates context_length/rope_scaling: it matches whatever they are
    old = resolve_profile("smollm2-135m-instruct")
    assert old.model.context_length is None and old.model.rope_scaling is None
    served = old.model.model_copy(update=dict(context_length=8192, rope_scaling="default"))
    assert find_profile_for(served) == old
    text = old.to_yaml()
    assert RazorProfile.from_yaml(text) == old


# -- real shapes: layout at every tensor-parallel size, bytes per request ------------------------------


@pytest.mark.parametrize("name", BUNDLED)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_bundled_profile_lays_out_at_every_tensor_parallel_size(name, dtype):
    """What install.py plans on each rank (rank-local heads, vLLM's GPU and CPU block sizes) is solvable."""
    profile = resolve_profile(name)
    n_kv = profile.model.num_kv_heads
    sizes = tp_sizes(n_kv)
    assert sizes == [1, 2, 4, 8]  # every bundled model splits its KV heads over 8 GPUs
    for tp in sizes:
        for rank in range(tp):
            heads = [shard_kv_heads(h, n_kv, tp, rank) for h in profile.retrieval_heads]
            for block in (16, 128):
                layout = plan_layout(heads, max(1, n_kv // tp), 32, DTYPE_BYTES[dtype], default_block_size=block)
                assert layout.num_retrieval_heads == sum(map(len, heads))
                assert layout.num_retrieval_heads + layout.num_local_heads == profile.model.num_layers * max(
                    1, n_kv // tp
                )
                assert layout.page_slots() > 0


def rank_pool_shapes(profile: RazorProfile, tp: int, mode: str = "pad", dtype_bytes: int = 2, block: int = 16) -> set:
    """Every rank's planned pool shape, as each worker plans it (install.py: balance.plan_scaleout
    for all ranks, then ScaleoutPlan.rank_layout, sized by the plan's pool head counts)."""
    priority = promotion_priority(profile.scores, profile_ratios(profile)) if mode == "promote" else None
    plan = plan_scaleout(profile.retrieval_heads, profile.model.num_kv_heads, tp, 1, mode, priority)
    shapes = set()
    for rank in plan.ranks:
        layout = plan.rank_layout(rank, 32, dtype_bytes, default_block_size=block)
        shapes.add((layout.retrieval_pool_heads, layout.local_pool_heads, layout.retrieval_block_size))
    return shapes


@pytest.mark.parametrize("name", BUNDLED)
@pytest.mark.parametrize("tp", [2, 4, 8])
def test_bundled_profile_pools_agree_across_ranks(name, tp):
    """vLLM 0.32 requires every rank's KV-cache spec of a layer to be equal (kv_cache_utils.
    get_kv_cache_configs asserts it) and one scheduler hands the same block ids to all ranks. The
    bundled profiles put unequal numbers of retrieval heads on the ranks; the scale-out plan must
    still give every rank one pool shape, padded or promoted."""
    profile = resolve_profile(name)
    modes = ["pad", "promote"] if profile.scores else ["pad"]
    for mode in modes:
        assert len(rank_pool_shapes(profile, tp, mode)) == 1, mode


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_profile_bytes_per_request_on_the_analytic_path(name, tmp_path, default_model_dir):
    out = tmp_path / "bench.json"
    rc = main(
        [
            "bench",
            "--model",
            f"synthetic:{name}",
            "--skip-engine",
            "--dtype",
            "bfloat16",
            "--contexts",
            "8k,32k",
            "--out",
            str(out),
            "--format",
            "plain",
        ]
    )
    assert rc == 0
    data = json.loads(out.read_text())
    profile = resolve_profile(name)
    assert Path(data["meta"]["profile"]) == bundled_profiles_dir() / f"{name}.yaml"  # picked automatically
    m = profile.model
    a = data["analytic"]
    assert a["bytes_per_token"]["stock"] == m.num_layers * m.num_kv_heads * 2 * m.head_size * 2
    geo = analytic.geometry(profile, "bfloat16")
    pool = geo.layout.retrieval_pool_heads  # the profile's retrieval heads plus at most a few padding heads
    assert profile.num_retrieval_heads <= pool <= profile.num_retrieval_heads + 2
    assert a["bytes_per_token"]["retrieval_pool"] == pool * 2 * m.head_size * 2
    assert (a["window"], a["sink"]) == (256, 128)
    # a request holds less under razor, and more so at 32k than at 8k
    assert a["requests"][1]["ratio_steady"] > a["requests"][0]["ratio_steady"] > 1.5
    geo = analytic.geometry(profile, "bfloat16", stock_block_size=16)
    assert geo.razor_steady_pages(32768) * geo.page_bytes < geo.stock_blocks(32768) * geo.stock_block_bytes


# -- reproducible from the public files ------------------------------------------------------------------

MIRRORS = {
    "duo": Path(os.environ.get("RAZOR_DUO_ATTENTION_GIT", "/work/.mirror/mit-han-lab+duo-attention/repo")),
    "kvzip": Path(os.environ.get("RAZOR_KVZIP_GIT", "/work/.mirror/snu-mllab+KVzip/repo")),
}


@pytest.mark.skipif(
    not all(p.is_dir() for p in MIRRORS.values()) or not shutil.which("git"),
    reason="needs git checkouts of mit-han-lab/duo-attention and snu-mllab/KVzip",
)
def test_bundled_profiles_rebuild_byte_for_byte(tmp_path):
    import importlib.util

    script = Path(__file__).resolve().parents[2] / "scripts" / "build_bundled_profiles.py"
    spec = importlib.util.spec_from_file_location("build_bundled_profiles", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rc = module.main(["--duo-attention", str(MIRRORS["duo"]), "--kvzip", str(MIRRORS["kvzip"]), "--out", str(tmp_path)])
    assert rc == 0
    for name in BUNDLED:
        rebuilt = RazorProfile.load(tmp_path / f"{name}.yaml")
        shipped = resolve_profile(name)
        assert rebuilt.model_dump(exclude={"provenance": {"tool_version"}}) == shipped.model_dump(
            exclude={"provenance": {"tool_version"}}
        )


def _config_args(model_dir) -> dict:
    """EngineArgs of a checkpoint without weights on vLLM's config path (dummy weights; no engine starts)."""
    return dict(
        model=str(model_dir),
        load_format="dummy",
        attention_backend="razor",
        max_model_len=4096,
        dtype="bfloat16",
        kv_cache_memory_bytes=1 << 30,
        enforce_eager=True,
    )


@pytest.mark.parametrize("name", BUNDLED)
def test_vllm_config_of_the_real_model_resolves_to_its_bundled_profile(name, tmp_path, default_model_dir):
    """vLLM's own config path (EngineArgs -> VllmConfig, as `vllm serve MODEL --attention-backend razor`
    builds it; no engine process): razor finds nothing to refuse and picks the bundled profile."""
    from vllm.engine.arg_utils import EngineArgs

    from razor_vllm.bench import synthetic
    from razor_vllm.model_support import unsupported_reasons
    from razor_vllm.options import resolve_for_vllm_config

    model_dir = synthetic.make_checkpoint(name, tmp_path, default_model_dir)
    vllm_config = EngineArgs(**_config_args(model_dir)).create_engine_config()
    assert unsupported_reasons(vllm_config) == []
    resolved = resolve_for_vllm_config(vllm_config)
    assert resolved.profile == resolve_profile(name)
    assert resolved.retrieval_heads == resolve_profile(name).retrieval_heads


def test_qwen_1m_models_with_dual_chunk_attention_are_refused_by_name(tmp_path, default_model_dir):
    """KVzip's Qwen2.5 head files are for the -Instruct-1M models (not bundled): their dual chunk
    attention is refused with a reason before any engine process, not served wrongly."""
    from vllm.engine.arg_utils import EngineArgs

    # Qwen/Qwen2.5-7B-Instruct-1M's config.json values (public fixtures quoting it), layers cut to 2
    config = model_config("qwen2.5-7b-instruct-1m-2-layers")
    target = tmp_path / "qwen"
    target.mkdir()
    (target / "config.json").write_text(json.dumps(config))
    for file in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(default_model_dir / file, target / file)
    args = _config_args(target)
    # refused while vLLM builds its config (vllm_compat's hook), naming the model and the reason
    with pytest.raises(
        ValueError, match=r"RAZOR attention cannot serve .*qwen \(Qwen2ForCausalLM\): it uses dual chunk"
    ):
        EngineArgs(**args).create_engine_config()
    config.pop("dual_chunk_attention_config")
    (target / "config.json").write_text(json.dumps(config))
    # the same model without DCA: servable; it stops only for want of a profile (none is bundled for it)
    with pytest.raises(ValueError, match="no head profile") as info:
        EngineArgs(**args).create_engine_config()
    assert "dual chunk" not in str(info.value)
