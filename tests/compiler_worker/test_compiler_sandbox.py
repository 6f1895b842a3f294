"""The compiler worker's confinement (npud/compiler_worker/sandbox.py), checked in a child process:
once confined it reads no file but its code, writes none, reaches no TCP address, and still
compiles."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from npud.compiler_worker import sandbox

CHILD = textwrap.dedent("""
    import json, os, socket, sys
    from npud.compiler_worker import sandbox
    probes = json.loads(sys.argv[1])
    sys.path.insert(0, os.getcwd())   # as `python -m` does: the directory it started in
    said = sandbox.confine()
    result = {"said": said}
    def attempt(kind, target):
        try:
            if kind == "read":
                open(target, "rb").read(1)
            elif kind == "write":
                open(target, "wb").close()
            elif kind == "tcp":
                socket.create_connection(("127.0.0.1", int(target)), timeout=2).close()
            return "allowed"
        except OSError as e:
            return type(e).__name__
    result["probes"] = [[k, t, attempt(k, t)] for k, t in probes]
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper
    from npud.compiler_worker import compile_model
    from npud.emulator.config import make_config
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])
    w = numpy_helper.from_array(np.ones((3, 4), np.float32), "w")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y], [w])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    result["compiled"] = len(compile_model(model.SerializeToString(), make_config("edge")).to_bytes())
    print(json.dumps(result))
""")


def confined_child(probes: list[tuple[str, str]], cwd: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(probes)], cwd=cwd, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


@pytest.fixture
def service_files(tmp_path):
    """Stand-ins for what a worker must not reach: a compile cache entry, a state file, a file in
    its starting directory; all readable and writable by this uid."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "entry.npux").write_bytes(b"someone else's weights")
    (tmp_path / "state.db").write_bytes(b"state")
    (tmp_path / "relative.bin").write_bytes(b"in the starting directory")
    return tmp_path


def test_a_confined_worker_reads_nothing_but_its_code_and_still_compiles(service_files):
    if sandbox.landlock_abi() < 1:
        pytest.skip("this kernel has no Landlock: the worker gets only the empty working directory")
    code = os.path.join(os.path.dirname(sandbox.__file__), "api.py")
    probes = [("read", str(service_files / "cache" / "entry.npux")), ("read", str(service_files / "state.db")),
              ("read", "relative.bin"), ("read", "/etc/passwd"), ("read", "/proc/1/environ"),
              ("write", str(service_files / "new.bin")), ("write", os.path.join(os.path.dirname(code), "x.py")),
              ("tcp", "1"), ("read", code)]
    result = confined_child(probes, str(service_files))
    outcome = {(k, t): r for k, t, r in result["probes"]}
    assert outcome.pop(("read", code)) == "allowed"                      # its own code stays readable
    assert outcome.pop(("read", "relative.bin")) == "FileNotFoundError"  # the starting directory is gone
    assert set(outcome.values()) == {"PermissionError"}, outcome
    assert "Landlock ABI" in result["said"] and "not confined" not in result["said"]
    assert result["compiled"] > 0


def test_without_landlock_the_worker_still_leaves_its_directory(service_files, monkeypatch):
    monkeypatch.setattr(sandbox, "landlock_abi", lambda: 0)
    before = os.getcwd()
    try:
        said = sandbox.confine()
        assert "no Landlock" in said
        with pytest.raises(FileNotFoundError):
            os.getcwd()
    finally:
        os.chdir(before)
