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
    from ipcv_export.loading import load_encoder

    tiny25 = load_encoder("tiny-qwen2.5-vl")
    program = compress(capture(tiny25), tiny25, config)
    for tokens in (256, 1024):
        floor = tiny25.description.flop_floor(tiny25.module.config, config.retention_e4, config.prune_layer,
                                              config.as_depth, tokens)
        assert program_flops(program, tiny25, tokens) == floor, tokens


@pytest.mark.parametrize("model,grid", [("tiny-qwen2.5-vl", [[1, 20, 28]]), ("tiny-qwen2.5-vl", [[2, 8, 12], [1, 16, 8]]),
                                        ("tiny-qwen2-vl", [[2, 8, 12], [1, 16, 8]])], ids=str)
def test_stock_cost_model_is_what_the_stock_module_computes(model, grid):
    """The stock module's own kernels, counted eagerly (SDPA's math backend, so attention is visible
    to the counter as matrix products), cost what `stock_flops` says: the benchmarks' baseline."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from ipcv_export.loading import load_encoder

    encoder = load_encoder(model)
    grid_thw = torch.tensor(grid)
    pixels = torch.zeros(int(grid_thw.prod(-1).sum()), encoder.input_width)
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        encoder.module(pixels, grid_thw=grid_thw)
    assert counter.get_total_flops() == encoder.description.stock_flops(encoder.module.config, grid_thw)


def test_window_blocks_are_linear_in_the_tokens():
    """Fails if window attention were dense again: at N = 4096 (one image) the rho = 1 file of the
    tiny Qwen2.5-VL tower counts within 1.10 x the stock module's windowed FLOPs."""
    import torch

    from ipcv_export.capture import capture
    from ipcv_export.loading import load_encoder

    tiny25 = load_encoder("tiny-qwen2.5-vl")
    counted = program_flops(capture(tiny25), tiny25, 4096)
    assert counted <= 1.10 * tiny25.description.stock_flops(tiny25.module.config, torch.tensor([[1, 64, 64]]))


CALL_GRIDS = [[[4, 8, 8]], [[1, 16, 24], [1, 8, 8], [2, 4, 6]]]
"""A video of 4 slices, and images of different sizes with a 2-slice video in one call."""


@pytest.fixture(scope="module", params=["tiny-qwen2-vl", "tiny-qwen2.5-vl"])
def packed(request):
    """(encoder, captured program) of each packed family."""
    from ipcv_export.capture import capture
    from ipcv_export.loading import load_encoder

    encoder = load_encoder(request.param)
    return encoder, capture(encoder)


@pytest.mark.parametrize("config", [IpcvConfig(1.0), IpcvConfig(0.5), IpcvConfig(0.35, 2, 3, 4)], ids=str)
def test_a_call_of_several_segments_costs_its_cost_model(config, packed):
    """Counted on a real call, attention priced segment by segment (flops.count_call), equals the
    per-call cost model (attention per segment, the rest on the call's rows) for the kept counts
    per slice the call-wide selection chose."""
    from conftest import grid_inputs
    from ipcv_export.flops import count_call, kept_per_slice

    encoder, captured = packed
    program = compress(captured, encoder, config)
    for grid in CALL_GRIDS:
        grid_thw, pixels = grid_inputs(encoder, grid)
        counted = count_call(program, pixels, grid_thw)
        modelled = encoder.description.call_flop_floor(encoder.module.config, config.retention_e4, config.prune_layer,
                                                      config.as_depth, kept_per_slice(grid_thw, counted.kept_index))
        assert counted.total == modelled, grid


@pytest.mark.parametrize("retention", [1.0, 0.5])
def test_the_cost_model_prices_a_video_by_its_slices(retention, packed):
    """Fails if the cost model priced attention densely over the call again: 8 slices of 64 patches
    cost exactly 8 x one slice at rho = 1; at rho = 0.5 at least that (the call-wide neighbour search
    adds its cross-slice distances), and below one image of 512 patches, which is what attention
    dense over the call would cost."""
    encoder, _ = packed
    config, vision = encoder.method_config(retention=retention), encoder.module.config
    model = encoder.description
    call = model.call_flop_floor(vision, config.retention_e4, config.prune_layer, config.as_depth, [(64, int(64 * retention))] * 8)
    one = model.flop_floor(vision, config.retention_e4, config.prune_layer, config.as_depth, 64)
    dense = model.flop_floor(vision, config.retention_e4, config.prune_layer, config.as_depth, 512)
    if retention == 1.0:
        assert call == 8 * one
    assert 8 * one <= call < dense
