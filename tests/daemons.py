"""Private daemons the tests of several packages start the same way."""

from __future__ import annotations

from pathlib import Path

from npu.local import LocalDaemon

# an npu-emu device and a cpu device: what heterogeneous models and the cpu driver's tests need
NPU_AND_CPU = """
[[devices]]
name = "npu0"

[[devices]]
name = "cpu0"
driver = "cpu"
"""


def npu_and_cpu(directory: Path, *args: str, config: str = "") -> LocalDaemon:
    """A test-mode daemon with device 0 npu-emu and device 1 cpu, its config (``config`` first, for
    top-level tables such as ``[limits]``) and compile cache in ``directory``."""
    path = Path(directory) / "npud.toml"
    path.write_text(config + NPU_AND_CPU)
    return LocalDaemon("--config", str(path), "--cache-dir", str(path.parent / "cache"), "--test-mode", *args)
