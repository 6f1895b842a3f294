"""npud: the NPU daemon."""

from npud.ipc_schema.version import distribution_version

__version__ = distribution_version()
