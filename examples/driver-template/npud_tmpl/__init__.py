"""A template npud driver: ``tmpl-int8``, an int8-only NPU shaped like an Arm Ethos-U55.

Three small modules, each the place a vendor replaces with their own (docs/DRIVERS.md,
"From the template to your hardware"):

* ``params``  -- the device's parameters (``DeviceParams``): MACs, SRAM, clock, memory;
* ``driver``  -- the daemon's side (``Driver``): presets, validation, the device process;
* ``target``  -- the compiler's side (``Target``): which nodes it runs (int8 only) and compiling.

The template runs on npu-emu's engines and compiler, configured, not copied: its device process
is npu-emu's, its compiler npu-emu's with an int8-only support table in front.
"""

__version__ = "0.1.0"
