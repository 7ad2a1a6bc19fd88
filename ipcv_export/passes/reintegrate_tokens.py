"""ReintegrateTokensPass: every token back in its original place before the merger (ipcv.md 5)."""

from __future__ import annotations

from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from .. import tokens
from . import _graph
from .reconstruct_tokens import removed_states

NAME = "reintegrate_tokens"


class ReintegrateTokensPass(PassBase):
    """Rewrites, with y the last block's output (K rows):
        full = scatter_back(y, removed_states(y), slot)   (role reintegrated, N rows)
    and whatever read y (the merger) reads `full`.
    Requires: PruneTokensPass ran. Ensures: the graph's output has its original shape.
    """

    def __init__(self, depth: int) -> None:
        super().__init__()
        self.depth = depth

    def requires(self, gm: fx.GraphModule) -> None:
        _graph.one_with_role(gm.graph, "slot")

    def call(self, gm: fx.GraphModule) -> PassResult:
        graph = gm.graph
        if _graph.with_role(graph, "reintegrated"):
            return PassResult(gm, False)
        last = _graph.block_output(graph, self.depth - 1)
        consumers = [u for u in last.users if u.meta.get(_graph.BLOCK) != self.depth - 1]
        removed = removed_states(graph, last, pass_name=NAME)
        full = _graph.insert(graph, tokens.scatter_back, (last, removed, _graph.one_with_role(graph, "slot")),
                             pass_name=NAME, role="reintegrated", after=_graph.latest(graph, (last, removed)))
        for user in consumers:
            user.replace_input_with(last, full)
        _graph.finish(gm)
        return PassResult(gm, True)
