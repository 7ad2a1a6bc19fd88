"""FLOPs counted on the exported graphs equal ipcv.md's cost model exactly (deterministic counts)."""

import pytest

from ipcv_export.compress import compress
from ipcv_export.config import IpcvConfig
from ipcv_export.flops import program_flops


@pytest.mark.parametrize("config", [IpcvConfig(0.5), IpcvConfig(0.35, 1, 2, 1), IpcvConfig(0.2, 3, 0, 10),
                                    IpcvConfig(0.5, 2, 9, 3), IpcvConfig(1.0)], ids=str)
def test_counted_flops_are_the_cost_model(config, tiny, captured):
    """Queries for kept rows only in AS blocks included: the graph does no matrix work beyond the floor."""
    program = compress(captured, tiny, config)
    for tokens in (256, 1024, 4096):
        floor = tiny.description.flop_floor(tiny.module.config, config.retention_e4, config.prune_layer,
                                            config.as_depth, tokens)
        assert program_flops(program, tiny, tokens) == floor, tokens


def test_original_cost(tiny, captured):
    assert program_flops(captured, tiny, 1024) == tiny.description.flop_floor(
        tiny.module.config, 10_000, 1, 0, 1024)


@pytest.mark.parametrize("config", [IpcvConfig(0.5), IpcvConfig(0.35, 2, 3, 4), IpcvConfig(1.0)], ids=str)
def test_windowed_tower_counts_are_its_cost_model(config):
    """Qwen2.5-VL: gated MLP, RMSNorm, window blocks (dense masked attention, as full blocks)."""
    from ipcv_export.capture import capture
    from ipcv_export.models import load_encoder

    tiny25 = load_encoder("tiny-qwen2.5-vl")
    program = compress(capture(tiny25), tiny25, config)
    for tokens in (256, 1024):
        floor = tiny25.description.flop_floor(tiny25.module.config, config.retention_e4, config.prune_layer,
                                              config.as_depth, tokens)
        assert program_flops(program, tiny25, tokens) == floor, tokens
