"""Per-context address translation.

Architecturally each hardware context has a page table: virtual page ->
(buffer-object page, writable).  Because the daemon always maps a BO (or a
page-aligned slice of one) as a whole, the table is stored as a sorted list
of *regions* -- runs of virtual pages backed by consecutive pages of one
buffer -- which is the same table, compressed.  A DMA whose footprint lies in
one region becomes a single strided numpy view of the buffer; anything else
(crossing regions, touching holes) is translated element by element, so a
fault reports the exact first faulting address.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

from .errors import PageFault
from .isa import VA_BITS


@dataclass(frozen=True)
class Mapping:
    """A mapped virtual range as the validator sees it.  ``immutable``: nothing writes its bytes
    while the program validated against it is loaded (only a read-only mapping may say so)."""
    va: int
    size: int
    writable: bool
    immutable: bool = False


class _Region:
    __slots__ = ("va", "end", "mem", "writable")

    def __init__(self, va: int, mem: np.ndarray, writable: bool) -> None:
        self.va, self.end, self.mem, self.writable = va, va + mem.size, mem, writable


def footprint(dtype: np.dtype, shape, strides) -> int:
    """Bytes from a strided access's first element to the end of its last."""
    return dtype.itemsize + sum((n - 1) * s for n, s in zip(shape, strides))


class PageTable:
    """The MMU state of one hardware context."""

    def __init__(self, page_size: int) -> None:
        self.page_size = page_size
        self._regions: list[_Region] = []
        self._starts: list[int] = []

    def map(self, va: int, buffer, *, writable: bool) -> None:
        """Map `buffer` (any buffer-protocol object, writable if `writable`)
        at `va`.  ValueError on misalignment, overlap, or a read-only buffer
        mapped writable."""
        ps = self.page_size
        if not isinstance(va, int) or va < 0 or va % ps:
            raise ValueError(f"va {va!r} is not a non-negative multiple of the page size {ps}")
        mem = np.frombuffer(buffer, dtype=np.uint8)
        if mem.size == 0 or mem.size % ps:
            raise ValueError(f"buffer of {mem.size} bytes is not a positive multiple of "
                             f"the page size {ps}")
        if va + mem.size > 1 << VA_BITS:
            raise ValueError(f"mapping 0x{va:x}+0x{mem.size:x} exceeds the {VA_BITS}-bit VA space")
        if writable and not mem.flags.writeable:
            raise ValueError("cannot map a read-only buffer writable")
        i = bisect.bisect_right(self._starts, va)
        if i > 0 and self._regions[i - 1].end > va:
            raise ValueError(f"mapping at 0x{va:x} overlaps the mapping at 0x{self._starts[i - 1]:x}")
        if i < len(self._starts) and self._starts[i] < va + mem.size:
            raise ValueError(f"mapping at 0x{va:x} overlaps the mapping at 0x{self._starts[i]:x}")
        self._regions.insert(i, _Region(va, mem, bool(writable)))
        self._starts.insert(i, va)

    def unmap(self, va: int) -> None:
        """Remove the mapping that starts at `va`; ValueError if there is none."""
        i = bisect.bisect_left(self._starts, va)
        if i == len(self._starts) or self._starts[i] != va:
            raise ValueError(f"no mapping starts at va {va!r}")
        del self._regions[i], self._starts[i]

    def mappings(self) -> list[Mapping]:
        return [Mapping(r.va, r.end - r.va, r.writable) for r in self._regions]

    # --- translation -----------------------------------------------------------
    def view(self, va: int, dtype: np.dtype, shape, strides, *, write: bool,
             command_index: int | None = None, what: str = "", span: int | None = None) -> np.ndarray:
        """A numpy array aliasing device memory for a strided access, or
        PageFault at the first element (row-major order) that is unmapped or
        lacks permission.  The fast path when the whole footprint lies in one
        region; otherwise returns a _Scatter for the caller to gather/scatter.
        `span`: the access's extent in bytes (:func:`footprint`), if the caller made it once."""
        if span is None:
            span = footprint(dtype, shape, strides)
        i = bisect.bisect_right(self._starts, va) - 1
        if i >= 0:
            r = self._regions[i]
            if va + span <= r.end and (r.writable or not write):
                return np.ndarray(shape, dtype, buffer=r.mem, offset=va - r.va, strides=strides)
        return _Scatter(self, va, dtype, shape, strides, write, command_index, what)

    def _translate(self, addrs: np.ndarray, write: bool, command_index, what):
        """Region index of every byte address; PageFault on the first bad one."""
        starts = np.asarray(self._starts, dtype=np.int64)
        ends = np.asarray([r.end for r in self._regions], dtype=np.int64)
        writable = np.asarray([r.writable for r in self._regions], dtype=bool)
        idx = np.searchsorted(starts, addrs, side="right") - 1
        ok = idx >= 0
        safe = np.where(ok, idx, 0)
        if len(self._regions):
            ok &= addrs < ends[safe]
            if write:
                ok &= writable[safe]
        else:
            ok[:] = False
        if not ok.all():
            bad = int(addrs[np.argmin(ok)])
            j = bisect.bisect_right(self._starts, bad) - 1
            mapped = j >= 0 and bad < self._regions[j].end
            access = "write" if write else "read"
            reason = "read-only page" if mapped else "unmapped page"
            where = f" by command {command_index}" if command_index is not None else ""
            raise PageFault(f"page fault: {access} of VA 0x{bad:x} ({reason}){where}"
                            f"{' (' + what + ')' if what else ''}",
                            address=bad, access=access, command_index=command_index)
        return safe


class _Scatter:
    """Slow path: a strided access that spans several regions."""

    def __init__(self, pt: PageTable, va, dtype, shape, strides, write, command_index, what):
        offs = np.zeros((1,), dtype=np.int64)
        for n, s in zip(shape, strides):
            offs = (offs[:, None] + np.arange(n, dtype=np.int64) * s).ravel()
        byte_addrs = (va + offs[:, None] + np.arange(dtype.itemsize, dtype=np.int64)).ravel()
        self.addrs = byte_addrs
        self.region = pt._translate(byte_addrs, write, command_index, what)
        self.pt, self.dtype, self.shape = pt, dtype, tuple(shape)

    def read(self) -> np.ndarray:
        out = np.empty(self.addrs.size, dtype=np.uint8)
        for j in np.unique(self.region):
            r = self.pt._regions[j]
            m = self.region == j
            out[m] = r.mem[self.addrs[m] - r.va]
        return out.view(self.dtype).reshape(self.shape)

    def write(self, values: np.ndarray) -> None:
        data = np.ascontiguousarray(values, dtype=self.dtype).view(np.uint8).ravel()
        for j in np.unique(self.region):
            r = self.pt._regions[j]
            m = self.region == j
            r.mem[self.addrs[m] - r.va] = data[m]
