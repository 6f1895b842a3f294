"""npu: the client library of npud.

    import npu
    with npu.connect() as client:          # or npu.local() for a private daemon
        buf = client.alloc(1 << 20)
        buf.map(np.float32)[:] = 1.0       # in place: no copies
"""

from typing import TYPE_CHECKING, Any

from npud.ipc_schema.endpoint import default_endpoint
from npud.ipc_schema.version import distribution_version

from .aio import (AsyncBuffer, AsyncClient, AsyncExecution, AsyncExecutionJob, AsyncJob, AsyncModel, AsyncModelJob,
                  connect_async)
from .buffer import Buffer
from .client import Client, connect, curve_keys
from .errors import (Busy, Cancelled, ConnectionLost, DeviceFault, InternalError, InvalidArgument,
                     MissedDeadline, NotFound, NpuError, OutOfMemory, PermissionDenied, ProtocolMismatch, Timeout)
from .execution import Execution, ExecutionJob
from .fences import wait, wait_async
from .jobs import Job
from .local import local
from .model import Model, ModelJob, Outputs, Report, TensorInfo
from .protocol import Device
from .session import Context

__version__: str = distribution_version()

if TYPE_CHECKING:   # (the "X as X" form: re-exported for type checkers)
    from .inference import ExecutionMode as ExecutionMode
    from .inference import GraphOptimizationLevel as GraphOptimizationLevel
    from .inference import InferenceSession as InferenceSession
    from .inference import IOBinding as IOBinding
    from .inference import ModelMetadata as ModelMetadata
    from .inference import NodeArg as NodeArg
    from .inference import RunOptions as RunOptions
    from .inference import SessionOptions as SessionOptions
    from .inference import get_all_providers as get_all_providers
    from .inference import get_available_providers as get_available_providers
    from .inference import get_device as get_device

# onnxruntime's API imports onnx (seconds): only programs that use it pay for that.
_INFERENCE = ("ExecutionMode", "GraphOptimizationLevel", "InferenceSession", "IOBinding", "ModelMetadata", "NodeArg",
              "RunOptions", "SessionOptions", "get_all_providers", "get_available_providers", "get_device")


def __getattr__(name: str) -> Any:
    if name in _INFERENCE:
        from . import inference
        return getattr(inference, name)
    raise AttributeError(f"module 'npu' has no attribute {name!r}")


__all__ = [
    "AsyncBuffer", "AsyncClient", "AsyncExecution", "AsyncExecutionJob", "AsyncJob", "AsyncModel", "AsyncModelJob", "Buffer", "Busy", "Cancelled", "Client", "ConnectionLost", "Device", "DeviceFault",
    "Execution", "ExecutionJob", "InternalError", "InvalidArgument", "Job", "Model", "ModelJob", "Report", "TensorInfo", "NotFound", "NpuError", "OutOfMemory",
    "PermissionDenied", "ProtocolMismatch", "Timeout", "connect", "connect_async", "curve_keys", "default_endpoint",
    "local", "Context", "MissedDeadline", "wait", "wait_async",
    "Outputs", *_INFERENCE,
]
