from __future__ import annotations

import pytest

from kvgrove.models.loading import LoadedModel, load


@pytest.fixture(scope="session")
def default_model() -> LoadedModel:
    """The real bundled default (SmolLM2-135M-Instruct), fetched into the cache on first use."""
    return load(None)
