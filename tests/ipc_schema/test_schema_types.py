"""Every field type of npud/ipc_schema/types.py, and codec.check_tensor."""

from __future__ import annotations

import pytest

from npud.ipc_schema import codec
from npud.ipc_schema.schema import ALL_STRUCTS, DTYPE_SIZES, DTYPES, OPS, TENSOR
from npud.ipc_schema.types import (Any_, Array, Bin, Bool, F, FieldError, Float, Int, MapOf, Str,
                              Struct)


def refused(type_, value, path="x"):
    with pytest.raises(FieldError) as info:
        type_.check(value, path)
    assert info.value.path.startswith(path)
    return info.value


# --- Int ------------------------------------------------------------------------------

def test_int_accepts_bounds_inclusive():
    t = Int(-3, 7)
    assert t.check(-3, "x") == -3
    assert t.check(7, "x") == 7
    assert t.check(0, "x") == 0


@pytest.mark.parametrize("value", [-4, 8, 2**70])
def test_int_out_of_range(value):
    err = refused(Int(-3, 7), value, "args.size")
    assert "out of range" in err.problem and str(value) in err.problem
    assert err.path == "args.size"


@pytest.mark.parametrize("value,kind", [(True, "bool"), (False, "bool"), (1.0, "float"), ("1", "str"),
                                        (b"1", "bin"), (None, "nil"), ([1], "array"), ({}, "map")])
def test_int_refuses_other_kinds_including_bool(value, kind):
    err = refused(Int(), value)
    assert err.problem == f"expected int, got {kind}"


def test_int_describe():
    assert Int(1, 5).describe() == "int [1..5]"


# --- Float ----------------------------------------------------------------------------

def test_float_accepts_int_and_float_and_returns_float():
    assert Float().check(3, "x") == 3.0 and type(Float().check(3, "x")) is float
    assert Float().check(2.5, "x") == 2.5


@pytest.mark.parametrize("value", [True, "1.0", None, b"", [1.0]])
def test_float_refuses(value):
    assert "expected float" in refused(Float(), value).problem


# --- Bool -----------------------------------------------------------------------------

def test_bool():
    assert Bool().check(True, "x") is True
    assert Bool().check(False, "x") is False
    for v in (0, 1, "true", None):
        assert "expected bool" in refused(Bool(), v).problem


# --- Str ------------------------------------------------------------------------------

def test_str_length_and_choices():
    assert Str(3).check("abc", "x") == "abc"
    assert "exceeds 3" in refused(Str(3), "abcd").problem
    t = Str(16, ("a", "b"))
    assert t.check("b", "x") == "b"
    err = refused(t, "c")
    assert "'c' is not one of a, b" in err.problem
    assert "expected str, got bin" in refused(Str(), b"abc").problem
    assert "one of `a`, `b`" in t.describe()
    assert "<= 5 chars" in Str(5).describe()


# --- Bin ------------------------------------------------------------------------------

def test_bin_bounds_and_kind():
    t = Bin(4, 2)
    assert t.check(b"ab", "x") == b"ab"
    assert t.check(b"abcd", "x") == b"abcd"
    assert "outside [2, 4]" in refused(t, b"a").problem
    assert "outside [2, 4]" in refused(t, b"abcde").problem
    assert refused(t, "abc").problem == "expected bin, got str"
    assert refused(t, bytearray(b"abc")).problem == "expected bin, got bytearray"
    assert Bin(32, 32).describe() == "bin (32 bytes)"
    assert Bin(8).describe() == "bin (<= 8 bytes)"


# --- Array ----------------------------------------------------------------------------

def test_array_items_checked_with_index_in_path():
    t = Array(Int(0, 9), 3, 1)
    assert t.check([1, 2], "x") == [1, 2]
    err = refused(t, [1, 10], "args.shape")
    assert err.path == "args.shape[1]"
    assert "outside [1, 3]" in refused(t, []).problem
    assert "outside [1, 3]" in refused(t, [1, 2, 3, 4]).problem
    assert refused(t, (1, 2)).problem == "expected array, got tuple"
    assert "array of int [0..9] (1..3 items)" == t.describe()


def test_any_accepts_anything():
    for v in (None, 1, "x", b"", [1], {"a": {}}):
        assert Any_().check(v, "x") == v
    assert Any_().describe() == "any"


# --- Struct ---------------------------------------------------------------------------

S = Struct("thing", {"a": F(Int(0, 5), "a"), "b": F(Str(4), "b", optional=True)})


def test_struct_valid_and_optional():
    assert S.check({"a": 1}, "p") == {"a": 1}
    assert S.check({"a": 1, "b": "x"}, "p") == {"a": 1, "b": "x"}


def test_struct_missing_extra_mistyped():
    err = refused(S, {}, "p")
    assert err.path == "p.a" and err.problem == "missing required field"
    err = refused(S, {"a": 1, "zz": 2}, "p")
    assert "unknown field 'zz'" in err.problem and "allowed: a, b" in err.problem
    err = refused(S, {"a": "1"}, "p")
    assert err.path == "p.a" and "expected int, got str" in err.problem
    err = refused(S, [("a", 1)], "p")
    assert "expected map (thing), got array" in err.problem
    # at top level (empty path) fields are named bare
    assert refused(S, {}, "").path == "a"
    assert "none" in refused(Struct("empty", {}), {"x": 1}, "e").problem
    assert S.describe() == "map `thing`"


# --- MapOf ----------------------------------------------------------------------------

def test_mapof():
    t = MapOf(Int(0, 3), max_len=2)
    assert t.check({"a": 1, "b": 3}, "m") == {"a": 1, "b": 3}
    assert "exceeds 2" in refused(t, {"a": 1, "b": 1, "c": 1}).problem
    assert "is not a string" in refused(t, {1: 1}).problem
    assert refused(t, {"a": 9}, "m").path == "m.a"
    assert "expected map" in refused(t, [1]).problem
    assert t.describe() == "map of str to int [0..3]"


def test_field_error_message_names_path():
    err = FieldError("args.handle", "missing required field")
    assert str(err) == "args.handle: missing required field"
    assert isinstance(err, ValueError)


def test_every_schema_struct_is_described():
    for s in ALL_STRUCTS:
        assert s.describe()
        for f in s.fields.values():
            assert f.type.describe() and f.doc
    for op in OPS.values():
        assert op.name and op.doc
        for f in [*op.args.fields.values(), *op.result.fields.values()]:
            assert f.type.describe() and f.doc


# --- check_tensor ---------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_tensor_inline_size_consistent(dtype):
    n = 2 * 3 * DTYPE_SIZES[dtype]
    t = codec.check_tensor({"dtype": dtype, "shape": [2, 3], "data": bytes(n)})
    assert t["data"] == bytes(n)
    with pytest.raises(FieldError) as info:
        codec.check_tensor({"dtype": dtype, "shape": [2, 3], "data": bytes(n + 1)})
    assert info.value.path == "tensor.data" and f"needs {n}" in info.value.problem


def test_tensor_scalar_and_empty_shapes():
    assert codec.check_tensor({"dtype": "int32", "shape": [], "data": bytes(4)})["shape"] == []
    assert codec.check_tensor({"dtype": "int32", "shape": [0, 5], "data": b""})["data"] == b""


def test_tensor_by_reference():
    t = codec.check_tensor({"dtype": "float32", "shape": [1 << 20], "buffer": 3, "offset": 64})
    assert t["buffer"] == 3 and t["offset"] == 64
    assert codec.check_tensor({"dtype": "int8", "shape": [4], "buffer": 1})["buffer"] == 1


def test_tensor_exactly_one_storage_form():
    with pytest.raises(FieldError, match="exactly one of 'data' or 'buffer'"):
        codec.check_tensor({"dtype": "int8", "shape": [1]})
    with pytest.raises(FieldError, match="exactly one of 'data' or 'buffer'"):
        codec.check_tensor({"dtype": "int8", "shape": [1], "data": b"x", "buffer": 1})
    with pytest.raises(FieldError) as info:
        codec.check_tensor({"dtype": "int8", "shape": [1], "data": b"x", "offset": 0})
    assert info.value.path == "tensor.offset"


@pytest.mark.parametrize("tensor,path", [
    ({"dtype": "float64", "shape": [1], "data": bytes(8)}, "t.dtype"),
    ({"dtype": "int8", "shape": [1] * 9, "data": b"x"}, "t.shape"),
    ({"dtype": "int8", "shape": [-1], "data": b""}, "t.shape[0]"),
    ({"dtype": "int8", "shape": [True], "data": b"x"}, "t.shape[0]"),
    ({"dtype": "int8", "shape": [1], "buffer": 0}, "t.buffer"),
    ({"dtype": "int8", "shape": [1], "data": "x"}, "t.data"),
    ({"dtype": "int8", "shape": [1], "data": b"x", "strides": [1]}, "t"),
])
def test_tensor_schema_errors(tensor, path):
    with pytest.raises(FieldError) as info:
        codec.check_tensor(tensor, "t")
    assert info.value.path == path


def test_tensor_struct_is_the_schema_one():
    assert set(TENSOR.fields) == {"dtype", "shape", "data", "buffer", "offset"}
