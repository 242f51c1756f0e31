"""Shared fixtures: the prepared default model and markers for slow tests."""

import sys
from pathlib import Path

import pytest

# loadtest/ (whose server helpers the server tests share) is a folder at the repository root, not installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from razor_vllm.model import prepare_default_model


@pytest.fixture(scope="session")
def default_model_dir():
    """SmolLM2-135M-Instruct as a safetensors checkpoint (converted once, then cached)."""
    return prepare_default_model(progress=False)
