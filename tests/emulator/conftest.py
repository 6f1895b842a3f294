"""The MAC engine's tests run on both integer GEMMs: oneDNN's (when installed
and self-tested, the default) and the numpy reference, which would otherwise
go untested wherever oneDNN is present.  The float convolution follows the
same switch: oneDNN's convolution primitive with the oneDNN GEMM, numpy with
numpy."""

from __future__ import annotations

import pytest

from npud.emulator.engines import int_gemm, onednn

# test_emu_int_gemm.py chooses its paths itself, case by case.
BOTH_PATHS = {"test_emu_mac", "test_emu_qconv", "test_emu_requant"}


def pytest_generate_tests(metafunc):
    if metafunc.module.__name__ in BOTH_PATHS:
        paths = ["numpy-gemm"] + (["onednn-gemm"] if int_gemm.get() is not None else [])
        metafunc.parametrize("_int_gemm_path", paths, indirect=True, scope="module")


@pytest.fixture(scope="module", autouse=True)
def _int_gemm_path(request):
    path = getattr(request, "param", None)
    if path is None:            # a module that does not run on both paths
        yield None
        return
    native = int_gemm.get()
    saved = int_gemm._state
    int_gemm._state = ((native, "oneDNN (test)") if path == "onednn-gemm"
                       else (None, "numpy reference (test)"))
    conv_lib = onednn._load()
    onednn._state = conv_lib if path == "onednn-gemm" else (None, "numpy (test)")
    yield path
    int_gemm._state = saved
    onednn._state = conv_lib
