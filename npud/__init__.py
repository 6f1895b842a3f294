"""npud: the NPU daemon."""

__version__ = "0.1.0"
