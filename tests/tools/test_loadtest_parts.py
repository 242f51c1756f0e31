"""The pieces the load-test command (``python -m loadtest``) checks answers with: passkey prompts and
their check, option parsing, the soak's catalogue and verdicts; no server. The command end to end
against real servers: tests/serving/test_loadtest.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from loadtest import run, soak
from loadtest.workload import answer_digits, default_ranges, parse_token_range, passkey_prompt

ROOT = Path(__file__).resolve().parents[2]


def test_passkey_check_wants_exactly_the_key():
    p = passkey_prompt("7481923", tokens=300, depth=0.5)
    assert p.prompt.endswith("The pass key is") and "The pass key is 7481923." in p.prompt
    assert p.check(" 7481923. Remember it")
    assert not p.check(" 748192. Remember it")  # razor's typical near miss on this model (NOTES)
    assert not p.check(" 74819234")
    assert not p.check(" The pass key is")
    assert answer_digits("no digits") is None


def test_passkey_prompt_length_tracks_the_request():
    short, long = passkey_prompt("1", 200, 0.1), passkey_prompt("1", 2000, 0.9)
    assert abs(short.approx_tokens - 200) <= 24 and abs(long.approx_tokens - 2000) <= 24
    assert short.prompt.index("pass key is 1") < len(short.prompt) * 0.25
    assert long.prompt.index("pass key is 1") > len(long.prompt) * 0.85


def test_bad_inputs_get_clear_errors():
    with pytest.raises(ValueError, match="token range"):
        parse_token_range("512-128")
    with pytest.raises(ValueError, match="digits"):
        passkey_prompt("abc", 100, 0.5)
    with pytest.raises(ValueError, match="far past the window"):
        default_ranges(window=256, max_model_len=512)
    assert default_ranges(256, 4096) == ((128, 512), (1024, 4022))
    assert run.parse_duration("1m30s") == 90 and run.parse_duration("45") == 45
    for bad in ("", "2x", "0s"):
        with pytest.raises(Exception, match="duration"):
            run.parse_duration(bad)
    result = subprocess.run(
        [sys.executable, "-m", "loadtest", "--backends", "razor,vllm"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "subset of razor,stock" in result.stderr


def test_soak_catalogue_fits_the_context_and_checks_fail_on_a_wrong_answer():
    assert {i.name for i in soak.catalogue(4096)} >= {"passkey far 2500", "chat 0", "story 2"}
    small = soak.catalogue(1024)
    assert all(int(i.name.split()[-1]) + 100 <= 1024 for i in small if i.name.startswith("passkey"))
    good = {
        "cancel_share": 0.3,
        "expected": {"a": {}},
        "alive_after_soak": True,
        "alive_at_end": True,
        "health": True,
        "after_idle_same_answers": 1,
        "stats": {
            "errors": 0,
            "completed": 5,
            "correct": 5,
            "cancelled_mid_stream": 2,
            "cancelled_before_first_token": 1,
            "cancelled_full_tokens": 90,
        },
        "server": {"generated_for_cancelled": 40},
        "idle": {"running": 0.0, "waiting": 0.0, "kv_cache_usage": 0.0},
    }
    assert all(ok for _, ok in soak.checks(good))
    wrong = {**good, "stats": {**good["stats"], "correct": 4}}
    leaked = {**good, "idle": {**good["idle"], "razor_blocks_in_use": {"local": 2.0}}}
    not_aborted = {**good, "server": {"generated_for_cancelled": 90}}
    for bad in (wrong, leaked, not_aborted):
        assert not all(ok for _, ok in soak.checks(bad))
