"""`--budget`: the best measured setting that fits a FLOP budget on the model being exported."""

import json

import pytest

from ipcv_export.budget import SETTINGS, choose_setting, setting_of
from ipcv_export.flops import floor_ratio
from ipcv_export.loading import load_encoder


@pytest.fixture(scope="module")
def table():
    return json.loads(SETTINGS.read_text())["settings"]


@pytest.mark.parametrize("model, tokens", [("tiny-dinov2", 256), ("tiny-llava-clip", 576), ("tiny-qwen2-vl", 1024)])
@pytest.mark.parametrize("budget", [0.7, 0.8, 0.95])  # tiny towers (5-6 blocks) run l_p = 3 only: >= 0.68
def test_choice_is_the_best_measured_setting_that_fits(table, model, tokens, budget):
    encoder = load_encoder(model)
    config, record = choose_setting(encoder, budget, tokens)
    assert floor_ratio(encoder, config, tokens) <= budget and record["flop_ratio"] <= budget
    for entry in table:  # no runnable setting within the budget was measured better
        other = setting_of(entry)
        runnable = other.prune_layer < encoder.depth and (other.selection == "score" or encoder.description.image_batch)
        if runnable and floor_ratio(encoder, other, tokens) <= budget:
            assert entry["worst_patch_cosine"] <= record["measured_worst_patch_cosine"]
    if encoder.description.image_batch is None:
        assert config.selection == "score"


def test_the_budget_is_recorded_in_the_manifest(tmp_path):
    from ipcv_export import Method, Target, export

    result = export("tiny-dinov2", Target(tmp_path / "d.onnx", opt_patches=256), Method(budget=0.7),
                    report=lambda _line: None)
    chosen = result.manifest["ipcv"]["chosen_for_budget"]
    assert chosen["budget"] == 0.7 and chosen["flop_ratio"] <= 0.7
    assert result.manifest["verification"]["verified"]


@pytest.mark.parametrize("budget, retention, cell", [(0.35, 0.35, 2), (0.5, 0.5, 2), (0.6, 0.5, 3), (0.7, 0.7, 4)])
def test_low_budgets_choose_mixed_tokens_on_towers_that_batch_images(budget, retention, cell):
    """The sweep measured mixed-resolution tokens best within these budgets on this tiny tower's
    FLOP ratios, 3 x 3 and 4 x 4 cells where they fit (FIDELITY.md, fifth look); on a packed tower,
    which cannot run them, the choice stays an IPCV score setting."""
    config, _ = choose_setting(load_encoder("tiny-dinov2"), budget, 256)
    assert (config.selection, config.retention, config.mixed_cell, config.neighbors) == ("mixed", retention, cell, 1)
    assert choose_setting(load_encoder("tiny-qwen2-vl"), max(budget, 0.7), 1024)[0].selection == "score"
