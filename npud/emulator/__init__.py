"""npu-emu: the reference emulated NPU (see docs/ISA.md)."""
