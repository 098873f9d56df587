"""The memory tests' tiny llama, loaded once per module."""

from __future__ import annotations

import pytest

from kvgrove.models.loading import load
from tiny_models import write_tiny_model


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load(write_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", "llama")).model
