"""The compiler's version, in a module of its own: the daemon's npu-emu target reads it for cache
keys without importing the compiler (and onnx)."""

COMPILER_VERSION = "0.3.1"   # 0.3.1: the I/O table declares symbolic dims (protocol 1.7)
