"""The record of a loaded encoder: the stock module, its family's description, and where it came from."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import IpcvConfig, UsageError
from .description import ModelDescription, square_side


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
    def depth(self) -> int:
        """Blocks in the exported graph (a LLaVA tower stops at its feature layer)."""
        if self.description.image_batch:
            return len(self.description.image_batch.parts(self.module).blocks)
        if self.description.padded:
            return self.vision_config.num_hidden_layers
        return self.vision_config.depth

    @property
    def tap_blocks(self) -> tuple[int, ...]:
        """Blocks whose outputs also leave the tower (ModelDescription.taps), in output order."""
        taps = self.description.taps
        return tuple(index for index, _ in taps(self.module)) if taps else ()

    @property
    def special_tokens(self) -> int:
        """Tokens always kept (CLS); 0 for packed towers."""
        batch = self.description.image_batch
        return batch.special_tokens if batch else 0

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
        """Tokens the merger concatenates per side; 1 for towers without a merger. For a batched
        tower, the multiple its grid sides must be (InternVL's pixel shuffle merges 2 x 2)."""
        if self.description.image_batch:
            return self.description.image_batch.grid_multiple
        if self.description.padded:
            return self.description.padded.grid_multiple(self.module.config)
        return getattr(self.vision_config, "spatial_merge_size", 1)

    @property
    def patch_size(self) -> int:
        if self.description.image_batch:
            return self.description.image_batch.parts(self.module).patch_size
        return self.vision_config.patch_size

    @property
    def native_patches(self) -> int | None:
        """Patches of one image at the size a batched tower was trained for (its position table's
        grid: 576 for CLIP-336); None for packed towers, whose images come in any size."""
        if self.description.padded:  # the processor pads every image to its budget of soft tokens
            return self.preprocessing["kwargs"]["max_soft_tokens"] * self.merge_size ** 2
        if not self.description.image_batch:
            return None
        return (square_side(self.vision_config.image_size) // self.patch_size) ** 2

    @property
    def position_table(self) -> int | None:
        """Rows per axis of a padded tower's position table: patch coordinates must be below it."""
        padded = self.description.padded
        return padded.position_table(self.module.config) if padded else None

    @property
    def channels(self) -> int:
        c = self.vision_config
        if self.description.padded:
            return 3
        return c.in_channels if hasattr(c, "in_channels") else c.num_channels

    @property
    def input_width(self) -> int:
        """Values per patch row of a packed tower's pixel_values; the channels of a batched one's."""
        c = self.vision_config
        if self.description.image_batch:
            return self.channels
        if self.description.padded:
            return self.channels * c.patch_size * c.patch_size
        return c.in_channels * c.temporal_patch_size * c.patch_size * c.patch_size
