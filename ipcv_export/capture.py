"""Capture: `torch.export` of the stock encoder with a dynamic number of patches N.

The stock transformers module is exported unmodified through its own extension points (see
`models/qwen2_vl.py`): positions and segment ids are inputs, attention is one custom-op node per
block. N is one symbolic dimension, a multiple of merge^2 (the merger concatenates merge^2
consecutive tokens). The example has two segments so the segment axis is not specialised.
"""

from __future__ import annotations

import torch
import torch.fx.experimental._config as fx_config

from .inputs import engine_inputs
from .models import LoadedEncoder

MAX_TOKENS = 65536
EXAMPLE_GRID = torch.tensor([[1, 8, 8], [2, 4, 6]])


def example_inputs(encoder: LoadedEncoder, grid_thw: torch.Tensor = EXAMPLE_GRID) -> tuple[torch.Tensor, ...]:
    """(pixel_values, position_ids, segment_ids) for a grid, with seeded random pixels."""
    positions, segments = engine_inputs(grid_thw, encoder.merge_size)
    generator = torch.Generator().manual_seed(0)
    return torch.randn(len(segments), encoder.input_width, generator=generator), positions, segments


def dynamic_shapes(encoder: LoadedEncoder, min_tokens: int = 1) -> tuple[dict, dict, dict]:
    """N = merge^2 * groups for all three inputs, groups in [ceil(min_tokens / merge^2), MAX_TOKENS / merge^2]."""
    group = encoder.merge_size ** 2
    groups = torch.export.Dim("groups", min=max(1, -(-min_tokens // group)), max=MAX_TOKENS // group)
    tokens = groups * group
    return {0: tokens}, {0: tokens}, {0: tokens}


def export_symbolic(module: torch.nn.Module, example: tuple, shapes: tuple) -> torch.export.ExportedProgram:
    """torch.export with sizes treated as >= 2 (no 0/1 specialisation of derived sizes such as K)."""
    with torch.no_grad(), fx_config.patch(backed_size_oblivious=True):
        return torch.export.export(module, example, dynamic_shapes=shapes)


def capture(encoder: LoadedEncoder) -> torch.export.ExportedProgram:
    """The stock encoder as an ExportedProgram: (pixel_values, position_ids, segment_ids) -> embeddings."""
    module = encoder.description.exportable(encoder.module).eval()
    with encoder.description.attention_context(encoder.module):
        return export_symbolic(module, example_inputs(encoder), dynamic_shapes(encoder))
