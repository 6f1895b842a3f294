"""The compiler's version, in a module of its own: the daemon's npu-emu target reads it for cache
keys without importing the compiler (and onnx)."""

# 0.3.1: the I/O table declares symbolic dims (protocol 1.7)
# 0.4.0: int8/uint8 graph inputs and outputs keep their type and bool ones are one byte (0/1), not
#        float32: cached executables of models with such I/O have another I/O table
COMPILER_VERSION = "0.4.0"
