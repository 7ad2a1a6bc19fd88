"""Input layouts: how a family's encoder takes its images, one module each (packed patches with a
grid, batches of whole images, padded patch rows). Each owns what differs between them: capture's
example inputs and dynamic sizes, the FLOP count's shapes, the manifest's inputs and outputs, the
parity gate's calls, the int32 check's largest calls and the TensorRT profile. A family's
description names its layout (ModelDescription.layout); the rest of the tool asks the layout.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Layout
from .images import IMAGES
from .packed import PACKED
from .padded import PADDED

if TYPE_CHECKING:
    from ..models.encoder import LoadedEncoder

LAYOUTS: dict[str, Layout] = {layout.name: layout for layout in (PACKED, IMAGES, PADDED)}
"""Manifest `inputs.layout` -> its layout."""


def layout_of(encoder: LoadedEncoder) -> Layout:
    """The layout the encoder's family description names."""
    return LAYOUTS[encoder.description.layout]
