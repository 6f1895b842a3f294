"""Fixtures of tests/packaging."""

from __future__ import annotations

from pathlib import Path

import pytest
from packaging_harness import build_wheel


@pytest.fixture(scope="session")
def wheel(tmp_path_factory) -> tuple[Path, str]:
    """npud's wheel and the log of its build (one build for every test that reads it)."""
    return build_wheel(tmp_path_factory.mktemp("wheel"))
