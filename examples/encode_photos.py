"""Export the built-in tiny Qwen2-VL encoder with IPCV, then encode two photographs and a short video.

    .venv/bin/pip install -e '.[examples]'     # scikit-image, for its sample photographs
    .venv/bin/python examples/encode_photos.py [--retention 0.5] [--out out/example]

Prints, for each input, the token count, the time of the IPCV file and of the uncompressed file
(both exported by this tool, both run in ONNX Runtime), and the cosine similarity of their
embeddings. The tiny model has random weights: the figures show the mechanics, not fidelity.
"""

from __future__ import annotations

import argparse
import warnings
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from skimage import data

import ipcv_export


def video_pixels(frames: list[Image.Image], settings: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """pixel_values and grid_thw of a clip, laid out as Qwen2-VL's video processor does.

    transformers' video processor needs torchvision, which has no CPU wheel here, so the layout is
    written out: frames are normalised, grouped by `temporal_patch_size`, and cut into patches in
    merge x merge blocks; each row holds (channel, time, patch row, patch column).
    """
    kw = settings["kwargs"]
    p, m, tp = kw["patch_size"], kw["merge_size"], kw["temporal_patch_size"]
    clip = np.stack([np.asarray(f.convert("RGB"), dtype=np.float32) / 255 for f in frames])  # T H W C
    clip = (clip - np.array(kw["image_mean"])) / np.array(kw["image_std"])
    t, h, w = len(frames) // tp, clip.shape[1] // p, clip.shape[2] // p
    clip = clip.transpose(0, 3, 1, 2).reshape(t, tp, 3, h // m, m, p, w // m, m, p)
    rows = clip.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(t * h * w, 3 * tp * p * p)
    return torch.from_numpy(rows.astype(np.float32)), torch.tensor([[t, h, w]])


def moving_crop(photo: np.ndarray, frames: int = 4, size: int = 224, step: int = 24) -> list[Image.Image]:
    """A short synthetic pan across a photograph."""
    return [Image.fromarray(photo[:size, i * step:i * step + size]) for i in range(frames)]


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a, b, dim=-1).mean().item()


def timed(run, *args):
    start = time.perf_counter()
    result = run(*args)
    return result, (time.perf_counter() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--retention", type=float, default=0.5)
    parser.add_argument("--out", type=Path, default=Path("out/example"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecations inside torch's exporter

    quiet = {"report": lambda _line: None}
    ipcv_export.export("tiny-qwen2-vl", args.out / "ipcv.onnx", ipcv_export.Method(retention=args.retention), **quiet)
    ipcv_export.export("tiny-qwen2-vl", args.out / "original.onnx", ipcv_export.Method(retention=1.0), **quiet)
    compressed, original = ipcv_export.load(args.out / "ipcv.onnx"), ipcv_export.load(args.out / "original.onnx")

    photos = {"astronaut": Image.fromarray(data.astronaut()), "chelsea": Image.fromarray(data.chelsea())}
    bounds = {"min_pixels": 56 * 56, "max_pixels": 448 * 448}
    print(f"{'input':12s} {'tokens':>7s} {'ipcv ms':>8s} {'orig ms':>8s} {'cosine':>7s}")
    for name, photo in photos.items():
        (ours,), ms = timed(compressed.encode_images, [photo], *bounds.values())
        (theirs,), ms_original = timed(original.encode_images, [photo], *bounds.values())
        print(f"{name:12s} {len(ours):7d} {ms:8.1f} {ms_original:8.1f} {cosine(ours, theirs):7.4f}")

    pixels, grid = video_pixels(moving_crop(data.coffee()), compressed.manifest["preprocessing"])
    ours, ms = timed(compressed, pixels, grid)
    theirs, ms_original = timed(original, pixels, grid)
    print(f"{'video ' + 'x'.join(map(str, grid[0].tolist())):12s} {len(ours):7d} {ms:8.1f} {ms_original:8.1f} "
          f"{cosine(ours, theirs):7.4f}")
    ratio = compressed.manifest["compute"]["ratio"]
    print(f"expected compute of the IPCV file: {ratio:.3f} of the original at N={compressed.manifest['compute']['tokens']}")


if __name__ == "__main__":
    main()
