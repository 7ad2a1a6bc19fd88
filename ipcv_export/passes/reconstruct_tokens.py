"""ReconstructTokensPass: Neighbour-Guided Reconstruction of removed tokens (ipcv.md 2)."""

from __future__ import annotations

from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from .. import tokens
from . import _graph

NAME = "reconstruct_tokens"


class ReconstructTokensPass(PassBase):
    """Rewrites: after the pruning point, once,
        nbr = nearest_kept(A, B, k)                       (role neighbors)
    so that `removed_states(y)` below becomes rec(y) = B + mean_{n in nbr}(y_n - A_n) instead of
    the plain pruning fill B. Consumers (AS blocks, reintegration) call `removed_states`.
    With `across_images` (batched towers), neighbours come from the kept tokens of every image.
    In a padded tower (the graph has `ipcv::valid_tokens`), padding is no neighbour and has none.
    With `weighted`, also once: w = neighbor_weights(A, B, nbr) (role neighbor_weights), and
    rec(y) = B + sum_n w_n (y_n - A_n).
    Requires: PruneTokensPass ran. Ensures: the neighbour search is computed exactly once.
    """

    def __init__(self, neighbors: int, across_images: bool = False, weighted: bool = False) -> None:
        super().__init__()
        self.neighbors, self.across_images, self.weighted = neighbors, across_images, weighted

    def requires(self, gm: fx.GraphModule) -> None:
        _graph.one_with_role(gm.graph, "removed_state")

    def call(self, gm: fx.GraphModule) -> PassResult:
        graph = gm.graph
        if _graph.with_role(graph, "neighbors"):
            return PassResult(gm, False)
        kept, removed = _graph.one_with_role(graph, "kept_state"), _graph.one_with_role(graph, "removed_state")
        args, cursor = (kept, removed, self.neighbors, self.across_images), removed
        valid = _graph.valid_input(graph)
        if valid is not None:
            flags = []
            for role in ("keep", "rem"):
                cursor = _graph.insert(graph, tokens.take, (valid, _graph.one_with_role(graph, role), 1),
                                       pass_name=NAME, after=cursor)
                flags.append(cursor)
            args = (*args, *flags)
        neighbors = _graph.insert(graph, tokens.nearest_kept, args, pass_name=NAME, role="neighbors", after=cursor,
                                  ipcv_across_images=self.across_images)
        if self.weighted:
            _graph.insert(graph, tokens.neighbor_weights, (kept, removed, neighbors, self.across_images),
                          pass_name=NAME, role="neighbor_weights", after=neighbors)
        _graph.finish(gm)
        return PassResult(gm, True)


def removed_states(graph: fx.Graph, kept_now: fx.Node, *, pass_name: str) -> fx.Node:
    """States of the removed tokens given the kept stream `kept_now`: rec(kept_now) when NGR ran,
    else their pruning-point states B (plain pruning)."""
    removed = _graph.one_with_role(graph, "removed_state")
    neighbors = _graph.with_role(graph, "neighbors")
    if not neighbors:
        return removed
    across_images = neighbors[0].meta["ipcv_across_images"]  # as the search was made
    weights = _graph.with_role(graph, "neighbor_weights")
    args = (kept_now, _graph.one_with_role(graph, "kept_state"), removed, neighbors[0], across_images,
            weights[0] if weights else None)
    return _graph.insert(graph, tokens.reconstruct, args, pass_name=pass_name, role="reconstruction",
                         after=_graph.latest(graph, args))
