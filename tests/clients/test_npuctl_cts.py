"""`npuctl cts`, the driver conformance suite: npud's drivers and the template pass it, a broken
driver fails it; and the support tables it holds targets to (cpu, the template's int8-only one).

The template (examples/driver-template) and the broken driver (cts_plugins/broken_abs.py) are
found through entry points: `make test` installs the template; otherwise, and for the broken
driver always, the test declares them with a dist-info directory on PYTHONPATH -- what
`pip install` writes, without touching the environment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "examples" / "driver-template"
PLUGINS = Path(__file__).resolve().parent / "cts_plugins"
# node tests that must pass (at the default --per-op): a driver that runs almost none is not conformant
MIN_PASSED = {"npu-emu": 100, "cpu": 100, "tmpl-int8": 5}


def python_path(*extra: Path) -> dict:
    """This environment with this worktree's packages (and ``extra``) first on the import path."""
    paths = [str(ROOT), str(ROOT / "clients"), *map(str, extra), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}


def plugin_env(tmp: Path, dist: str, code: Path, driver: str, target: str) -> dict:
    """An environment in which the distribution ``dist``, whose code is under ``code``, is installed
    with the entry points ``driver`` and ``target`` ("name = module:Class") in npud's groups."""
    info = tmp / "site" / f"{dist}-0.1.0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text(f"[npud.drivers]\n{driver}\n\n[npud.targets]\n{target}\n")
    return python_path(code, tmp / "site")


def template_env(tmp: Path) -> dict:
    """The template installed: as `make test` installs it, else declared here."""
    if "tmpl-int8" in {ep.name for ep in metadata.entry_points(group="npud.drivers")}:
        return python_path()
    return plugin_env(tmp, "npud_driver_template", TEMPLATE, "tmpl-int8 = npud_tmpl.driver:TmplDriver",
                      "tmpl-int8 = npud_tmpl.target:TmplTarget")


def cts(env: dict, tmp: Path, *args: str) -> tuple[int, dict, str]:
    out = tmp / "cts.json"
    proc = subprocess.run([sys.executable, "-m", "npuctl", "cts", "--json", str(out), *args], env=env,
                          capture_output=True, text=True, timeout=600)
    return proc.returncode, json.loads(out.read_text()) if out.exists() else {}, proc.stdout + proc.stderr


@pytest.mark.parametrize("driver", ["npu-emu", "cpu", "tmpl-int8"])
def test_npuds_drivers_and_the_template_pass_the_cts(driver, tmp_path):
    env = template_env(tmp_path) if driver == "tmpl-int8" else python_path()
    code, report, output = cts(env, tmp_path, "--driver", driver)
    assert code == 0, output[-3000:]
    assert report["failures"] == [], report["failures"]
    results = {r["check"]: r["result"] for r in report["results"]}
    system = {k: v for k, v in results.items() if not k.startswith("node/")}
    assert len(system) == 8 and set(system.values()) <= {"pass", "not supported"}, system
    assert results["scheduling/preemption"] == ("not supported" if driver == "cpu" else "pass")
    # the cpu target claims the Sin the check's model puts on the fallback device: nothing crosses
    assert results["fences/cross-device-data"] == ("not supported" if driver == "cpu" else "pass")
    passed = sum(1 for k, v in results.items() if k.startswith("node/") and v == "pass")
    assert passed >= MIN_PASSED[driver], (passed, report["counts"])
    assert "CHECK" in output and "total:" in output   # the table


def test_the_cts_fails_a_driver_whose_target_claims_an_op_and_gets_it_wrong(tmp_path):
    env = plugin_env(tmp_path, "broken_abs", PLUGINS, "broken-abs = broken_abs:BrokenDriver",
                     "broken-abs = broken_abs:BrokenTarget")
    code, report, output = cts(env, tmp_path, "--driver", "broken-abs", "-k", r"^test_abs$|^test_relu$|probe")
    assert code == 1, output[-3000:]
    failed = [f["check"] for f in report["failures"]]
    assert failed == ["node/Abs/test_abs"], report["failures"]
    assert "mismatch" in report["failures"][0]["detail"]
    assert any(line.startswith("node/Abs/test_abs") and " fail " in line for line in output.splitlines())
    assert {r["check"]: r["result"] for r in report["results"]}["node/Relu/test_relu"] == "pass"


def test_an_unknown_driver_is_a_usage_error_naming_the_installed_ones(tmp_path):
    code, _report, output = cts(python_path(), tmp_path, "--driver", "no-such-npu")
    assert code == 2 and "npu-emu" in output and "no-such-npu" in output


# --- the support tables -----------------------------------------------------------------------

def _model(nodes, inputs, outputs, inits=(), opset=13) -> bytes:
    graph = helper.make_graph(nodes, "m", inputs, outputs, list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]).SerializeToString()


def _vi(name, elem, shape):
    return helper.make_tensor_value_info(name, elem, shape)


def test_the_cpu_target_claims_only_what_onnxruntime_runs_and_npud_carries():
    from npud.targets.cpu import CpuTarget

    target = CpuTarget()

    def claim(model):
        return [(s.op, s.supported, s.reason) for s in target.support(model, {})]

    f32 = TensorProto.FLOAT
    [(_, ok, _)] = claim(_model([helper.make_node("Relu", ["x"], ["y"])], [_vi("x", f32, ["n", 4])], [_vi("y", f32, None)]))
    assert ok   # a symbolic batch dimension is fixed at compile: not "unknown"
    [(_, ok, why)] = claim(_model([helper.make_node("Unique", ["x"], ["y"])], [_vi("x", f32, [6])], [_vi("y", f32, None)]))
    assert not ok and "depends on the data" in why
    [(_, ok, why)] = claim(_model([helper.make_node("Add", ["x", "x"], ["y"])], [_vi("x", TensorProto.DOUBLE, [4])],
                                  [_vi("y", TensorProto.DOUBLE, [4])]))
    assert not ok and "float64" in why
    rois = [_vi("x", f32, [1, 1, 4, 4]), _vi("rois", f32, [1, 4]), _vi("idx", TensorProto.INT64, [1])]
    [(_, ok, why)] = claim(_model([helper.make_node("RoiAlign", ["x", "rois", "idx"], ["y"])], rois,
                                  [_vi("y", f32, None)], opset=22))
    assert not ok and "no kernel for RoiAlign-22" in why      # onnxruntime has RoiAlign-16 only
    [(_, ok, why)] = claim(_model([helper.make_node("RandomNormalLike", ["x"], ["y"])], [_vi("x", f32, [4])],
                                  [_vi("y", f32, [4])]))
    assert not ok and "random" in why
    # inside the model, a data-dependent shape is onnxruntime's business (a cpu partition of a
    # heterogeneous model: NonZero's indices gathered into a fixed-size output), and a Constant is
    # always claimed (the partitioner copies constants into every partition that reads them)
    nodes = [helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(np.array([2], np.int64))),
             helper.make_node("NonZero", ["x"], ["nz"]), helper.make_node("ReduceSum", ["nz"], ["s"], keepdims=0),
             helper.make_node("Add", ["s", "k"], ["y"])]
    claims = claim(_model(nodes, [_vi("x", f32, [6])], [_vi("y", TensorProto.INT64, [1])]))
    assert all(ok for _, ok, _ in claims), claims


def _template_target():
    sys.path.insert(0, str(TEMPLATE))
    try:
        from npud_tmpl.driver import TmplDriver
        from npud_tmpl.target import TmplTarget
    finally:
        sys.path.remove(str(TEMPLATE))
    return TmplDriver(), TmplTarget()


def qdq_model() -> bytes:
    """x (float) -> Q -> DQ -> MatMul(DQ(W int8)) -> Q -> DQ -> Softmax -> y (float)."""
    rng = np.random.default_rng(0)
    f32 = TensorProto.FLOAT
    inits = [numpy_helper.from_array(np.array(0.05, np.float32), "s"), numpy_helper.from_array(np.array(0, np.int8), "z"),
             numpy_helper.from_array(np.array(0.01, np.float32), "sw"),
             numpy_helper.from_array(rng.integers(-100, 100, (16, 16), dtype=np.int8), "w")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="quantize_input"),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="dq_x"),
             helper.make_node("DequantizeLinear", ["w", "sw", "z"], ["wd"], name="dq_w"),
             helper.make_node("MatMul", ["xd", "wd"], ["m"], name="matmul"),
             helper.make_node("QuantizeLinear", ["m", "s", "z"], ["mq"], name="q_m"),
             helper.make_node("DequantizeLinear", ["mq", "s", "z"], ["md"], name="dequantize_output"),
             helper.make_node("Softmax", ["md"], ["y"], name="softmax", axis=1)]
    return _model(nodes, [_vi("x", f32, [4, 16])], [_vi("y", f32, [4, 16])], inits)


def test_the_template_claims_int8_and_qdq_patterns_and_declines_float_nodes_with_a_reason():
    driver, target = _template_target()
    params = driver.params("u55-256", {}).to_dict()
    answers = {s.node: s for s in target.support(qdq_model(), params)}
    assert {n for n, s in answers.items() if s.supported} == {"dq_x", "dq_w", "matmul", "q_m"}
    for node in ("quantize_input", "dequantize_output", "softmax"):
        assert "tmpl-int8 computes int8 only" in answers[node].reason, answers[node]
    assert "float32" in answers["softmax"].reason
    relu = _model([helper.make_node("Relu", ["x"], ["y"], name="relu")], [_vi("x", TensorProto.FLOAT, [4])],
                  [_vi("y", TensorProto.FLOAT, [4])])
    [s] = target.support(relu, params)
    assert not s.supported and "reads float32 tensor 'x'" in s.reason


def test_the_template_has_its_own_parameters_and_presets():
    driver, _target = _template_target()
    assert driver.presets() == ("u55-256", "u55-128")
    small = driver.params("u55-128", {"clock_mhz": 400})
    assert (small.macs, small.sram_bytes, small.clock_mhz) == (128, 128 * 1024, 400)
    assert small.target_hash() != driver.params("u55-256", {}).target_hash()
    with pytest.raises(ValueError, match="macs"):
        driver.params("u55-256", {"macs": 100})
    with pytest.raises(ValueError, match="unknown tmpl-int8 device key"):
        driver.params("u55-256", {"fp32": True})


def test_npuctl_devices_shows_the_template_device(tmp_path):
    from npu.local import LocalDaemon

    env = template_env(tmp_path)
    config = tmp_path / "npud.toml"
    config.write_text('[[devices]]\nname = "u55"\ndriver = "tmpl-int8"\npreset = "u55-128"\n')
    daemon = LocalDaemon("--config", str(config), "--cache-dir", str(tmp_path / "cache"), env=env)
    try:
        out = subprocess.run([sys.executable, "-m", "npuctl", "--endpoint", daemon.endpoint, "devices"], env=env,
                             capture_output=True, text=True, timeout=60)
        listed = json.loads(subprocess.run([sys.executable, "-m", "npuctl", "--endpoint", daemon.endpoint, "--json",
                                            "devices"], env=env, capture_output=True, text=True, timeout=60).stdout)
    finally:
        daemon.stop()
    assert out.returncode == 0 and "tmpl-int8" in out.stdout, out.stdout + out.stderr
    assert [(d["name"], d["driver"], d["driver_version"], d["preset"]) for d in listed] == \
        [("u55", "tmpl-int8", "0.1.0", "u55-128")]


def test_a_compiler_worker_may_read_a_target_installed_through_an_import_hook(tmp_path, monkeypatch):
    """`pip install -e` of a vendor's package puts an import hook, not its directory, on the import
    path; the compiler worker's Landlock rules must still let it read the target's code."""
    import importlib.machinery

    from npud.compiler_worker import sandbox

    plugin_env(tmp_path, "npud_driver_template", TEMPLATE, "tmpl-int8 = npud_tmpl.driver:TmplDriver",
               "tmpl-int8 = npud_tmpl.target:TmplTarget")

    class EditableFinder:   # what setuptools' editable finder does: one package, from its own directory
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name == "npud_tmpl":
                return importlib.machinery.PathFinder.find_spec(name, [str(TEMPLATE)])
            return None

    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(sys, "meta_path", [*sys.meta_path, EditableFinder])
    assert str(TEMPLATE) not in sys.path
    assert os.path.realpath(TEMPLATE / "npud_tmpl") in sandbox.readable_paths()
