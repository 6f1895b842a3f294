"""The convolution primitive is created on one OpenMP thread, whatever the process's default:
oneDNN blocks a primitive for the thread count it is created under (two threads on one core ran
at a third of the speed), and `_threads` once called a function that no longer existed, so the
pin was silently skipped outside device processes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from npud.emulator.engines import onednn

pytestmark = pytest.mark.skipif(onednn._load()[0] is None, reason="oneDNN is not installed here")

PROGRAM = """
import ctypes
from npud.emulator.engines import onednn
omp = ctypes.CDLL("libgomp.so.1")
before = omp.omp_get_max_threads()
onednn.plan((1, 8, 8, 4), (3, 3, 4, 8), (1, 8, 8, 8), (1, 1), (1, 1, 1, 1), (1, 1),
            bias=False, accumulate=False, relu=False)
print(before, omp.omp_get_max_threads())
"""


def test_a_primitive_is_created_on_one_openmp_thread():
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    env["OMP_NUM_THREADS"] = "3"   # the process's default, as a user's environment might set it
    out = subprocess.run([sys.executable, "-c", PROGRAM], env=env, capture_output=True, text=True, check=True)
    before, after = map(int, out.stdout.split())
    assert before == 3 and after == 1


GEMM = """
import ctypes
import numpy as np
from npud.emulator.engines import int_gemm
omp = ctypes.CDLL("libgomp.so.1")
before = omp.omp_get_max_threads()
gemm = int_gemm.get()
c = np.zeros((4, 4), np.int32)
gemm(np.ones((4, 8), np.uint8), np.ones((8, 4), np.int8), c)
print(before, omp.omp_get_max_threads())
"""


def test_the_integer_gemm_runs_on_one_openmp_thread_too():
    """Both kernels pin through npud.emulator.threads (three copies of the pin, one was once
    silently skipped)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    env["OMP_NUM_THREADS"] = "3"
    out = subprocess.run([sys.executable, "-c", GEMM], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    before, after = map(int, out.stdout.split())
    assert before == 3 and after == 1
