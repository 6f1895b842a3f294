"""Disassembler: a command stream as readable text.

    python -m npud.emulator.disasm FILE
"""

from __future__ import annotations

import sys

from . import isa
from .isa import DType, Tile


def _fmt_value(field: isa.Field, v) -> str:
    if isinstance(v, Tile):
        dt = v.dtype.name.lower() if isinstance(v.dtype, DType) else f"dtype?{v.dtype}"
        return f"{dt}[{','.join(map(str, v.shape))}]@0x{v.addr:x}"
    if field.enum is not None:
        try:
            return field.enum(v).name.lower()
        except ValueError:
            return f"{field.enum.__name__}?{v}"
    if field.name in ("va", "sram", "table") or field.name.endswith(("_addr", "bias", "gamma", "beta")):
        return "none" if v == isa.NONE_ADDR else f"0x{v:x}"
    if isinstance(v, tuple):
        return "[" + ",".join(map(str, v)) + "]"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def format_command(cmd: isa.Command) -> str:
    ops = " ".join(f"{f.name}={_fmt_value(f, v)}" for f, v in zip(cmd.op.fields, cmd.args))
    core = f"c{cmd.core}" if cmd.op.engine != isa.Engine.CTRL or cmd.op.fields else "  "
    return f"{cmd.index:5d}  {core:3s} {cmd.op.name:<12s}{ops}".rstrip()


def disassemble(stream: bytes) -> str:
    """One line per record after a header line.  Never raises on bad input:
    the listing stops with a line saying what is wrong."""
    lines = []
    try:
        version, flags, target, count = isa.decode_header(stream)
    except isa.DecodeError as e:
        return f"; error: {e}\n"
    lines.append(f"; npu-emu stream v{version} flags=0x{flags:x} target={target.hex()} "
                 f"records={count} bytes={len(stream)}")
    try:
        for cmd in isa.decode_records(stream):
            lines.append(format_command(cmd))
    except isa.DecodeError as e:
        lines.append(f"; error: {e}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m npud.emulator.disasm FILE", file=sys.stderr)
        return 2
    with open(argv[0], "rb") as f:
        sys.stdout.write(disassemble(f.read()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
