"""Moved to :mod:`razor_vllm.serve.harness`; this name stays an alias of that module for code written
before the move (tests/test_scaleout.py). Import the harness instead; the coordinator deletes this file."""

import sys

from razor_vllm.serve import harness

sys.modules[__name__] = harness
