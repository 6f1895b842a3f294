"""The cpu driver's device process: ONNX programs run by onnxruntime on one host thread.

Serves the device link (npud/drivers/link.py) like npu-emu's device process: buffer objects are
mapped on import, a program is loaded once (an onnxruntime session) and run by id, and each run
reads its inputs from, and writes its outputs to, the buffers bound at their addresses -- the
tensors' bytes are read and written in place in the shared memfds, the way a device reads
device memory.  A run is one segment (no preemption points inside onnxruntime).  Anything
onnxruntime refuses or raises fails that job with EIO; the process carries on.
"""

from __future__ import annotations

import socket
import sys
import time

import numpy as np

from npud.drivers import link
from npud.drivers.cpu import CpuParams, unpack_program

# ONNX element types by the names the cpu target writes in a program's tensors.
DTYPES = {"float32": np.float32, "float16": np.float16, "float64": np.float64, "int8": np.int8,
          "uint8": np.uint8, "int16": np.int16, "uint16": np.uint16, "int32": np.int32, "uint32": np.uint32,
          "int64": np.int64, "uint64": np.uint64, "bool": np.bool_}


class RunError(Exception):
    """This job cannot run (a tensor outside its bindings, an onnxruntime error); the device is fine."""


class CpuDevice(link.DeviceServer):
    def __init__(self, sock: socket.socket, params: CpuParams):
        super().__init__(sock)
        self.params = params
        self.programs: dict[int, tuple[object, dict]] = {}   # id -> (onnxruntime session, program)

    def _session(self, program: dict):
        try:
            import onnxruntime as ort
        except ImportError:
            raise RunError("the cpu driver needs onnxruntime, which is not installed here: "
                           "pip install 'npud[cpu]'") from None

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.params.threads   # one compute thread per device process
        options.inter_op_num_threads = 1
        return ort.InferenceSession(program["model"], options, providers=["CPUExecutionProvider"])

    def _load(self, stream: bytes) -> tuple[object, dict]:
        try:
            program = unpack_program(stream)
            _refuse_external_data(program["model"])
            return self._session(program), program
        except RunError:
            raise
        except Exception as exc:   # ProgramRejected, or onnxruntime refusing the model
            raise RunError(f"cannot load the program: {exc}") from None

    def _op_load_program(self, request, fds):
        try:
            self.programs[request["program"]] = self._load(self.read_stream(fds))
        except RunError as exc:
            return _failure(str(exc))
        return {"ok": True, "segments": [[0, 1]], "segment_cycles": [0]}

    def _op_unload_program(self, request, fds):
        self.programs.pop(request["program"], None)
        return {"ok": True}

    def _op_run(self, request, fds):
        started = time.perf_counter()
        self.hang_or_crash(request)
        self.before_segment(request)   # a run is one segment
        try:
            if "program" in request:
                if request["program"] not in self.programs:
                    raise RunError(f"program {request['program']} is not loaded")
                session, program = self.programs[request["program"]]
            else:
                session, program = self._load(request["stream"])
            views = {t["name"]: self._view(t, request["bindings"], False) for t in program["inputs"]}
            names = [t["name"] for t in program["outputs"]]
            try:
                results = session.run(names, views)
            except Exception as exc:
                raise RunError(f"onnxruntime: {exc}") from None
            for t, value in zip(program["outputs"], results):
                out = self._view(t, request["bindings"], True)
                value = np.asarray(value)
                if value.shape != out.shape or value.dtype != out.dtype:
                    raise RunError(f"output {t['name']!r} is {value.dtype}{list(value.shape)}, the program "
                                   f"says {out.dtype}{list(out.shape)}")
                out[...] = value
        except RunError as exc:
            return _failure(str(exc))
        wall = time.perf_counter() - started
        cycles = int(wall * self.params.clock_mhz * 1e6)   # measured time, as cycles at the nominal clock
        return {"ok": True, "done": True, "next": 1, "segments": 1, "cycles": cycles,
                "stats": {"cycles": cycles, "wall_ms": wall * 1e3}, "wall_ms": wall * 1e3}

    def _view(self, t: dict, bindings: list, writable: bool) -> np.ndarray:
        """The tensor ``t`` in place, in the buffer bound over its addresses (the daemon checked
        this when it validated the program; checked again: this process trusts nobody either)."""
        dtype = np.dtype(DTYPES.get(t["dtype"], np.uint8))
        if t["dtype"] not in DTYPES or t["size"] != dtype.itemsize * int(np.prod(t["shape"], dtype=np.int64)):
            raise RunError(f"tensor {t['name']!r}: {t['dtype']}{t['shape']} does not fill its {t['size']} bytes")
        for bo, va, may_write in bindings:
            mm = self.buffers.get(bo)
            if mm is not None and va <= t["va"] and t["va"] + t["size"] <= va + len(mm) \
                    and (may_write or not writable):
                view = np.frombuffer(mm, dtype, int(np.prod(t["shape"], dtype=np.int64)), t["va"] - va)
                return view.reshape(t["shape"])
        raise RunError(f"tensor {t['name']!r} at va {t['va']:#x} is not inside a "
                       f"{'writable ' if writable else ''}binding")


def _refuse_external_data(model: bytes) -> None:
    """The cpu target resolves external data or refuses the model; a program that still names a
    file is refused here too: onnxruntime would open it with this process's permissions."""
    import onnx

    from npud.ipc_schema.model_container import all_tensors

    for what, tensor in all_tensors(onnx.load_from_string(model)):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            raise RunError(f"the program's {what} {tensor.name!r} names an external file; the cpu device "
                           "opens no file a model names")


def _failure(message: str) -> dict:
    return {"ok": False, "error": {"code": "EIO", "message": message, "command": None}}


def main(argv: list[str] | None = None) -> int:
    _into_nowhere()
    return link.serve_main("cpu", CpuDevice, CpuParams.from_dict, argv)


def _into_nowhere() -> None:
    """Work in a directory that no longer exists: a relative path anything here resolves (as
    onnxruntime does a model's external data) names nothing, whatever npud was started from."""
    import os
    import tempfile

    path = tempfile.mkdtemp(prefix="npud-cpu-")
    os.chdir(path)
    os.rmdir(path)


if __name__ == "__main__":
    sys.exit(main())
