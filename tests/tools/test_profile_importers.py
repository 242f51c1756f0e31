"""Importing published head files: DuoAttention's full_attention_heads.tsv and Retrieval Head's head_score json."""

from __future__ import annotations

import argparse
import json

import pytest

from razor_vllm.config import ProfileError, RazorProfile
from razor_vllm.profile import DuoAttentionImport, RetrievalHeadImport, command

from tiny_models import build_tiny_llama

# tiny model: 4 layers, 4 query heads over 2 KV heads (query heads 0,1 -> KV 0; 2,3 -> KV 1)
DUO_TSV = "0.9\t0.1\n0.2\t0.3\n0.5\t0.7\n0.05\t0.6\n"


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama_import"), with_tokenizer=False)


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def cli(argv):
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    args = parser.parse_args(argv)
    args.argv = argv
    return command.run(args)


# -- DuoAttention ---------------------------------------------------------------------------------


def test_duo_threshold_default_half(tiny_llama, tmp_path):
    selection = DuoAttentionImport(write(tmp_path, "duo.tsv", DUO_TSV)).select(tiny_llama)
    assert selection.retrieval_heads == [[0], [], [0, 1], [1]]  # gate >= 0.5
    assert selection.scores == {"duo_attention": [[0.9, 0.1], [0.2, 0.3], [0.5, 0.7], [0.05, 0.6]]}
    assert selection.provenance["threshold"] == 0.5


def test_duo_threshold_and_ratio(tiny_llama, tmp_path):
    path = write(tmp_path, "duo.tsv", DUO_TSV)
    assert DuoAttentionImport(path, threshold=0.65).select(tiny_llama).retrieval_heads == [[0], [], [1], []]
    # ratio 0.25 of 8 KV heads -> the 2 highest gates, globally
    selection = DuoAttentionImport(path, ratio=0.25).select(tiny_llama)
    assert selection.retrieval_heads == [[0], [], [1], []]
    assert selection.provenance["ratio"] == 0.25 and "threshold" not in selection.provenance
    assert sum(map(len, DuoAttentionImport(path, ratio=0.5).select(tiny_llama).retrieval_heads)) == 4
    with pytest.raises(ValueError, match="not both"):
        DuoAttentionImport(path, threshold=0.5, ratio=0.5)


@pytest.mark.parametrize(
    "text,message",
    [
        ("0.9\t0.1\n0.2\t0.3\n", "2 rows of 2 values, the model has 4 layers x 2 KV heads"),
        ("0.9\t0.1\t0.4\n" * 4, "4 rows of 3 values"),
        ("0.9\t0.1\n0.2\tx\n0.5\t0.7\n0.1\t0.6\n", "line 2"),
        ("0.9\tnan\n" * 4, "non-finite"),
    ],
)
def test_duo_malformed_files(tiny_llama, tmp_path, text, message):
    with pytest.raises(ProfileError, match=message):
        DuoAttentionImport(write(tmp_path, "bad.tsv", text)).select(tiny_llama)


def test_duo_cli_end_to_end(tiny_llama, tmp_path):
    tsv = write(tmp_path, "full_attention_heads.tsv", DUO_TSV)
    out = tmp_path / "duo.yaml"
    assert cli(["--model", str(tiny_llama), "--import-duo", str(tsv), "--out", str(out), "--quiet"]) == 0
    profile = RazorProfile.load(out)
    assert profile.retrieval_heads == [[0], [], [0, 1], [1]]
    assert profile.provenance.method == "duo_attention" and profile.provenance.source == str(tsv)
    assert profile.provenance.threshold == 0.5
    assert "--import-duo" in profile.provenance.command


# -- Retrieval Head -------------------------------------------------------------------------------


def rh_scores():
    # query head scores (lists averaged): KV head = max over its query heads
    return {
        "0-0": [0.0, 0.2],  # mean 0.1
        "0-1": [0.3, 0.5],  # 0.4   -> KV 0 of layer 0: 0.4
        "0-3": [0.05],  # KV 1 of layer 0: 0.05
        "1-2": [0.3],  # KV 1 of layer 1: max(0.3, 0.0), whatever the order
        "1-3": [0.0],
        "2-1": [0.2, 0.2, 0.2],  # 0.2 -> KV 0 of layer 2
        "2-2": [0.9],  # -> KV 1 of layer 2
        "3-0": [],  # empty list: 0
    }


def test_retrieval_head_group_max_and_threshold(tiny_llama, tmp_path):
    path = write(tmp_path, "head_score.json", json.dumps(rh_scores()))
    selection = RetrievalHeadImport(path).select(tiny_llama)
    assert selection.scores == {"retrieval_head": [[0.4, 0.05], [0.0, 0.3], [0.2, 0.9], [0.0, 0.0]]}
    assert selection.retrieval_heads == [[0], [1], [0, 1], []]  # mean score >= 0.1
    assert RetrievalHeadImport(path, threshold=0.35).select(tiny_llama).retrieval_heads == [[0], [], [1], []]
    assert RetrievalHeadImport(path, ratio=0.125).select(tiny_llama).retrieval_heads == [[], [], [1], []]


@pytest.mark.parametrize(
    "data,message",
    [
        ({"0-4": [0.1]}, "'0-4' outside the model"),
        ({"4-0": [0.1]}, "'4-0' outside the model"),
        ({"layer0": [0.1]}, "'layer0' is not 'layer-head'"),
        ({"0-0": ["x"]}, "non-numeric"),
        ([0.1, 0.2], "expected an object"),
    ],
)
def test_retrieval_head_malformed_files(tiny_llama, tmp_path, data, message):
    with pytest.raises(ProfileError, match=message):
        RetrievalHeadImport(write(tmp_path, "bad.json", json.dumps(data))).select(tiny_llama)


def test_retrieval_head_cli_end_to_end(tiny_llama, tmp_path, capsys):
    path = write(tmp_path, "head_score.json", json.dumps(rh_scores()))
    out = tmp_path / "rh.yaml"
    argv = [
        "--model",
        str(tiny_llama),
        "--import-retrieval-head",
        str(path),
        "--ratio",
        "0.25",
        "--sink",
        "8",
        "--window",
        "32",
        "--out",
        str(out),
    ]
    assert cli(argv) == 0
    profile = RazorProfile.load(out)
    assert profile.retrieval_heads == [[0], [], [1], []]  # top 2 of 8: 0.9 (layer 2) and 0.4 (layer 0)
    assert profile.provenance.method == "retrieval_head" and profile.provenance.ratio == 0.25
    assert (profile.sink, profile.window) == (8, 32)
    assert "retrieval_head: 2/8 KV heads" in capsys.readouterr().err


def test_import_needs_model_and_existing_file(tiny_llama, tmp_path, capsys):
    assert cli(["--import-duo", "x.tsv"]) == 2
    assert "--model DIR is required" in capsys.readouterr().err
    assert cli(["--model", str(tiny_llama), "--import-duo", str(tmp_path / "missing.tsv")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert cli(["--model", str(tiny_llama), "--ratio", "0.5"]) == 2
    assert "apply to --import-duo" in capsys.readouterr().err


# -- KVzip ----------------------------------------------------------------------------------------


def save_pt(tmp_path, name, rows, dtype=None):
    import torch

    path = tmp_path / name
    torch.save(torch.tensor(rows, dtype=dtype or torch.bfloat16), path)
    return path


def test_kvzip_ratio_threshold_and_max_over_files(tiny_llama, tmp_path):
    from razor_vllm.profile import KVzipImport

    # [layers=4, KV heads=2] as KVzip saves them (bf16 on the GPU there; here on the CPU)
    qa = save_pt(tmp_path, "m-qa-0.pt", [[0.5, 0.25], [1.0, 0.125], [0.75, 0.5], [0.0625, 0.875]])
    repo = save_pt(tmp_path, "m-repoqa-0.pt", [[0.5, 0.9375], [0.25, 0.125], [0.75, 0.5], [0.0625, 0.25]])
    one = KVzipImport(qa, ratio=0.25).select(tiny_llama)
    assert one.retrieval_heads == [[], [0], [], [1]]  # 1.0 and 0.875
    assert one.scores == {"kvzip": [[0.5, 0.25], [1.0, 0.125], [0.75, 0.5], [0.0625, 0.875]]}
    both = KVzipImport([qa, repo], ratio=0.25).select(tiny_llama)  # KVzip's own rule: elementwise max
    assert both.scores["kvzip"][0] == [0.5, 0.9375]
    assert both.retrieval_heads == [[1], [0], [], []]
    assert KVzipImport(qa, threshold=0.5).select(tiny_llama).retrieval_heads == [[0], [0], [0, 1], [1]]
    with pytest.raises(ValueError, match="give a threshold or a ratio"):
        KVzipImport(qa)


def test_ratio_keeps_ties_at_the_cut(tiny_llama, tmp_path):
    # DuoAttention gates saturate at 1.0: a 25% cut (2 of 8) inside a tie of three keeps all three
    tsv = write(tmp_path, "duo.tsv", "1.0\t0.1\n0.2\t1.0\n0.5\t0.7\n1.0\t0.6\n")
    selection = DuoAttentionImport(tsv, ratio=0.25).select(tiny_llama)
    assert selection.retrieval_heads == [[0], [1], [], [0]]


@pytest.mark.parametrize(
    "rows,message",
    [
        ([[0.5, 0.5]] * 3, r"shape \[3, 2\], the model has 4 layers x 2 KV heads"),
        ([[float("nan"), 0.5]] * 4, "non-finite"),
    ],
)
def test_kvzip_malformed_files(tiny_llama, tmp_path, rows, message):
    import torch

    from razor_vllm.profile import KVzipImport

    path = save_pt(tmp_path, "bad.pt", rows, dtype=torch.float32)
    with pytest.raises(ProfileError, match=message):
        KVzipImport(path, ratio=0.5).select(tiny_llama)
    (tmp_path / "junk.pt").write_text("not a tensor")
    with pytest.raises(ProfileError, match="not a torch tensor file"):
        KVzipImport(tmp_path / "junk.pt", ratio=0.5).select(tiny_llama)


def test_kvzip_cli_end_to_end(tiny_llama, tmp_path):
    a = save_pt(tmp_path, "a.pt", [[0.5, 0.25], [1.0, 0.125], [0.75, 0.5], [0.0625, 0.875]])
    b = save_pt(tmp_path, "b.pt", [[0.5, 0.9375], [0.25, 0.125], [0.75, 0.5], [0.0625, 0.25]])
    out = tmp_path / "kvzip.yaml"
    assert (
        cli(
            [
                "--model",
                str(tiny_llama),
                "--import-kvzip",
                str(a),
                str(b),
                "--ratio",
                "0.25",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    profile = RazorProfile.load(out)
    assert profile.provenance.method == "kvzip" and profile.provenance.source == f"{a}, {b}"
    assert profile.retrieval_heads == [[1], [0], [], []]


def test_profile_list_shows_the_bundled_profiles(capsys):
    assert cli(["list"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["profile", "model", "heads", "share", "sink/window", "source"]
    assert "meta-llama/Llama-3.1-8B-Instruct" in out and "kvzip: snu-mllab/KVzip@5d84729 (MIT)" in out
    assert "smollm2-135m-instruct" in out and "35/90" in out  # the calibrated default: 35 heads, share 38.9%
