"""Batches of whole images (LLaVA's CLIP, OneVision's SigLIP, InternViT, DINOv2): pixel_values
[B, C, H, W], every image the same size, the special tokens (CLS) before each image's patches. The
number of images and each image's height and width in patches are symbolic dimensions."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..contract import INPUT_NAMES, MAX_IMAGES, MAX_SIDE, output_names
from ..inputs import square_grid
from ..models.description import square_side
from ..lower.int32_check import UNBOUNDED, Bounded
from ..tokens import min_side
from ..verify import check_batched_parity
from .base import Call, FileInputs, Layout, Shapes, TowerGeometry

if TYPE_CHECKING:
    from ..config import IpcvConfig, ShapeProfile
    from ..models.encoder import LoadedEncoder
    from ..verify import ParityCheck, Tolerance

VERIFY_BATCHES = ((1, 16, 16), (2, 12, 20), (3, 8, 8))
"""(images, rows, columns of patches) per check, none the capture example."""


class Images(Layout):
    name = "images"
    input_names = tuple(INPUT_NAMES[:1])
    largest = MAX_SIDE ** 2  # per image

    def geometry(self, encoder: LoadedEncoder) -> TowerGeometry:
        """Native patches: the grid of the tower's position table (576 for CLIP-336)."""
        batch, c = encoder.description.image_batch, encoder.vision_config
        parts = batch.parts(encoder.module)
        channels = c.in_channels if hasattr(c, "in_channels") else c.num_channels
        return TowerGeometry(len(parts.blocks), batch.grid_multiple, parts.patch_size, channels, channels,
                             batch.special_tokens, (square_side(c.image_size) // parts.patch_size) ** 2)

    def example_inputs(self, encoder: LoadedEncoder, smallest: int = 1) -> Call:
        """Two images of 5 x 7 grid multiples of patches, or more where the file needs `smallest`
        patches per image."""
        generator = torch.Generator().manual_seed(0)
        multiple = encoder.merge_size
        cell, side = encoder.patch_size * multiple, min_side(smallest, multiple) // multiple
        rows, cols = max(5, side + 1), max(7, side + 3)
        return (torch.randn(2, encoder.channels, rows * cell, cols * cell, generator=generator),)

    def dynamic_shapes(self, encoder: LoadedEncoder, smallest: int = 1) -> tuple[dict, ...]:
        """B images of H x W pixels, H and W multiples of the patch size times the grid multiple,
        with at least `min_side(smallest)` patches per side."""
        multiple = encoder.merge_size
        cell, side = encoder.patch_size * multiple, min_side(smallest, multiple) // multiple
        images = torch.export.Dim("images", min=1, max=MAX_IMAGES)
        rows = torch.export.Dim("rows", min=side, max=MAX_SIDE // multiple)
        cols = torch.export.Dim("cols", min=side, max=MAX_SIDE // multiple)
        return ({0: images, 2: rows * cell, 3: cols * cell},)

    def counting_inputs(self, encoder: LoadedEncoder, tokens: int) -> Call:
        """The most nearly square grid of that many patches."""
        rows, cols = square_grid(tokens, encoder.merge_size)
        p = encoder.patch_size
        return (torch.empty(1, encoder.channels, rows * p, cols * p),)

    def manifest_io(self, encoder: LoadedEncoder, config: IpcvConfig, smallest: int) -> tuple[dict, list[dict]]:
        p, s, multiple = encoder.patch_size, encoder.special_tokens, encoder.merge_size
        side = min_side(smallest, multiple)
        inputs = {"layout": self.name, "patch_size": p, "merge_size": multiple, "input_width": encoder.channels,
                  "min_tokens": smallest, "special_tokens": s,
                  "max_images": MAX_IMAGES, "max_side": MAX_SIDE * p,
                  "tensors": [{"name": INPUT_NAMES[0], "dtype": "float32", "shape": ["B", encoder.channels, "H", "W"]}],
                  "rules": f"H and W multiples of {p * multiple}, each at least {side * p} pixels; B <= {MAX_IMAGES}, "
                           f"H, W <= {MAX_SIDE * p}; P = (H/{p})*(W/{p}) patches and T = {s} + P tokens per image"}
        names = output_names()
        features = {"name": names[0], "dtype": "float32", "shape": ["B", "T", "hidden"],
                    "meaning": "every token of every image (special tokens first), the original encoder's output"}
        outputs = [features,
                   {"name": names[1], "dtype": "int64", "shape": ["B", f"{s} + P*{config.retention_e4}//10000"],
                    "meaning": "per image, ascending indices of the kept tokens (special tokens always kept)"},
                   {"name": names[2], "dtype": "int64", "shape": ["B", "T-K", config.neighbors],
                    "meaning": "per image, indices into kept_index of each removed token's neighbours; K means none"}]
        return inputs, outputs

    def onnx_metadata(self, encoder: LoadedEncoder) -> dict[str, str]:
        return {"patch_size": str(encoder.patch_size)}

    def check_inputs(self, pixels: torch.Tensor, second: torch.Tensor | None, file: FileInputs) -> Call:
        p, multiple = file.patch_size, file.merge_size
        if pixels.ndim != 4 or pixels.shape[1] != file.input_width:
            raise ValueError(f"pixel_values must have shape [B, {file.input_width}, H, W], got {list(pixels.shape)}")
        side = min_side(file.min_tokens, multiple)
        if min(pixels.shape[2:]) < side * p:
            raise ValueError(f"images are too small for this file: each side needs at least {side} patches of {p} pixels")
        images, side_px = file.limit("max_images"), file.limit("max_side")
        if images and pixels.shape[0] > images:
            raise ValueError(f"this file takes at most {images} images per call, got {pixels.shape[0]}")
        if side_px and max(pixels.shape[2:]) > side_px:
            raise ValueError(f"image sides may be at most {side_px} pixels for this file, got {list(pixels.shape[2:])}")
        if pixels.shape[2] % (p * multiple) or pixels.shape[3] % (p * multiple):
            unit = f"the patch size {p}" if multiple == 1 else f"{p * multiple} ({multiple} patches of {p})"
            raise ValueError(f"image height and width must be multiples of {unit}, got {list(pixels.shape[2:])}")
        return (pixels,)

    def preprocess(self, settings: dict, images: Sequence, min_pixels: int | None, max_pixels: int | None,
                   file_name: str) -> Call:
        """Refused: the processor of such a tower resizes every image to one size, which the caller chooses."""
        raise ValueError(f"{file_name} takes image batches [B, C, H, W]: resize and normalise them with "
                         f"{settings.get('class', 'the model processor')}, then call the encoder")

    def per_image(self, features: torch.Tensor, call: Call, merge_size: int) -> list[torch.Tensor]:
        return list(features)

    def verification_calls(self, encoder: LoadedEncoder, config: IpcvConfig, smallest: int,
                           generator: torch.Generator) -> list[Call]:
        return [(torch.randn(images, encoder.channels, rows * encoder.patch_size, cols * encoder.patch_size,
                             generator=generator),)
                for images, rows, cols in VERIFY_BATCHES]

    def check_call(self, run: Callable[..., tuple[torch.Tensor, ...]], encoder: LoadedEncoder, config: IpcvConfig,
                   call: Call, tolerance: Tolerance) -> ParityCheck:
        batch = encoder.description.image_batch
        return check_batched_parity(run, batch.parts(encoder.module), batch.special_tokens, config, call[0], tolerance,
                                    batch.neighbors_across_images)

    def extreme_calls(self, inputs: dict) -> dict[str, dict[str, np.ndarray | Bounded]]:
        """The most images at the largest side."""
        k = inputs["merge_size"]
        side = inputs["max_side"] // (inputs["patch_size"] * k) * (inputs["patch_size"] * k)
        name = inputs["tensors"][0]["name"]
        return {"images": {name: Bounded(UNBOUNDED, (inputs["max_images"], inputs["input_width"], side, side))}}

    def engine_shapes(self, inputs: dict, profile: ShapeProfile, most_images: int) -> Shapes:
        """Each side the smallest square side (a multiple of the grid multiple) that holds the min /
        opt / max patches per image."""
        channels, pixels = inputs["input_width"], inputs["patch_size"]

        def images(count: int, patches: int) -> tuple[int, ...]:
            side = min_side(patches, inputs["merge_size"]) * pixels
            return (count, channels, side, side)

        return {"pixel_values": (images(1, profile.min_tokens), images(1, profile.opt_tokens),
                                 images(most_images, profile.max_tokens))}


IMAGES = Images()
