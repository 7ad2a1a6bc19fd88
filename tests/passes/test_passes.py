"""Each pass on the captured tiny encoder: what it inserts, that it is idempotent, and that the
graph stays symbolic in N (run at three token counts, none of them the export sample)."""

from collections import Counter

import pytest
import torch

from conftest import grid_inputs
from ipcv_export import tokens
from ipcv_export.config import IpcvConfig
from ipcv_export.passes import ipcv_passes, run_passes
from ipcv_export.passes._blocks import SEGMENT_ATTENTION
from ipcv_export.reference import ipcv_reference

CONFIG = IpcvConfig(retention=0.5, prune_layer=2, as_depth=2, neighbors=4)


def _passes(tiny, config=CONFIG):
    return ipcv_passes(config, tiny.description, tiny.depth)


def _targets(gm) -> Counter:
    return Counter(n.target for n in gm.graph.nodes if n.op == "call_function")


def _roles(gm) -> Counter:
    return Counter(n.meta.get("ipcv_role") for n in gm.graph.nodes if n.meta.get("ipcv_role"))


def test_annotate_marks_every_block(tiny, captured):
    gm = captured.module()
    before = _targets(gm)
    assert _passes(tiny)[0](gm).modified
    assert _roles(gm)["block_input"] == tiny.depth and _roles(gm)["block_output"] == tiny.depth
    assert _targets(gm)[SEGMENT_ATTENTION] == before[SEGMENT_ATTENTION] == tiny.depth


def test_each_pass_inserts_its_nodes_and_a_second_run_changes_nothing(tiny, captured):
    gm = captured.module()
    annotate, prune, reconstruct, stabilize, reintegrate = _passes(tiny)
    annotate(gm)
    prune(gm)
    targets = _targets(gm)
    assert targets[tokens.select_tokens] == 1 and targets[tokens.importance_score] == 1
    assert _roles(gm)["kept_view"] == 4  # cos, sin, segment ids and N, gathered once for all kept blocks
    reconstruct(gm)
    assert _targets(gm)[tokens.nearest_kept] == 1
    stabilize(gm)
    assert _roles(gm)["stabilized_input"] == CONFIG.as_depth
    stabilized_cores = [n for n in gm.graph.nodes if n.target == SEGMENT_ATTENTION and
                        n.args[0].target == tokens.take]
    assert len(stabilized_cores) == CONFIG.as_depth
    reintegrate(gm)
    assert _roles(gm)["reintegrated"] == 1
    assert _targets(gm)[tokens.reconstruct] == CONFIG.as_depth + 1  # one per AS block, one at the end
    snapshot = [(n.name, n.target, n.args) for n in gm.graph.nodes]
    for pass_ in _passes(tiny):
        assert not pass_(gm).modified
    assert [(n.name, n.target, n.args) for n in gm.graph.nodes] == snapshot


def test_zero_as_depth_leaves_the_graph_untouched(tiny, captured):
    config = IpcvConfig(retention=0.5, prune_layer=2, as_depth=0)
    gm = captured.module()
    annotate, prune, reconstruct, stabilize, _ = _passes(tiny, config)
    for pass_ in (annotate, prune, reconstruct):
        pass_(gm)
    assert not stabilize(gm).modified


def test_no_sort_or_large_topk_is_inserted(tiny, captured):
    gm = run_passes(captured.module(), _passes(tiny))
    program = torch.export.export(gm, grid_inputs(tiny, [[1, 8, 8]])[::-1])  # (pixel_values, image_grid_thw)
    decomposed = Counter(n.target for n in program.run_decompositions().graph.nodes if n.op == "call_function")
    assert torch.ops.aten.sort.default not in decomposed and torch.ops.aten.nonzero.default not in decomposed
    topk = [n for n in program.graph.nodes if n.target == torch.ops.aten.topk.default]
    assert len(topk) == tokens.NEIGHBOR_CHUNKS and all(n.args[1] == CONFIG.neighbors for n in topk)


@pytest.mark.parametrize("grid", [[[1, 8, 8]], [[1, 6, 10]], [[2, 12, 12]]])
def test_rewritten_graph_stays_symbolic(tiny, captured, grid):
    gm = run_passes(captured.module(), _passes(tiny))
    grid_thw, pixels = grid_inputs(tiny, grid)
    out = gm(pixels, grid_thw)
    reference = ipcv_reference(tiny.module, pixels, grid_thw, CONFIG).embeddings
    assert out.shape == reference.shape and (out - reference).abs().max() <= 1e-4


def test_passes_contain_no_architecture_names():
    import pathlib

    source = " ".join(p.read_text().lower() for p in pathlib.Path("ipcv_export/passes").glob("*.py"))
    assert not any(name in source for name in ("qwen", "clip", "siglip", "intern", "dino"))
