"""Field types of the wire protocol: what a value must be, and the limits it must keep.

Each type validates a decoded msgpack value and raises ``FieldError`` naming the
path of the offending field.  ``strict=False`` reads a newer peer's messages:
fields this side does not know are dropped instead of refused, which is what
lets a minor protocol version add fields (the daemon checks requests strictly;
clients read replies leniently).  The same objects render themselves for
docs/PROTOCOL.md (``describe()``), so the documentation cannot drift from the
checks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class FieldError(ValueError):
    """A value does not match its declared type; ``path`` names where."""

    def __init__(self, path: str, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


def _kind(value: Any) -> str:
    return {bool: "bool", int: "int", float: "float", str: "str", bytes: "bin",
            list: "array", dict: "map", type(None): "nil"}.get(type(value), type(value).__name__)


class Type:
    def check(self, value: Any, path: str, strict: bool = True) -> Any:  # pragma: no cover - interface
        raise NotImplementedError

    def describe(self) -> str:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass(frozen=True)
class Int(Type):
    min: int = 0
    max: int = 2**63 - 1

    def check(self, value, path, strict=True):
        # bool is an int in Python but a distinct type in msgpack: refuse it.
        if type(value) is not int:
            raise FieldError(path, f"expected int, got {_kind(value)}")
        if not self.min <= value <= self.max:
            raise FieldError(path, f"{value} is out of range [{self.min}, {self.max}]")
        return value

    def describe(self):
        return f"int [{self.min}..{self.max}]"


@dataclass(frozen=True)
class Float(Type):
    def check(self, value, path, strict=True):
        if type(value) not in (float, int):
            raise FieldError(path, f"expected float, got {_kind(value)}")
        return float(value)

    def describe(self):
        return "float"


@dataclass(frozen=True)
class Bool(Type):
    def check(self, value, path, strict=True):
        if type(value) is not bool:
            raise FieldError(path, f"expected bool, got {_kind(value)}")
        return value

    def describe(self):
        return "bool"


@dataclass(frozen=True)
class Str(Type):
    max_len: int = 256
    choices: tuple[str, ...] = ()

    def check(self, value, path, strict=True):
        if type(value) is not str:
            raise FieldError(path, f"expected str, got {_kind(value)}")
        if len(value) > self.max_len:
            raise FieldError(path, f"string of {len(value)} characters exceeds {self.max_len}")
        if self.choices and value not in self.choices:
            raise FieldError(path, f"{value!r} is not one of {', '.join(self.choices)}")
        return value

    def describe(self):
        if self.choices:
            return "str, one of " + ", ".join(f"`{c}`" for c in self.choices)
        return f"str (<= {self.max_len} chars)"


@dataclass(frozen=True)
class Bin(Type):
    max_len: int
    min_len: int = 0

    def check(self, value, path, strict=True):
        if type(value) is not bytes:
            raise FieldError(path, f"expected bin, got {_kind(value)}")
        if not self.min_len <= len(value) <= self.max_len:
            raise FieldError(path, f"{len(value)} bytes is outside [{self.min_len}, {self.max_len}]")
        return value

    def describe(self):
        if self.min_len == self.max_len:
            return f"bin ({self.max_len} bytes)"
        return f"bin (<= {self.max_len} bytes)"


@dataclass(frozen=True)
class Array(Type):
    item: Type
    max_len: int
    min_len: int = 0

    def check(self, value, path, strict=True):
        if type(value) is not list:
            raise FieldError(path, f"expected array, got {_kind(value)}")
        if not self.min_len <= len(value) <= self.max_len:
            raise FieldError(path, f"{len(value)} items is outside [{self.min_len}, {self.max_len}]")
        return [self.item.check(v, f"{path}[{i}]", strict) for i, v in enumerate(value)]

    def describe(self):
        return f"array of {self.item.describe()} ({self.min_len}..{self.max_len} items)"


@dataclass(frozen=True)
class Any_(Type):
    """Any msgpack value: only in replies, for open-ended maps such as counters."""

    def check(self, value, path, strict=True):
        return value

    def describe(self):
        return "any"


@dataclass(frozen=True)
class F:
    """One field of a struct: its type, whether it may be left out, what it means, and the
    protocol version that added it (None: 1.0, or added before versions were recorded)."""

    type: Type
    doc: str
    optional: bool = False
    since: tuple[int, int] | None = None


@dataclass(frozen=True)
class Struct(Type):
    """A map with a fixed set of string keys: missing, extra or mistyped keys are errors."""

    name: str
    fields: dict[str, F] = field(default_factory=dict)
    doc: str = ""

    def check(self, value, path, strict=True):
        if type(value) is not dict:
            raise FieldError(path, f"expected map ({self.name}), got {_kind(value)}")
        extra = [k for k in value if k not in self.fields]
        if extra and strict:
            raise FieldError(path, f"unknown field {extra[0]!r} (allowed: {', '.join(self.fields) or 'none'})")
        out = {}
        for name, f in self.fields.items():
            sub = f"{path}.{name}" if path else name
            if name not in value:
                if not f.optional:
                    raise FieldError(sub, "missing required field")
                continue
            out[name] = f.type.check(value[name], sub, strict)
        return out

    def describe(self):
        return f"map `{self.name}`"


@dataclass(frozen=True)
class MapOf(Type):
    """A map from short string keys to values of one type (for open-ended tables)."""

    value: Type
    max_len: int = 256

    def check(self, value, path, strict=True):
        if type(value) is not dict:
            raise FieldError(path, f"expected map, got {_kind(value)}")
        if len(value) > self.max_len:
            raise FieldError(path, f"{len(value)} entries exceeds {self.max_len}")
        out = {}
        for k, v in value.items():
            if type(k) is not str:
                raise FieldError(path, f"key {k!r} is not a string")
            out[k] = self.value.check(v, f"{path}.{k}", strict)
        return out

    def describe(self):
        return f"map of str to {self.value.describe()}"
