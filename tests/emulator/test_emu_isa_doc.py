"""docs/ISA.md and npud/emulator/isa.py must agree; the disassembler must read every opcode."""

import pathlib
import re
import subprocess
import sys


from npud.emulator import isa
from npud.emulator.assembler import StreamBuilder
from npud.emulator.config import make_config
from npud.emulator.disasm import disassemble
from npud.emulator.engines import EXECUTORS
from npud.emulator.isa import tile

ROOT = pathlib.Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "ISA.md").read_text()


def test_every_opcode_is_tabled_with_code_and_length():
    rows = {m.group(2): (int(m.group(1), 16), m.group(3), int(m.group(4))) for m in re.finditer(
        r"^\| 0x([0-9a-f]{2}) \| `(\w+)` \| (\w+) \| (\d+) \|", DOC, re.M)}
    for op in isa.OPCODES:
        assert op.name in rows, f"{op.name} missing from docs/ISA.md"
        assert rows[op.name] == (op.code, op.engine.name.lower(), op.length), op.name
        assert re.search(rf"^\| `{op.name}[ `]", DOC, re.M), f"{op.name} has no semantics row"
    assert set(rows) == set(isa.BY_NAME)


def test_every_queued_opcode_has_an_executor_and_a_cost():
    for op in isa.OPCODES:
        if op.engine != isa.Engine.CTRL:
            assert op.name in EXECUTORS, op.name


def test_disassembler_round_trip_and_cli(tmp_path):
    cfg = make_config("edge")
    sb = StreamBuilder(cfg)
    f = lambda a, s: tile(a, "fp32", s)
    sb.dma_load(0, 0x100000, "fp32", (64,)).sync("dma", "vector")
    sb.add(f(0, (64,)), f(0, (64,)), f(256, (64,)))
    sb.vunary("clip", f(0, (64,)), f(256, (64,)), -1, 1)
    sb.conv2d(f(0, (1, 4, 4, 4)), f(512, (3, 3, 4, 4)), f(1024, (1, 2, 2, 4)), bias=None)
    sb.end()
    text = disassemble(sb.build())
    lines = text.splitlines()
    assert lines[0].startswith("; npu-emu stream v1") and cfg.target_hash().hex() in lines[0]
    assert "dma_load" in lines[1] and "va=0x100000" in lines[1] and "dtype=fp32" in lines[1]
    assert "engine=dma" in lines[2] and "engine=vector" in lines[3]
    assert "func=add" in lines[4] and "fp32[1,1,1,64]@0x100" in lines[4]
    assert "func=clip" in lines[5] and "p0=-1" in lines[5]
    assert "bias=none" in lines[6] and "pad=[0,0,0,0]" in lines[6]
    assert lines[7].split() == ["6", "end"]
    assert "error" in disassemble(b"junk")
    assert disassemble(sb.build()[:-2]).splitlines()[-1].startswith("; error")
    path = tmp_path / "s.bin"
    path.write_bytes(sb.build())
    out = subprocess.run([sys.executable, "-m", "npud.emulator.disasm", str(path)], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    assert out == text
