"""The licence: the standard Apache-2.0 text, declared the PEP 639 way, and a build that does not warn."""

from __future__ import annotations

import hashlib
import re
import tomllib
import zipfile

import pytest
from packaging_harness import REPO

# The text of https://www.apache.org/licenses/LICENSE-2.0.txt, byte for byte as onnx, trio, sniffio
# and pytest-trio ship it in their wheels.
APACHE_2_0_SHA256 = "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30"


def test_packaging_license_is_the_standard_apache_2_0_text():
    text = (REPO / "LICENSE").read_bytes()
    assert b"Apache License\n                           Version 2.0, January 2004" in text
    assert hashlib.sha256(text).hexdigest() == APACHE_2_0_SHA256


def test_packaging_pyproject_declares_the_license_as_spdx():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["project"]["license"] == "Apache-2.0"
    assert project["project"]["license-files"] == ["LICENSE"]
    # setuptools reads PEP 639's string `license` and `license-files` from 77 on.
    setuptools = [r for r in project["build-system"]["requires"] if r.startswith("setuptools")]
    assert setuptools and int(re.search(r">=\s*(\d+)", setuptools[0]).group(1)) >= 77


@pytest.mark.slow
def test_packaging_build_has_no_license_deprecation_warnings(wheel):
    _, log = wheel
    assert [line for line in log.splitlines() if "BuildBackendWarning" in line or "SetuptoolsDeprecationWarning"
            in line or "license" in line.lower() and "deprecat" in line.lower()] == []


@pytest.mark.slow
def test_packaging_wheel_carries_the_license(wheel):
    path, _ = wheel
    with zipfile.ZipFile(path) as whl:
        names = whl.namelist()
        metadata = whl.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        shipped = whl.read(next(n for n in names if n.endswith(".dist-info/licenses/LICENSE")))
    assert "License-Expression: Apache-2.0" in metadata.splitlines()
    assert hashlib.sha256(shipped).hexdigest() == APACHE_2_0_SHA256
