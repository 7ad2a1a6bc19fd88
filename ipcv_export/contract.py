"""The file's contract with a runtime: the names of its inputs and outputs, and the largest call
it takes (the limits every manifest states, the int32 check proves and the profile is cut from)."""

from __future__ import annotations

MAX_TOKENS = 65536
"""Patches per call (packed towers) or per padded row (padded towers) at most."""
MAX_IMAGES, MAX_SIDE = 256, 128
"""At most this many images per call (rows of image_grid_thw; images of a batched tower), and
patches per image side of a batched tower."""

INPUT_NAMES = ["pixel_values", "image_grid_thw"]
"""The inputs of a packed tower's file (a batched tower's: the first only), as its processor names them."""
PADDED_INPUT_NAMES = ["pixel_values", "image_position_ids"]
"""The inputs of a padded tower's file (Gemma 4), named as its processor names them."""

DIAGNOSTIC_NAMES = ["kept_index", "neighbor_index"]
"""The program's last two outputs: diagnostics (the parity gate reads them; `.onnx` files keep them
only when asked)."""


def feature_names(taps: int) -> list[str]:
    """The program's first outputs: `image_features` (the name ONNX Runtime GenAI reads), then one
    per tapped block, `deepstack_features_<i>` (the names TensorRT Edge-LLM reads), in stock order."""
    return ["image_features", *(f"deepstack_features_{i}" for i in range(taps))]


def output_names(taps: int = 0) -> list[str]:
    """Every output of the program of a tower with `taps` tapped blocks: features, then diagnostics."""
    return [*feature_names(taps), *DIAGNOSTIC_NAMES]


OUTPUT_NAMES = output_names()
"""The outputs of a tower without taps (every family but Qwen3-VL)."""
