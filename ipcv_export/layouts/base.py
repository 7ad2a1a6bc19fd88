"""What every input layout provides: the pipeline, the checks and the FLOP count ask the encoder's
layout, never which layout it is."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch

if TYPE_CHECKING:
    from ..config import IpcvConfig, ShapeProfile
    from ..lower.int32_check import Bounded
    from ..models.encoder import LoadedEncoder
    from ..verify import ParityCheck, Tolerance

Call = tuple[torch.Tensor, ...]
"""A call's input tensors, in the file's input order."""
Shapes = dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]
"""Input name -> (min, opt, max) shape of an optimisation profile."""


@dataclass(frozen=True)
class TowerGeometry:
    """A loaded tower's sizes as its layout reads them from the module and its config.

    merge_size: tokens the merger concatenates per side (1 without one); for a batched tower the
        multiple its grid sides must be (InternVL's pixel shuffle merges 2 x 2); for a padded one
        the pooler's cell side.
    input_width: values per patch row of pixel_values (a batched tower's: its channels).
    native_patches: patches of one image at the size the tower was trained for or is padded to;
        None where images come in any size.
    position_table: rows per axis of a padded tower's position table, else None.
    """

    depth: int
    merge_size: int
    patch_size: int
    channels: int
    input_width: int
    special_tokens: int = 0
    native_patches: int | None = None
    position_table: int | None = None


@dataclass(frozen=True)
class FileInputs:
    """What an exported file takes, as its manifest or its ONNX metadata records it: `limits` are
    the manifest's `inputs` (max_tokens, max_images, max_side, position_table), empty without one."""

    merge_size: int
    min_tokens: int
    input_width: int
    patch_size: int | None = None
    limits: Mapping[str, int] = field(default_factory=dict)

    def limit(self, name: str) -> int | None:
        """A size limit the manifest records (the exported graph's dynamic range), None without one."""
        value = self.limits.get(name)
        return value if isinstance(value, int) else None


class Layout(ABC):
    """One way a family's encoder takes its images. `name` is the manifest's `inputs.layout`;
    `input_names` the file's inputs; `largest` the most patches a shape profile may reach (per call,
    or per image where the layout batches whole images)."""

    name: ClassVar[str]
    input_names: ClassVar[tuple[str, ...]]
    largest: ClassVar[int]

    @abstractmethod
    def geometry(self, encoder: LoadedEncoder) -> TowerGeometry:
        """The tower's sizes (blocks in the exported graph, merge, patch, input width...)."""

    @abstractmethod
    def example_inputs(self, encoder: LoadedEncoder, smallest: int = 1) -> Call:
        """Seeded inputs to capture with: no size may equal another or a bound (no specialisation);
        `smallest`: the fewest patches the file takes (compress.min_patches)."""

    @abstractmethod
    def dynamic_shapes(self, encoder: LoadedEncoder, smallest: int = 1) -> tuple[dict, ...]:
        """torch.export's dynamic shapes of the inputs, within the contract's limits."""

    @abstractmethod
    def counting_inputs(self, encoder: LoadedEncoder, tokens: int) -> Call:
        """Empty inputs (shapes only, for FLOP counting) of one image of `tokens` patches."""

    @abstractmethod
    def manifest_io(self, encoder: LoadedEncoder, config: IpcvConfig, smallest: int) -> tuple[dict, list[dict]]:
        """The manifest's `inputs` and `outputs` (diagnostics last) of a file for `config`."""

    def onnx_metadata(self, encoder: LoadedEncoder) -> dict[str, str]:
        """What the layout adds to an ONNX file's metadata (beside merge_size and min_tokens)."""
        return {}

    @abstractmethod
    def check_inputs(self, pixels: torch.Tensor, second: torch.Tensor | None, file: FileInputs) -> Call:
        """The call's inputs for a file taking `file`, from pixel_values and the processor's second
        tensor (image_grid_thw, image_position_ids; None where there is none); ValueError naming
        what is wrong."""

    @abstractmethod
    def preprocess(self, settings: dict, images: Sequence, min_pixels: int | None, max_pixels: int | None,
                   file_name: str) -> Call:
        """The call's inputs for PIL images from the model's own image processor (`settings`: the
        manifest's preprocessing, empty without a manifest); min_pixels / max_pixels override its
        resize bounds."""

    @abstractmethod
    def per_image(self, features: torch.Tensor, call: Call, merge_size: int) -> list[torch.Tensor]:
        """The features of a call split back per image."""

    @abstractmethod
    def verification_calls(self, encoder: LoadedEncoder, config: IpcvConfig, smallest: int,
                           generator: torch.Generator) -> list[Call]:
        """The calls the parity gate runs: several images of different sizes, none the capture example."""

    @abstractmethod
    def check_call(self, run: Callable[..., tuple[torch.Tensor, ...]], encoder: LoadedEncoder, config: IpcvConfig,
                   call: Call, tolerance: Tolerance) -> ParityCheck:
        """Run `run(*call)` and compare it with the eager reference (verify.py)."""

    @abstractmethod
    def extreme_calls(self, inputs: dict) -> dict[str, dict[str, np.ndarray | Bounded]]:
        """The largest calls a manifest's `inputs` allow, for the int32 check: each input's values,
        or its range and shape where the values are features."""

    @abstractmethod
    def engine_shapes(self, inputs: dict, profile: ShapeProfile, most_images: int) -> Shapes:
        """A TensorRT optimisation profile's input shapes from the manifest's `inputs`: 1 / 1 /
        `most_images` images of the profile's min / opt / max patches."""


def processor_settings(settings: dict, file_name: str) -> dict:
    """The manifest's preprocessing settings; ValueError when the file has no manifest to give them."""
    if not settings:
        raise ValueError(f"{file_name} has no manifest with preprocessing settings beside it")
    return settings
