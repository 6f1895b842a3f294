"""Pass 6: tile and stripe.  Every lowered op gets a plan whose SRAM working
set fits the target's SRAM (``config.sram_bytes``): convolutions in bands
of output rows x blocks of output channels (x input-channel chunks that
accumulate), matmuls in batch/M/N/K blocks, element-wise and copies in the
largest row-major blocks, pooling in bands x channel blocks.  Constant
operands are re-packed here (convolution weights HWIO, one contiguous blob
per block) so every weight DMA is a single burst."""

from __future__ import annotations

from ..errors import CompileError
from ..kernels import PLAN, Ctx


def run(ctx) -> None:
    cx = Ctx(ctx.config, ctx.ptensors)
    for op in ctx.lops:
        try:
            PLAN[op.kind](op, cx)
        except CompileError as e:
            if e.node is None:
                raise CompileError(e.reason, node=op.node, op=op.op) from None
            raise
        if op.plan.sram > ctx.config.sram_bytes:
            raise CompileError(f"internal: tile plan needs {op.plan.sram} bytes of SRAM",
                               node=op.node, op=op.op)
