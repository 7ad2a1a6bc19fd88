"""The eager reference against a direct rewrite of the authors' formulation: the same method.

The authors compute queries for every row in AS blocks and drop the removed rows afterwards, and
average neighbour drift after deduplicating neighbour indices; ipcv.md computes queries only for
kept rows and gathers directly. The results must agree.
"""

import pytest
import torch

from conftest import grid_inputs
from ipcv_export.config import IpcvConfig
from ipcv_export.inputs import check_grid, position_ids, segment_ids
from ipcv_export.models.qwen2_vl import run_block
from ipcv_export.reference import ipcv_reference


def authors_formulation(visual, pixels, grid_thw, config):
    grid = check_grid(grid_thw, visual.spatial_merge_size)
    seg = segment_ids(grid)
    x = visual.patch_embed(pixels)
    cos, sin = visual.rotary_pos_emb(x, position_ids(grid, visual.spatial_merge_size))
    blocks = list(visual.blocks)
    for block in blocks[:config.prune_layer]:
        previous, x = x, run_block(block, x, cos, sin, seg)
    n = x.shape[0]
    k = max(1, n * config.retention_e4 // 10_000)
    score = (x - previous).float().pow(2).sum(-1)
    order = torch.sort(score, descending=True, stable=True).indices
    keep, rem = order[:k].sort().values, order[k:].sort().values
    kept_then, removed_then = x[keep], x[rem]
    nbr = torch.cdist(removed_then, kept_then).topk(min(config.neighbors, k), largest=False).indices
    unique, inverse = torch.unique(nbr, return_inverse=True)  # dedup, then gather through the inverse

    def rebuild(y):
        drift = (y - kept_then)[unique]
        z = x.new_empty(n, x.shape[1])
        z[keep], z[rem] = y, removed_then + drift[inverse].mean(1)
        return z

    y = kept_then
    for index in range(config.prune_layer, len(blocks)):
        if index < config.prune_layer + config.as_depth:
            y = run_block(blocks[index], rebuild(y), cos, sin, seg)[keep]  # queries for all rows
        else:
            y = run_block(blocks[index], y, cos[keep], sin[keep], seg[keep])
    return visual.merger(rebuild(y))


@pytest.mark.parametrize("config", [IpcvConfig(0.35, 3, 7, 10), IpcvConfig(0.5, 1, 2, 1), IpcvConfig(0.2, 2, 0, 3)])
@pytest.mark.parametrize("grid", [[[1, 16, 16]], [[1, 8, 8], [2, 4, 8]]])
def test_reference_equals_authors_formulation(tiny, config, grid):
    grid_thw, pixels = grid_inputs(tiny, grid)
    with torch.no_grad():
        expected = authors_formulation(tiny.module, pixels, grid_thw, config)
    actual = ipcv_reference(tiny.module, pixels, grid_thw, config).embeddings
    assert (actual - expected).abs().max() <= 1e-5
