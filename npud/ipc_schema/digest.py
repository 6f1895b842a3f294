"""The model digest of the protocol (``load``'s ``model_digest``, PROTOCOL.md): one definition
that the daemon (its compile cache keys) and clients (loading by digest) share.

Standard library only: clients import it without the daemon's dependencies.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor

CHUNK = 16 << 20
THREADS = min(2, os.cpu_count() or 1)


def model_digest(model, copy_to: bytearray | None = None) -> bytes:
    """SHA-256 of the model's length (8 little-endian bytes) followed by the SHA-256 of each
    16 MiB chunk of it.

    ``model`` is one bytes-like object, or a list of them holding the model in order (a model
    sent in several buffers): the digest is that of their concatenation, which is never made.
    The chunks are hashed by two threads (hashlib releases the GIL), so a 100 MB model costs
    ~30 ms, not ~60.  With ``copy_to`` each chunk is first copied there and the copy is hashed
    while it is in cache: the digest is the copy's, whatever the source's owner does to it
    meanwhile.
    """
    parts = [memoryview(p).cast("B") for p in (model if isinstance(model, list) else [model])]
    n = sum(len(p) for p in parts)

    def chunk(start: int) -> bytes:
        h = hashlib.sha256()
        for at, part in _pieces(parts, start, min(start + CHUNK, n)):
            if copy_to is not None:
                copy_to[at:at + len(part)] = part
                part = memoryview(copy_to)[at:at + len(part)]
            h.update(part)
        return h.digest()
    starts = range(0, max(n, 1), CHUNK)
    if len(starts) > 1:
        with ThreadPoolExecutor(THREADS) as pool:
            digests = list(pool.map(chunk, starts))
    else:
        digests = [chunk(0)]
    return hashlib.sha256(n.to_bytes(8, "little") + b"".join(digests)).digest()


def _pieces(parts: list[memoryview], start: int, stop: int):
    """(offset in the whole, view) of each part's share of the bytes [start, stop) of their
    concatenation."""
    base = 0
    for part in parts:
        lo, hi = max(start, base), min(stop, base + len(part))
        if lo < hi:
            yield lo, part[lo - base:hi - base]
        base += len(part)
