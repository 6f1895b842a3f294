"""The lowered program: physical tensors and lowered ops (LOps).

After the layout pass the graph is a list of :class:`LOp` over
:class:`PTensor` s.  A PTensor has a *physical* shape (NHWC for
convolution/pooling activations, the ONNX shape otherwise) and lives in one
region: ``const`` (weights blob, read-only), ``arena`` (activations, reused
by liveness), ``input`` or ``output`` (one I/O region each).  An alias
PTensor shares the bytes of another (Reshape, Flatten, a layout change that
does not move bytes...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

NCHW = (0, 1, 2, 3)
NHWC = (0, 2, 3, 1)
ESIZE = 4   # float32, the default element type (float activations and constants)


@dataclass
class PTensor:
    name: str
    shape: tuple
    kind: str = "arena"                 # const | arena | input | output
    const: np.ndarray | None = None
    alias: str | None = None            # shares the bytes of this PTensor
    logical: tuple | None = None
    va: int | None = None
    dtype: str = "float32"              # float32, or int8/uint8/int32 on the quantised path

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def esize(self) -> int:
        return np.dtype(self.dtype).itemsize

    @property
    def nbytes(self) -> int:
        return self.numel * self.esize


@dataclass
class LOp:
    kind: str            # conv matmul eltwise unary pool softmax reduce norm copy fill
    node: str
    op: str
    ins: list
    outs: list
    p: dict = field(default_factory=dict)
    plan: object = None  # the kernel's typed plan (kernels.Plan), set by the tiling pass


def cstrides(shape) -> tuple:
    """Contiguous element strides."""
    st, acc = [], 1
    for s in reversed(shape):
        st.append(acc)
        acc *= s
    return tuple(reversed(st))
