"""The executable: a versioned, self-describing, integrity-checked binary.

The container both sides import: a target (npud/targets) writes it, the daemon reads and checks
it (it trusts no compiler's output) without importing any compiler module.

Layout (little-endian)::

    header   magic "NPUX" | u16 format_version | u16 flags (0)
             | char compiler_version[16] (ASCII, NUL padded) | u8 target_hash[8]
             | u32 section_count
    table    section_count x (char tag[4] | u64 offset | u64 size)   offsets from file start
    payload  the sections, each 16-byte aligned, in table order
    trailer  u32 digest = CRC-32 (zlib's) of every byte before it

Format version 2 replaced version 1's BLAKE2b-256 trailer by a CRC-32: the digest guards against
corruption (a torn write, a flipped bit on disk), not forgery (it has no key: whoever can write a
file can recompute any hash of it), and a 100 MB executable is checked on each side of a compile,
where BLAKE2b cost ~0.11 s of CPU each and CRC-32 ~0.025 s (docs/PERFORMANCE.md, "Cold compile,
issue 15").
Files of version 1 are refused as unsupported; the compile cache deletes and recompiles them.

Sections: ``STRM`` command stream (npu-emu binary, docs/ISA.md), ``WGHT``
weights blob (mapped read-only: each ``weights`` region maps the bytes
``[offset, offset + size)`` of it, see :func:`weights_part`),
``IOTB`` I/O table (JSON), ``MEMO`` memory layout (JSON), ``RPRT`` per-op
report (JSON), ``META`` compile metadata (JSON).  Field by field in
docs/COMPILER.md.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field



class ExecutableFormatError(ValueError):
    """Bytes that are not a valid, intact executable."""


MAGIC = b"NPUX"
FORMAT_VERSION = 2
HEADER = struct.Struct("<4sHH16s8sI")
ENTRY = struct.Struct("<4sQQ")
TRAILER = struct.Struct("<I")
DIGEST = TRAILER.size
SECTIONS = (b"STRM", b"WGHT", b"IOTB", b"MEMO", b"RPRT", b"META")
MAX_SECTIONS = 64


@dataclass
class Report:
    """Per-op performance report: ``rows`` (dicts) and ``table`` (text)."""
    rows: list
    table: str

    def __iter__(self):
        return iter(self.rows)

    def __str__(self) -> str:
        return self.table


@dataclass
class Executable:
    stream: bytes
    weights: bytes
    io: dict                       # {"inputs": [...], "outputs": [...]}
    memory: dict                   # {"regions": [...], "arena_bytes", "naive_bytes", ...}
    ops: list                      # per-op report rows
    meta: dict = field(default_factory=dict)
    compiler_version: str = ""
    target_hash: bytes = b"\0" * 8
    format_version: int = FORMAT_VERSION

    @property
    def inputs(self) -> list:
        return self.io["inputs"]

    @property
    def outputs(self) -> list:
        return self.io["outputs"]

    # --- serialisation -------------------------------------------------------------
    def to_bytes(self) -> bytes:
        payloads = [bytes(self.stream), memoryview(self.weights).cast("B"), _js(self.io), _js(self.memory),
                    _js(self.ops), _js(self.meta)]
        cv = self.compiler_version.encode("ascii")[:16]
        head = HEADER.pack(MAGIC, self.format_version, 0, cv.ljust(16, b"\0"),
                           bytes(self.target_hash), len(payloads))
        pos = HEADER.size + ENTRY.size * len(payloads)
        table, body = [], []
        for tag, data in zip(SECTIONS, payloads):
            pad = -pos % 16
            body.append(b"\0" * pad)
            pos += pad
            table.append(ENTRY.pack(tag, pos, len(data)))
            body.append(data)
            pos += len(data)
        parts = [head, *table, *body]
        return b"".join((*parts, integrity_digest(*parts)))

    @classmethod
    def from_bytes(cls, data: bytes) -> "Executable":
        parsed = _parse(data)
        return cls(bytes(parsed.sections[b"STRM"]), bytes(parsed.sections[b"WGHT"]), *parsed.documents,
                   parsed.compiler_version, parsed.target_hash, parsed.format_version)

    # --- reporting ---------------------------------------------------------------
    def report(self) -> Report:
        rows = [dict(r) for r in self.ops]
        hdr = ("op", "node", "output shape", "MACs", "cycles", "SRAM B", "DMA B", "cmds")
        lines = [[r["op"], r["node"], "x".join(map(str, r["outputs"][0])) if r["outputs"] else "",
                  f"{r['macs']:,}", f"{r['cycles']:,}", f"{r['sram_bytes']:,}",
                  f"{r['dma_bytes']:,}", str(r["commands"])] for r in rows]
        tot = ["TOTAL", "", "", f"{sum(r['macs'] for r in rows):,}",
               f"{sum(r['cycles'] for r in rows):,}",
               f"{max((r['sram_bytes'] for r in rows), default=0):,}",
               f"{sum(r['dma_bytes'] for r in rows):,}", str(sum(r["commands"] for r in rows))]
        widths = [max(len(str(x[i])) for x in [hdr, tot] + lines) for i in range(len(hdr))]

        def fmt(cols):
            return "  ".join(str(c).ljust(w) if i < 3 else str(c).rjust(w)
                             for i, (c, w) in enumerate(zip(cols, widths)))
        mem = self.memory
        out = [fmt(hdr), fmt(["-" * w for w in widths])] + [fmt(l) for l in lines] + \
            [fmt(["-" * w for w in widths]), fmt(tot),
             f"arena {mem.get('arena_bytes', 0):,} bytes (naive sum {mem.get('naive_bytes', 0):,}), "
             f"weights {mem.get('weights_bytes', 0):,} bytes, stream {len(self.stream):,} bytes"]
        return Report(rows, "\n".join(out))


def integrity_digest(*parts) -> bytes:
    """The trailer of an executable whose bytes before it are ``parts`` in order: their CRC-32,
    computed part by part (the weights are not copied for it; zlib releases the GIL)."""
    crc = 0
    for part in parts:
        crc = zlib.crc32(part, crc)
    return TRAILER.pack(crc)


@dataclass
class _Parsed:
    format_version: int
    compiler_version: str
    target_hash: bytes
    sections: dict          # tag -> memoryview into the checked bytes
    documents: tuple        # io, memory, ops, meta (decoded JSON)


def _parse(data) -> _Parsed:
    """Every check of the format, over views of ``data`` (a 100 MB executable is not copied to be
    checked); ExecutableFormatError naming the first problem."""
    view = memoryview(data).cast("B")
    if len(view) < HEADER.size + DIGEST:
        raise ExecutableFormatError(f"executable of {len(view)} bytes is truncated")
    magic, ver, flags, cv, th, count = HEADER.unpack_from(view)
    if magic != MAGIC:
        raise ExecutableFormatError(f"bad magic {magic!r}: not an npud executable")
    if ver != FORMAT_VERSION:
        raise ExecutableFormatError(f"unsupported executable format version {ver} "
                                    f"(this compiler reads {FORMAT_VERSION})")
    body, digest = view[:-DIGEST], view[-DIGEST:]
    if integrity_digest(body) != digest:
        raise ExecutableFormatError("executable is corrupt: integrity digest mismatch")
    if flags != 0:
        raise ExecutableFormatError(f"reserved flags 0x{flags:x} set")
    try:
        compiler_version = cv.rstrip(b"\0").decode("ascii")
    except UnicodeDecodeError:  # found by fuzzing: it loaded, then to_bytes() failed
        raise ExecutableFormatError(f"compiler version {cv!r} is not ASCII") from None
    if count > MAX_SECTIONS or HEADER.size + count * ENTRY.size > len(body):
        raise ExecutableFormatError(f"bad section count {count}")
    sections = {}
    for i in range(count):
        tag, off, size = ENTRY.unpack_from(view, HEADER.size + i * ENTRY.size)
        if off + size > len(body):
            raise ExecutableFormatError(f"section {tag!r} lies outside the file")
        sections[tag] = body[off:off + size]
    missing = [t.decode() for t in SECTIONS if t not in sections]
    if missing:
        raise ExecutableFormatError(f"missing section(s) {', '.join(missing)}")
    try:
        documents = tuple(json.loads(bytes(sections[t])) for t in (b"IOTB", b"MEMO", b"RPRT", b"META"))
    except ValueError as e:
        raise ExecutableFormatError(f"malformed metadata section: {e}") from None
    return _Parsed(ver, compiler_version, th, sections, documents)


MAX_META_BYTES = 1 << 20


def read_meta(f) -> dict:
    """The META section of an executable file open for reading (binary), reading only the header,
    the section table and that section, and checking nothing else: for listings (a damaged file
    shows as {}); loading an executable still checks all of it."""
    head = f.read(HEADER.size)
    if len(head) < HEADER.size:
        return {}
    magic, _ver, _flags, _cv, _th, count = HEADER.unpack(head)
    if magic != MAGIC or count > MAX_SECTIONS:
        return {}
    table = f.read(ENTRY.size * count)
    for i in range(len(table) // ENTRY.size):
        tag, off, size = ENTRY.unpack_from(table, i * ENTRY.size)
        if tag == b"META" and size <= MAX_META_BYTES:
            f.seek(off)
            try:
                meta = json.loads(f.read(size))
            except ValueError:
                return {}
            return meta if isinstance(meta, dict) else {}
    return {}


class PackedExecutable:
    """An executable kept as the file it was read from, one bytes object, its metadata parsed on use.

    A long-running reader that keeps many executables (npud's compile cache) would otherwise
    hold each one's JSON-decoded metadata: ~80 small Python objects per tiny model, made while
    other work comes and goes, which keep the allocator's arenas from being returned.  Reads
    like an ``Executable``: ``stream`` is a copy, ``weights`` a read-only view into the file,
    and ``io``, ``memory``, ``ops`` and ``meta`` are decoded afresh at each access (callers that
    use them repeatedly keep what they need).
    """

    __slots__ = ("data",)

    def __init__(self, data: bytes):
        """``data`` must be an executable ``from_bytes`` accepted (it is not checked again)."""
        self.data = data

    @classmethod
    def from_bytes(cls, data) -> "PackedExecutable":
        """Checked exactly as ``Executable.from_bytes`` checks it (ExecutableFormatError)."""
        data = bytes(data)   # no copy when it is bytes already
        _parse(data)
        return cls(data)

    def _span(self, tag: bytes) -> tuple[int, int]:
        count = HEADER.unpack_from(self.data)[5]
        for i in range(count):
            found, off, size = ENTRY.unpack_from(self.data, HEADER.size + i * ENTRY.size)
            if found == tag:
                return off, size
        raise KeyError(tag)   # from_bytes checked every section is there

    def _json(self, tag: bytes):
        off, size = self._span(tag)
        return json.loads(self.data[off:off + size])

    @property
    def stream(self) -> bytes:
        off, size = self._span(b"STRM")
        return self.data[off:off + size]

    @property
    def weights(self) -> memoryview:
        off, size = self._span(b"WGHT")
        return memoryview(self.data)[off:off + size]

    io = property(lambda self: self._json(b"IOTB"))
    memory = property(lambda self: self._json(b"MEMO"))
    ops = property(lambda self: self._json(b"RPRT"))
    meta = property(lambda self: self._json(b"META"))
    inputs = property(lambda self: self.io["inputs"])
    outputs = property(lambda self: self.io["outputs"])
    format_version = property(lambda self: HEADER.unpack_from(self.data)[1])
    compiler_version = property(lambda self: HEADER.unpack_from(self.data)[3].rstrip(b"\0").decode("ascii"))
    target_hash = property(lambda self: HEADER.unpack_from(self.data)[4])
    report = Executable.report

    def to_bytes(self) -> bytes:
        return self.data


def weights_part(weights, region: dict) -> memoryview:
    """The bytes of the weights blob that a ``weights`` region maps: ``size`` bytes from its
    ``offset`` (absent: 0, as executables with one weights region wrote it).  ValueError when
    the range is not inside the blob (the daemon trusts no compiler's layout)."""
    offset, size = region.get("offset", 0), region["size"]
    if type(offset) is not int or type(size) is not int or not 0 <= offset <= offset + size <= len(weights):
        raise ValueError(f"weights region {region.get('name')!r} maps bytes {offset}..{offset}+{size} "
                         f"of a {len(weights)}-byte weights blob")
    return memoryview(weights)[offset:offset + size]


def _js(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
