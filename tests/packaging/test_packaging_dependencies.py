"""The fast path is the default install: a plain `pip install .` brings oneDNN on x86-64 Linux
(and only there), and `.[int8-gemm]`, which once added it, still installs."""

from __future__ import annotations

import zipfile
from email.parser import Parser

import pytest
from packaging.requirements import Requirement

X86_64_LINUX = {"platform_machine": "x86_64", "sys_platform": "linux", "extra": ""}
AARCH64_LINUX = {"platform_machine": "aarch64", "sys_platform": "linux", "extra": ""}
X86_64_MAC = {"platform_machine": "x86_64", "sys_platform": "darwin", "extra": ""}


def _installed_without_extras(requirements: list[Requirement], env: dict[str, str]) -> set[str]:
    """The distributions pip installs for ``pip install .`` (no extras) on the platform ``env`` describes."""
    return {r.name for r in requirements if r.marker is None or r.marker.evaluate(env)}


@pytest.mark.slow
def test_packaging_plain_install_pulls_onednn_on_x86_64_linux_only(wheel):
    path, _ = wheel
    with zipfile.ZipFile(path) as whl:
        metadata = Parser().parsestr(whl.read(next(n for n in whl.namelist()
                                                   if n.endswith(".dist-info/METADATA"))).decode())
    requirements = [Requirement(r) for r in metadata.get_all("Requires-Dist")]
    onednn = [r for r in requirements if r.name == "onednn-cpu-gomp"]
    assert [str(r.specifier) for r in onednn] == ["==2023.2.0"]
    assert "onednn-cpu-gomp" in _installed_without_extras(requirements, X86_64_LINUX)
    # Where no wheel exists the numpy reference runs: an install there must not try to build one.
    assert "onednn-cpu-gomp" not in _installed_without_extras(requirements, AARCH64_LINUX)
    assert "onednn-cpu-gomp" not in _installed_without_extras(requirements, X86_64_MAC)
    # `pip install '.[int8-gemm]'` (the old way to get it) is still a valid request.
    assert "int8-gemm" in metadata.get_all("Provides-Extra")
