"""Exact 8-bit integer GEMMs on oneDNN's VNNI kernels, when oneDNN is installed.

The MAC engine's reference for integer GEMMs is numpy (float32 BLAS in exact
K-chunks, see mac.py); this module offers the same integers several times
faster through oneDNN's ``dnnl_gemm_u8s8s32`` / ``dnnl_gemm_s8s8s32`` (the
optional ``int8-gemm`` extra installs the ``onednn-cpu-gomp`` wheel, which puts
``libdnnl.so.3`` in ``<prefix>/lib``).  It is used only after a self-test at
load: worst-case operands at the longest K this module accepts, with zero
points, strided operands and random values, every result compared with int64
numpy.  oneDNN's kernels for CPUs without VNNI may saturate int16 pair sums
(``vpmaddubsw``); a library that differs anywhere is refused and the numpy
path stays in use, so results never depend on the host.

``NPU_EMU_INT_GEMM=numpy`` forces the numpy path.  oneDNN runs on one OpenMP
thread, always (npud/emulator/threads.py): each modeled core already runs in a
device process of its own, and on a shared 2-core host a second OpenMP thread
measured up to 8x slower (spin-waiting against the other process).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import threading

import numpy as np

from .. import threads

ENV = "NPU_EMU_INT_GEMM"

# |a - a_zp| <= 255 for 8-bit a and an in-range zero point, |b| <= 128: every
# product is at most 255 * 128 in magnitude, so a K this long cannot leave int32
# (the self-test runs the extremes at exactly this K).
MAX_PRODUCT = 255 * 128
MAX_K = (2**31 - 1) // MAX_PRODUCT      # 65793

_D = ctypes.c_int64


def reference(a: np.ndarray, b: np.ndarray, a_zp: int = 0, co=None) -> np.ndarray:
    """(a - a_zp) @ b (+ co) in int64: the definition every backend must equal."""
    r = (a.astype(np.int64) - a_zp) @ b.astype(np.int64)
    return r if co is None else r + co


class OneDNN:
    """ctypes binding of oneDNN's u8 x s8 -> s32 GEMM (row-major, no transposes).

    Only this one: oneDNN computes s8 x s8 by shifting A to uint8 itself, and
    with ``ONEDNN_MAX_CPU_ISA=AVX2_VNNI`` its s8s8 GEMM measured wrong for
    ``a_zp = 127``; one function is one thing to self-test."""

    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib   # the library itself: the convolution primitive (onednn.py) binds more of it
        self.version = _version(lib)
        self.isa = _isa(lib)
        f = lib.dnnl_gemm_u8s8s32
        f.restype = ctypes.c_int
        f.argtypes = [ctypes.c_char, ctypes.c_char, ctypes.c_char, _D, _D, _D, ctypes.c_float,
                      ctypes.c_void_p, _D, ctypes.c_uint8, ctypes.c_void_p, _D, ctypes.c_int8,
                      ctypes.c_float, ctypes.c_void_p, _D, ctypes.c_void_p]
        self._fn = f
        self._co = np.zeros(1, np.int32)

    def __call__(self, a: np.ndarray, b: np.ndarray, c: np.ndarray, a_zp: int = 0,
                 co: np.ndarray | None = None) -> None:
        """c[:] = (a - a_zp) @ b (+ co), exactly, for a [M, K] uint8, b [K, N]
        int8, c [M, N] int32 with unit column stride (rows may be strided),
        K <= MAX_K and 0 <= a_zp <= 255.  co, an optional contiguous int32 [N]
        added to every row, is for callers that know no result leaves int32
        (whether oneDNN would then wrap or saturate is not relied on).  int8
        activations are the caller's to flip to uint8 (``a ^ 0x80 = a + 128``,
        the zero point likewise)."""
        if a.dtype != np.uint8 or b.dtype != np.int8 or c.dtype != np.int32:
            raise TypeError(f"expected uint8 x int8 -> int32, got {a.dtype} x {b.dtype} -> {c.dtype}")
        if a.ndim != 2 or b.ndim != 2 or c.ndim != 2:
            raise ValueError(f"expected 2-D operands, got {a.ndim}-D x {b.ndim}-D -> {c.ndim}-D")
        m, k = a.shape
        n = b.shape[1]
        if b.shape[0] != k or c.shape != (m, n) or not 0 < k <= MAX_K:
            raise ValueError(f"shapes {a.shape} x {b.shape} -> {c.shape} do not make a GEMM with "
                             f"0 < K <= {MAX_K}")
        if not c.flags.writeable:
            raise ValueError("the int32 output is read-only")
        if not 0 <= a_zp <= 255:
            raise ValueError(f"a_zp {a_zp} is not a uint8 zero point")
        if co is not None and (co.dtype != np.int32 or co.shape != (n,) or not co.flags.c_contiguous):
            raise ValueError("co: a contiguous int32 vector of N offsets")
        a, lda = _rows(a)
        b, ldb = _rows(b)
        ldc = c.strides[0] // 4 if m > 1 else n
        if (n > 1 and c.strides[1] != 4) or ldc < n:
            raise ValueError("the int32 output needs unit column stride and rows >= N apart")
        threads.one_openmp_thread_here()
        status = self._fn(
            b"N", b"N", b"F" if co is None else b"R", m, n, k, 1.0, a.ctypes.data, lda, a_zp,
            b.ctypes.data, ldb, 0, 0.0, c.ctypes.data, ldc,
            (self._co if co is None else co).ctypes.data)
        if status != 0:
            raise RuntimeError(f"oneDNN integer GEMM failed with status {status}")


def _rows(x: np.ndarray) -> tuple[np.ndarray, int]:
    """`x` (8-bit, 2-D) with unit column stride and its leading dimension (a
    copy only when its columns are strided or its rows overlap)."""
    rows, cols = x.shape
    if rows <= 1:
        return (x if cols <= 1 or x.strides[1] == 1 else np.ascontiguousarray(x)), cols
    if (cols > 1 and x.strides[1] != 1) or x.strides[0] < cols:
        x = np.ascontiguousarray(x)
    return x, x.strides[0]


def _version(lib) -> str:
    class V(ctypes.Structure):
        _fields_ = [("major", ctypes.c_int), ("minor", ctypes.c_int), ("patch", ctypes.c_int),
                    ("hash", ctypes.c_char_p), ("cpu_runtime", ctypes.c_uint),
                    ("gpu_runtime", ctypes.c_uint)]
    try:
        lib.dnnl_version.restype = ctypes.POINTER(V)
        v = lib.dnnl_version().contents
        return f"{v.major}.{v.minor}.{v.patch}"
    except (AttributeError, ValueError):
        return "unknown"


def _isa(lib) -> str:
    """The instruction set oneDNN's kernels use on this CPU, e.g. ``avx512_core_vnni``."""
    try:
        lib.dnnl_get_effective_cpu_isa.restype = ctypes.c_int
        lib.dnnl_cpu_isa2str.restype = ctypes.c_char_p
        lib.dnnl_cpu_isa2str.argtypes = [ctypes.c_int]
        return lib.dnnl_cpu_isa2str(lib.dnnl_get_effective_cpu_isa()).decode().removeprefix("cpu_isa_")
    except (AttributeError, ValueError, UnicodeDecodeError):
        return "unknown isa"


def _candidates() -> list[str]:
    """libdnnl paths to try: the environment's own lib/ (where the wheel puts
    it), then the dynamic loader's search path."""
    paths = []
    for prefix in dict.fromkeys((sys.prefix, sys.base_prefix)):
        for name in ("libdnnl.so.3", "libdnnl.so"):
            paths.append(os.path.join(prefix, "lib", name))
    found = ctypes.util.find_library("dnnl")
    paths += [found] if found else []
    paths += ["libdnnl.so.3"]
    return paths


def _open() -> tuple[OneDNN | None, str]:
    errors = []
    for path in _candidates():
        if os.path.isabs(path) and not os.path.exists(path):
            continue
        try:
            lib = ctypes.CDLL(path)
            lib.dnnl_gemm_u8s8s32, lib.dnnl_gemm_s8s8s32
        except (OSError, AttributeError) as e:
            errors.append(f"{path}: {e}")
            continue
        return OneDNN(lib), path
    return None, "libdnnl not found" + (f" ({'; '.join(errors)})" if errors else "")


def self_test(gemm) -> str | None:
    """Run `gemm` (called as ``gemm(a, b, c, a_zp[, co])``, see :meth:`OneDNN.__call__`)
    on the cases that break inexact kernels and compare with :func:`reference`;
    returns why it failed, or None when every result is exact."""
    rng = np.random.default_rng(20261125)
    cases = []
    # Extremes (constant operands, so the expected value is K * (a - zp) * b):
    # at the longest K accepted, |products| up to 255*128 and every pair sum
    # outside int16 (what non-VNNI kernels saturate); then at ResNet-like
    # shapes, whose blocking differs.
    for av, zp in ((255, 0), (0, 255), (255, 128), (0, 0), (128, 0)):
        for bv in (-128, 127):
            cases.append((np.full((3, MAX_K), av, np.uint8), np.full((MAX_K, 17), bv, np.int8), zp,
                          MAX_K * (av - zp) * bv))
    for m, k, n in ((300, 4608, 64), (2, 4608, 512), (3136, 64, 40)):
        for av, zp in ((255, 0), (0, 255)):
            cases.append((np.full((m, k), av, np.uint8), np.full((k, n), -128, np.int8), zp,
                          k * (av - zp) * -128))
    for k in (4608, 2304, 1024, 515):
        a = rng.choice(np.array([0, 255, 0, 255, 1], np.uint8), size=(19, k))
        b = rng.choice(np.array([-128, 127, -128, 127, -1], np.int8), size=(k, 33))
        cases += [(a, b, 0, None), (a, b, 255, None), (a, b, int(rng.integers(0, 256)), None)]
    for m, k, n in ((1, 1, 1), (7, 3, 5), (64, 147, 64), (130, 576, 70), (1, 4608, 1)):
        a = rng.integers(0, 256, (m, k), dtype=np.uint8)
        b = rng.integers(-128, 128, (k, n), dtype=np.int8)
        cases.append((a, b, int(rng.integers(0, 256)), None))
    for a, b, zp, constant in cases:
        c = np.full((a.shape[0], b.shape[1]), -1, np.int32)
        gemm(a, b, c, zp)
        if not np.array_equal(c, reference(a, b, zp) if constant is None else
                              np.full(c.shape, constant, np.int64)):
            return (f"uint8 x int8 GEMM {a.shape[0]}x{a.shape[1]}x{b.shape[1]} "
                    f"(a_zp {zp}) differs from int64 numpy")
    # A per-column offset, up to where the sum meets int32's bounds.
    k = 4608
    a = np.full((5, k), 255, np.uint8)
    b = np.full((k, 6), -128, np.int8)
    b[:, 1::2] = 127
    worst = (reference(a[:1], b[:, :2]))[0]
    co = np.array([-2**31 - worst[0], 2**31 - 1 - worst[1], 12345, -1, 0, 7], np.int32)
    for zp in (0, 200):
        c = np.full((5, 6), -1, np.int32)
        gemm(a, b, c, zp, co)
        if not np.array_equal(c, reference(a, b, zp, co)):
            return f"uint8 x int8 GEMM with a column offset (a_zp {zp}) differs from int64 numpy"
    # Strided operands, as the MAC engine passes them: a row pitch wider than K
    # (a slice of a larger tile), b and c column blocks of wider matrices.
    a_wide = rng.integers(0, 256, (37, 300), dtype=np.uint8)
    b_wide = rng.integers(-128, 128, (200, 90), dtype=np.int8)
    c_wide = np.full((37, 100), 7, np.int32)
    a, b, c = a_wide[:, 50:250], b_wide[:, 10:60], c_wide[:, 20:70]
    gemm(a, b, c, 3)
    expect = np.full((37, 100), 7, np.int64)
    expect[:, 20:70] = reference(a, b, 3)
    if not np.array_equal(c_wide, expect):
        return "strided GEMM differs from int64 numpy (or wrote outside its output)"
    return None


_lock = threading.Lock()
_state: tuple | None = None     # (gemm or None, description)


def _load() -> tuple:
    global _state
    with _lock:
        if _state is None:
            if os.environ.get(ENV, "").lower() == "numpy":
                _state = (None, f"numpy reference ({ENV}=numpy)")
            else:
                lib, where = _open()
                if lib is None:
                    _state = (None, f"numpy reference: {where}")
                else:
                    try:
                        why = self_test(lib)
                    except Exception as e:      # a library that cannot run is one we do not use
                        why = f"{type(e).__name__}: {e}"
                    _state = ((None, f"numpy reference: oneDNN {lib.version} ({where}) refused: {why}")
                              if why else (lib, f"oneDNN {lib.version} ({where}), exact (self-tested)"))
        return _state


def get():
    """The exact integer GEMM (callable as ``gemm(a, b, c, a_zp, co=None)``), or None
    when the numpy reference must be used."""
    state = _state if _state is not None else _load()
    return state[0]


def describe() -> str:
    """Which integer GEMM the emulator uses, and why."""
    return _load()[1]


def kernels() -> str:
    """Which kernels the emulator's integer GEMMs run, in a few words for `npuctl devices`:
    ``onednn 3.2.0 (avx512_core_vnni)``, or ``numpy reference`` and why."""
    gemm, why = _load()
    return f"onednn {gemm.version} ({gemm.isa})" if gemm is not None else why


def reset() -> None:
    """Forget the loaded backend (tests change the environment and reload)."""
    global _state
    with _lock:
        _state = None
