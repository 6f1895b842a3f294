"""The compile cache: executables on disk, addressed by what produced them.

The key is a hash of the model bytes, the compile options, the target's
fingerprint (its compiler's version and sources, npud/targets) and the
device's parameters, so any change to one of them is a miss.  Entries are written atomically (a temporary file renamed into place) and
checked when read: an executable whose integrity digest does not match is
deleted and compiled again, never run.  The cache is shared by every client
of the daemon and survives restarts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import tempfile
import threading
import time
from collections import OrderedDict
from pathlib import Path

from npud.drivers import DeviceParams
from npud.executable import ExecutableFormatError, PackedExecutable, read_meta
from npud.ipc_schema.digest import model_digest  # noqa: F401  (models.py and handlers.py import it from here)

log = logging.getLogger("npud.cache")

SUFFIX = ".npux"
MEMORY_BYTES = 256 << 20   # executables also kept in memory, most recently used first
# What an in-memory entry holds besides its file's bytes: the entry object, its key, identity and
# validation record, the memo's slot (measured with tracemalloc: ~400 bytes; a margin for more
# validation records and other Python builds).  ~420 with its trace layers and a validation record.
ENTRY_OVERHEAD = 640
TMP_PREFIX = ".tmp-"
# A temporary file this old was left by a writer that died (a SIGKILLed daemon, a power cut);
# younger ones may be another daemon's, sharing the directory, still writing.
STALE_TMP_S = 600.0


_IDENTITY = struct.Struct("<QQQq")


def _identity(st: os.stat_result) -> bytes:
    """Which file an entry was read from or written to (device, inode, size, mtime), packed:
    an in-memory entry keeps one small object for it, not a tuple of four integers."""
    return _IDENTITY.pack(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def default_directory(env=None) -> Path:
    """$CACHE_DIRECTORY (systemd's CacheDirectory=), else $XDG_CACHE_HOME/npud, else ~/.cache/npud."""
    env = os.environ if env is None else env
    if env.get("CACHE_DIRECTORY"):
        return Path(env["CACHE_DIRECTORY"].split(":")[0])
    base = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "npud"


def _model_name(path: Path) -> str:
    """The model name an entry's metadata records ("" if it has none or cannot be read)."""
    try:
        with open(path, "rb") as f:
            return str(read_meta(f).get("model_name", ""))[:256]
    except OSError:
        return ""


def cache_key(model, options: dict, config: DeviceParams, fingerprint: str, digest: bytes | None = None) -> str:
    """The entry's name; ``fingerprint`` is the target's (npud/targets: its compiler's version and
    sources); ``digest`` is ``model_digest(model)`` if the caller has it already."""
    h = hashlib.sha256()
    for part in (digest or model_digest(model),
                 json.dumps(options, sort_keys=True).encode(),
                 fingerprint.encode(),
                 json.dumps(config.to_dict(), sort_keys=True).encode()):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()


class CachedExecutable(PackedExecutable):
    """An executable as the daemon keeps it: the file's bytes (metadata decoded on use) plus the
    daemon's own notes, all in a few objects made once per entry.  A cache entry lives across
    busy periods, so the small objects it keeps are the ones that pin the allocator's arenas:
    JSON-decoded metadata was ~80 objects per tiny model (the 30-minute soak, docs/RELIABILITY.md).

    ``validated`` is the 16-byte keys (target and layout, npud/models.py) its stream passed the
    validator against, concatenated; ``ident`` the identity of the file it is the parsed form of;
    ``trace_layers`` what `trace` shows of its layers (npud/jobs.py compact_layers), made at its
    first load and shared by every load's jobs (the trace ring refers to it).
    """

    __slots__ = ("validated", "ident", "trace_layers")
    VALIDATION_KEY = 16

    def __init__(self, data: bytes):
        super().__init__(data)
        self.validated = b""
        self.ident = b""
        self.trace_layers: bytes | None = None

    def validated_for(self, key: bytes) -> bool:
        n = self.VALIDATION_KEY
        return any(self.validated[i:i + n] == key for i in range(0, len(self.validated), n))


def memory_cost(exe: CachedExecutable) -> int:
    """Bytes an in-memory entry holds: its file's bytes (kept as they are) and ``ENTRY_OVERHEAD``.
    (Parsed into Python objects, the metadata took ~6x its text, and counting file bytes let the
    soak's small models take ~3x the configured memory.)"""
    return len(exe.data) + ENTRY_OVERHEAD


class CompileCache:
    """The on-disk cache, with the most recently used executables also kept in memory.

    An in-memory entry is used only while its file is the one it was read from
    or written to (same inode, size and modification time), so deleting,
    replacing or corrupting a file on disk is noticed at the next lookup, and
    an entry whose file could not be written is never served.  ``get`` and
    ``put`` may run in worker threads.
    """

    def __init__(self, directory: Path, memory_bytes: int = MEMORY_BYTES):
        self.directory = Path(directory)
        self.hits = 0
        self.misses = 0
        self.discarded = 0
        self.memory_bytes = memory_bytes
        self._memo: OrderedDict[str, CachedExecutable] = OrderedDict()
        self._memo_size = 0
        self._lock = threading.Lock()
        self.remove_stale_temporaries()

    def counters(self) -> dict:
        """Lookups since start, as `status` reports them (`compile_cache_stats`)."""
        return {"hits": self.hits, "misses": self.misses, "discarded": self.discarded}

    def remove_stale_temporaries(self, older_than_s: float = STALE_TMP_S) -> int:
        """Delete temporary files that writers which died mid-``put`` left behind (they hold
        disk space nothing would ever free, and no lookup reads them); returns how many."""
        removed = 0
        now = time.time()
        try:
            paths = list(self.directory.glob(f"{TMP_PREFIX}*{SUFFIX}"))
        except OSError:
            return 0
        for path in paths:
            try:
                if now - path.stat().st_mtime > older_than_s:
                    path.unlink()
                    removed += 1
            except OSError:
                pass
        if removed:
            log.warning("removed %d temporary file(s) that a writer which died left in %s", removed,
                        self.directory)
        return removed

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}{SUFFIX}"

    def get(self, key: str) -> CachedExecutable | None:
        """The cached executable, or None (missing, unreadable or corrupt: then deleted)."""
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                ident = _identity(os.fstat(f.fileno()))
                with self._lock:
                    memo = self._memo.get(key)
                    if memo is not None and memo.ident == ident:
                        self._memo.move_to_end(key)
                        self.hits += 1
                        return memo
                data = f.read()
        except FileNotFoundError:
            self._forget(key)
            self.misses += 1
            return None
        except OSError as exc:
            log.warning("cannot read cache entry %s: %s", path, exc)
            self.misses += 1
            return None
        try:
            exe = CachedExecutable.from_bytes(data)
        except ExecutableFormatError as exc:
            log.warning("discarding corrupt cache entry %s: %s", path.name, exc)
            self._forget(key)
            self.discarded += 1
            self.misses += 1
            path.unlink(missing_ok=True)
            return None
        self._remember(key, ident, exe)
        self.hits += 1
        return exe

    def _remember(self, key: str, ident: bytes, exe: CachedExecutable) -> None:
        size = memory_cost(exe)
        with self._lock:
            old = self._memo.pop(key, None)
            if old is not None:
                self._memo_size -= memory_cost(old)
            if size > self.memory_bytes:
                return
            exe.ident = ident
            self._memo[key] = exe
            self._memo_size += size
            while self._memo_size > self.memory_bytes:
                _, dropped = self._memo.popitem(last=False)
                self._memo_size -= memory_cost(dropped)

    def _forget(self, key: str | None = None) -> None:
        with self._lock:
            if key is None:
                self._memo.clear()
                self._memo_size = 0
            elif key in self._memo:
                self._memo_size -= memory_cost(self._memo.pop(key))

    def remember(self, key: str, ident: bytes, exe: CachedExecutable) -> None:
        """Keep ``exe`` in memory as the parsed form of the entry file ``put`` identified."""
        self._remember(key, ident, exe)

    def discard(self, key: str) -> None:
        self._forget(key)
        self._path(key).unlink(missing_ok=True)

    def put(self, key: str, data: bytes, exe: CachedExecutable | None = None) -> bytes | None:
        """Store an entry atomically (and ``exe``, its parsed form, in memory); a full or
        read-only disk only costs the caching.  The stored file's identity, or None."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=TMP_PREFIX, suffix=SUFFIX)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self._path(key))
            except BaseException:
                os.unlink(tmp)
                raise
            ident = _identity(os.stat(self._path(key)))
            if exe is not None:
                self._remember(key, ident, exe)
            return ident
        except OSError as exc:
            log.warning("cannot store compile cache entry in %s: %s", self.directory, exc)
            return None

    def entries(self) -> list[dict]:
        out = []
        for path in sorted(self.directory.glob(f"*{SUFFIX}")):
            try:
                st = path.stat()
            except OSError:
                continue
            out.append({"key": path.stem, "size": st.st_size, "age_s": max(0.0, time.time() - st.st_mtime),
                        "model_name": _model_name(path)})
        return out

    def clear(self) -> int:
        self._forget()
        removed = 0
        for path in self.directory.glob(f"*{SUFFIX}"):
            try:
                path.unlink()
                removed += 1
            except OSError:
                pass
        return removed
