"""The compiler worker's confinement: it parses untrusted models, so it may open almost nothing.

A worker needs no file of the service: the daemon sends it a model's bytes and takes back the
executable over a socket it has already connected.  ``confine()`` therefore, before the worker
starts any thread and before it imports the compiler:

1. moves it into an empty directory and deletes that directory, so a relative path resolves
   to nothing (the first defence against a model that names a file, after the compiler's
   own refusal, npud/compiler_worker/external_data.py);
2. where the kernel has Landlock (Linux 5.13+), restricts the process, irrevocably, to reading
   and mapping the Python code and shared libraries it runs (the import path and the system
   library directories): no other file may be opened, no file written or created, no TCP
   socket bound or connected, and (Landlock ABI 6+) no signal sent and no abstract Unix
   socket reached outside the worker.  The compile cache, the state and configuration
   directories, /etc, /proc and every user's files are out of reach.

Landlock binds the calling thread and the threads it starts later, not threads already
running: hence "before any thread".  What a compromised worker can still reach is listed in
docs/RELIABILITY.md ("Isolation").
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import sys
import tempfile

# <linux/landlock.h>
_SYS_CREATE_RULESET, _SYS_ADD_RULE, _SYS_RESTRICT_SELF = 444, 445, 446   # generic syscall table
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH = 1
_FS_EXECUTE, _FS_READ_FILE, _FS_READ_DIR = 1 << 0, 1 << 2, 1 << 3
_FS_ABI1 = (1 << 13) - 1            # execute .. make_sym: every right of the first ABI
_FS_REFER, _FS_TRUNCATE, _FS_IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15   # ABI 2, 3, 5
_NET_BIND_TCP, _NET_CONNECT_TCP = 1 << 0, 1 << 1                     # ABI 4
_SCOPE_ABSTRACT_UNIX_SOCKET, _SCOPE_SIGNAL = 1 << 0, 1 << 1          # ABI 6
_PR_SET_NO_NEW_PRIVS = 38

READ_ONLY = _FS_READ_FILE | _FS_READ_DIR | _FS_EXECUTE
SYSTEM_LIBRARIES = ("/lib", "/lib64", "/usr/lib", "/usr/lib64", "/usr/local/lib", "/etc/ld.so.cache")
PACKAGES = ("npud.compiler_worker", "npud.emulator", "npud.ipc_schema", "npud.executable", "npud.targets",
            "npud.drivers", "onnx", "numpy", "msgpack", "zmq")


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def confine() -> str:
    """Confine this process as the module says; return what was done, for the log.  Never
    raises: a kernel without Landlock leaves the worker with the empty directory only."""
    started_in = _leave_for_empty_directory()
    threads = _thread_count()
    try:
        abi = landlock_abi()
        if abi < 1:
            return "an empty working directory; no Landlock in this kernel (or refused by a seccomp filter)"
        readable = readable_paths(exclude=started_in)
        restrict(abi, readable)
    except OSError as exc:
        return f"an empty working directory; Landlock failed: {exc}"
    note = "" if threads <= 1 else f"; {threads - 1} thread(s) started before it are not confined"
    return f"Landlock ABI {abi}: read-only {', '.join(readable)}; nothing else{note}"


def _leave_for_empty_directory() -> str | None:
    """Move into a deleted directory; return the one we started in (None if unknown)."""
    try:
        started_in = os.path.realpath(os.getcwd())
    except OSError:
        started_in = None
    path = tempfile.mkdtemp(prefix="npud-worker-")
    os.chdir(path)
    os.rmdir(path)   # relative paths now resolve in a deleted directory: to nothing
    return started_in


def _thread_count() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 1


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def landlock_abi() -> int:
    """The kernel's Landlock ABI version; 0 where it has none or a filter refuses the call."""
    result = _libc().syscall(_SYS_CREATE_RULESET, None, ctypes.c_size_t(0),
                             ctypes.c_uint32(_CREATE_RULESET_VERSION))
    return max(int(result), 0)


def readable_paths(exclude: str | None = None) -> list[str]:
    """What the worker keeps reading: the import path, its packages' directories (an editable
    install maps them from elsewhere) and the system libraries.  Never the root directory, nor
    ``exclude``: the directory the worker started in, which ``python -m`` puts on the import
    path and which may be the daemon's state directory (its packages are listed on their own)."""
    paths = [p for p in sys.path if p and os.path.isabs(p) and os.path.realpath(p) != exclude]
    for name in (*PACKAGES, *_target_plugins()):
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            paths.extend(spec.submodule_search_locations)
        elif spec is not None and spec.origin and os.path.isabs(spec.origin):
            paths.append(spec.origin)   # a plugin that is one module
    paths.extend(SYSTEM_LIBRARIES)
    seen, out = set(), []
    for p in paths:
        real = os.path.realpath(p)
        if real != "/" and real not in seen and os.path.exists(real):
            seen.add(real)
            out.append(real)
    return out


def _target_plugins() -> list[str]:
    """The top-level packages of the installed compiler targets (``npud.targets`` entry points): a
    vendor's, installed editable, is found through an import hook, not on the import path, and
    its worker must still read it (npuctl cts found a template target unreadable here)."""
    from npud import plugins

    return sorted({value.partition(":")[0].strip().split(".")[0] for value in plugins.installed("npud.targets").values()})


def restrict(abi: int, readable: list[str]) -> None:
    """Restrict this thread, and the threads and processes it starts, to reading ``readable``."""
    libc = _libc()
    handled_fs = _FS_ABI1 | (_FS_REFER if abi >= 2 else 0) | (_FS_TRUNCATE if abi >= 3 else 0) \
        | (_FS_IOCTL_DEV if abi >= 5 else 0)
    attr = _RulesetAttr(handled_fs, _NET_BIND_TCP | _NET_CONNECT_TCP if abi >= 4 else 0,
                        _SCOPE_ABSTRACT_UNIX_SOCKET | _SCOPE_SIGNAL if abi >= 6 else 0)
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8   # the struct grew with the ABI
    ruleset = _check(libc.syscall(_SYS_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size),
                                  ctypes.c_uint32(0)), "landlock_create_ruleset")
    try:
        for path in readable:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:
                access = READ_ONLY if os.path.isdir(path) else READ_ONLY & ~_FS_READ_DIR
                rule = _PathBeneathAttr(access, fd)
                _check(libc.syscall(_SYS_ADD_RULE, ctypes.c_int(ruleset), ctypes.c_int(_RULE_PATH_BENEATH),
                                    ctypes.byref(rule), ctypes.c_uint32(0)), f"landlock_add_rule {path}")
            finally:
                os.close(fd)
        _check(libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "PR_SET_NO_NEW_PRIVS")
        _check(libc.syscall(_SYS_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0)),
               "landlock_restrict_self")
    finally:
        os.close(ruleset)
