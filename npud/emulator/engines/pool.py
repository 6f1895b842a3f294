"""The pooling engine: max and average pooling over NHWC tiles."""

from __future__ import annotations

import numpy as np

from ..isa import FLAG_COUNT_INCLUDE_PAD, PoolFunc
from .common import store, view


def _valid_counts(size: int, k: int, s: int, pad_lo: int, out: int) -> np.ndarray:
    """How many real (unpadded) rows each output row's window covers."""
    start = np.arange(out) * s - pad_lo
    return np.minimum(start + k, size) - np.maximum(start, 0)


def pool(job, cmd) -> None:
    a = cmd.args
    sram = job.sram[cmd.core]
    x, out = view(sram, a.x), view(sram, a.out)
    n, h, w, c = x.shape
    _, oh, ow, _ = out.shape
    (kh, kw), (sh, sw) = a.kernel, a.stride
    pt, pb, pl, pr = a.pad
    is_max = a.func == PoolFunc.MAX
    if (kh, kw) == (h, w) and not (pt or pb or pl or pr):
        # Global pooling: one reduction instead of kh*kw shifted passes.
        if is_max:
            np.copyto(out, x.max(axis=(1, 2), keepdims=True))
        else:
            acc = x.sum(axis=(1, 2), keepdims=True,
                        dtype=np.float32 if x.dtype.kind == "f" else np.int64)
            store(out, acc / (acc.dtype.type(h * w) if x.dtype.kind == "f" else h * w))
        return
    if x.dtype.kind == "f":
        acc_t, fill = np.float32, (-np.inf if is_max else 0)
    elif is_max:    # exact in the input's own type: no widening
        acc_t, fill = x.dtype, np.iinfo(x.dtype).min
    else:
        acc_t, fill = np.int64, 0
    if pt or pb or pl or pr:
        xp = np.full((n, h + pt + pb, w + pl + pr, c), fill, dtype=acc_t)
        xp[:, pt:pt + h, pl:pl + w, :] = x
    else:
        xp = x.astype(acc_t)
    acc = None
    for p in range(kh):
        for q in range(kw):
            tap = xp[:, p:p + (oh - 1) * sh + 1:sh, q:q + (ow - 1) * sw + 1:sw, :]
            if acc is None:
                acc = tap.copy()
            elif is_max:
                np.maximum(acc, tap, out=acc)
            else:
                acc += tap
    if is_max:
        store(out, acc)
        return
    if a.flags & FLAG_COUNT_INCLUDE_PAD:
        count = np.full((oh, ow), kh * kw)
    else:
        count = np.outer(_valid_counts(h, kh, sh, pt, oh), _valid_counts(w, kw, sw, pl, ow))
    count = count[None, :, :, None]
    store(out, acc / (count.astype(np.float32) if x.dtype.kind == "f" else count))


EXECUTORS = {"pool": pool}
