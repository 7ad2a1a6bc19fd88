"""AnnotateBlocksPass: tag every block's nodes and mark where each block reads its hidden states."""

from __future__ import annotations

from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from . import _graph
from ._blocks import find_blocks


class AnnotateBlocksPass(PassBase):
    """Rewrites: in block j, every read of the hidden input h becomes a read of
    `m_j = block_input(h)` (an identity, traced away on re-export).
    Tags: `ipcv_block = j` on the block's nodes, role `block_output` on its output, role
    `block_input` (with `ipcv_marks = j` and h's fake value) on m_j.
    Requires: one `ipcv::segment_attention` node per block. Ensures: values are unchanged.
    """

    def __init__(self, block_path: str, depth: int) -> None:
        super().__init__()
        self.block_path, self.depth = block_path, depth

    def call(self, gm: fx.GraphModule) -> PassResult:
        if _graph.with_role(gm.graph, "block_input"):
            return PassResult(gm, False)
        for block in find_blocks(gm, self.block_path, self.depth):
            for node in block.nodes:
                node.meta[_graph.BLOCK] = block.index
            block.output.meta[_graph.ROLE] = "block_output"
            marker = _graph.insert(gm.graph, _graph.block_input, (block.input,), pass_name="annotate_blocks",
                                   role="block_input", before=block.nodes[0], ipcv_marks=block.index,
                                   val=block.input.meta["val"])
            for node in block.nodes:
                node.replace_input_with(block.input, marker)
        _graph.finish(gm)
        return PassResult(gm, True)
