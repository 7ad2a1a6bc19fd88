"""Padded patch rows (Gemma 4): every image's patches padded to one length P, pixel_values
[B, P, w] with image_position_ids [B, P, 2] ((x, y) per patch, (-1, -1) for padding), as the image
processor gives them. The number of images and P are symbolic dimensions."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..config import UsageError
from ..contract import MAX_IMAGES, MAX_TOKENS, PADDED_INPUT_NAMES, output_names
from ..inputs import real_patches, square_grid
from ..lower.int32_check import UNBOUNDED, Bounded
from ..verify import check_padded_parity
from .base import Call, FileInputs, Layout, Shapes, TowerGeometry, processor_settings

if TYPE_CHECKING:
    from ..config import IpcvConfig, ShapeProfile
    from ..models.encoder import LoadedEncoder
    from ..verify import ParityCheck, Tolerance

VERIFY_PADDED = (([(4, 3)], 12), ([(2, 2), (1, 3), (3, 3)], 10), ([(5, 2), (2, 1)], 12))
"""Images of (columns, rows) in cells of k x k patches, padded to that many cells: one unpadded
image, three of which one fills the row, two with much padding."""


class Padded(Layout):
    name = "padded"
    input_names = tuple(PADDED_INPUT_NAMES)
    largest = MAX_TOKENS

    def geometry(self, encoder: LoadedEncoder) -> TowerGeometry:
        """Native patches: the processor pads every image to its budget of soft tokens."""
        padded, c = encoder.description.padded, encoder.vision_config
        merge = padded.grid_multiple(encoder.module.config)
        native = encoder.preprocessing["kwargs"]["max_soft_tokens"] * merge ** 2
        return TowerGeometry(c.num_hidden_layers, merge, c.patch_size, 3, 3 * c.patch_size * c.patch_size,
                             native_patches=native, position_table=padded.position_table(encoder.module.config))

    def example_inputs(self, encoder: LoadedEncoder, smallest: int = 1) -> Call:
        """Two images of 2 x 2 and 3 x 1 grid multiples padded to 7 squared multiples (neither is full)."""
        m = encoder.merge_size
        return padded_inputs([(2 * m, 2 * m), (3 * m, m)], 7 * m * m, encoder.input_width,
                             torch.Generator().manual_seed(0))

    def dynamic_shapes(self, encoder: LoadedEncoder, smallest: int = 1) -> tuple[dict, ...]:
        """B images, and P a multiple of k^2 holding at least `smallest` patches (two cells at least)."""
        square = encoder.merge_size ** 2
        images = torch.export.Dim("images", min=1, max=MAX_IMAGES)
        cells = torch.export.Dim("cells", min=max(2, -(-smallest // square)), max=MAX_TOKENS // square)
        return {0: images, 1: cells * square}, {0: images, 1: cells * square}

    def counting_inputs(self, encoder: LoadedEncoder, tokens: int) -> Call:
        """The most nearly square grid of that many patches, unpadded."""
        rows, cols = square_grid(tokens, encoder.merge_size)
        return padded_inputs([(cols, rows)], tokens, encoder.input_width)

    def manifest_io(self, encoder: LoadedEncoder, config: IpcvConfig, smallest: int) -> tuple[dict, list[dict]]:
        k, table = encoder.merge_size, encoder.position_table
        square = k * k
        largest = MAX_TOKENS // square * square
        inputs = {"layout": self.name, "patch_size": encoder.patch_size, "merge_size": k,
                  "input_width": encoder.input_width, "min_tokens": smallest, "max_tokens": largest,
                  "max_images": MAX_IMAGES, "position_table": table,
                  "tensors": [{"name": PADDED_INPUT_NAMES[0], "dtype": "float32", "shape": ["B", "P", encoder.input_width]},
                              {"name": PADDED_INPUT_NAMES[1], "dtype": "int64", "shape": ["B", "P", 2]}],
                  "rules": f"the image processor's pixel_values and image_position_ids as they come: every image padded "
                           f"to P patches, P a multiple of {square}, {-(-max(smallest, 2 * square) // square) * square} "
                           f"<= P <= {largest}; each image's real patches first, positions (x, y) in "
                           f"[0, {table}), then padding at (-1, -1); grid sides multiples of {k}; B <= {MAX_IMAGES}"}
        names = output_names()
        outputs = [{"name": names[0], "dtype": "float32", "shape": ["B", f"P/{square}", "hidden"],
                    "meaning": f"per image, its soft tokens (real patches / {square} of them, the processor's "
                               "num_soft_tokens_per_image) first, then zero rows: the original encoder's output per image"},
                   {"name": names[1], "dtype": "int64", "shape": ["B", f"P*{config.retention_e4}//10000"],
                    "meaning": f"per image, ascending indices of the kept tokens: its max(V*{config.retention_e4}//10000, 1) "
                               "kept real patches (V of them), then its first padding tokens, which fill the slots"},
                   {"name": names[2], "dtype": "int64", "shape": ["B", "P-K", config.neighbors],
                    "meaning": "per image, indices into kept_index of each removed token's neighbours; K means none "
                               "(always for padding)"}]
        return inputs, outputs

    def onnx_metadata(self, encoder: LoadedEncoder) -> dict[str, str]:
        return {"patch_size": str(encoder.patch_size), "layout": self.name}

    def check_inputs(self, pixels: torch.Tensor, second: torch.Tensor | None, file: FileInputs) -> Call:
        """pixel_values [B, P, w] and image_position_ids [B, P, 2] as the processor pads them."""
        if second is None:
            raise ValueError("this file takes padded patches: pass image_position_ids with pixel_values")
        positions = torch.as_tensor(second)
        square = file.merge_size ** 2
        if pixels.ndim != 3 or pixels.shape[2] != file.input_width:
            raise ValueError(f"pixel_values must have shape [B, P, {file.input_width}], got {list(pixels.shape)}")
        if positions.dtype != torch.int64 or list(positions.shape) != [*pixels.shape[:2], 2]:
            raise ValueError(f"image_position_ids must be int64 of shape {[*pixels.shape[:2], 2]}, got "
                             f"{positions.dtype} {list(positions.shape)}")
        patches, images = pixels.shape[1], pixels.shape[0]
        if patches % square or patches < file.min_tokens:
            raise ValueError(f"the padded length P must be a multiple of {square} and at least {file.min_tokens}, "
                             f"got {patches}")
        largest, most, table = file.limit("max_tokens"), file.limit("max_images"), file.limit("position_table")
        if largest and patches > largest:
            raise ValueError(f"this file takes at most {largest} patches per image, got {patches}")
        if most and images > most:
            raise ValueError(f"this file takes at most {most} images per call, got {images}")
        real = real_patches(positions)
        if (real.sum(-1) == 0).any() or (real.int().diff(dim=-1) > 0).any():
            raise ValueError("each image needs its real patches first and at least one of them (padding: -1, -1 after)")
        if (positions[real] < 0).any() or (table and (positions[real] >= table).any()):
            raise ValueError(f"patch positions must lie in [0, {table or 'the position table'}) (padding: -1, -1)")
        return pixels, positions

    def preprocess(self, settings: dict, images: Sequence, min_pixels: int | None, max_pixels: int | None,
                   file_name: str) -> Call:
        import transformers

        settings = processor_settings(settings, file_name)
        if min_pixels is not None or max_pixels is not None:
            raise UsageError(f"{file_name} sizes images by its soft-token budget, not min/max pixels")
        batch = getattr(transformers, settings["class"])(**settings["kwargs"])(images=list(images), return_tensors="pt")
        return batch["pixel_values"].float(), batch["image_position_ids"]

    def per_image(self, features: torch.Tensor, call: Call, merge_size: int) -> list[torch.Tensor]:
        """Image b's soft tokens: its first (real patches / k^2) rows."""
        soft = (real_patches(call[1]).sum(-1) // merge_size ** 2).tolist()
        return [rows[:count] for rows, count in zip(features, soft)]

    def verification_calls(self, encoder: LoadedEncoder, config: IpcvConfig, smallest: int,
                           generator: torch.Generator) -> list[Call]:
        k = encoder.merge_size
        return [padded_inputs([(cols * k, rows * k) for cols, rows in cells], length * k * k, encoder.input_width,
                              generator) for cells, length in VERIFY_PADDED]

    def check_call(self, run: Callable[..., tuple[torch.Tensor, ...]], encoder: LoadedEncoder, config: IpcvConfig,
                   call: Call, tolerance: Tolerance) -> ParityCheck:
        pixels, positions = call
        return check_padded_parity(run, encoder.description.padded.parts(encoder.module), config, pixels, positions,
                                   tolerance)

    def extreme_calls(self, inputs: dict) -> dict[str, dict[str, np.ndarray | Bounded]]:
        """The longest row with one square image, and the most images of it with positions only bounded."""
        names = [tensor["name"] for tensor in inputs["tensors"]]
        k, width = inputs["merge_size"], inputs["input_width"]
        length, table = inputs["max_tokens"], inputs["position_table"]
        side = min(int(math.isqrt(length)), table) // k * k
        rows, columns = np.divmod(np.arange(side * side), side)
        positions = np.full((1, length, 2), -1, dtype=np.int64)
        positions[0, :side * side] = np.stack([columns, rows], -1)
        return {"image": {names[0]: Bounded(UNBOUNDED, (1, length, width)), names[1]: positions},
                "images": {names[0]: Bounded(UNBOUNDED, (inputs["max_images"], length, width)),
                           names[1]: Bounded((-1.0, table - 1.0), (inputs["max_images"], length, 2), True)}}

    def engine_shapes(self, inputs: dict, profile: ShapeProfile, most_images: int) -> Shapes:
        """1 / 1 / most_images images of P = min / opt / max patches."""
        width = inputs["input_width"]
        counts = (1, 1, most_images)
        lengths = (profile.min_tokens, profile.opt_tokens, profile.max_tokens)
        return {"pixel_values": tuple((b, p, width) for b, p in zip(counts, lengths)),
                "image_position_ids": tuple((b, p, 2) for b, p in zip(counts, lengths))}


def padded_inputs(grids: list[tuple[int, int]], patches: int, width: int,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A padded tower's (pixel_values [B, P, width] in [0, 1], image_position_ids [B, P, 2]) for
    images of (columns, rows) patches, each padded to P = `patches` as the processor pads: real
    patches first in row-major order with their (x, y), then zero pixels at (-1, -1)."""
    pixels = torch.rand(len(grids), patches, width, generator=generator)
    positions = torch.full((len(grids), patches, 2), -1, dtype=torch.int64)
    for image, (cols, rows) in enumerate(grids):
        y, x = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
        positions[image, :rows * cols] = torch.stack([x.flatten(), y.flatten()], -1)
        pixels[image, rows * cols:] = 0
    return pixels, positions


PADDED = Padded()
