"""Pass 8: emission.  Lowered ops with plans and addresses -> one npu-emu
command stream (StreamBuilder), plus the per-op performance report, costed
with the emulator's own timing model (:func:`npud.emulator.timing.command_cost`)."""

from __future__ import annotations

from npud.emulator import isa
from npud.emulator.timing import command_cost

from ..kernels import EMIT, Emitter


def run(ctx) -> None:
    em = Emitter(ctx.config, ctx.ptensors)
    spans = []
    for op in ctx.lops:
        start, dma0 = len(em.sb), em.dma_bytes
        EMIT[op.kind](op, em)
        spans.append((op, start, len(em.sb), em.dma_bytes - dma0))
    ctx.stream = em.end()
    ctx.report = build_report(ctx, spans)


def build_report(ctx, spans) -> list[dict]:
    cmds = list(isa.decode_records(ctx.stream))
    costs = [command_cost(c, ctx.config) if c.op.engine != isa.Engine.CTRL else (0, 0) for c in cmds]
    rows: dict = {}
    order = []
    pt = ctx.ptensors
    for op, s, e, dma in spans:
        key = op.node
        if key not in rows:
            rows[key] = {"node": op.node, "op": op.op, "kind": op.kind,
                         "inputs": [list(pt[x].logical or pt[x].shape) for x in op.ins],
                         "outputs": [list(pt[x].logical or pt[x].shape) for x in op.outs],
                         "macs": 0, "cycles": 0, "sram_bytes": 0, "dma_bytes": 0, "commands": 0}
            order.append(key)
        r = rows[key]
        r["macs"] += sum(c[1] for c in costs[s:e])
        r["cycles"] += sum(c[0] for c in costs[s:e])
        r["sram_bytes"] = max(r["sram_bytes"], int(op.plan.sram))
        r["dma_bytes"] += dma
        r["commands"] += e - s
    return [rows[k] for k in order]
