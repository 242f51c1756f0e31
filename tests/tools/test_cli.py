"""The razor-vllm command line as a user runs it."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from razor_vllm.cli import main


def test_model_path_prints_the_prepared_checkpoint(default_model_dir, capsys):
    assert main(["model", "path"]) == 0
    assert capsys.readouterr().out.strip() == str(default_model_dir)


def test_model_prepare_is_instant_when_prepared(default_model_dir, capsys):
    assert main(["model", "prepare"]) == 0
    assert capsys.readouterr().out.strip() == str(default_model_dir)


def test_console_script_lists_subcommands():
    """The installed ``razor-vllm`` command (setup.py's console script, next to this interpreter), as a user runs it."""
    script = shutil.which("razor-vllm", path=str(Path(sys.executable).parent))
    assert script, "razor-vllm is not installed next to the interpreter (pip install -e .)"
    out = subprocess.run([script, "--help"], capture_output=True, text=True, check=True)
    for name in ("model", "profile"):
        assert name in out.stdout


def test_profile_from_scores_records_the_command(tmp_path, capsys):
    out = tmp_path / "reselected.yaml"
    code = main(
        [
            "profile",
            "--from-scores",
            "smollm2-135m-instruct",
            "--induction-ratio",
            "0.05",
            "--echo-ratio",
            "0",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    from razor_vllm.config import RazorProfile

    profile = RazorProfile.load(out)
    assert profile.num_retrieval_heads == int(0.05 * 90 + 0.5)  # the profiler rounds half up
    assert "--induction-ratio 0.05" in profile.provenance.command


def test_unknown_subcommand_fails():
    with pytest.raises(SystemExit):
        main(["frobnicate"])
