"""One compute thread per device process: the BLAS and OpenMP thread pools pinned to one thread.

Parallelism in npud is across device processes (one per modeled core), never inside one.
A second OpenBLAS or OpenMP thread in each device process spin-waits for work; with several
device processes on a shared host those threads take the cores from each other and from
everything else, and a run measured 20x slower under load (docs/PERFORMANCE.md).

Two layers, because each alone can fail: ``npud.drivers.ONE_COMPUTE_THREAD`` goes into
every device process's environment when the daemon starts it (npud/devices.py), before numpy or oneDNN is loaded, so their
pools never start more threads; :func:`pin` then sets every loaded OpenBLAS and OpenMP
runtime to one thread through its own API, whatever the environment said, and
:func:`counts` reads back what they use (the device process reports it to the daemon).
"""

from __future__ import annotations

import ctypes
import os
import threading

# OpenBLAS's thread-count API under the names its builds export (numpy's wheels ship
# scipy-openblas, whose symbols carry a prefix and a 64-bit-integer suffix).
_OPENBLAS_NAMES = ("openblas_{}_num_threads", "openblas_{}_num_threads64_",
                   "scipy_openblas_{}_num_threads64_", "scipy_openblas_{}_num_threads")


def _loaded(*needles: str) -> list[str]:
    """Paths of the shared libraries mapped into this process whose file name contains a needle."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split(None, 5)[5].strip() for line in f if line.count(" ") >= 5 and "/" in line}
    except (OSError, IndexError):
        return []
    return sorted(p for p in paths if ".so" in p and any(n in os.path.basename(p) for n in needles))


def _open(path: str) -> ctypes.CDLL | None:
    """An already loaded library, without loading anything new."""
    try:
        return ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LOCAL)
    except OSError:
        return None


def _openblas(verb: str) -> list:
    """OpenBLAS's ``get``/``set`` thread-count functions, one per loaded OpenBLAS."""
    found = []
    for path in _loaded("openblas"):
        lib = _open(path)
        for name in _OPENBLAS_NAMES:
            fn = getattr(lib, name.format(verb), None) if lib is not None else None
            if fn is not None:
                found.append(fn)
                break
    return found


def _openmp(name: str) -> list:
    """``name`` (an OpenMP API function) of every loaded OpenMP runtime (GNU, LLVM, Intel)."""
    libs = [_open(p) for p in _loaded("libgomp", "libomp", "libiomp")]
    return [getattr(lib, name) for lib in libs if lib is not None and hasattr(lib, name)]


def pin() -> dict[str, int]:
    """Set every loaded OpenBLAS and OpenMP runtime to one thread; returns :func:`counts`.

    OpenMP's count is per calling thread: this sets the calling thread's (the device
    process's only compute thread)."""
    for fn in _openblas("set"):
        fn.argtypes = [ctypes.c_int]
        fn(1)
    _one_openmp_thread()
    return counts()


def one_openmp_thread_here() -> None:
    """One OpenMP thread for the calling thread, set once per thread (an OpenMP setting is per
    thread): the kernels (oneDNN's primitives and GEMM) call it before they run, wherever they
    run -- a device process's compute thread, or a test's or benchmark's own thread.  oneDNN
    blocks a primitive for the thread count it is created under, and extra threads spin against
    the other device processes."""
    if not getattr(_here, "pinned", False):
        _here.pinned = _one_openmp_thread()


def _one_openmp_thread() -> bool:
    """Every loaded OpenMP runtime at one thread for the calling thread; False if none is loaded."""
    found = _openmp("omp_set_num_threads")
    for fn in found:
        fn.argtypes = [ctypes.c_int]
        fn(1)
    return bool(found)


_here = threading.local()


def counts() -> dict[str, int]:
    """The most threads each kind of loaded pool will use: ``{"openblas": n, "openmp": n}``
    (a kind with no library loaded is left out)."""
    out = {}
    for kind, fns in (("openblas", _openblas("get")), ("openmp", _openmp("omp_get_max_threads"))):
        for fn in fns:
            fn.restype = ctypes.c_int
            out[kind] = max(out.get(kind, 0), int(fn()))
    return out
