"""Errors raised by the compiler."""

from __future__ import annotations


class CompileError(Exception):
    """A model (or one node of it) cannot be compiled.

    ``node`` and ``op`` name the offending node when there is one; ``reason``
    says why.  ``str()`` reads ``node 'conv1' (Conv): <reason>``, or just the
    reason for model-level problems (malformed bytes, cycles...).
    """

    def __init__(self, reason: str, node: str | None = None, op: str | None = None) -> None:
        self.reason = str(reason)
        self.node = node
        self.op = op
        super().__init__(self.__str__())

    def __str__(self) -> str:
        if self.node is not None or self.op is not None:
            return f"node {self.node!r} ({self.op}): {self.reason}"
        return self.reason

    def __reduce__(self):
        return (CompileError, (self.reason, self.node, self.op))

    def to_dict(self) -> dict:
        return {"node": self.node, "op": self.op, "reason": self.reason}


class CompileErrors(CompileError):
    """Several nodes are unsupported; ``errors`` lists every one (the first
    one's fields are this exception's own)."""

    def __init__(self, errors: list[CompileError]) -> None:
        self.errors = list(errors)
        first = self.errors[0]
        super().__init__(first.reason, first.node, first.op)

    def __str__(self) -> str:
        s = CompileError.__str__(self)
        if len(self.errors) > 1:
            s += f" (and {len(self.errors) - 1} more unsupported node(s))"
        return s

    def __reduce__(self):
        return (CompileErrors, (self.errors,))


# The container's error lives with the container (npud/executable), which the daemon imports.
from npud.executable import ExecutableFormatError  # noqa: E402,F401
