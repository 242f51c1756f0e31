"""Shared fixtures: the prepared default model and markers for slow tests."""

import pytest

from razor_vllm.model import prepare_default_model


@pytest.fixture(scope="session")
def default_model_dir():
    """SmolLM2-135M-Instruct as a safetensors checkpoint (converted once, then cached)."""
    return prepare_default_model(progress=False)
