"""ruff (configured in pyproject.toml) over the repository: lint and format; no formatter suppressions."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SUPPRESSION = re.compile("#" + r" fmt: (skip|off)\b")  # split so that this file does not match itself


def ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ruff", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_ruff_check():
    result = ruff("check", "--output-format", "concise", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format():
    result = ruff("format", "--check", ".")
    assert result.returncode == 0, result.stdout + result.stderr + "\nrun: ruff format ."


def test_no_formatter_suppressions():
    """No formatter suppressions (fmt skip/off comments): the formatter settles style everywhere."""
    files = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True, check=True)
    found = [
        f"{path}:{number}"
        for path in files.stdout.split()
        if (ROOT / path).exists()
        for number, line in enumerate((ROOT / path).read_text().splitlines(), 1)
        if SUPPRESSION.search(line)
    ]
    assert not found, found
