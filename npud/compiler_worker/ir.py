"""The compiler's graph IR: a small, mutable, ONNX-shaped graph.

Tensors are named values with a static shape, a numpy dtype and, for
constants, their value.  Nodes keep the ONNX op type and attributes
(normalised by the passes: parameter inputs such as Reshape's shape or
Slice's starts move into ``attrs`` once they are constant).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import CompileError


@dataclass
class Tensor:
    name: str
    shape: tuple | None = None          # ints; None = unknown
    dtype: np.dtype | None = None
    const: np.ndarray | None = None     # value if constant

    @property
    def is_const(self) -> bool:
        return self.const is not None

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= int(d)
        return n


@dataclass
class Node:
    name: str
    op: str
    inputs: list
    outputs: list
    attrs: dict = field(default_factory=dict)
    domain: str = ""

    def fail(self, reason: str) -> CompileError:
        return CompileError(reason, node=self.name, op=self.op)

    def input(self, i: int) -> str:
        return self.inputs[i] if i < len(self.inputs) else ""


@dataclass
class Graph:
    nodes: list
    tensors: dict
    inputs: list          # graph input names (non-constant)
    outputs: list         # graph output names
    opset: int
    name: str = "model"
    meta: dict = field(default_factory=dict)

    def t(self, name: str) -> Tensor:
        t = self.tensors.get(name)
        if t is None:
            t = self.tensors[name] = Tensor(name)
        return t

    def const(self, name: str):
        t = self.tensors.get(name)
        return None if t is None else t.const

    def add_const(self, base: str, value: np.ndarray) -> str:
        name = base
        i = 0
        while name in self.tensors:
            i += 1
            name = f"{base}_{i}"
        value = np.asarray(value)
        self.tensors[name] = Tensor(name, tuple(value.shape), value.dtype, value)
        return name

    def fresh(self, base: str) -> str:
        name, i = base, 0
        while name in self.tensors:
            i += 1
            name = f"{base}_{i}"
        self.tensors[name] = Tensor(name)
        return name

    def producers(self) -> dict:
        return {o: n for n in self.nodes for o in n.outputs if o}

    def consumers(self) -> dict:
        c: dict = {}
        for n in self.nodes:
            for i in n.inputs:
                if i:
                    c.setdefault(i, []).append(n)
        return c

    def toposort(self) -> None:
        """Order nodes so producers come first; CompileError on a cycle."""
        prod = {}
        for n in self.nodes:
            for o in n.outputs:
                if o:
                    if o in prod:
                        raise CompileError(f"tensor {o!r} is produced by two nodes "
                                           f"({prod[o].name!r} and {n.name!r})")
                    prod[o] = n
        state: dict = {}
        order = []
        for root in self.nodes:
            if id(root) in state:
                continue
            stack = [(root, 0)]
            state[id(root)] = 1
            while stack:
                n, i = stack.pop()
                ins = [x for x in n.inputs if x and x in prod]
                if i < len(ins):
                    stack.append((n, i + 1))
                    p = prod[ins[i]]
                    s = state.get(id(p))
                    if s == 1:
                        raise CompileError(f"graph has a cycle through node {p.name!r} "
                                           f"({p.op}) and tensor {ins[i]!r}")
                    if s is None:
                        state[id(p)] = 1
                        stack.append((p, 0))
                else:
                    state[id(n)] = 2
                    order.append(n)
        self.nodes = order

    def prune(self) -> None:
        """Drop nodes whose outputs nobody needs, and unused tensors."""
        need = set(self.outputs)
        keep = []
        for n in reversed(self.nodes):
            if any(o in need for o in n.outputs if o):
                keep.append(n)
                need.update(i for i in n.inputs if i)
        self.nodes = keep[::-1]
        used = need | set(self.inputs)
        for n in self.nodes:
            used.update(o for o in n.outputs if o)
        self.tensors = {k: v for k, v in self.tensors.items() if k in used}
