"""The version of the installed npud distribution, which ships npud, npu and npuctl together."""

from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path

DISTRIBUTION = "npud"
UNKNOWN = "0+unknown"


def distribution_version() -> str:
    """The installed distribution's version (importlib.metadata); running from a source tree
    that is not installed, the version its pyproject.toml declares; else ``UNKNOWN``."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return tree_version(Path(__file__).resolve().parents[2] / "pyproject.toml")   # npud/ipc_schema/


def tree_version(pyproject: Path) -> str:
    """The version a source tree's pyproject.toml declares for npud, or ``UNKNOWN``."""
    try:
        project = tomllib.loads(pyproject.read_text()).get("project", {})
    except (OSError, tomllib.TOMLDecodeError):
        return UNKNOWN
    version = project.get("version") if project.get("name") == DISTRIBUTION else None
    return version if isinstance(version, str) else UNKNOWN
