"""RemoveNoOpCastsPass: reads of a same-dtype `.to(dtype)` become reads of its input."""

from __future__ import annotations

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

CASTS = (torch.ops.aten.to.dtype, torch.ops.aten._to_copy.default)


class RemoveNoOpCastsPass(PassBase):
    """Rewrites `y = x.to(x.dtype)` by redirecting every user of y to x.

    An fp32 encoder's RMSNorm upcasts with `.to(float32)`, a no-op that export keeps as a node;
    the residual add may then read the block input through that node, which hides from later
    passes that the add reads the block's input and not something computed inside the block.
    Ensures: values are unchanged; every remaining cast changes the dtype (or layout/device).
    """

    def call(self, gm: fx.GraphModule) -> PassResult:
        changed = False
        for node in list(gm.graph.nodes):
            if node.target in CASTS and _is_identity(node):
                node.replace_all_uses_with(node.args[0])
                changed = True
        if changed:
            gm.graph.eliminate_dead_code()
            gm.recompile()
        return PassResult(gm, changed)


def _is_identity(node: fx.Node) -> bool:
    source, result = node.args[0], node.meta.get("val")
    before = source.meta.get("val") if isinstance(source, fx.Node) else None
    if not isinstance(before, torch.Tensor) or not isinstance(result, torch.Tensor):
        return False
    other = {k: v for k, v in node.kwargs.items() if k != "dtype"}
    return before.dtype == result.dtype and before.device == result.device and not other
