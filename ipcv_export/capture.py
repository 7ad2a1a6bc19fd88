"""Capture: `torch.export` of the stock encoder with dynamic sizes.

The stock transformers module is exported unmodified through its own extension points (see
`models/qwen2_vl.py`): the inputs are what the image processor gives, positions and segment ids
one custom-op node computed from them, attention one custom-op node per block. Which sizes are
symbolic, and the example that captures them, are the encoder's layout's (`layouts/`).
"""

from __future__ import annotations

import torch
import torch.fx.experimental._config as fx_config

from .layouts import layout_of
from .models.encoder import LoadedEncoder


def export_symbolic(module: torch.nn.Module, encoder: LoadedEncoder, smallest: int = 1) -> torch.export.ExportedProgram:
    """torch.export of `module`, which takes the encoder's inputs, on its layout's example with its
    layout's dynamic sizes from `smallest` patches on, sizes treated as >= 2 (no 0/1
    specialisation of derived sizes such as K)."""
    layout = layout_of(encoder)
    with torch.no_grad(), fx_config.patch(backed_size_oblivious=True):
        return torch.export.export(module, layout.example_inputs(encoder, smallest),
                                   dynamic_shapes=layout.dynamic_shapes(encoder, smallest))


def capture(encoder: LoadedEncoder) -> torch.export.ExportedProgram:
    """The stock encoder as an ExportedProgram: the processor's inputs -> its outputs."""
    module = encoder.description.exportable(encoder.module).eval()
    with encoder.description.attention_context(encoder.module):
        return export_symbolic(module, encoder)
