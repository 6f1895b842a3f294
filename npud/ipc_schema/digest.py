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

    The chunks are hashed by two threads (hashlib releases the GIL), so a 100 MB model costs
    ~30 ms, not ~60.  With ``copy_to`` each chunk is first copied there and the copy is hashed
    while it is in cache: the digest is the copy's, whatever the source's owner does to it
    meanwhile.
    """
    view = memoryview(model).cast("B")
    n = len(view)

    def chunk(start: int) -> bytes:
        part = view[start:start + CHUNK]
        if copy_to is not None:
            copy_to[start:start + len(part)] = part
            part = memoryview(copy_to)[start:start + len(part)]
        return hashlib.sha256(part).digest()
    starts = range(0, max(n, 1), CHUNK)
    if len(starts) > 1:
        with ThreadPoolExecutor(THREADS) as pool:
            digests = list(pool.map(chunk, starts))
    else:
        digests = [chunk(0)]
    return hashlib.sha256(n.to_bytes(8, "little") + b"".join(digests)).digest()
