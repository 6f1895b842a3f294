"""Drivers and targets are plugins (npud/drivers, npud/targets, npud/plugins.py): the daemon core
imports none of them, finds them through entry points, and a config picks one per device."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from npud import drivers, plugins, targets
from npud.config import ConfigError, device_arg, parse_devices

ROOT = Path(__file__).resolve().parents[2]
# Only the registries' own plugin modules may import a driver's or a compiler's code.
# (docgen writes docs/PROTOCOL.md, which documents npu-emu's target hash: a build tool, never run
# by the daemon.)
PLUGIN_MODULES = {"npud/drivers/npu_emu.py", "npud/targets/npu_emu.py", "npud/drivers/cpu_device.py",
                  "npud/targets/cpu.py", "npud/targets/cpu_support.py", "npud/ipc_schema/docgen.py"}
FORBIDDEN = ("npud.emulator", "npud.compiler_worker", "onnx", "onnxruntime")


def _imports(path: Path) -> list[str]:
    """Every module a file imports, at any depth (function-level imports too)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def test_the_daemon_core_imports_no_driver_and_no_compiler():
    """grep, as the issue puts it: no emulator or compiler_worker import in npud/ outside the
    driver and target registries (the core, the wire protocol, the executable container)."""
    core = [p for p in (ROOT / "npud").rglob("*.py")
            if p.relative_to(ROOT).parts[1] not in ("emulator", "compiler_worker")
            and str(p.relative_to(ROOT)) not in PLUGIN_MODULES]
    assert len(core) > 30
    offending = {str(p.relative_to(ROOT)): bad for p in core
                 if (bad := [m for m in _imports(p) if m.split(".")[0] in FORBIDDEN or m.startswith(FORBIDDEN)])}
    assert offending == {}


def test_starting_the_daemon_loads_no_compiler_and_only_its_drivers_modules():
    """In a fresh interpreter: importing npud.server loads no driver, emulator, compiler or onnx module;
    creating the devices loads the npu-emu driver (and through it the emulator's validator), still
    no compiler or onnx; the target loads only the compiler's version module (for cache keys)."""
    code = textwrap.dedent("""
        import json, sys
        def loaded():
            return sorted(m for m in sys.modules if m.startswith(("npud.emulator", "npud.compiler_worker",
                                                                  "npud.drivers.", "npud.targets."))
                          and m != "npud.drivers.link"   # the device link's schemas: the interface's own
                          or m.split(".")[0] in ("onnx", "onnxruntime"))
        import npud.server
        from npud.config import Config
        out = {"import": loaded()}
        daemon = npud.server.Daemon(Config())
        out["devices"] = loaded()
        daemon.devices[0].target.fingerprint()
        out["target"] = loaded()
        print(json.dumps(out))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    loaded = json.loads(out.stdout)
    assert loaded["import"] == []
    assert "npud.drivers.npu_emu" in loaded["devices"]
    for stage in ("devices", "target"):
        assert not [m for m in loaded[stage] if m.startswith("npud.compiler_worker.")
                    and m != "npud.compiler_worker.version"], loaded[stage]
        assert not [m for m in loaded[stage] if m.split(".")[0] in ("onnx", "onnxruntime")], loaded[stage]
        assert "npud.compiler_worker.pipeline" not in loaded[stage]


def test_npu_emu_is_registered_like_any_driver():
    assert "npu-emu" in drivers.installed() and "npu-emu" in targets.installed()
    driver = drivers.driver("npu-emu")
    assert driver is drivers.driver() and driver.target == "npu-emu"
    assert isinstance(driver.params("edge", {}), drivers.DeviceParams)
    assert [p.preset for p in driver.enumerate()] == list(driver.presets())
    with pytest.raises(drivers.ProgramRejected, match="header"):
        driver.validate(b"not a stream", driver.params("edge", {}), [])


def test_a_config_names_the_driver_and_an_unknown_one_is_a_config_error_naming_the_installed():
    assert parse_devices([{"name": "a"}])[0].driver == "npu-emu"
    assert parse_devices([{"name": "a", "driver": "npu-emu", "preset": "server"}])[0].preset == "server"
    with pytest.raises(ConfigError, match=r"devices\[0\]\.driver: no driver named 'acme-npu' .*installed: "
                                          r".*npu-emu"):
        parse_devices([{"driver": "acme-npu"}])
    with pytest.raises(ConfigError, match=r"devices\[0\]\.preset: unknown preset 'x' of driver npu-emu"):
        parse_devices([{"driver": "npu-emu", "preset": "x"}])
    with pytest.raises(ConfigError, match=r"devices\[0\]\.driver: expected a driver's name"):
        parse_devices([{"driver": 3}])


@pytest.mark.parametrize("value, table", [
    ("edge", {"preset": "edge"}),                        # a preset of the default driver
    ("cpu", {"driver": "cpu"}),                          # a driver: its first preset
    ("npu-emu:server", {"driver": "npu-emu", "preset": "server"}),
    ("cpu:", {"driver": "cpu"}),
])
def test_the_device_option_names_a_preset_a_driver_or_both(value, table):
    assert device_arg(value) == table
    parse_devices([device_arg(value)])


@pytest.mark.parametrize("value, problem", [("acme:edge", "no driver named 'acme'"),
                                            ("cpu:edge", "unknown preset 'edge' of driver cpu"),
                                            ("bogus", "unknown preset 'bogus' of driver npu-emu")])
def test_a_device_option_naming_nothing_installed_is_a_config_error(value, problem):
    with pytest.raises(ConfigError, match=problem):
        parse_devices([device_arg(value)])


def test_unknown_target_names_the_installed():
    with pytest.raises(plugins.UnknownPlugin, match="no target named 'nope'.*installed: .*npu-emu"):
        targets.target("nope")


def test_a_separately_installed_driver_is_found_through_its_entry_point(tmp_path):
    """A vendor's package (here a dist-info directory on sys.path, as pip leaves one) adds a driver
    that a config selects; `devices` shows it and its version."""
    (tmp_path / "acme_npu.py").write_text(textwrap.dedent("""
        from npud.drivers.npu_emu import NpuEmuDriver

        class AcmeDriver(NpuEmuDriver):
            name = "acme-npu"
            version = "9.1.2"
    """))
    info = tmp_path / "acme_npu-9.1.2.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-npu\nVersion: 9.1.2\n")
    (info / "entry_points.txt").write_text("[npud.drivers]\nacme-npu = acme_npu:AcmeDriver\n")
    code = textwrap.dedent("""
        import json, sys
        from npud import drivers
        from npud.config import from_dict
        from npud.server import Daemon
        config = from_dict({"devices": [{"name": "n0"}, {"name": "a0", "driver": "acme-npu"}]})
        print(json.dumps({"installed": drivers.installed(),
                          "devices": [[d.info()["driver"], d.info()["driver_version"]]
                                      for d in Daemon(config).devices]}))
    """)
    env = {"PYTHONPATH": f"{tmp_path}:{ROOT}:{ROOT / 'clients'}", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    # (make test also installs examples/driver-template's tmpl-int8)
    assert {"acme-npu", "cpu", "npu-emu"} <= set(result["installed"]) and result["installed"] == sorted(result["installed"])
    assert result["devices"][0][0] == "npu-emu" and result["devices"][1] == ["acme-npu", "9.1.2"]


def test_npuctl_devices_shows_the_driver_and_its_version():
    from npuctl.render import device_params, devices_table

    device = {"index": 0, "name": "npu0", "preset": "edge", "state": "ok", "util_pct": 0.0, "memory_used": 0,
              "memory_total": 1 << 20, "jobs_queued": 0, "jobs_running": 0, "jobs_completed": 0,
              "jobs_failed": 0, "busy_ms": 0.0, "resets": 0, "driver": "npu-emu", "driver_version": "0.1.0",
              "params": {"preset": "edge"}}
    assert "DRIVER" in devices_table([device]) and "npu-emu 0.1.0" in devices_table([device])
    assert "driver npu-emu 0.1.0" in device_params(device)


def test_npu_emu_target_answers_per_node_with_a_reason_and_compiles_a_container():
    """The target interface over today's pipeline: a support answer per node (an unsupported one
    says why), and a compile whose bytes the daemon reads with the container package alone."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    from npud.executable import Executable

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"], name="relu"),
         helper.make_node("TopK", ["r", "k"], ["v", "i"], name="topk", axis=1)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("v", TensorProto.FLOAT, [1, 2]),
         helper.make_tensor_value_info("i", TensorProto.INT64, [1, 2])],
        [onnx.numpy_helper.from_array(np.array([2], np.int64), "k")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]).SerializeToString()
    target = targets.target(drivers.driver().target)
    params = drivers.driver().params("edge", {})
    support = {s.node: s for s in target.support(model, params.to_dict())}
    assert support["relu"].supported and support["relu"].reason == ""
    assert not support["topk"].supported and support["topk"].op == "TopK" and support["topk"].reason

    relu_only = helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"], name="relu")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])]),
        opset_imports=[helper.make_opsetid("", 13)]).SerializeToString()
    exe = Executable.from_bytes(target.compile(relu_only, params.to_dict(), {}))
    assert exe.target_hash == params.target_hash() and target.fingerprint().startswith(exe.compiler_version)
