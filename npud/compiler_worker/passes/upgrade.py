"""Front end, inside import: models older than the compiler's native opsets are upgraded by
ONNX's version converter here, in the compiler worker (a client never converts).  The rewrite
evaluates nothing; a node the converter has no adapter for is named in the error."""

from __future__ import annotations

import re

import onnx
from onnx import version_converter

from ..errors import CompileError

OLDEST_OPSET = 1      # every older opset is upgraded at import (the converter has adapters from 1)
UPGRADE_TO = 13       # what older models become: the opset exporters and quantisers write most

# The converter's failures name the adapter or the op, never the node: "adapt_scan_8_9: ...",
# "No Adapter For Scan", "Unsupported ... for Scan".
_ADAPTER = re.compile(r"adapt_([a-z0-9]+)_\d+_\d+|(?:[Aa]dapter (?:[Ff]or|from)|for op(?:erator)?) "
                      r"([A-Za-z0-9]+)")


def upgrade(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """`model` (default-domain opset `opset`, OLDEST_OPSET <= opset < UPGRADE_TO) rewritten at
    UPGRADE_TO; CompileError naming the first node of the op the converter failed on."""
    try:
        return version_converter.convert_version(model, UPGRADE_TO)
    except Exception as e:  # noqa: BLE001 -- the converter raises RuntimeError/ValueError/...
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        node = _failing_node(model, str(e))
        msg = (f"cannot be upgraded from opset {opset} to {UPGRADE_TO} by onnx's version "
               f"converter: {reason[:300]} (re-export the model at opset {UPGRADE_TO} or newer)")
        if node is None:
            raise CompileError(f"the model {msg}") from None
        raise CompileError(msg, node=node.name or f"{node.op_type}_{list(model.graph.node).index(node)}",
                           op=node.op_type) from None


def _failing_node(model: onnx.ModelProto, message: str) -> onnx.NodeProto | None:
    """The first node whose op the converter's message names, or None."""
    ops = {m.group(1) or m.group(2) for m in _ADAPTER.finditer(message)}
    ops = {o.lower() for o in ops if o}
    for n in model.graph.node:
        if n.op_type.lower() in ops:
            return n
    return None
