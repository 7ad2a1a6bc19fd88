"""The static-shape selector against the reference definition (ivc-prune.md steps 0, 2-5)."""

from __future__ import annotations

import warnings

import pytest
import torch

from ipcv_export.llm.selection_reference import Counts, ivc_scores, ivc_tokens, round_half_even, select_reference
from ipcv_export.llm.selector import TOPK_LIMIT, export_selector, select_static

HEAD_DIM, THETA = 16, 1e6
INTERLEAVED = torch.tensor([0, 1, 2, 0, 1, 2, 0, 0])
"""Qwen3-VL's M-RoPE layout at d = 16 with sections [4, 2, 2] (what prune_hooks.rotary_axes reads
off the tiny Qwen3-VL chat model)."""


def grid_positions(frames: int, rows: int, cols: int, offset: int = 7) -> torch.Tensor:
    """[3, L] M-RoPE positions of a merged grid after `offset` text tokens (t varies for video)."""
    t, r, c = torch.meshgrid(torch.arange(frames), torch.arange(rows), torch.arange(cols), indexing="ij")
    return torch.stack([offset + 2 * t, offset + r, offset + c]).reshape(3, -1)


def values(length: int, seed: int) -> torch.Tensor:
    return torch.randn(length, 2, HEAD_DIM, generator=torch.Generator().manual_seed(seed))


def test_round_half_even_is_exact():
    assert [round_half_even(n, 10) for n in (4, 5, 6, 15, 25, 35)] == [0, 0, 1, 2, 2, 4]
    assert round_half_even(5000 * 5, 10_000) == 2 and round_half_even(7 * 5000, 10_000) == 4


def test_counts_follow_step_0():
    for visual in range(1, 20_001):
        half = Counts.of(visual, 5000)
        assert 2 * round_half_even(visual, 10) + half.seeds <= half.budget  # never overflows at 0.5
        assert half.ivc_per_kind == round_half_even(visual, 10)
        full = Counts.of(visual, 10_000)
        assert full.budget == visual
    overflowing = [v for v in range(1, 20_001)
                   if Counts.of(v, 3500).ivc_per_kind != round_half_even(v, 10)]
    assert overflowing == [6, 7]
    assert Counts.of(1, 5000) == Counts(1, 1, 1, 0)


CASES = [(1, 1, n) for n in (1, 2, 3, 5, 6, 7)] + [(1, 5, 7), (1, 8, 8), (1, 9, 13), (1, 16, 24), (1, 37, 41),
                                                    (1, 64, 64), (3, 6, 10), (4, 7, 7), (2, 16, 30)]


@pytest.mark.parametrize("axes", [None, INTERLEAVED], ids=["authors-score", "model-layout"])
@pytest.mark.parametrize("retention_e4", [5000, 3500, 2000])
@pytest.mark.parametrize("frames,rows,cols", CASES)
def test_static_selector_equals_reference(frames, rows, cols, retention_e4, axes):
    positions = grid_positions(frames, rows, cols)
    length = positions.shape[1]
    for queries in (1, 4, 37):
        visual, query = values(length, length + queries), values(queries, queries)
        expected = select_reference(positions, visual, query, retention_e4, HEAD_DIM, THETA, axes)
        got = select_static(positions, visual, query, retention_e4, HEAD_DIM, THETA, axes)
        assert torch.equal(got, expected), (length, queries)
        assert got.shape[0] == Counts.of(length, retention_e4).budget


def test_ties_go_to_the_lower_index():
    """All visual values equal: every foreground score ties, and the lowest indices fill the budget."""
    positions = grid_positions(1, 10, 10)
    visual = torch.ones(100, 2, HEAD_DIM)
    kept = select_static(positions, visual, values(3, 0), 5000, HEAD_DIM, THETA)
    assert torch.equal(kept, select_reference(positions, visual, values(3, 0), 5000, HEAD_DIM, THETA))
    priority = ivc_tokens(positions, Counts.of(100, 5000).ivc_per_kind, HEAD_DIM, THETA) | {0}  # seed: index 0
    rest = [i for i in range(100) if i not in priority][: 50 - len(priority)]
    assert kept.tolist() == sorted(priority | set(rest))


def test_mirrored_tokens_tie_exactly():
    positions = grid_positions(1, 12, 12)
    c, s = ivc_scores(positions, HEAD_DIM, THETA)
    grid_c, grid_s = c.reshape(12, 12), s.reshape(12, 12)
    assert torch.equal(grid_c, grid_c.T) and torch.equal(grid_s, grid_s.T)


def test_model_layout_scores_the_rotation_the_attention_applies():
    """With axes, token i's score sums cos(p_axis(j) theta_j) over the d/2 frequencies, each turned
    by its own axis's position only; the authors' score sums all three axes for every frequency."""
    positions = grid_positions(2, 5, 7)
    theta = THETA ** (-torch.arange(HEAD_DIM // 2, dtype=torch.float64) * 2 / HEAD_DIM)
    angle = positions.double()[INTERLEAVED, :].T * theta  # [L, d/2]
    c, s = ivc_scores(positions, HEAD_DIM, THETA, INTERLEAVED)
    assert torch.allclose(c, angle.cos().sum(-1), rtol=0, atol=1e-12)
    assert torch.allclose(s, angle.sin().sum(-1), rtol=0, atol=1e-12)
    authors, _ = ivc_scores(positions, HEAD_DIM, THETA)
    assert (c - authors).abs().max() > 1.0


def test_ivc_tokens_ignore_content_and_are_always_kept():
    positions = grid_positions(1, 16, 20)
    ivc = ivc_tokens(positions, Counts.of(320, 3500).ivc_per_kind, HEAD_DIM, THETA)
    assert len(ivc) >= Counts.of(320, 3500).ivc_per_kind
    for seed in range(3):
        kept = set(select_static(positions, values(320, seed), values(5, seed + 10), 3500, HEAD_DIM, THETA).tolist())
        assert ivc <= kept


def _export(retention_e4: int):
    return export_selector(retention_e4, HEAD_DIM, THETA)


def test_exported_selector_has_small_topk_and_matches_reference():
    program = _export(3500)
    topk = [n for n in program.graph.nodes if n.target == torch.ops.aten.topk.default]
    assert topk, "expected TopK for the IVC and seed thresholds"
    length = next(n for n in program.graph.nodes if n.name == "positions").meta["val"].shape[1].node.expr
    for node in topk:
        k = node.args[1].meta["val"] if isinstance(node.args[1], torch.fx.Node) else node.args[1]
        assert int(k.node.expr.subs(length, 16384)) <= TOPK_LIMIT
    layout = export_selector(3500, HEAD_DIM, THETA, axes=INTERLEAVED)
    for frames, rows, cols in [(1, 1, 1), (1, 7, 9), (2, 20, 22)]:
        positions = grid_positions(frames, rows, cols)
        visual, query = values(positions.shape[1], 3), values(6, 4)
        assert torch.equal(program.module()(positions, visual, query),
                           select_reference(positions, visual, query, 3500, HEAD_DIM, THETA))
        assert torch.equal(layout.module()(positions, visual, query),
                           select_reference(positions, visual, query, 3500, HEAD_DIM, THETA, INTERLEAVED))


def test_selector_runs_in_onnx_runtime(tmp_path):
    import onnxruntime

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx_program = torch.onnx.export(_export(5000), dynamo=True, verbose=False,
                                         input_names=["positions", "visual_values", "query_values"])
    onnx_program.save(tmp_path / "selector.onnx")
    session = onnxruntime.InferenceSession(tmp_path / "selector.onnx", providers=["CPUExecutionProvider"])
    for frames, rows, cols in [(1, 1, 1), (1, 13, 17), (1, 64, 64)]:
        positions = grid_positions(frames, rows, cols)
        visual, query = values(positions.shape[1], 5), values(11, 6)
        kept = session.run(None, {"positions": positions.numpy(), "visual_values": visual.numpy(),
                                  "query_values": query.numpy()})[0]
        assert kept.tolist() == select_reference(positions, visual, query, 5000, HEAD_DIM, THETA).tolist()
