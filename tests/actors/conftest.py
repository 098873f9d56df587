"""The actor tests' tiny random-weight models, written once per session."""

from __future__ import annotations

import pytest

from tiny_models import write_tiny_model


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """tiny(arch) -> the folder of a tiny `arch` model; tiny("default") -> None (the bundled
    model, SmolLM2-135M)."""
    folders: dict[str, str] = {}

    def get(arch: str) -> str | None:
        if arch == "default":
            return None
        if arch not in folders:
            folders[arch] = str(write_tiny_model(tmp_path_factory.mktemp("tiny") / arch, arch))
        return folders[arch]

    return get
