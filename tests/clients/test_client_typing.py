"""The client library's public API is typed (PEP 561: npu ships py.typed): ``mypy --strict`` passes
on the example programs, and -- so that it cannot pass because everything is Any -- reports every
misuse in a program written to be wrong."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

WRONG = '''\
import numpy as np
import npu
sess = npu.InferenceSession(b"")
name: int = sess.get_inputs()[0].name                      # line 4
outs: dict[str, np.ndarray] = sess.run(None, {})           # line 5
client = npu.connect(timeout="soon")                       # line 6
model = client.load("m.onnx")
report: int = model.report()                               # line 8
result: list[int] = model.submit(np.zeros(1)).result()     # line 9
version: int = npu.__version__                             # line 10
ex = model.execution()
ex.rebind("x", 3)                                          # line 12
devices: list[str] = client.devices()                      # line 13
sess.io_binding().bind_cpu_input(0, np.zeros(1))           # line 14


async def trio_program() -> None:
    async with npu.connect_async() as c:
        m = await c.load("m.onnx")
        r: int = await m.report()                          # line 20
        await (await m.execution()).rebind("x", "buf")     # line 21
'''

RIGHT = '''\
import numpy as np
import npu


async def trio_program(x: np.ndarray) -> list[str]:
    async with npu.connect_async() as c:
        m: npu.AsyncModel = await c.load("m.onnx")
        outputs: npu.Outputs = await m.run(x)
        job: npu.AsyncModelJob = await m.submit(x)
        await job.wait(5)
        async with await m.execution() as ex:
            y: npu.Outputs = await ex.run(x)
        buf: npu.AsyncBuffer = await c.alloc(64)
        await buf.write(b"x")
        devices: list[npu.Device] = await c.devices()
        return [str(outputs[0].shape), str(y[0].shape), str(await m.report()), devices[0].name]
'''


def mypy(*targets: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    pytest.importorskip("mypy", reason="mypy is in the test extras: pip install -e '.[test]'")
    env = {**os.environ, "MYPYPATH": f"{ROOT}{os.pathsep}{ROOT / 'clients'}"}
    return subprocess.run([sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent",
                           "--no-incremental", "--cache-dir", os.devnull, *targets],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_package_ships_py_typed():
    assert (ROOT / "clients" / "npu" / "py.typed").exists()
    assert 'npu = ["py.typed"]' in (ROOT / "pyproject.toml").read_text()


def test_examples_pass_mypy_strict():
    done = mypy("-p", "examples.ort_port", "-m", "npu", "-m", "npu.inference", cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Success" in done.stdout


def test_misuse_is_reported(tmp_path):
    (tmp_path / "wrong.py").write_text(WRONG)
    done = mypy("wrong.py", cwd=tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    lines = {int(m) for m in re.findall(r"^wrong\.py:(\d+): error", done.stdout, re.M)}
    assert lines == {4, 5, 6, 8, 9, 10, 12, 13, 14, 20, 21}, done.stdout


def test_the_trio_client_is_typed_too(tmp_path):
    (tmp_path / "right.py").write_text(RIGHT)
    done = mypy("right.py", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
