"""Coverage-guided fuzzing of one target with atheris: ``python -m fuzz.atheris_main TARGET CORPUS [libFuzzer flags]``.

The corpus directory is seeded with the target's real seeds; atheris
instruments the input-handling packages so libFuzzer steers by coverage.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["npud.ipc_schema", "npud.emulator", "npud.compiler_worker", "fuzz"]):
    from fuzz import targets


def main() -> None:
    name, corpus = sys.argv[1], Path(sys.argv[2])
    seeds = targets.TARGETS[name][1]()
    for i, s in enumerate(seeds):
        data = s[:-targets.DIGEST] if name == "executable" else s[0] if name == "stream" else s
        (corpus / f"seed-{i}").write_bytes(data)
    stream_maps = [m for _, m in targets.stream_seeds()] if name == "stream" else []

    def one(data: bytes) -> None:
        if name == "stream":   # first byte picks the address space the stream is checked against
            if not data:
                return
            targets.validate_stream(data[1:], stream_maps[data[0] % len(stream_maps)])
        elif name == "onnx":
            targets.import_onnx(data)
        else:
            targets.TARGETS[name][0](data)

    atheris.Setup([sys.argv[0], str(corpus), *sys.argv[3:]], one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
