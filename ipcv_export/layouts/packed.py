"""Packed patches (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5): every image's and video's patches in one
sequence, pixel_values [N, w] with image_grid_thw [S, 3] (t, h, w per image, in patches), as the
image processor gives them. N is one symbolic dimension, a multiple of merge^2 (the merger
concatenates merge^2 consecutive tokens), the number of images another."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..config import UsageError, first_line
from ..contract import INPUT_NAMES, MAX_IMAGES, MAX_TOKENS, output_names
from ..inputs import check_grid, slice_lengths, square_grid
from ..lower.int32_check import UNBOUNDED, Bounded
from ..verify import check_parity
from .base import Call, FileInputs, Layout, Shapes, TowerGeometry, processor_settings

if TYPE_CHECKING:
    from ..config import IpcvConfig, ShapeProfile
    from ..models.encoder import LoadedEncoder
    from ..verify import ParityCheck, Tolerance

EXAMPLE_GRID = torch.tensor([[1, 8, 8], [2, 4, 6]])
"""Two images, one of them a two-slice video, so that neither axis is specialised."""
VERIFY_GRIDS = ([[1, 16, 24]], [[1, 8, 8], [1, 12, 8]], [[3, 8, 8]])
"""Single image, two images of different sizes, a 3-slice video: none is the capture example."""


class Packed(Layout):
    name = "packed"
    input_names = tuple(INPUT_NAMES)
    largest = MAX_TOKENS

    def geometry(self, encoder: LoadedEncoder) -> TowerGeometry:
        c = encoder.vision_config
        return TowerGeometry(c.depth, getattr(c, "spatial_merge_size", 1), c.patch_size, c.in_channels,
                             c.in_channels * c.temporal_patch_size * c.patch_size * c.patch_size)

    def example_inputs(self, encoder: LoadedEncoder, smallest: int = 1) -> Call:
        """The grid EXAMPLE_GRID, whatever `smallest`."""
        generator = torch.Generator().manual_seed(0)
        patches = int(EXAMPLE_GRID.prod(1).sum())
        return torch.randn(patches, encoder.input_width, generator=generator), EXAMPLE_GRID.clone()

    def dynamic_shapes(self, encoder: LoadedEncoder, smallest: int = 1) -> tuple[dict, ...]:
        """N = merge^2 * groups rows of pixel_values, groups in [ceil(smallest / merge^2),
        MAX_TOKENS / merge^2], and 1 to MAX_IMAGES rows of image_grid_thw."""
        group = encoder.merge_size ** 2
        groups = torch.export.Dim("groups", min=max(1, -(-smallest // group)), max=MAX_TOKENS // group)
        return {0: groups * group}, {0: torch.export.Dim("images", min=1, max=MAX_IMAGES)}

    def counting_inputs(self, encoder: LoadedEncoder, tokens: int) -> Call:
        """One segment of the most nearly square grid."""
        rows, cols = square_grid(tokens, encoder.merge_size)
        return torch.empty(tokens, encoder.input_width), torch.tensor([[1, rows, cols]])

    def manifest_io(self, encoder: LoadedEncoder, config: IpcvConfig, smallest: int) -> tuple[dict, list[dict]]:
        merge = encoder.merge_size
        inputs = {
            "layout": self.name, "merge_size": merge, "input_width": encoder.input_width, "min_tokens": smallest,
            "max_tokens": MAX_TOKENS, "max_images": MAX_IMAGES,
            "tensors": [{"name": INPUT_NAMES[0], "dtype": "float32", "shape": ["N", encoder.input_width]},
                        {"name": INPUT_NAMES[1], "dtype": "int64", "shape": ["S", 3]}],
            "rules": f"the image processor's pixel_values and image_grid_thw as they come: rows (t, h, w) in "
                     f"patches, h and w multiples of {merge}, 1 <= S <= {MAX_IMAGES}; N = sum of t*h*w; "
                     f"{-(-smallest // merge ** 2) * merge ** 2} <= N <= {MAX_TOKENS}",
        }
        names = output_names(len(encoder.tap_blocks))
        features, (kept, neighbors) = names[:-2], names[-2:]
        outputs = [{"name": features[0], "dtype": "float32", "shape": [f"N/{merge * merge}", "hidden"],
                    "meaning": "merged embeddings, the original encoder's output in count and order"},
                   *({"name": name, "dtype": "float32", "shape": [f"N/{merge * merge}", "hidden"],
                      "meaning": f"block {block}'s own merger on every token in its place (DeepStack), as the "
                                 f"original encoder's deepstack_features[{index}]"}
                     for index, (name, block) in enumerate(zip(features[1:], encoder.tap_blocks))),
                   {"name": kept, "dtype": "int64", "shape": ["K"],
                    "meaning": f"ascending indices of the kept tokens, K = N*{config.retention_e4}//10000"},
                   {"name": neighbors, "dtype": "int64", "shape": ["N-K", config.neighbors],
                    "meaning": "indices into kept_index of each removed token's neighbours; K means none"}]
        return inputs, outputs

    def check_inputs(self, pixels: torch.Tensor, second: torch.Tensor | None, file: FileInputs) -> Call:
        if second is None:
            raise ValueError("this file takes packed patches: pass grid_thw with pixel_values")
        grid = torch.as_tensor(second)
        if grid.dtype != torch.int64:
            raise ValueError(f"grid_thw must be int64, as the file declares image_grid_thw, got {grid.dtype}")
        grid = check_grid(grid, file.merge_size)
        patches = sum(slice_lengths(grid))
        if pixels.ndim != 2 or pixels.shape[1] != file.input_width:
            raise ValueError(f"pixel_values must have shape [N, {file.input_width}], got {list(pixels.shape)}")
        if pixels.shape[0] != patches:
            raise ValueError(f"pixel_values has {pixels.shape[0]} rows but grid_thw describes {patches} patches")
        if patches < file.min_tokens:
            raise ValueError(f"this file needs at least {file.min_tokens} patches per call, got {patches}")
        largest, images = file.limit("max_tokens"), file.limit("max_images")
        if largest and patches > largest:
            raise ValueError(f"this file takes at most {largest} patches per call, got {patches}: split the call")
        if images and len(grid) > images:
            raise ValueError(f"this file takes at most {images} images per call, got {len(grid)}: split the call")
        return pixels, grid

    def preprocess(self, settings: dict, images: Sequence, min_pixels: int | None, max_pixels: int | None,
                   file_name: str) -> Call:
        import transformers

        settings = processor_settings(settings, file_name)
        kwargs = dict(settings["kwargs"])
        size = dict(kwargs.pop("size", {}))
        if min_pixels is not None:
            size["shortest_edge"] = min_pixels
        if max_pixels is not None:
            size["longest_edge"] = max_pixels
        processor = getattr(transformers, settings["class"])(size=size, **kwargs)
        try:
            batch = processor(images=list(images), return_tensors="pt")
        except ValueError as err:  # e.g. an aspect ratio above the processor's limit
            raise UsageError(f"the image processor refused an image: {first_line(err)}") from None
        return batch["pixel_values"].float(), batch["image_grid_thw"]

    def per_image(self, features: torch.Tensor, call: Call, merge_size: int) -> list[torch.Tensor]:
        """Each image's merged tokens, t*h*w / merge^2 rows in call order."""
        return list(features.split((call[1].prod(-1) // merge_size ** 2).tolist()))

    def verification_calls(self, encoder: LoadedEncoder, config: IpcvConfig, smallest: int,
                           generator: torch.Generator) -> list[Call]:
        calls = []
        for grid in VERIFY_GRIDS:
            grid_thw = torch.tensor(grid)
            calls.append((torch.randn(int(grid_thw.prod(-1).sum()), encoder.input_width, generator=generator), grid_thw))
        return calls

    def check_call(self, run: Callable[..., tuple[torch.Tensor, ...]], encoder: LoadedEncoder, config: IpcvConfig,
                   call: Call, tolerance: Tolerance) -> ParityCheck:
        pixels, grid_thw = call
        return check_parity(run, encoder.module, config, grid_thw, pixels, tolerance, encoder.description)

    def extreme_calls(self, inputs: dict) -> dict[str, dict[str, np.ndarray | Bounded]]:
        """The most patches as one strip, one column, one square image and a video of the smallest
        slices, and the most images."""
        names = [tensor["name"] for tensor in inputs["tensors"]]
        k, width = inputs["merge_size"], inputs["input_width"]
        most, images = inputs["max_tokens"] // (k * k) * (k * k), inputs["max_images"]
        side = int(math.isqrt(most)) // k * k
        grids = {"strip": [[1, k, most // k]], "column": [[1, most // k, k]], "square": [[1, side, side]],
                 "video": [[most // (k * k), k, k]],
                 "images": [[1, k, k]] * (images - 1) + [[1, k, (most - k * k * (images - 1)) // k]]}
        return {call: {names[0]: Bounded(UNBOUNDED, (sum(t * h * w for t, h, w in grid), width)),
                       names[1]: np.array(grid, dtype=np.int64)} for call, grid in grids.items()}

    def engine_shapes(self, inputs: dict, profile: ShapeProfile, most_images: int) -> Shapes:
        """N = min / opt / max patches per call in pixel_values, 1 / 1 / most_images rows of image_grid_thw."""
        width = inputs["input_width"]
        return {"pixel_values": tuple((n, width) for n in (profile.min_tokens, profile.opt_tokens, profile.max_tokens)),
                "image_grid_thw": ((1, 3), (1, 3), (most_images, 3))}


PACKED = Packed()
