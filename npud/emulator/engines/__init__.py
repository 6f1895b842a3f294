"""Functional models of the engines.

Each module exports ``EXECUTORS``: opcode mnemonic -> ``fn(job, cmd)``.
Executors trust their operands (the validator has checked them) and touch
only SRAM -- except DMA, which alone reaches device memory, through the MMU.
"""

from . import dma, mac, pool, vector

EXECUTORS = {**dma.EXECUTORS, **mac.EXECUTORS, **vector.EXECUTORS, **pool.EXECUTORS}
