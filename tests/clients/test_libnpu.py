"""libnpu, the C client library (clients/c): its test program against a private daemon, plain and
under AddressSanitizer+UBSan, a zero-copy run compared with the Python client's, the example, the
pkg-config file and soname, and the dependency check that never skips silently."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest

import npu
from npu.local import LocalDaemon

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILD = os.path.join(ROOT, "build", "libnpu")
HEADER = os.path.join(ROOT, "clients", "c", "include", "npu.h")
TEST_SOURCE = os.path.join(ROOT, "clients", "c", "tests", "test_libnpu.c")
DEPS = os.path.join(ROOT, "clients", "c", "deps.sh")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_client_models import big_model  # noqa: E402
from test_client_session import daemon_to_kill  # noqa: E402,F401  (a fixture)

sys.path.insert(0, ROOT)
from examples import tiny_cnn  # noqa: E402


@pytest.fixture(scope="module")
def built():
    """libnpu, its example and test programs, built (or brought up to date) as `make test` does."""
    done = subprocess.run(["make", "-s", "-C", ROOT, "libnpu-tests"], capture_output=True, text=True)
    assert done.returncode == 0, f"make libnpu-tests failed:\n{done.stdout}\n{done.stderr}"
    return BUILD


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    # 1 GiB of device memory, fixed (not sized from this machine's RAM): the C test allocates
    # 256 MiB buffers until the device runs out, within the session's 2 GiB quota
    config = tmp_path_factory.mktemp("config") / "npud.toml"
    config.write_text('[[devices]]\nname = "npu0"\n[devices.params]\nmemory_bytes = "1GiB"\n')
    d = LocalDaemon("--test-mode", "--config", str(config), "--cache-dir", str(tmp_path_factory.mktemp("cache")))
    yield d
    d.stop()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The classifier, an input for it, and a model over the inline limit, as files."""
    d = tmp_path_factory.mktemp("libnpu")
    model, big, symbolic = d / "tiny.onnx", d / "big.onnx", d / "symbolic.onnx"
    onnx.save(tiny_cnn.build(), str(model))
    big.write_bytes(big_model())
    onnx.save(symbolic_batch_model(), str(symbolic))
    x = np.random.default_rng(3).standard_normal(tiny_cnn.INPUT_SHAPE).astype(np.float32)
    x.tofile(d / "x.raw")
    return {"dir": d, "model": str(model), "big": str(big), "symbolic": str(symbolic), "input": str(d / "x.raw"),
            "x": x}


def symbolic_batch_model() -> onnx.ModelProto:
    """y = relu(x), x float32['N', 4]: for npu_model_load_shaped and the defaulted bits."""
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "relu", [x], [y])
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])


def python_output(endpoint: str, files: dict) -> np.ndarray:
    with npu.connect(endpoint) as client:
        model = client.load(files["model"])
        return model.run(files["x"])[model.outputs[0].name]


@pytest.mark.parametrize("program", ["test_libnpu", "test_libnpu-asan"])
def test_c_test_program_passes_and_its_zero_copy_run_equals_python(built, daemon, files, program):
    out = files["dir"] / f"{program}.out"
    env = {**os.environ, "ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0",
           "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1"}
    done = subprocess.run([os.path.join(built, program), daemon.endpoint, files["model"], files["input"],
                           str(out), files["big"], files["symbolic"]], capture_output=True, text=True,
                          timeout=600, env=env)
    assert done.returncode == 0, f"{program} failed:\n{done.stdout}\n{done.stderr}"
    assert re.search(r"^\d+ checks, 0 failed$", done.stdout, re.M), done.stdout
    assert "runtime error" not in done.stderr and "Sanitizer" not in done.stderr, done.stderr
    want = python_output(daemon.endpoint, files)
    got = np.fromfile(out, dtype=np.float32).reshape(want.shape)
    np.testing.assert_array_equal(got, want)


def test_every_call_of_the_header_is_exercised_by_the_test_program():
    with open(HEADER) as f:
        declared = set(re.findall(r"\b(npu_[a-z0-9_]+)\s*\(", f.read()))
    with open(TEST_SOURCE) as f:
        used = set(re.findall(r"\b(npu_[a-z0-9_]+)\s*\(", f.read()))
    assert len(declared) > 40
    assert declared - used == set()


def test_classify_example_prints_the_python_clients_top_classes(built, daemon, files):
    done = subprocess.run([os.path.join(built, "classify"), files["model"], files["input"], "--top", "3",
                           "--endpoint", daemon.endpoint], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"top 3 of {tiny_cnn.CLASSES} classes:"
    got = [int(line.split()[0]) for line in lines[1:]]
    want = np.argsort(-python_output(daemon.endpoint, files).ravel(), kind="stable")[:3].tolist()
    assert got == want


def test_classify_says_what_is_wrong(built, daemon, files):
    done = subprocess.run([os.path.join(built, "classify"), files["model"], files["model"],
                           "--endpoint", daemon.endpoint], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "must hold exactly 12288 bytes" in done.stderr
    done = subprocess.run([os.path.join(built, "classify"), files["model"], "--endpoint",
                           f"ipc://{files['dir']}/none.sock"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "ECONNREFUSED" in done.stderr and "not running" in done.stderr


def test_pkg_config_soname_and_exports(built):
    env = {**os.environ, "PKG_CONFIG_PATH": built}
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", "libnpu"], capture_output=True, text=True,
                           env=env, check=True).stdout.split()
    assert f"-I{os.path.join(ROOT, 'clients', 'c', 'include')}" in flags and "-lnpu" in flags
    dynamic = subprocess.run(["readelf", "-dW", os.path.join(built, "libnpu.so")], capture_output=True,
                             text=True, check=True).stdout
    assert "Library soname: [libnpu.so.0]" in dynamic
    symbols = subprocess.run(["nm", "-D", "--defined-only", os.path.join(built, "libnpu.so")],
                             capture_output=True, text=True, check=True).stdout
    exported = {line.split()[-1] for line in symbols.splitlines() if " T " in line}
    assert exported and all(s.startswith("npu_") and not s.startswith("npu__") for s in exported), exported


def fake_tools(tmp_path, *, apt_knows_msgpack_c: bool):
    """A PATH where pkg-config finds nothing, `id -u` is 1000 and apt-cache knows what we say."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scripts = {"pkg-config": "exit 1", "id": "echo 1000",
               "apt-cache": f"[ \"$2\" = libmsgpack-c-dev ] && exit {0 if apt_knows_msgpack_c else 100}; exit 0",
               "apt-get": "echo apt-get must not run >&2; exit 99"}
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin"}


@pytest.mark.parametrize("trixie", [False, True], ids=["bookworm", "trixie"])
def test_missing_dependencies_stop_with_the_command_to_run(tmp_path, trixie):
    done = subprocess.run(["sh", DEPS], capture_output=True, text=True,
                          env=fake_tools(tmp_path, apt_knows_msgpack_c=trixie))
    package = "libmsgpack-c-dev" if trixie else "libmsgpack-dev"
    assert done.returncode == 1
    assert f"run: sudo apt-get install -y libzmq3-dev {package} pkg-config" in done.stderr


def test_the_minimal_program_of_the_docs_builds_and_runs(built, daemon, files, tmp_path):
    with open(os.path.join(ROOT, "docs", "CLIENT-C.md")) as f:
        program = re.search(r"```c\n(.*?)```", f.read(), re.S).group(1)
    (tmp_path / "app.c").write_text(program)
    (tmp_path / "model.onnx").write_bytes(open(files["model"], "rb").read())
    env = {**os.environ, "PKG_CONFIG_PATH": built, "NPUD_ENDPOINT": daemon.endpoint}
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", "libnpu"], capture_output=True, text=True,
                           env=env, check=True).stdout.split()
    subprocess.run(["cc", "-std=c11", "-Wall", "-Werror", "-o", "app", "app.c", *flags, f"-Wl,-rpath,{built}"],
                   cwd=tmp_path, check=True)
    done = subprocess.run(["./app"], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert 0.0 < float(done.stdout) < 1.0   # a softmax probability


@pytest.mark.parametrize("program", ["test_libnpu", "test_libnpu-asan"])
def test_a_call_blocked_when_the_daemon_is_killed_returns_enotconn_at_once(built, files, daemon_to_kill, program):
    """SIGKILL (no shutdown event): the daemon is SIGSTOPped first so the wait surely blocks on it;
    its death closes the companion socket, which ends the wait -- not its 60 s timeout -- and the
    next call fails at once too."""
    d = daemon_to_kill
    proc = subprocess.Popen([os.path.join(built, program), "--wait-through-death", d.endpoint, files["model"]],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "ready\n"
        os.kill(d.process.pid, signal.SIGSTOP)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        time.sleep(0.5)
        os.kill(d.process.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    wait = re.search(r"^wait (\w+) (\d+) ms", out, re.M)
    assert wait and wait.group(1) == "ENOTCONN", out
    assert int(wait.group(2)) < 5000, out     # measured: about 550 ms, 500 of them before the kill
    print(wait.group(0))
    assert "ping ENOTCONN" in out, out
    assert "Sanitizer" not in err and "runtime error" not in err, err


def test_libnpu_reports_uint8_int8_and_bool_tensors_in_their_own_dtype(built, daemon):
    """npu_tensor_info.dtype of a model with uint8/bool inputs and int8/bool outputs: NPU_UINT8,
    NPU_BOOL, NPU_INT8 -- one byte an element, as the buffers bound to them hold."""
    import ctypes

    from test_client_int import byte_model

    class Info(ctypes.Structure):
        _fields_ = [("name", ctypes.c_char_p), ("dtype", ctypes.c_int), ("rank", ctypes.c_uint32),
                    ("shape", ctypes.c_int64 * 8), ("size", ctypes.c_uint64), ("symbolic", ctypes.c_uint32),
                    ("defaulted", ctypes.c_uint32)]

    lib = ctypes.CDLL(os.path.join(built, "libnpu.so"))
    lib.npu_model_input.restype = lib.npu_model_output.restype = ctypes.POINTER(Info)
    lib.npu_dtype_name.restype = ctypes.c_char_p
    lib.npu_status_message.restype, lib.npu_status_message.argtypes = ctypes.c_char_p, [ctypes.c_void_p]
    lib.npu_client_connect.restype = lib.npu_model_load.restype = ctypes.c_void_p   # npu_status
    client, model = ctypes.c_void_p(), ctypes.c_void_p()
    status = lib.npu_client_connect(daemon.endpoint.encode(), None, ctypes.byref(client))
    assert not status, lib.npu_status_message(status)
    try:
        data = byte_model()
        status = lib.npu_model_load(client, 0, data, len(data), ctypes.byref(model))
        assert not status, lib.npu_status_message(status)
        tensors = [lib.npu_model_input(model, i).contents for i in range(2)] + \
                  [lib.npu_model_output(model, i).contents for i in range(3)]
        assert [(t.name, lib.npu_dtype_name(t.dtype), t.size) for t in tensors] == [
            (b"img", b"uint8", 10), (b"keep", b"bool", 10), (b"bright", b"bool", 10), (b"q", b"int8", 10),
            (b"drop", b"bool", 10)]
        lib.npu_model_unload(model)
    finally:
        lib.npu_client_close(client)
