"""Fuzz harnesses for npud's untrusted inputs (docs/RELIABILITY.md).

``fuzz.targets`` holds one function per input -- the daemon's request decoder,
the executable loader, the command-stream validator (and the emulator behind
it) and the ONNX import path of a compiler worker -- each of which raises
``Finding`` (or any unexpected exception) when the input breaks its contract.
``fuzz.run`` drives them: mutation fuzzing from real seeds for a time budget,
and coverage-guided fuzzing with atheris where it is installed.
"""
