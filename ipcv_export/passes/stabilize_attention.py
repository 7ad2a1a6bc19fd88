"""StabilizeAttentionPass: reconstructed tokens as keys and values in blocks l_p..l_p+Delta-1 (ipcv.md 3)."""

from __future__ import annotations

import re

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from .. import tokens
from . import _graph
from ._blocks import SEGMENT_ATTENTION
from .reconstruct_tokens import removed_states

NAME = "stabilize_attention"


class StabilizeAttentionPass(PassBase):
    """Rewrites each block j in l_p..min(l_p+Delta, depth)-1, which reads the kept stream y:
        z = scatter_back(y, rec(y), slot)                  (N rows, original order)
        the nodes feeding the attention core (norm1, qkv, rotary) read z, the full tables and N
        instead of their kept views; the core takes queries q[:, :, keep] with kept segment ids,
        keys and values from all N rows with full segment ids (a banded core, whose band needs
        one sequence, takes all N query rows and its output is read at keep);
        the residual adds and the MLP still read y and K: removed rows get no output of their own;
        with `query_projection` given, the linear layer producing the queries computes them for
        kept rows only (`tokens.project_except_queries`); its other columns still cover all N rows.
    Requires: PruneTokensPass and ReconstructTokensPass ran; nothing after the core reads the
    nodes before it except through the core. Ensures: Delta = 0 leaves the graph untouched.
    """

    def __init__(self, prune_layer: int, as_depth: int, depth: int,
                 query_projection: tuple[str, int, int] | None = None) -> None:
        super().__init__()
        self.blocks = range(prune_layer, min(prune_layer + as_depth, depth))
        self.query_projection = query_projection

    def requires(self, gm: fx.GraphModule) -> None:
        if self.blocks:
            _graph.one_with_role(gm.graph, "neighbors")

    def call(self, gm: fx.GraphModule) -> PassResult:
        graph = gm.graph
        done = {n.meta["ipcv_stabilizes"] for n in _graph.with_role(graph, "stabilized_input")}
        todo = [j for j in self.blocks if j not in done]
        for index in todo:
            self._stabilize(graph, index)
        if todo:
            _graph.finish(gm)
        return PassResult(gm, bool(todo))

    def _stabilize(self, graph: fx.Graph, index: int) -> None:
        marker = _graph.block_marker(graph, index)
        nodes = _graph.block_nodes(graph, index)
        core = next(n for n in nodes if n.target == SEGMENT_ATTENTION)
        feeding = _ancestors_within(core, set(nodes))
        for node in nodes:
            reads_feeding = any(a in feeding for a in node.all_input_nodes)
            if node not in feeding and node is not core and node.users and reads_feeding:
                raise RuntimeError(f"block {index}: {node.name} reads {core.name}'s inputs directly")
        kept = marker.args[0]
        removed = removed_states(graph, kept, pass_name=NAME)
        full = _graph.insert(graph, tokens.scatter_back, (kept, removed, _graph.one_with_role(graph, "slot")),
                             pass_name=NAME, role="stabilized_input", after=_graph.latest(graph, (kept, removed)), ipcv_stabilizes=index)
        for node in feeding:
            node.replace_input_with(marker, full)
            for arg in node.all_input_nodes:
                if _graph.FULL in arg.meta:
                    node.replace_input_with(arg, arg.meta[_graph.FULL])
        query, key, value, segment_q, segment_k, scale, *banded = core.args
        keep = _graph.one_with_role(graph, "keep")
        full_segment_k = segment_k.meta.get(_graph.FULL, segment_k) if segment_k is not None else None
        if banded and banded[0] is not None:  # a band needs one sequence: all N queries, kept outputs
            core.args = (query, key, value, segment_q.meta.get(_graph.FULL, segment_q), full_segment_k, scale, *banded)
            kept_rows = _graph.insert(graph, tokens.take, (core, keep, 1), pass_name=NAME, after=core)
            core.replace_all_uses_with(kept_rows, delete_user_cb=lambda user: user is not kept_rows)
        else:
            kept_query = _graph.insert(graph, tokens.take, (query, keep, 2), pass_name=NAME, before=core)
            core.args = (kept_query, key, value, segment_q, full_segment_k, scale, *banded)
        if self.query_projection is not None:
            self._project_queries_for_kept_rows(graph, index, feeding)

    def _project_queries_for_kept_rows(self, graph: fx.Graph, index: int, feeding: set[fx.Node]) -> None:
        path, part, parts = self.query_projection
        pattern = re.compile(path)
        linear = [n for n in feeding if n.target == torch.ops.aten.linear.default
                  and pattern.search(_innermost_module(n))]
        if len(linear) != 1:
            raise RuntimeError(f"block {index}: expected one query projection matching {path!r}, found {len(linear)}")
        (node,) = linear
        x, weight, bias = (list(node.args) + [None])[:3]
        width = node.meta["val"].shape[-1] // parts
        selection = tuple(_graph.one_with_role(graph, role) for role in ("keep", "rem", "slot"))
        replacement = _graph.insert(graph, tokens.project_except_queries,
                                    (x, weight, bias, *selection, (part * width, (part + 1) * width)),
                                    pass_name=NAME, before=node)
        node.replace_all_uses_with(replacement)
        graph.erase_node(node)


def _innermost_module(node: fx.Node) -> str:
    """Path of the module that called the node's operation (last entry of nn_module_stack)."""
    stack = list((node.meta.get("nn_module_stack") or {}).values())
    return stack[-1][0] if stack else ""


def _ancestors_within(node: fx.Node, region: set[fx.Node]) -> set[fx.Node]:
    found: set[fx.Node] = set()
    stack = [a for a in node.all_input_nodes if a in region]
    while stack:
        current = stack.pop()
        if current not in found:
            found.add(current)
            stack.extend(a for a in current.all_input_nodes if a in region)
    return found
