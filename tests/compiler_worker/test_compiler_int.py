"""Integer tensors and masks (issue 14): int64/int32 graph I/O, run-time Gather (dma_gather),
Cast, comparisons, And/Or/Xor/Not, Where, Mod, CumSum, IsNaN/IsInf, integer arithmetic and
the ops folded at load (Range, GatherElements, Trilu, shape chains), each against onnxruntime."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from npud.compiler_worker import CompileError, compile_model, run_on_emulator
from npud.compiler_worker.errors import CompileErrors
from npud.emulator.config import make_config
from npud.emulator.errors import IndexFault
from test_compiler_models import ort_run

R = np.random.default_rng(14)
CODE = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.int64): TensorProto.INT64,
        np.dtype(np.int32): TensorProto.INT32, np.dtype(np.bool_): TensorProto.BOOL,
        np.dtype(np.int8): TensorProto.INT8, np.dtype(np.uint8): TensorProto.UINT8}


def model(nodes, inputs: dict, outputs: dict, inits: dict | None = None, opset: int = 17) -> bytes:
    """A model from `nodes`; inputs/outputs map name -> (dtype, shape) / dtype."""
    g = helper.make_graph(
        nodes, "int",
        [helper.make_tensor_value_info(k, CODE[np.dtype(d)], list(s)) for k, (d, s) in inputs.items()],
        [helper.make_tensor_value_info(k, CODE[np.dtype(d)], None) for k, d in outputs.items()],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in (inits or {}).items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m.SerializeToString()


def check(mb, feeds, rtol=1e-5, atol=1e-6):
    """Compile, run on the emulator, compare with onnxruntime: exact dtype (int64 stays int64,
    bool stays bool) and values."""
    cfg = make_config("edge")
    exe = compile_model(mb, cfg)
    outs, stats = run_on_emulator(exe, feeds, cfg)
    ref = ort_run(mb, feeds)
    for k, want in ref.items():
        got = outs[k]
        if want.dtype.kind in "iub":
            assert got.dtype == want.dtype, (k, got.dtype, want.dtype)
            np.testing.assert_array_equal(got, want, err_msg=k)
        else:
            np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=k)
    assert stats.hazards == 0
    return exe, stats


def ints(shape, lo=-5, hi=6, dtype=np.int64):
    return R.integers(lo, hi, shape).astype(dtype)


def floats(shape):
    return R.standard_normal(shape).astype(np.float32)


# --- graph I/O -----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.int64, np.int32])
def test_integer_input_and_output_keep_their_dtype(dtype):
    mb = model([helper.make_node("Add", ["x", "k"], ["y"])], {"x": (dtype, [2, 3])}, {"y": dtype},
               {"k": np.array([[1, -2, 3]], dtype)})
    x = np.array([[0, -7, 2**20], [-(2**31) + 5, 9, -1]], dtype)
    exe, _ = check(mb, {"x": x})
    assert exe.inputs[0]["dtype"] == np.dtype(dtype).name
    assert exe.outputs[0]["dtype"] == np.dtype(dtype).name
    assert exe.inputs[0]["size"] == x.nbytes


@pytest.mark.parametrize("dtype", [np.int8, np.uint8])
def test_8bit_input_and_output_keep_their_dtype(dtype):
    """An int8/uint8 graph input or output is one byte per element in its region, as onnxruntime
    (and the cpu device of a heterogeneous model) holds it: no float32 region, no conversion."""
    mb = model([helper.make_node("Identity", ["x"], ["y"])], {"x": (dtype, [2, 3])}, {"y": dtype})
    info = np.iinfo(dtype)
    x = np.array([[info.min, info.max, 0], [1, 7, info.max - 1]], dtype)
    exe, _ = check(mb, {"x": x})
    assert [e["dtype"] for e in exe.inputs + exe.outputs] == [np.dtype(dtype).name] * 2
    assert exe.inputs[0]["size"] == exe.outputs[0]["size"] == x.nbytes
    assert not [r for r in exe.report().rows if r["op"] == "Cast"]


@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.bool_, np.int32])
def test_an_output_that_reshapes_an_input_keeps_its_dtype(dtype):
    """The output's bytes alias the input's region, so it is copied into a region of its own: of
    the same type (a float32 region would hold 4 bytes an element)."""
    mb = model([helper.make_node("Reshape", ["x", "s"], ["y"])], {"x": (dtype, [2, 3])}, {"y": dtype},
               {"s": np.array([3, 2], np.int64)})
    x = (np.arange(6).reshape(2, 3) % 2).astype(dtype) if dtype == np.bool_ else \
        (np.arange(6).reshape(2, 3) * 7 - 20).astype(dtype)
    exe, _ = check(mb, {"x": x})
    assert exe.outputs[0]["size"] == x.nbytes


def test_bool_input_and_output_are_one_byte_each():
    """bool graph I/O is one byte (0/1) per element, converted on the device to and from the
    float32 mask it computes on."""
    mb = model([helper.make_node("Not", ["x"], ["y"]), helper.make_node("Identity", ["x"], ["z"])],
               {"x": (np.bool_, [3, 5])}, {"y": np.bool_, "z": np.bool_})
    x = R.random((3, 5)) < 0.5
    exe, _ = check(mb, {"x": x})
    assert [e["dtype"] for e in exe.inputs + exe.outputs] == ["bool"] * 3
    assert {e["size"] for e in exe.inputs + exe.outputs} == {x.size}


def test_8bit_output_of_a_quantised_graph_is_not_converted():
    """A QuantizeLinear output (the cut of a heterogeneous QDQ model) stays int8 in the I/O table."""
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q8", "s", "z"], ["d"])]
    mb = model(nodes, {"x": (np.float32, [4, 16]), "q8": (np.int8, [4, 16])},
               {"q": np.int8, "d": np.float32}, {"s": np.array(0.05, np.float32), "z": np.array(3, np.int8)})
    x = floats((4, 16)) * 4
    exe, _ = check(mb, {"x": x, "q8": ints((4, 16), -128, 128, np.int8)})
    assert {e["name"]: e["dtype"] for e in exe.inputs + exe.outputs} == \
        {"x": "float32", "q8": "int8", "q": "int8", "d": "float32"}


def test_int64_values_beyond_int32_wrap_to_the_low_word():
    """Documented: int64 tensors compute as int32 on the device (docs/ISA.md)."""
    mb = model([helper.make_node("Identity", ["x"], ["y"])], {"x": (np.int64, [2])}, {"y": np.int64})
    cfg = make_config("edge")
    outs, _ = run_on_emulator(compile_model(mb, cfg), {"x": np.array([2**32 + 5, -3], np.int64)}, cfg)
    np.testing.assert_array_equal(outs["y"], [5, -3])


# --- Gather --------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.int64, np.int32])
def test_embedding_lookup_by_runtime_ids(dtype):
    table = floats((50, 24))
    mb = model([helper.make_node("Gather", ["table", "ids"], ["y"])],
               {"ids": (dtype, [2, 7])}, {"y": np.float32}, {"table": table})
    ids = ints((2, 7), -50, 50, dtype)     # negative ids count from the end, as ONNX says
    exe, stats = check(mb, {"ids": ids})
    assert [r["kind"] for r in exe.report().rows if r["op"] == "Gather"] == ["gather"]
    assert stats.dma_bytes_in < table.nbytes      # only the 14 rows looked up are read


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_gather_activation_on_any_axis(axis):
    mb = model([helper.make_node("Gather", ["x", "i"], ["y"], axis=axis)],
               {"x": (np.float32, [3, 4, 5]), "i": (np.int64, [2, 3])}, {"y": np.float32})
    dim = [3, 4, 5][axis]
    check(mb, {"x": floats((3, 4, 5)), "i": ints((2, 3), -dim, dim)})


def test_gather_big_table_on_edge_sram_is_tiled():
    table = floats((4000, 96))     # 1.5 MB > edge SRAM: rows come straight from device memory
    mb = model([helper.make_node("Gather", ["table", "ids"], ["y"])],
               {"ids": (np.int64, [1, 700])}, {"y": np.float32}, {"table": table})
    exe, _ = check(mb, {"ids": ints((1, 700), 0, 4000)})
    row = [r for r in exe.report().rows if r["op"] == "Gather"][0]
    assert row["sram_bytes"] <= 256 * 1024 and row["commands"] > 3


@pytest.mark.parametrize("bad", [50, -51])
def test_gather_out_of_range_id_fails_the_run_with_einval(bad):
    mb = model([helper.make_node("Gather", ["table", "ids"], ["y"])],
               {"ids": (np.int64, [3])}, {"y": np.float32}, {"table": floats((50, 8))})
    cfg = make_config("edge")
    exe = compile_model(mb, cfg)
    with pytest.raises(IndexFault) as e:
        run_on_emulator(exe, {"ids": np.array([1, bad, 2], np.int64)}, cfg)
    assert e.value.code == "EINVAL" and f"index {bad} at position 1" in str(e.value)


# --- Cast, comparisons, logic, Where, Mod -------------------------------------------------
CASTS = [(np.float32, np.int64), (np.float32, np.int32), (np.int64, np.float32),
         (np.int64, np.bool_), (np.float32, np.bool_), (np.int32, np.int64), (np.int64, np.int32)]


@pytest.mark.parametrize("src,dst", CASTS, ids=[f"{np.dtype(a)}-{np.dtype(b)}" for a, b in CASTS])
def test_cast(src, dst):
    mb = model([helper.make_node("Cast", ["x"], ["y"], to=CODE[np.dtype(dst)])],
               {"x": (src, [2, 6])}, {"y": dst})
    if np.dtype(src).kind == "f":
        x = np.array([[2.7, -2.7, 0.5, -0.5, 0.0, 3.0], [1e3, -1e3, 7.9, -7.9, 1.0, np.nan]], src)
        if np.dtype(dst).kind == "i":
            x[1, 5] = 4.0     # NaN to an integer is undefined in ONNX
    else:
        x = ints((2, 6), dtype=src)
    check(mb, {"x": x})


def test_bool_mask_round_trip():
    """int64 mask -> bool -> float additive mask, as BERT builds its attention mask."""
    nodes = [helper.make_node("Cast", ["m"], ["b"], to=TensorProto.BOOL),
             helper.make_node("Not", ["b"], ["nb"]),
             helper.make_node("Cast", ["nb"], ["f"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["f", "big"], ["y"]),
             helper.make_node("Cast", ["b"], ["i"], to=TensorProto.INT32)]
    mb = model(nodes, {"m": (np.int64, [2, 5])}, {"y": np.float32, "i": np.int32},
               {"big": np.array(-1e9, np.float32)})
    check(mb, {"m": np.array([[1, 1, 1, 0, 0], [1, 0, 1, 0, 1]], np.int64)})


@pytest.mark.parametrize("op", ["Equal", "Less", "Greater", "GreaterOrEqual", "LessOrEqual"])
@pytest.mark.parametrize("dtype", [np.int64, np.float32])
def test_comparisons(op, dtype):
    mb = model([helper.make_node(op, ["a", "b"], ["y"])],
               {"a": (dtype, [3, 4]), "b": (dtype, [1, 4])}, {"y": np.bool_})
    a, b = ints((3, 4), -2, 3).astype(dtype), ints((1, 4), -2, 3).astype(dtype)
    check(mb, {"a": a, "b": b})


@pytest.mark.parametrize("op", ["And", "Or", "Xor"])
def test_logic_on_masks(op):
    nodes = [helper.make_node("Greater", ["a", "z"], ["p"]), helper.make_node("Less", ["b", "z"], ["q"]),
             helper.make_node(op, ["p", "q"], ["y"])]
    mb = model(nodes, {"a": (np.float32, [4, 5]), "b": (np.float32, [4, 1])}, {"y": np.bool_},
               {"z": np.array(0, np.float32)})
    check(mb, {"a": floats((4, 5)), "b": floats((4, 1))})


@pytest.mark.parametrize("dtype", [np.int64, np.float32])
def test_where_with_integer_or_float_values(dtype):
    nodes = [helper.make_node("Cast", ["c"], ["cb"], to=TensorProto.BOOL),
             helper.make_node("Where", ["cb", "a", "k"], ["y"])]
    mb = model(nodes, {"c": (np.int64, [2, 4]), "a": (dtype, [2, 4])}, {"y": dtype},
               {"k": np.array([7], dtype)})
    check(mb, {"c": ints((2, 4), 0, 2), "a": ints((2, 4)).astype(dtype)})


@pytest.mark.parametrize("dtype,fmod", [(np.int64, 0), (np.int64, 1), (np.float32, 1), (np.int32, 0)])
def test_mod_signs(dtype, fmod):
    mb = model([helper.make_node("Mod", ["a", "b"], ["y"], fmod=fmod)],
               {"a": (dtype, [6]), "b": (dtype, [6])}, {"y": dtype})
    check(mb, {"a": np.array([7, -7, 7, -7, 6, 0], dtype), "b": np.array([3, 3, -3, -3, 4, 5], dtype)})


def test_integer_arithmetic_and_shapes():
    """Positions from an int64 mask: cumsum * mask + offset, expanded and reshaped."""
    nodes = [helper.make_node("CumSum", ["m", "ax"], ["c"]),
             helper.make_node("Mul", ["c", "m"], ["cm"]),
             helper.make_node("Add", ["cm", "one"], ["p"]),
             helper.make_node("Sub", ["p", "m"], ["q"]),
             helper.make_node("Max", ["q", "one"], ["r"]),
             helper.make_node("Neg", ["r"], ["s"]),
             helper.make_node("Unsqueeze", ["s", "ax0"], ["u"]),
             helper.make_node("Expand", ["u", "shape"], ["y"])]
    mb = model(nodes, {"m": (np.int64, [2, 6])}, {"y": np.int64},
               {"ax": np.array(1, np.int64), "one": np.array(1, np.int64), "ax0": np.array([0], np.int64),
                "shape": np.array([3, 2, 6], np.int64)})
    check(mb, {"m": ints((2, 6), 0, 2)})


@pytest.mark.parametrize("exclusive,reverse", [(0, 0), (1, 0), (0, 1), (1, 1)])
@pytest.mark.parametrize("axis", [0, -1])
def test_cumsum_float(exclusive, reverse, axis):
    mb = model([helper.make_node("CumSum", ["x", "ax"], ["y"], exclusive=exclusive, reverse=reverse)],
               {"x": (np.float32, [5, 7])}, {"y": np.float32}, {"ax": np.array(axis, np.int32)})
    check(mb, {"x": floats((5, 7))}, rtol=1e-5, atol=1e-5)


def test_isnan_isinf():
    nodes = [helper.make_node("IsNaN", ["x"], ["n"]), helper.make_node("IsInf", ["x"], ["i"]),
             helper.make_node("IsInf", ["x"], ["p"], detect_negative=0)]
    mb = model(nodes, {"x": (np.float32, [6])}, {"n": np.bool_, "i": np.bool_, "p": np.bool_})
    check(mb, {"x": np.array([1.0, np.nan, np.inf, -np.inf, 0.0, -2.0], np.float32)})


# --- folded at load ------------------------------------------------------------------------
def test_shape_chain_folds_at_load():
    """ViT's pattern: Shape -> Gather -> Unsqueeze -> Concat -> Reshape of an activation."""
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Gather", ["s", "i0"], ["b"], axis=0),
             helper.make_node("Unsqueeze", ["b", "ax0"], ["bu"]),
             helper.make_node("Concat", ["bu", "rest"], ["shape"], axis=0),
             helper.make_node("Reshape", ["x", "shape"], ["r"]),
             helper.make_node("Slice", ["s", "st", "en"], ["hw"]),
             helper.make_node("ReduceProd", ["hw"], ["n"], keepdims=0),
             helper.make_node("Range", ["zero", "n", "one"], ["pos"]),
             helper.make_node("Cast", ["pos"], ["pf"], to=TensorProto.FLOAT),
             helper.make_node("Add", ["r", "pf"], ["y"])]
    mb = model(nodes, {"x": (np.float32, [2, 3, 4, 5])}, {"y": np.float32},
               {"i0": np.array(0, np.int64), "ax0": np.array([0], np.int64), "rest": np.array([-1, 60], np.int64),
                "st": np.array([1], np.int64), "en": np.array([4], np.int64), "zero": np.array(0, np.int64),
                "one": np.array(1, np.int64)})
    exe, _ = check(mb, {"x": floats((2, 3, 4, 5))})
    assert {r["op"] for r in exe.report().rows} <= {"Reshape", "Add", "Identity"}


def test_gather_elements_and_trilu_fold_at_load():
    nodes = [helper.make_node("GatherElements", ["t", "i"], ["g"], axis=1),
             helper.make_node("Trilu", ["sq"], ["tri"], upper=0),
             helper.make_node("Cast", ["g"], ["gf"], to=TensorProto.FLOAT),
             helper.make_node("Add", ["x", "gf"], ["a"]),
             helper.make_node("MatMul", ["a", "tri"], ["y"])]
    mb = model(nodes, {"x": (np.float32, [2, 3])}, {"y": np.float32},
               {"t": ints((2, 5)), "i": np.array([[0, -1, 2], [4, 4, -5]], np.int64), "sq": floats((3, 3))})
    check(mb, {"x": floats((2, 3))})


def test_range_not_known_at_load_is_refused_naming_the_node():
    mb = model([helper.make_node("Range", ["s", "l", "d"], ["y"], name="r")],
               {"s": (np.int64, []), "l": (np.int64, []), "d": (np.int64, [])}, {"y": np.int64})
    with pytest.raises((CompileError, CompileErrors)) as e:
        compile_model(mb, make_config("edge"))
    assert "r" in str(e.value) and "must be known at load" in str(e.value)


def test_integer_div_folds_truncating_toward_zero():
    """ONNX integer Div truncates (C semantics); numpy's // floors."""
    nodes = [helper.make_node("Div", ["a", "b"], ["q"]), helper.make_node("Cast", ["q"], ["qf"], to=1),
             helper.make_node("Add", ["x", "qf"], ["y"])]
    mb = model(nodes, {"x": (np.float32, [4])}, {"y": np.float32},
               {"a": np.array([-7, 7, -7, 7], np.int64), "b": np.array([2, -2, -2, 2], np.int64)})
    check(mb, {"x": floats((4,))})


# --- If ------------------------------------------------------------------------------------
def _branch(name, op, k):
    """A branch reading outer tensor 'x': op(x, k) into its output."""
    return helper.make_graph([helper.make_node(op, ["x", f"{name}_k"], [f"{name}_y"])], name, [],
                             [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, None)],
                             [numpy_helper.from_array(np.asarray(k, np.float32), f"{name}_k")])


@pytest.mark.parametrize("rank", [4, 3])
def test_if_whose_condition_is_known_at_load_is_folded(rank):
    """As exporters write it: the condition computed from a static shape (rank == 4)."""
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Size", ["s"], ["r"]),
             helper.make_node("Equal", ["r", "four"], ["c"]),
             helper.make_node("If", ["c"], ["y"], then_branch=_branch("then", "Mul", 2.0),
                              else_branch=_branch("else", "Add", 10.0)),
             helper.make_node("Relu", ["y"], ["z"])]
    shape = [2, 3, 4, 5][:rank]
    mb = model(nodes, {"x": (np.float32, shape)}, {"z": np.float32}, {"four": np.array(4, np.int64)})
    exe, _ = check(mb, {"x": floats(shape)})
    assert "If" not in {r["op"] for r in exe.report().rows}


def test_nested_if_folds():
    inner = helper.make_graph([helper.make_node("Neg", ["x"], ["in_y"])], "inner", [],
                              [helper.make_tensor_value_info("in_y", TensorProto.FLOAT, None)])
    outer = helper.make_graph([helper.make_node("If", ["t"], ["o_y"], then_branch=inner,
                                                else_branch=_branch("e2", "Add", 1.0))], "outer", [],
                              [helper.make_tensor_value_info("o_y", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("If", ["t"], ["y"], then_branch=outer, else_branch=_branch("e1", "Mul", 3.0))]
    mb = model(nodes, {"x": (np.float32, [3])}, {"y": np.float32}, {"t": np.array(True)})
    check(mb, {"x": floats((3,))})


def test_if_on_a_runtime_condition_is_refused_naming_the_node():
    nodes = [helper.make_node("Greater", ["x", "zero"], ["c"]),
             helper.make_node("If", ["c"], ["y"], name="branchy", then_branch=_branch("t", "Mul", 2.0),
                              else_branch=_branch("f", "Add", 1.0))]
    mb = model(nodes, {"x": (np.float32, [1])}, {"y": np.float32}, {"zero": np.array(0, np.float32)})
    with pytest.raises((CompileError, CompileErrors)) as e:
        compile_model(mb, make_config("edge"))
    assert "branchy" in str(e.value) and "known at load" in str(e.value)


# --- quantize_dynamic: MatMulInteger with a zero point computed at run time ---------------
@pytest.mark.parametrize("bzp", [None, 3, "per_column"])
def test_matmulinteger_with_dynamic_zero_point_is_exact(bzp):
    """DynamicQuantizeLinear -> MatMulInteger (a_zp computed on the device) -> int32, exactly
    onnxruntime's integers, with no, a scalar or a per-column weight zero point."""
    w = R.integers(-128, 128, (24, 10)).astype(np.int8)
    inits = {"w": w}
    ins = ["xq", "w", "xzp"]
    if bzp is not None:
        inits["wzp"] = (np.array(bzp, np.int8) if bzp != "per_column"
                        else R.integers(-5, 6, (10,)).astype(np.int8))
        ins.append("wzp")
    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xzp"]),
             helper.make_node("MatMulInteger", ins, ["y"])]
    mb = model(nodes, {"x": (np.float32, [2, 5, 24])}, {"y": np.int32}, inits)
    x = floats((2, 5, 24)) * 3 + 1.5        # an asymmetric range: a non-trivial zero point
    check(mb, {"x": x})


def test_gather_with_many_constant_indices_uses_dma_gather():
    """Before: 'Gather with more than 1024 indices is not supported'."""
    idx = R.integers(-64, 64, (3, 500))
    mb = model([helper.make_node("Gather", ["x", "i"], ["y"], axis=1)], {"x": (np.float32, [2, 64, 3])},
               {"y": np.float32}, {"i": idx})
    exe, _ = check(mb, {"x": floats((2, 64, 3))})
    assert [r["kind"] for r in exe.report().rows if r["op"] == "Gather"] == ["gather"]


def test_gather_constant_index_out_of_range_is_a_compile_error():
    mb = model([helper.make_node("Gather", ["x", "i"], ["y"], name="g")], {"x": (np.float32, [4, 3])},
               {"y": np.float32}, {"i": np.array([0, 4], np.int64)})
    with pytest.raises((CompileError, CompileErrors), match="index 4 is out of range for an axis of 4"):
        compile_model(mb, make_config("edge"))


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_gather_elements_with_runtime_indices(axis):
    mb = model([helper.make_node("GatherElements", ["x", "i"], ["y"], axis=axis)],
               {"x": (np.float32, [3, 4, 5]), "i": (np.int64, [3, 2, 5])}, {"y": np.float32})
    dim = [3, 4, 5][axis]
    check(mb, {"x": floats((3, 4, 5)), "i": ints((3, 2, 5), -dim, dim)})


def test_gather_elements_out_of_range_fails_the_run_with_einval():
    mb = model([helper.make_node("GatherElements", ["x", "i"], ["y"], axis=1)],
               {"i": (np.int64, [2, 2])}, {"y": np.float32}, {"x": floats((2, 3))})
    cfg = make_config("edge")
    exe = compile_model(mb, cfg)
    for bad in (3, -4):      # within the flattened data, but outside the axis: still refused
        with pytest.raises(IndexFault) as e:
            run_on_emulator(exe, {"i": np.array([[0, 1], [bad, 2]], np.int64)}, cfg)
        assert e.value.code == "EINVAL"


@pytest.mark.parametrize("dtype", [np.int64, np.int32])
def test_integer_div_on_the_device_truncates(dtype):
    mb = model([helper.make_node("Div", ["a", "b"], ["y"])], {"a": (dtype, [6]), "b": (dtype, [6])}, {"y": dtype})
    check(mb, {"a": np.array([7, -7, 7, -7, 0, 100], dtype), "b": np.array([2, 2, -2, -2, 3, 7], dtype)})


def test_casts_within_one_device_type_cost_no_command():
    """int64 -> int32, bool -> float and float -> float are the same bytes on the device."""
    nodes = [helper.make_node("Add", ["x", "one"], ["a"]), helper.make_node("Cast", ["a"], ["b"], to=6),
             helper.make_node("Greater", ["b", "zero32"], ["m"]),
             helper.make_node("Cast", ["m"], ["mf"], to=TensorProto.FLOAT),
             helper.make_node("Cast", ["mf"], ["y"], to=TensorProto.FLOAT)]
    mb = model(nodes, {"x": (np.int64, [3, 4])}, {"y": np.float32},
               {"one": np.array(1, np.int64), "zero32": np.array(0, np.int32)})
    exe, _ = check(mb, {"x": ints((3, 4))})
    assert not [r for r in exe.report().rows if r["op"] == "Cast" and r["node"] != "x:input"]


@pytest.mark.parametrize("op", ["Max", "Min"])   # ONNX Sum is float-only
@pytest.mark.parametrize("n_in", [1, 3])
def test_variadic_integer_ops(op, n_in):
    names = [f"x{i}" for i in range(n_in)]
    nodes = [helper.make_node(op, names, ["s"]), helper.make_node("Add", ["s", "one"], ["y"])]
    mb = model(nodes, {k: (np.int64, [2, 3]) for k in names}, {"y": np.int64}, {"one": np.array(1, np.int64)})
    check(mb, {k: ints((2, 3)) for k in names})


def test_an_int64_constant_read_by_several_nodes_is_stored_once():
    """Each read of an int64 constant used to add a saturated copy to the weights."""
    k = np.arange(64, dtype=np.int64)
    reads = [helper.make_node("Add", ["x", "k"], [f"y{i}"]) for i in range(4)]
    total = [helper.make_node("Add", ["y0", "y1"], ["s0"]), helper.make_node("Add", ["y2", "y3"], ["s1"]),
             helper.make_node("Add", ["s0", "s1"], ["y"])]
    mb = model(reads + total, {"x": (np.int64, [64])}, {"y": np.int64}, {"k": k})
    exe, _ = check(mb, {"x": ints((64,))})
    assert len(exe.weights) < 2 * k.size * 4, f"{len(exe.weights)} bytes of weights for one 256-byte constant"
