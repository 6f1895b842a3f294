"""npuctl against a real daemon with real clients doing work: every command, its --json and CSV,
the trace file, admin ops and their refusal, exit codes, and `top` through a pseudo-terminal."""

from __future__ import annotations

import csv
import io
import json
import os
import pty
import select
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import onnx
import pytest

import npu
from asuser import needs_root, open_to_everyone, run_as
from npud.emulator.config import make_config
from npu.local import LocalDaemon
from npuctl import fields
from npuctl.main import main as npuctl_main
from streams import A, B, O, add_stream

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "compiler_worker"))
from compiler_testmodels import mlp  # noqa: E402

CFG = make_config("edge")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("cache"))
    d = LocalDaemon("--device", "edge", "--device", "edge", "--cache-dir", cache)
    yield d
    d.stop()


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "mlp.onnx"
    onnx.save(mlp(), str(path))
    return str(path)


class Work:
    """Two clients doing work: A runs a model on device 0 and maps a buffer; B runs streams on device 1."""

    def __init__(self, endpoint: str, onnx_path: str):
        self.a = npu.connect(endpoint, name="worker-a")
        self.b = npu.connect(endpoint, name="worker-b")
        self.model = self.a.load(onnx_path, 0)
        x = np.ones(self.model.inputs[0].shape, np.float32)
        for _ in range(3):
            self.model.run(x)
        self.mapped = self.a.alloc(10000)
        self.mapped.map()
        n = 256
        self.b_bufs = [self.b.alloc(n * 4, device=1) for _ in range(3)]
        for _ in range(2):
            self.b.submit(add_stream(n), [(self.b_bufs[0], A, False), (self.b_bufs[1], B, False),
                                          (self.b_bufs[2], O, True)], device=1).wait(10)

    def close(self):
        self.a.close()
        self.b.close()


@pytest.fixture(scope="module")
def work(daemon, onnx_path):
    w = Work(daemon.endpoint, onnx_path)
    yield w
    w.close()


def ctl(capsys, daemon, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    code = npuctl_main(["--endpoint", daemon.endpoint, *args])
    out, err = capsys.readouterr()
    return code, out, err


def ctl_json(capsys, daemon, *args):
    code, out, err = ctl(capsys, daemon, *args, "--json")
    assert code == 0, err
    return json.loads(out)


def by_session(entries, session):
    [entry] = [e for e in entries if e["session"] == session]
    return entry


# --- status, devices, clients, query ------------------------------------------------------


def test_status_json_and_text_agree_with_what_clients_did(capsys, daemon, work):
    s = ctl_json(capsys, daemon, "status")
    a, b = by_session(s["clients"], work.a.session), by_session(s["clients"], work.b.session)
    assert a["pid"] == os.getpid() and a["uid"] == os.getuid() and a["user"]
    assert (a["jobs_submitted"], a["jobs_completed"], a["jobs_failed"]) == (3, 3, 0)
    assert (b["jobs_submitted"], b["jobs_completed"], b["jobs_failed"]) == (2, 2, 0)
    # A holds the model's weights and arena, its pooled I/O set and the 10000-byte buffer, page-rounded
    expected_a = (work.model.weights_bytes + work.model.arena_bytes + 4096 * 2 + 12288)
    assert a["memory"] == expected_a and a["models"] == 1 and a["buffers"] == 3
    assert b["memory"] == 3 * 4096 and b["buffers"] == 3
    assert a["busy_ms"] > 0 and a["jobs_in_flight"] == 0
    assert a["modeled_cycles"] == 3 * sum(r["cycles"] for r in work.model.report().rows)
    assert not any(c["name"] == "npuctl" for c in s["clients"])  # npuctl hides its own session
    d0, d1 = s["devices"]
    assert d0["jobs_completed"] >= 3 and d1["jobs_completed"] >= 2
    assert d0["memory_used"] >= expected_a and d1["memory_used"] >= b["memory"]
    assert 0 <= d0["util_pct"] <= 100 and d0["modeled_cycles"] >= a["modeled_cycles"]
    code, text, _ = ctl(capsys, daemon, "status")
    assert code == 0
    for needle in ("npud ", "up ", "npu0", "npu1", "UTIL", "MEMORY USED / TOTAL", "PID namespaces",
                   work.a.session, work.b.session, "worker-a", str(os.getpid())):
        assert needle in text, needle
    assert ctl(capsys, daemon)[2] == "" and "npu1" in ctl(capsys, daemon)[1]  # status is the default


def test_devices_and_clients(capsys, daemon, work):
    devices = ctl_json(capsys, daemon, "devices")
    assert [d["name"] for d in devices] == ["npu0", "npu1"] and devices[0]["params"]["clock_mhz"] > 0
    assert "mac_rows" in ctl(capsys, daemon, "devices")[1]
    clients = ctl_json(capsys, daemon, "clients")
    assert {work.a.session, work.b.session} <= {c["session"] for c in clients}
    assert "worker-b" in ctl(capsys, daemon, "clients")[1]


def test_query_csv_fields_match_json(capsys, daemon, work):
    names = "index,name,state,memory.used,memory.total,memory.free,jobs.completed,resets"
    code, out, _ = ctl(capsys, daemon, "query", f"--device={names}", "--format=csv,noheader,nounits")
    assert code == 0
    rows = list(csv.reader(io.StringIO(out), skipinitialspace=True))
    devices = ctl_json(capsys, daemon, "devices")
    assert len(rows) == 2
    for row, d in zip(rows, devices):
        assert row[:3] == [str(d["index"]), d["name"], d["state"]]
        assert int(row[3]) == d["memory_used"] and int(row[5]) == d["memory_total"] - d["memory_used"]
    code, out, _ = ctl(capsys, daemon, "query", "--clients=session,name,memory,jobs.submitted,util.pct,command")
    header, *rows = list(csv.reader(io.StringIO(out), skipinitialspace=True))
    assert header == ["session", "name", "memory [B]", "jobs.submitted", "util.pct [%]", "command"]
    row_a = next(r for r in rows if r[0] == work.a.session)
    status_a = by_session(ctl_json(capsys, daemon, "clients"), work.a.session)
    assert row_a[2] == f"{status_a['memory']} B" and row_a[3] == "3" and row_a[4].endswith(" %")
    as_json = ctl_json(capsys, daemon, "query", "--clients=session,jobs.completed")
    assert by_session(as_json, work.b.session) == {"session": work.b.session, "jobs.completed": 2}
    code, out, _ = ctl(capsys, daemon, "query", "--help-fields")
    assert code == 0 and all(name in out for name in [*fields.DEVICE_FIELDS, *fields.CLIENT_FIELDS])
    every = ",".join(fields.DEVICE_FIELDS)
    assert ctl(capsys, daemon, "query", f"--device={every}")[0] == 0
    assert ctl(capsys, daemon, "query", f"--clients={','.join(fields.CLIENT_FIELDS)}")[0] == 0


@pytest.mark.parametrize("args", [["query", "--device=index,bogus"], ["query"],
                                  ["query", "--device=index", "--format=tsv"],
                                  ["query", "--device=index", "--clients=pid"],
                                  ["dmon", "-d", "0"], ["dmon", "-o", "X"], ["pmon", "-c", "0"],
                                  ["frobnicate"], ["compile"], ["top", "-s", "z"], ["--no-such-option"]])
def test_usage_errors_exit_2(capsys, daemon, args):
    code, _out, err = ctl(capsys, daemon, *args)
    assert code == 2 and err


def test_daemon_not_running_is_one_line_naming_endpoint(capsys, tmp_path):
    endpoint = f"ipc://{tmp_path}/absent.sock"
    for command in ("status", "top", "jobs"):
        capsys.readouterr()
        assert npuctl_main(["--endpoint", endpoint, command]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and endpoint in err and "npud --endpoint" in err


# --- dmon, pmon ------------------------------------------------------------------------------


def test_dmon_csv_and_text(capsys, daemon, work):
    code, out, _ = ctl(capsys, daemon, "dmon", "-c", "2", "-d", "0.1", "-o", "DT", "--format", "csv")
    assert code == 0
    header, *rows = list(csv.reader(io.StringIO(out), skipinitialspace=True))
    assert header[:4] == ["date", "time", "index", "name"] and len(rows) == 4
    assert [r[3] for r in rows] == ["npu0", "npu1", "npu0", "npu1"]
    assert all(len(r[0]) == 8 and r[1].count(":") == 2 for r in rows)
    completed = header.index("jobs.completed")
    assert int(rows[0][completed]) >= 3 and int(rows[1][completed]) >= 2
    code, out, _ = ctl(capsys, daemon, "dmon", "-c", "1")
    lines = out.splitlines()
    assert lines[0].startswith("#") and "util" in lines[0] and len(lines) == 4
    lines = [json.loads(line) for line in ctl(capsys, daemon, "dmon", "-c", "1", "--json")[1].splitlines()]
    assert [x["name"] for x in lines] == ["npu0", "npu1"] and "util.pct" in lines[0]


def test_pmon_lines_per_client(capsys, daemon, work):
    code, out, _ = ctl(capsys, daemon, "pmon", "-c", "2", "-d", "0.1", "--format", "csv,noheader")
    rows = list(csv.reader(io.StringIO(out), skipinitialspace=True))
    mine = [r for r in rows if r[2] == work.a.session]
    assert code == 0 and len(mine) == 2 and mine[0][0] == str(os.getpid()) and mine[0][9] == "3"
    assert mine[0][3] == "0"   # the device column: A works on device 0
    records = [json.loads(x) for x in ctl(capsys, daemon, "pmon", "-c", "1", "--json", "-o", "T")[1].splitlines()]
    rec_b = by_session(records, work.b.session)
    assert rec_b["jobs.submitted"] == 2 and rec_b["memory"] == 3 * 4096 and "time" in rec_b
    assert rec_b["devices"] == "1"
    text = ctl(capsys, daemon, "pmon", "-c", "1")[1]
    assert "worker-a" in text and text.splitlines()[0].split()[4] == "dev"


# --- jobs, mem -----------------------------------------------------------------------------------


def test_jobs_lists_every_clients_jobs(capsys, daemon, work):
    data = ctl_json(capsys, daemon, "jobs")
    a_jobs = [j for j in data["jobs"] if j["session"] == work.a.session]
    b_jobs = [j for j in data["jobs"] if j["session"] == work.b.session]
    cycles = sum(r["cycles"] for r in work.model.report().rows)
    assert len(a_jobs) == 3 and all(j["state"] == "done" and j["model"] == work.model.id and j["device"] == 0
                                    and j["cycles"] == cycles and j["pid"] == os.getpid() for j in a_jobs)
    assert len(b_jobs) == 2 and all(j["model"] == 0 and j["device"] == 1 for j in b_jobs)
    for j in a_jobs + b_jobs:
        assert j["submitted_s"] <= j["started_s"] <= j["finished_s"] <= data["now_s"]
        assert j["wall_ms"] == pytest.approx((j["finished_s"] - j["started_s"]) * 1e3)
    only_b = ctl_json(capsys, daemon, "jobs", "--device", "1", "--limit", "1")
    assert [j["session"] for j in only_b["jobs"]] == [work.b.session]
    text = ctl(capsys, daemon, "jobs")[1]
    assert "worker-a" in text and "WALL MS" in text


def test_mem_lists_buffers_sizes_and_mapping(capsys, daemon, work):
    data = ctl_json(capsys, daemon, "mem")
    a_bufs = [b for b in data["buffers"] if b["session"] == work.a.session]
    mapped = next(b for b in a_bufs if b["handle"] == work.mapped.handle)
    assert mapped["size"] == 10000 and mapped["mapped_size"] == 12288 and mapped["exported"]
    kinds = sorted(b["kind"] for b in a_bufs if b["model"] == work.model.id)
    assert kinds == ["arena", "weights"]
    assert not any(b["exported"] for b in data["buffers"] if b["session"] == work.b.session)
    clients = ctl_json(capsys, daemon, "clients")
    for c in (work.a, work.b):
        total = sum(t["mapped_bytes"] for t in data["totals"] if t["session"] == c.session)
        assert total == by_session(clients, c.session)["memory"]
    assert [b["device"] for b in ctl_json(capsys, daemon, "mem", "--device", "1")["buffers"]] == [1, 1, 1]
    text = ctl(capsys, daemon, "mem", "--session", work.a.session)[1]
    assert "weights" in text and "EXPORTED" in text and work.b.session not in text


# --- trace -----------------------------------------------------------------------------------------


def test_trace_file_is_chrome_trace_with_job_and_layer_slices(capsys, daemon, work, tmp_path):
    x = np.ones(work.model.inputs[0].shape, np.float32)
    stop = threading.Event()
    runs = []

    def load():
        with npu.connect(daemon.endpoint, name="tracee") as c:
            bufs = [c.alloc(1024, device=1) for _ in range(3)]
            time.sleep(0.3)
            for _ in range(4):
                c.submit(add_stream(256), [(bufs[0], A, False), (bufs[1], B, False), (bufs[2], O, True)],
                         device=1).wait(10)
            runs.append(c.session)
            while not stop.is_set():
                time.sleep(0.01)

    t = threading.Thread(target=load)
    t.start()
    out = tmp_path / "trace.json"
    try:
        # the model jobs run in this thread while the trace records
        timer = threading.Timer(0.3, lambda: [work.model.run(x) for _ in range(2)])
        timer.start()
        code, text, err = ctl(capsys, daemon, "trace", "--duration", "1.2", "-o", str(out), "--summary")
        timer.join()
    finally:
        stop.set()
        t.join()
    assert code == 0, err
    assert "Per device" in text and "tracee" in text
    trace = json.loads(out.read_text())
    events = trace["traceEvents"]
    for e in events:
        assert {"ph", "name", "pid"} <= set(e) and e["ph"] in ("X", "M", "i")
        if e["ph"] == "X":
            assert isinstance(e["ts"], float) and e["dur"] > 0 and "tid" in e
    jobs = [e for e in events if e["ph"] == "X" and e["cat"] == "job"]
    tracee = [e for e in jobs if e["args"]["session"] == runs[0]]
    model_jobs = [e for e in jobs if e["args"]["session"] == work.a.session]
    assert len(tracee) == 4 and all(e["pid"] == 2 for e in tracee)
    assert len(model_jobs) == 2 and all(e["pid"] == 1 for e in model_jobs)
    rows = work.model.report().rows
    for job in model_jobs:
        layers = [e for e in events if e["ph"] == "X" and e["cat"] == "layer" and e["tid"] == job["tid"]
                  and job["ts"] - 1e-3 <= e["ts"] and e["ts"] + e["dur"] <= job["ts"] + job["dur"] + 1e-3]
        assert [e["args"]["node"] for e in layers] == [r["node"] for r in rows]
        assert sum(e["dur"] for e in layers) == pytest.approx(job["dur"])
    meta = {(e["name"], e["pid"]) for e in events if e["ph"] == "M"}
    assert ("process_name", 1) in meta and ("thread_name", 2) in meta
    names = [e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "process_name"]
    assert names == ["npu0 (edge)", "npu1 (edge)"]
    summary = ctl_json(capsys, daemon, "trace", "--summary")  # what the ring holds now
    assert by_session(summary["clients"], work.a.session)["jobs"] == 5


# --- compile, run, disasm, cache --------------------------------------------------------------


def test_compile_report_check_run_bench(capsys, daemon, onnx_path, tmp_path):
    data = ctl_json(capsys, daemon, "compile", onnx_path, "--report")
    assert data["cycles"] == sum(r["cycles"] for r in data["report"]) > 0 and data["inputs"][0]["name"] == "x"
    code, text, _ = ctl(capsys, daemon, "compile", onnx_path, "--report")
    assert code == 0 and "from the compile cache" in text and "TOTAL" in text
    assert ctl_json(capsys, daemon, "compile", onnx_path, "--check")["compiles"] is True
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    code, _out, err = ctl(capsys, daemon, "compile", str(bad))
    assert code == 1 and err.startswith("npuctl: ")
    assert ctl(capsys, daemon, "compile", str(tmp_path / "missing.onnx"))[0] == 2
    x = np.linspace(-1, 1, 4 * 32, dtype=np.float32).reshape(4, 32)
    np.save(tmp_path / "x.npy", x)
    run = ctl_json(capsys, daemon, "run", onnx_path, "--inputs", f"x={tmp_path / 'x.npy'}", "--bench", "5",
                   "--save-outputs", str(tmp_path / "out"))
    with npu.connect(daemon.endpoint) as c:
        expected = c.load(onnx_path).run(x)
    [(name, want)] = expected.items()
    np.testing.assert_array_equal(np.load(tmp_path / "out" / f"{name}.npy"), want)
    lat = run["bench"]["latency_ms"]
    assert run["bench"]["runs"] == 5 and lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert run["bench"]["cycles"] == data["cycles"] and run["outputs"][0]["shape"] == [4, 10]
    code, text, _ = ctl(capsys, daemon, "run", onnx_path, "--bench", "3")
    assert code == 0 and "p99" in text and "modeled" in text


def test_run_feeds_and_prints_uint8_and_bool_tensors_in_their_own_dtype(capsys, daemon, tmp_path):
    """npuctl run of a model with uint8/bool inputs and int8/bool outputs: random feeds of those
    types, a .npy of another type refused naming the one expected, outputs saved as they come."""
    from test_client_int import byte_model

    path = tmp_path / "bytes.onnx"
    path.write_bytes(byte_model())
    img = (np.arange(10, dtype=np.uint8) * 25).reshape(2, 5)
    np.save(tmp_path / "img.npy", img)
    run = ctl_json(capsys, daemon, "run", str(path), "--inputs", f"img={tmp_path / 'img.npy'}",
                   "--save-outputs", str(tmp_path / "out"))
    assert {o["name"]: o["dtype"] for o in run["outputs"]} == {"bright": "bool", "q": "int8", "drop": "bool"}
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "bright.npy"), img > 127)
    np.save(tmp_path / "imgf.npy", img.astype(np.float32))
    code, _out, err = ctl(capsys, daemon, "run", str(path), "--inputs", f"img={tmp_path / 'imgf.npy'}")
    assert code == 1 and "expected: (tensor(uint8))" in err


def test_disasm_raw_stream_and_executable(capsys, daemon, onnx_path, tmp_path):
    from npud.compiler_worker.api import compile_model
    raw = tmp_path / "add.bin"
    raw.write_bytes(add_stream(64))
    data = ctl_json(capsys, daemon, "disasm", str(raw))
    assert data["kind"] == "stream" and data["listing"][0].startswith("; npu-emu stream")
    assert any("dma_load" in line.lower() for line in data["listing"])
    exe = tmp_path / "mlp.npux"
    exe.write_bytes(compile_model(open(onnx_path, "rb").read(), CFG).to_bytes())
    code, text, _ = ctl(capsys, daemon, "disasm", str(exe))
    assert code == 0 and "npux executable" in text and "; input  x float32[4, 32]" in text
    corrupt = tmp_path / "bad.npux"
    corrupt.write_bytes(exe.read_bytes()[:-1] + b"\0")
    code, _out, err = ctl(capsys, daemon, "disasm", str(corrupt))
    assert code == 1 and "corrupt" in err


def test_cache_list_and_clear(capsys, daemon, onnx_path):
    ctl_json(capsys, daemon, "compile", onnx_path)
    listing = ctl_json(capsys, daemon, "cache", "list")
    assert listing["entries"] and listing["directory"].startswith(tempfile.gettempdir())
    assert "KEY" in ctl(capsys, daemon, "cache", "list")[1]
    assert ctl_json(capsys, daemon, "cache", "clear")["removed"] == len(listing["entries"])
    assert ctl_json(capsys, daemon, "cache", "list")["entries"] == []


# --- admin -----------------------------------------------------------------------------------


def test_kill_client_by_session_and_pid(capsys, daemon):
    victim = npu.connect(daemon.endpoint, name="victim")
    victim.alloc(8192)
    result = ctl_json(capsys, daemon, "kill-client", victim.session)
    assert result == [{"session": victim.session, "pid": os.getpid(), "buffers": 1, "memory": 8192}]
    with pytest.raises(npu.ConnectionLost):
        victim.ping()
    victim.close()
    code, _out, err = ctl(capsys, daemon, "kill-client", "s-no-such-session")
    assert code == 1 and "no session" in err
    child = subprocess.Popen([sys.executable, "-c", "import npu,sys,time\n"
                              f"c = npu.connect({daemon.endpoint!r}, name='child')\n"
                              "print('up', flush=True); time.sleep(30)"], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "up\n"
        code, text, _ = ctl(capsys, daemon, "kill-client", str(child.pid))
        assert code == 0 and f"(pid {child.pid})" in text
        assert not any(c["pid"] == child.pid for c in ctl_json(capsys, daemon, "clients"))
    finally:
        child.kill()
        child.wait()


def test_reset_device(capsys, daemon, work):
    before = ctl_json(capsys, daemon, "devices")[1]["resets"]
    result = ctl_json(capsys, daemon, "reset", "npu1")
    assert result == {"device": 1, "resets": before + 1, "state": "ok"}
    code, text, _ = ctl(capsys, daemon, "reset", "1")
    assert code == 0 and f"{before + 2} reset(s)" in text
    # the device works afterwards
    work.b.submit(add_stream(256), [(work.b_bufs[0], A, False), (work.b_bufs[1], B, False),
                                    (work.b_bufs[2], O, True)], device=1).wait(10)
    code, _out, err = ctl(capsys, daemon, "reset", "npu7")
    assert code == 1 and "no device" in err


def _npuctl_admin_as_nobody(endpoint: str, victim: str) -> dict:
    """In the child run by run_as: npuctl's admin commands and a status, with their stderr."""
    err = io.StringIO()
    sys.stderr = err
    codes = [npuctl_main(["--endpoint", endpoint, "reset", "0"]),
             npuctl_main(["--endpoint", endpoint, "kill-client", victim]),
             npuctl_main(["--endpoint", endpoint, "status", "--json"])]
    return {"codes": codes, "err": err.getvalue()}


@needs_root
def test_admin_ops_refused_for_other_uids(daemon):
    """A client running as nobody (uid from SO_PEERCRED) gets EPERM with a reason, exit 1."""
    open_to_everyone(daemon)
    with npu.connect(daemon.endpoint) as c:
        report = run_as(65534, 65534, _npuctl_admin_as_nobody, daemon.endpoint, c.session)
        c.ping()  # not killed
    assert report["codes"] == [1, 1, 0], report["err"]
    lines = report["err"].splitlines()
    assert len(lines) == 2 and all("admin operation" in line and "uid 65534" in line for line in lines)


def test_policy_refusals_name_the_reason():
    from npud.policy import admin_refusal
    from npud.sessions import Session

    def session(uid):
        s = Session(id="s", routing_id=b"r", name="n", claimed_pid=1)
        s.uid = uid
        return s
    assert admin_refusal(session(0), "reset_device", daemon_uid=1000) is None
    assert admin_refusal(session(1000), "reset_device", daemon_uid=1000) is None
    assert "uid 1001" in admin_refusal(session(1001), "reset_device", daemon_uid=1000)
    assert "unknown" in admin_refusal(session(-1), "kill_client", daemon_uid=1000)


# --- top through a pseudo-terminal ------------------------------------------------------------


def _read_until(fd: int, needle: bytes, timeout: float = 10.0) -> bytes:
    data = b""
    deadline = time.monotonic() + timeout
    while needle not in data:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"{needle!r} not seen in {data[-2000:]!r}"
        if select.select([fd], [], [], remaining)[0]:
            try:
                data += os.read(fd, 65536)
            except OSError:
                break
    return data


def test_top_renders_sorts_and_quits_in_a_pty(daemon, work):
    master, slave = pty.openpty()
    env = {**os.environ, "TERM": "xterm", "COLUMNS": "160", "LINES": "40"}
    proc = subprocess.Popen([sys.executable, "-m", "npuctl.main", "--endpoint", daemon.endpoint, "top",
                             "-d", "0.2"], stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    try:
        screen = _read_until(master, b"worker-b")
        assert b"\x1b[?1049h" in screen and b"sorted by util" in screen and b"npu1" in screen
        os.write(master, b"m")
        screen = _read_until(master, b"sorted by memory")
        frame = screen.rsplit(b"sorted by memory", 1)[1]
        # worker-a holds more memory than worker-b: sorted first
        assert frame.index(b"worker-a") < frame.index(b"worker-b")
        os.write(master, b"r")
        frame = _read_until(master, b"(reversed)").rsplit(b"(reversed)", 1)[1]
        frame += _read_until(master, b"worker-a", 5)
        os.write(master, b"q")
        assert proc.wait(10) == 0
        rest = b""
        try:
            while select.select([master], [], [], 0.5)[0]:
                rest += os.read(master, 65536)
        except OSError:
            pass
        assert b"\x1b[?1049l" in screen + rest or proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    assert ctl_json_top(daemon)["clients"]


def ctl_json_top(daemon):
    out = subprocess.run([sys.executable, "-m", "npuctl.main", "--endpoint", daemon.endpoint, "top", "--json"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)
