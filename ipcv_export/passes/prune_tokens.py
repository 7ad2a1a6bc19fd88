"""PruneTokensPass: select tokens before block l_p and run blocks l_p.. on the kept stream (ipcv.md 1, 4)."""

from __future__ import annotations

import operator

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from .. import tokens
from . import _graph

NAME = "prune_tokens"


class PruneTokensPass(PassBase):
    """Rewrites, with x = input of block l_p-1 and x' = its output (tokens on the second-to-last
    axis: [N, D] packed, [B, N, D] batched), S special tokens:
        score = importance_score(x, x');  K = ((N - S) * rho_e4) // 10^4
        keep, rem, slot = select_tokens(score, K, S)    (per batch entry when batched)
        A = x'[keep];  B = x'[rem]                      (roles kept_state, removed_state)
        blocks l_p..depth-1 read the kept stream (block l_p reads A), and every full-sequence
        table they read (rotary cos/sin, segment ids: tensors with one row per token, `_is_per_token`)
        is replaced by its rows at `keep`, every read of N by S + K.
    With selection "spread" (towers that batch images [B, C, H, W] as their first input, patch
    size p), the score is `spread_score(x', S, W // p)` instead: a fixed coarse-to-fine order of
    each image's grid; with "hybrid", `hybrid_score(score, spread_score(...), K)`: the first K // 2
    of that order, then the best of the rest by the importance score; with "bipartite",
    `bipartite_score(x', spread_score(...), K, S)`: the first K // 2 of that order, then the
    patches least like any of them (ToMe's bipartite rule); with "merge", `merge_tokens(x', K, S)`
    (ToMe's rounds of merging): A is then the merged states, and each removed token's owner is its
    one neighbour (role neighbors), so ReconstructTokensPass has nothing to search. With `per_segment` (packed
    towers), `select_per_segment(score, K, segment_ids, rho_e4)`: each image its own share first.
    A padded tower (the graph has `ipcv::valid_tokens`) selects with `select_valid(score, K, valid,
    rho_e4)`: K counts each image's real patches, padding fills the slots left.
    The last block's output then has S + K tokens: ReintegrateTokensPass must follow.
    Requires: AnnotateBlocksPass ran, 1 <= l_p < depth. Ensures: no TopK or sort on N-sized data.
    """

    def __init__(self, retention_e4: int, prune_layer: int, depth: int, special_tokens: int = 0,
                 selection: str = "score", patch_size: int | None = None, per_segment: bool = False) -> None:
        super().__init__()
        self.retention_e4, self.prune_layer, self.depth = retention_e4, prune_layer, depth
        self.special_tokens = special_tokens
        self.selection, self.patch_size, self.per_segment = selection, patch_size, per_segment

    def requires(self, gm: fx.GraphModule) -> None:
        if not _graph.with_role(gm.graph, "block_input"):
            raise RuntimeError("PruneTokensPass needs AnnotateBlocksPass first")
        if not 1 <= self.prune_layer < self.depth:
            raise ValueError(f"prune layer {self.prune_layer} outside [1, {self.depth - 1}]")

    def call(self, gm: fx.GraphModule) -> PassResult:
        graph = gm.graph
        if _graph.with_role(graph, "keep"):
            return PassResult(gm, False)
        before = _graph.block_marker(graph, self.prune_layer - 1).args[0]
        after = _graph.block_output(graph, self.prune_layer - 1)
        hidden = _graph.block_marker(graph, 0).meta["val"]
        axis = hidden.ndim - 2

        def add(target, args, role=None, **meta):
            nonlocal cursor
            cursor = _graph.insert(graph, target, args, pass_name=NAME, role=role, after=cursor, **meta)
            return cursor

        cursor = after
        n = add(torch.ops.aten.sym_size.int, (after, axis))
        k = add(tokens.kept_count, (n, self.retention_e4, self.special_tokens))
        if self.selection in ("score", "hybrid"):
            score = importance = add(tokens.importance_score, (before, after), "score")
        if self.selection in ("spread", "hybrid", "bipartite"):
            width = add(torch.ops.aten.sym_size.int, (_graph.pixel_input(graph), 3))
            columns = add(operator.floordiv, (width, self.patch_size))
            score = spread = add(tokens.spread_score, (after, self.special_tokens, columns))
        if self.selection == "hybrid":
            score = add(tokens.hybrid_score, (importance, spread, k))
        elif self.selection == "bipartite":
            score = add(tokens.bipartite_score, (after, spread, k, self.special_tokens), "score")
        valid = _graph.valid_input(graph)
        if self.selection == "merge":
            plan = add(tokens.merge_tokens, (after, k, self.special_tokens, tokens.merge_rounds(self.retention_e4)))
        elif valid is not None:
            plan = add(tokens.select_valid, (score, k, valid, self.retention_e4))
        elif self.per_segment:
            plan = add(tokens.select_per_segment, (score, k, _graph.segment_input(graph), self.retention_e4))
        else:
            plan = add(tokens.select_tokens, (score, k, self.special_tokens))
        keep = add(operator.getitem, (plan, 0), "keep")
        add(operator.getitem, (plan, 1), "rem")
        add(operator.getitem, (plan, 2), "slot")
        if self.selection == "merge":
            stream = add(operator.getitem, (plan, 3), "kept_state")
            add(operator.getitem, (plan, 4), "neighbors", ipcv_across_images=False)
        else:
            stream = add(tokens.take, (after, keep, axis), "kept_state")
        add(tokens.take, (after, _graph.one_with_role(graph, "rem"), axis), "removed_state")
        kept_views: dict[fx.Node, fx.Node] = {}
        for index in range(self.prune_layer, self.depth):
            nodes = _graph.block_nodes(graph, index)
            for ext in _graph.external_inputs(nodes):
                if ext.meta.get(_graph.ROLE) == "block_input":
                    continue
                if ext not in kept_views and _is_per_token(ext, hidden.shape[:axis + 1]):
                    kept_views[ext] = add(*(((tokens.take, (ext, keep, axis)) if _graph.is_tensor(ext)
                                             else (torch.ops.aten.sym_size.int, (stream, axis)))),
                                          "kept_view", **{_graph.FULL: ext})
                if ext in kept_views:
                    for node in nodes:
                        node.replace_input_with(ext, kept_views[ext])
            _graph.block_marker(graph, index).args = (stream,)
            stream = _graph.block_output(graph, index)
        _graph.finish(gm)
        return PassResult(gm, True)


def _is_per_token(node: fx.Node, leading: torch.Size) -> bool:
    """A table with one row per token: a tensor whose leading dimensions are the hidden states'
    up to the token axis (`leading`: [N] packed, a packed tower's rotary and segment tables;
    [B, N] batched, a padded tower's), or the size N itself."""
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return val.ndim >= len(leading) and all(_graph.same_size(a, b) for a, b in zip(val.shape, leading))
    return isinstance(val, torch.SymInt) and _graph.same_size(val, leading[-1])
