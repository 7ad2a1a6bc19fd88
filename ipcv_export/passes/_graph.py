"""Small helpers shared by the passes: tagged insertion and look-up by role.

Every node a pass inserts carries `meta["ipcv_pass"]` (which pass made it) and, where later passes
need to find it, `meta["ipcv_role"]`. A node that stands for a kept-token view of a full-sequence
node carries `meta["ipcv_full"]`, the node it was gathered from.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable

import torch
from torch import fx

ROLE = "ipcv_role"
BLOCK = "ipcv_block"
FULL = "ipcv_full"


def block_input(hidden: torch.Tensor) -> torch.Tensor:
    """Identity marking where a block reads its hidden states; re-export traces it away."""
    return hidden


def insert(graph: fx.Graph, target: Callable, args: tuple, *, pass_name: str, role: str | None = None,
           after: fx.Node | None = None, before: fx.Node | None = None, **meta) -> fx.Node:
    """Insert `target(*args)` after or before a node, tagged with its pass, role and extra meta."""
    point = graph.inserting_after(after) if after is not None else graph.inserting_before(before)
    with point:
        node = graph.call_function(target, args)
    node.meta["ipcv_pass"] = pass_name
    if role is not None:
        node.meta[ROLE] = role
    node.meta.update(meta)
    return node


def latest(graph: fx.Graph, nodes: Iterable[fx.Node]) -> fx.Node:
    """The node among `nodes` that comes last in graph order: a safe insertion point after all."""
    wanted = set(nodes)
    last = None
    for node in graph.nodes:
        if node in wanted:
            last = node
    return last


def with_role(graph: fx.Graph, role: str) -> list[fx.Node]:
    return [n for n in graph.nodes if n.meta.get(ROLE) == role]


def one_with_role(graph: fx.Graph, role: str) -> fx.Node:
    found = with_role(graph, role)
    if len(found) != 1:
        raise RuntimeError(f"expected one node with role {role!r}, found {len(found)}: run the passes in order")
    return found[0]


def block_nodes(graph: fx.Graph, index: int) -> list[fx.Node]:
    return [n for n in graph.nodes if n.meta.get(BLOCK) == index]


def block_marker(graph: fx.Graph, index: int) -> fx.Node:
    return next(n for n in with_role(graph, "block_input") if n.meta["ipcv_marks"] == index)


def block_output(graph: fx.Graph, index: int) -> fx.Node:
    return next(n for n in block_nodes(graph, index) if n.meta.get(ROLE) == "block_output")


def external_inputs(nodes: Iterable[fx.Node]) -> list[fx.Node]:
    """Nodes read by `nodes` but defined outside them, in first-use order."""
    inside = set(nodes)
    seen: dict[fx.Node, None] = {}
    for node in inside:
        for arg in node.all_input_nodes:
            if arg not in inside:
                seen[arg] = None
    return list(seen)


def pixel_input(graph: fx.Graph) -> fx.Node:
    """The graph's `pixel_values` input (every family's exportable module names its first input so)."""
    return next(n for n in graph.nodes if n.op == "placeholder" and n.name == "pixel_values")


def segment_input(graph: fx.Graph) -> fx.Node:
    """A packed tower's segment ids, which image (or temporal slice) each patch belongs to: the
    second output of the graph's `ipcv::grid_layout` node (processor order; a family that reorders
    tokens keeps every segment one run, so the ids per place are the same in its order)."""
    layout = next(n for n in graph.nodes if n.target is torch.ops.ipcv.grid_layout.default)
    return next(user for user in layout.users if user.target is operator.getitem and user.args[1] == 1)


def valid_input(graph: fx.Graph) -> fx.Node | None:
    """A padded tower's [B, P] real-patch flags (the `ipcv::valid_tokens` node), None for towers
    without padding."""
    return next((n for n in graph.nodes if n.target is torch.ops.ipcv.valid_tokens.default), None)


def is_tensor(node: fx.Node) -> bool:
    """True when the node's fake value is a tensor (not a size, a tuple or missing)."""
    return isinstance(node.meta.get("val"), torch.Tensor)


def same_size(a, b) -> bool:
    """True when two (possibly symbolic) sizes are the same expression."""
    if isinstance(a, torch.SymInt) and isinstance(b, torch.SymInt):
        return a.node.expr == b.node.expr
    return not isinstance(a, torch.SymInt) and not isinstance(b, torch.SymInt) and a == b


def finish(gm: fx.GraphModule) -> None:
    """Lint and recompile after a modifying pass. Dead code is removed once, after the whole
    chain: a pass may insert nodes that only a later pass reads."""
    gm.graph.lint()
    gm.recompile()
