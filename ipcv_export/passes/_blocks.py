"""Find transformer blocks in a captured graph from module-path metadata.

Nodes are grouped by the value of `nn_module_stack` (the module path, e.g. `visual.blocks.3`),
never by parsing mangled keys or by architecture name: the family's `block_path` regex says which
paths are blocks. Shape reads (`sym_size`) are not block members: the exporter shares one read of
N across all blocks, wherever it happened to be created.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import fx

from . import _graph

SEGMENT_ATTENTION = torch.ops.ipcv.segment_attention.default


@dataclass(frozen=True)
class Block:
    """One transformer block: its nodes in graph order, hidden input, output and attention core."""

    index: int
    nodes: tuple[fx.Node, ...]
    input: fx.Node
    output: fx.Node
    attention: fx.Node


def _block_index(node: fx.Node, pattern: re.Pattern) -> int | None:
    for path, _type in (node.meta.get("nn_module_stack") or {}).values():
        match = pattern.search(path)
        if match:
            return int(match.group(1))
    return None


def _is_shape_read(node: fx.Node) -> bool:
    return isinstance(node.meta.get("val"), (torch.SymInt, int))


def find_blocks(gm: fx.GraphModule, block_path: str, depth: int) -> list[Block]:
    """Blocks 0..depth-1 of the graph, or RuntimeError saying what does not match."""
    pattern = re.compile(block_path)
    members: dict[int, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or _is_shape_read(node):
            continue
        index = _block_index(node, pattern)
        if index is not None:
            members.setdefault(index, []).append(node)
    if sorted(members) != list(range(depth)):
        raise RuntimeError(f"found blocks {sorted(members)} in the graph, expected 0..{depth - 1} "
                           f"(block path pattern {block_path!r})")
    return [_describe(index, members[index]) for index in range(depth)]


def _describe(index: int, nodes: list[fx.Node]) -> Block:
    inside = set(nodes)
    outputs = [n for n in nodes if any(user not in inside for user in n.users)]
    if len(outputs) != 1:
        raise RuntimeError(f"block {index}: expected one output, found {[n.name for n in outputs]}")
    output = outputs[0]
    shape = output.meta["val"].shape
    inputs = [n for n in _graph.external_inputs(nodes) if _graph.is_tensor(n) and len(n.meta["val"].shape) == len(shape)
              and all(_graph.same_size(a, b) for a, b in zip(n.meta["val"].shape, shape))]
    if len(inputs) != 1:
        raise RuntimeError(f"block {index}: expected one hidden-state input of shape {tuple(shape)}, "
                           f"found {[n.name for n in inputs]}")
    cores = [n for n in nodes if n.target == SEGMENT_ATTENTION]
    if len(cores) != 1:
        raise RuntimeError(f"block {index}: expected one ipcv::segment_attention node, found {len(cores)}")
    return Block(index, tuple(nodes), inputs[0], output, cores[0])
