"""npuctl: inspect and administer npud (entry point: npuctl.main)."""

from __future__ import annotations

from npud.ipc_schema.version import distribution_version as version  # npuctl ships in npud's distribution

__all__ = ["version"]
