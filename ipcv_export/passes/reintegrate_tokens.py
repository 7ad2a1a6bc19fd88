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
    and whatever read y (the merger) reads `full`. The same at each tapped block j >= l_p (`taps`,
    ipcv.md's towers that hand the LLM features from several depths): what reads y_j outside the
    blocks (the tap's merger) reads its rebuilt full sequence; block j + 1 still reads y_j.
    Requires: PruneTokensPass ran. Ensures: the graph's outputs have their original shapes.
    """

    def __init__(self, depth: int, taps: tuple[int, ...] = ()) -> None:
        """`taps`: the tapped blocks at or after l_p (those before it run on every token)."""
        super().__init__()
        self.depth, self.taps = depth, taps

    def requires(self, gm: fx.GraphModule) -> None:
        _graph.one_with_role(gm.graph, "slot")

    def call(self, gm: fx.GraphModule) -> PassResult:
        graph = gm.graph
        if _graph.with_role(graph, "reintegrated"):
            return PassResult(gm, False)
        for index in sorted({*self.taps, self.depth - 1}):
            kept = _graph.block_output(graph, index)
            outside = [u for u in kept.users  # the merger(s): not block j + 1, nor what a pass inserted for it
                       if u.meta.get(_graph.BLOCK) is None and "ipcv_pass" not in u.meta]
            removed = removed_states(graph, kept, pass_name=NAME)
            full = _graph.insert(graph, tokens.scatter_back, (kept, removed, _graph.one_with_role(graph, "slot")),
                                 pass_name=NAME, role="reintegrated", after=_graph.latest(graph, (kept, removed)))
            for user in outside:
                user.replace_input_with(kept, full)
        _graph.finish(gm)
        return PassResult(gm, True)
