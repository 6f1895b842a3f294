"""npuctl as Unix tools behave: Ctrl-C prints what it has and exits 130, errors under --json are JSON,
`top` writes no escape codes to a pipe, `query` filters (-i) and repeats (-l), `disasm` refuses what
it cannot list, `compile -o` writes an executable, `cache list` names models, `--version`, and
`python -m npuctl`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest

import npu
import npud
from npu.local import LocalDaemon
from npuctl.main import main as npuctl_main

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "compiler_worker"))
from compiler_testmodels import mlp  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "clients"),
                                                    os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = LocalDaemon("--device", "edge", "--device", "edge", "--cache-dir", str(tmp_path_factory.mktemp("cache")))
    yield d
    d.stop()


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "mlp.onnx"
    model = onnx.load_from_string(mlp())
    model.graph.name = "tiny-mlp"
    onnx.save(model, str(path))
    return str(path)


def ctl(capsys, daemon, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    code = npuctl_main(["--endpoint", daemon.endpoint, *args])
    out, err = capsys.readouterr()
    return code, out, err


def npuctl_process(daemon, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "npuctl", "--endpoint", daemon.endpoint, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def wait_for(predicate, timeout: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def npuctl_session(client) -> dict | None:
    return next((c for c in client.clients() if c["name"] == "npuctl"), None)


def connected_for(daemon, seconds: float) -> None:
    """Wait until npuctl has a session, then ``seconds`` more."""
    with npu.connect(daemon.endpoint, name="watcher") as c:
        wait_for(lambda: npuctl_session(c) is not None, what="npuctl's session")
    time.sleep(seconds)


def interrupted(daemon, *args, before) -> tuple[int, str, str]:
    """Start npuctl, call ``before()``, then press Ctrl-C (SIGINT): its exit status, stdout, stderr."""
    proc = npuctl_process(daemon, *args)
    try:
        before()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        return proc.returncode, out, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --- Ctrl-C ------------------------------------------------------------------------------------


def test_ctrl_c_in_run_bench_prints_partial_stats_and_exits_130(daemon, onnx_path):
    def some_runs():
        with npu.connect(daemon.endpoint, name="watcher") as c:
            wait_for(lambda: (npuctl_session(c) or {}).get("jobs_completed", 0) > 20, what="bench runs")
    code, out, err = interrupted(daemon, "run", onnx_path, "--bench", "1000000", before=some_runs)
    assert code == 130, err
    assert "on device 0" in out and "of 1000000 runs (interrupted)" in out and "latency ms" in out, out
    runs = int(out.split("bench: ", 1)[1].split()[0])
    assert 20 <= runs < 1000000


def test_ctrl_c_in_trace_duration_writes_the_trace_so_far_and_exits_130(daemon, onnx_path, tmp_path):
    out_file = tmp_path / "trace.json"
    with npu.connect(daemon.endpoint, name="worker") as c:
        model = c.load(onnx_path)
        x = np.ones(model.inputs[0].shape, np.float32)

        def jobs_while_it_records():   # Ctrl-C right after the last one: npuctl polls once more
            wait_for(lambda: npuctl_session(c) is not None, what="npuctl's session")
            until = time.monotonic() + 2.0   # past the moment it takes its cursor, however loaded the machine
            while time.monotonic() < until:
                model.run(x)
        code, out, err = interrupted(daemon, "trace", "--duration", "600", "-o", str(out_file), "--summary",
                                     before=jobs_while_it_records)
    assert code == 130, err
    assert "(interrupted" in out and "worker" in out, out
    trace = json.loads(out_file.read_text())
    recorded = len([e for e in trace["traceEvents"] if e.get("cat") == "job"])
    assert trace["otherData"]["interrupted"] is True and recorded >= 1
    assert f"trace: {recorded} job(s)" in out


def test_ctrl_c_in_query_loop_exits_130_after_printing_rows(daemon):
    code, out, err = interrupted(daemon, "query", "--device=index,name", "-l", "0.1", "--format=csv,nounits",
                                 before=lambda: connected_for(daemon, 1.0))
    assert code == 130, err
    lines = out.splitlines()
    assert lines[0] == "index, name" and lines.count("index, name") == 1   # the header once
    assert lines.count("1, npu1") >= 2


# --- query -i / -l -------------------------------------------------------------------------------


def test_query_id_filter_by_index_name_and_uuid(capsys, daemon):
    uuid1 = json.loads(ctl(capsys, daemon, "devices", "--json")[1])[1]["uuid"]
    assert f"device 1 (npu1, driver npu-emu {npud.__version__}, preset edge, {uuid1})" in ctl(capsys, daemon, "devices")[1]
    for ident in ("1", "npu1", uuid1):
        code, out, err = ctl(capsys, daemon, "query", "--device=index,name,uuid", "-i", ident,
                             "--format=csv,noheader")
        assert code == 0 and out.splitlines() == [f"1, npu1, {uuid1}"], (ident, out, err)
    assert ctl(capsys, daemon, "query", "--device=index", "--id", "1,0", "--format=csv,noheader")[1] == "1\n0\n"
    code, out, err = ctl(capsys, daemon, "query", "--device=index", "-i", "npu7")
    assert code == 1 and "no device 'npu7'" in err


@pytest.mark.parametrize("seconds", ["0", "-1", "abc", "nan"])
def test_query_loop_refuses_a_bad_interval(capsys, daemon, seconds):
    code, out, err = ctl(capsys, daemon, "query", "--device=index", "-l", seconds)
    assert code == 2 and "-l/--loop" in err and seconds in err and out == "", (code, out, err)


def test_query_clients_on_a_device(capsys, daemon):
    with npu.connect(daemon.endpoint, name="on-one") as one, npu.connect(daemon.endpoint, name="idle"):
        one.alloc(4096, device=1)
        rows = ctl(capsys, daemon, "query", "--clients=name,devices", "-i", "1", "--format=csv,noheader")[1]
        assert rows.splitlines() == ["on-one, 1"]
        rows = ctl(capsys, daemon, "query", "--clients=name,devices", "--format=csv,noheader")[1]
        assert sorted(rows.splitlines()) == ["idle, -", "on-one, 1"]


def test_query_loop_json_is_one_line_per_sample(daemon):
    code, out, _ = interrupted(daemon, "query", "--device=index", "-l", "0.1", "--json",
                               before=lambda: connected_for(daemon, 1.0))
    samples = [json.loads(line) for line in out.splitlines()]
    assert code == 130 and len(samples) >= 2 and samples[0] == [{"index": 0}, {"index": 1}]


# --- errors as JSON ----------------------------------------------------------------------------


def test_errors_under_json_are_json(capsys, daemon, tmp_path):
    capsys.readouterr()
    code = npuctl_main(["--endpoint", f"ipc://{tmp_path}/nowhere.sock", "status", "--json"])
    out, err = capsys.readouterr()
    error = json.loads(out)["error"]
    assert code == 1 and error["code"] == "ECONNREFUSED" and "not running" in error["message"] and err == ""
    code, out, err = ctl(capsys, daemon, "query", "--device=nope", "--json")
    assert code == 2 and json.loads(out)["error"]["code"] == "EINVAL" and "nope" in out and err == ""
    code, out, err = ctl(capsys, daemon, "dmon", "-d", "0", "--json")   # an argparse error
    assert code == 2 and "--delay" in json.loads(out)["error"]["message"] and err == ""
    code, out, err = ctl(capsys, daemon, "dmon", "-d", "0")             # without --json: usage on stderr
    assert code == 2 and out == "" and err.startswith("usage: npuctl dmon") and "npuctl: " in err


# --- top batch mode ----------------------------------------------------------------------------


def test_top_to_a_pipe_is_batch_mode_without_escape_codes(daemon):
    out = subprocess.run([sys.executable, "-m", "npuctl", "--endpoint", daemon.endpoint, "top", "-n", "2",
                          "-d", "0.2"], capture_output=True, text=True, timeout=60, env=ENV,
                         stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr
    assert "\x1b" not in out.stdout and "\r" not in out.stdout
    assert out.stdout.count("npuctl top - npud") == 2 and "npu1" in out.stdout


# --- disasm, compile -o, cache list ---------------------------------------------------------


def test_disasm_of_a_non_executable_exits_1(capsys, daemon, onnx_path, tmp_path):
    code, out, err = ctl(capsys, daemon, "disasm", onnx_path)
    assert code == 1 and "neither an npux executable nor a command stream" in err and out == ""
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    assert ctl(capsys, daemon, "disasm", str(text))[0] == 1


def test_compile_output_writes_an_executable_disasm_lists(capsys, daemon, onnx_path, tmp_path):
    from npud.executable import Executable
    target = tmp_path / "mlp.npux"
    code, out, err = ctl(capsys, daemon, "compile", onnx_path, "--device", "1", "-o", str(target))
    assert code == 0 and f"executable written to {target}" in out, err
    exe = Executable.from_bytes(target.read_bytes())
    with npu.connect(daemon.endpoint) as c:
        model = c.load(onnx_path, 1)
        assert [t["name"] for t in exe.inputs] == [t.name for t in model.inputs]
        assert sum(r["cycles"] for r in exe.ops) == sum(r["cycles"] for r in model.report().rows)
    code, out, _ = ctl(capsys, daemon, "disasm", str(target))
    assert code == 0 and "npux executable" in out and "'tiny-mlp'" in out
    assert ctl(capsys, daemon, "compile", onnx_path, "-o", str(tmp_path / "no" / "such" / "dir.npux"))[0] == 2


def test_cache_list_shows_model_names(capsys, daemon, onnx_path):
    assert ctl(capsys, daemon, "compile", onnx_path)[0] == 0
    listing = json.loads(ctl(capsys, daemon, "cache", "list", "--json")[1])
    assert "tiny-mlp" in {e["model_name"] for e in listing["entries"]}
    text = ctl(capsys, daemon, "cache", "list")[1]
    assert "MODEL" in text and "tiny-mlp" in text


# --- version, python -m ------------------------------------------------------------------------


def test_version_and_python_dash_m(capsys):
    from npud.ipc_schema.version import UNKNOWN, distribution_version
    assert npuctl_main(["--version"]) == 0
    assert capsys.readouterr()[0].strip() == f"npuctl {distribution_version()}" != f"npuctl {UNKNOWN}"
    out = subprocess.run([sys.executable, "-m", "npuctl", "--help"], capture_output=True, text=True,
                         timeout=60, env=ENV)
    assert out.returncode == 0 and out.stdout.startswith("usage: npuctl")
