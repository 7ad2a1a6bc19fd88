"""The record of a loaded encoder: the stock module, its family's description, and where it came from."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import IpcvConfig, UsageError
from ..layouts import LAYOUTS
from ..layouts.base import TowerGeometry
from .description import ModelDescription


@dataclass
class LoadedEncoder:
    """A stock vision module in eval mode, with what is known about where it came from."""

    module: torch.nn.Module
    description: ModelDescription
    source: dict = field(default_factory=dict)
    processor_overrides: dict = field(default_factory=dict)  # from a checkpoint's preprocessor_config.json

    @property
    def vision_config(self):
        """The tower's own config (a LLaVA module's config is the whole model's)."""
        return getattr(self.module.config, "vision_config", self.module.config)

    @property
    def geometry(self) -> TowerGeometry:
        """The tower's sizes, as its layout reads them (layouts/base.TowerGeometry)."""
        return LAYOUTS[self.description.layout].geometry(self)

    @property
    def depth(self) -> int:
        """Blocks in the exported graph (a LLaVA tower stops at its feature layer)."""
        return self.geometry.depth

    @property
    def tap_blocks(self) -> tuple[int, ...]:
        """Blocks whose outputs also leave the tower (ModelDescription.taps), in output order."""
        taps = self.description.taps
        return tuple(index for index, _ in taps(self.module)) if taps else ()

    @property
    def special_tokens(self) -> int:
        """Tokens always kept (CLS); 0 for packed towers."""
        return self.geometry.special_tokens

    def method_config(self, **given) -> IpcvConfig:
        """IpcvConfig from the values given (None = not given), else the family's defaults
        (ModelDescription.method_defaults), else ipcv.md's; merge and mixed selection's one neighbour."""
        chosen = {name: value for name, value in given.items() if value is not None}
        if chosen.get("selection") == "mixed":
            unused = [f"--{name.replace('_', '-')}" for name in ("prune_layer", "as_depth") if name in chosen]
            if unused:
                raise UsageError(f"mixed selection prunes nothing inside the tower (no pruning layer, no AS blocks): "
                                 f"drop {', '.join(unused)}")
        if chosen.get("selection") in ("merge", "mixed"):
            chosen.setdefault("neighbors", 1)
        return IpcvConfig(**self.description.method_defaults | chosen)

    @property
    def preprocessing(self) -> dict:
        """The image processor class and settings that turn images into this encoder's inputs."""
        processor = self.description.image_processor(self.module.config)
        return {"class": processor["class"], "kwargs": processor["kwargs"] | self.processor_overrides}

    @property
    def merge_size(self) -> int:
        return self.geometry.merge_size

    @property
    def patch_size(self) -> int:
        return self.geometry.patch_size

    @property
    def native_patches(self) -> int | None:
        return self.geometry.native_patches

    @property
    def position_table(self) -> int | None:
        return self.geometry.position_table

    @property
    def channels(self) -> int:
        return self.geometry.channels

    @property
    def input_width(self) -> int:
        return self.geometry.input_width
