"""Functional models of the engines.

Each module exports ``EXECUTORS``: opcode mnemonic -> ``fn(job, cmd)``.
Executors trust their operands (the validator has checked them) and touch
only SRAM -- except DMA, which alone reaches device memory, through the MMU.

Decode once, run many: :func:`prepare` turns a command into a step,
``step(job)``, with its SRAM views (and, through the MMU's cache, its device
memory views and its kernel plans) made once; a program's steps are prepared
when it is first run on a device and reused by every later run.
"""

from functools import partial

from . import dma, mac, pool, vector

EXECUTORS = {**dma.EXECUTORS, **mac.EXECUTORS, **vector.EXECUTORS, **pool.EXECUTORS}
PREPARE = {**dma.PREPARE, **mac.PREPARE, **vector.PREPARE}


def prepare(cmd, sram: list, frozen=None):
    """The step running `cmd` (a validated, queued command) on a device
    whose per-core SRAM is `sram`; `frozen`: its weights window holds the same
    bytes in every run of the step (a MAC step may keep them pre-arranged,
    shared with the steps given an equal `frozen` key)."""
    prep = PREPARE.get(cmd.op.name)
    if prep is not None:
        return prep(cmd, sram[cmd.core], frozen=frozen) if frozen else prep(cmd, sram[cmd.core])
    return partial(EXECUTORS[cmd.op.name], cmd=cmd)
