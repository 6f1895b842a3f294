"""The compile cache: executables on disk, addressed by what produced them.

The key is a hash of the model bytes, the compile options, the compiler
version and the target's parameters, so any change to one of them is a miss.
Entries are written atomically (a temporary file renamed into place) and
checked when read: an executable whose integrity digest does not match is
deleted and compiled again, never run.  The cache is shared by every client
of the daemon and survives restarts.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path

from compiler_worker.executable import Executable
from compiler_worker.errors import ExecutableFormatError
from compiler_worker.pipeline import COMPILER_VERSION
from emulator.config import DeviceConfig

log = logging.getLogger("npud.cache")

SUFFIX = ".npux"


def default_directory(env=None) -> Path:
    """$CACHE_DIRECTORY (systemd's CacheDirectory=), else $XDG_CACHE_HOME/npud, else ~/.cache/npud."""
    env = os.environ if env is None else env
    if env.get("CACHE_DIRECTORY"):
        return Path(env["CACHE_DIRECTORY"].split(":")[0])
    base = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "npud"


@functools.cache
def compiler_fingerprint() -> str:
    """The compiler's version plus a hash of its sources and the ISA's.

    A version string alone would let a changed compiler (a developer's tree, a
    patched package) be served executables its predecessor built.
    """
    import compiler_worker
    import emulator

    h = hashlib.sha256(COMPILER_VERSION.encode())
    for package in (compiler_worker, emulator):
        root = Path(package.__file__).parent
        for path in sorted(root.rglob("*.py")):
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    return f"{COMPILER_VERSION}+{h.hexdigest()[:16]}"


def cache_key(model: bytes, options: dict, config: DeviceConfig) -> str:
    h = hashlib.sha256()
    for part in (hashlib.sha256(model).digest(),
                 json.dumps(options, sort_keys=True).encode(),
                 compiler_fingerprint().encode(),
                 json.dumps(config.to_dict(), sort_keys=True).encode()):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()


class CompileCache:
    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.hits = 0
        self.misses = 0
        self.discarded = 0

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}{SUFFIX}"

    def get(self, key: str) -> Executable | None:
        """The cached executable, or None (missing, unreadable or corrupt: then deleted)."""
        path = self._path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            self.misses += 1
            return None
        except OSError as exc:
            log.warning("cannot read cache entry %s: %s", path, exc)
            self.misses += 1
            return None
        try:
            exe = Executable.from_bytes(data)
        except ExecutableFormatError as exc:
            log.warning("discarding corrupt cache entry %s: %s", path.name, exc)
            self.discarded += 1
            self.misses += 1
            path.unlink(missing_ok=True)
            return None
        self.hits += 1
        return exe

    def put(self, key: str, data: bytes) -> None:
        """Store an entry atomically; a full or read-only disk only costs the caching."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-", suffix=SUFFIX)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self._path(key))
            except BaseException:
                os.unlink(tmp)
                raise
        except OSError as exc:
            log.warning("cannot store compile cache entry in %s: %s", self.directory, exc)

    def entries(self) -> list[dict]:
        out = []
        for path in sorted(self.directory.glob(f"*{SUFFIX}")):
            try:
                st = path.stat()
            except OSError:
                continue
            out.append({"key": path.stem, "size": st.st_size,
                        "age_s": max(0.0, time.time() - st.st_mtime)})
        return out

    def clear(self) -> int:
        removed = 0
        for path in self.directory.glob(f"*{SUFFIX}"):
            try:
                path.unlink()
                removed += 1
            except OSError:
                pass
        return removed
