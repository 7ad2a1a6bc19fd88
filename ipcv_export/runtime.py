"""Run an exported encoder file with the call `encoder(pixel_values, grid_thw) -> embeddings`.

Nothing here is needed at serving time: a runtime feeds the file what the model's processor gives
(pixel_values, and image_grid_thw for packed towers). This module is the convenience and test harness in Python, one
class per file format, all behind `load(path)`. What a file needs besides itself (merge size,
smallest N, the image processor's settings) is in the manifest `<file>.json` written beside it;
ONNX files also carry the first two as metadata, so they load without the manifest.
"""

from __future__ import annotations

import zipfile
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .config import UsageError, first_line, read_json_object
from .inputs import check_grid, real_patches, slice_lengths
from .tokens import min_side

ONNX_PROVIDERS = ("CPUExecutionProvider",)


class EncoderFile(ABC):
    """Shared input preparation and checks; subclasses run the prepared tensors."""

    def __init__(self, path: Path, manifest: dict | None, merge_size: int, min_tokens: int, input_width: int,
                 patch_size: int | None = None, padded: bool = False) -> None:
        self.path = path
        self.manifest = manifest or {}
        self.merge_size = merge_size
        self.min_tokens = min_tokens
        self.input_width = input_width
        self.patch_size = patch_size  # set for files of towers that batch whole images
        self.padded = padded  # files of towers whose images come as padded patch rows (Gemma 4)

    def __call__(self, pixel_values: torch.Tensor | np.ndarray, grid_thw: torch.Tensor | None = None) -> torch.Tensor:
        """The merged embeddings [N / merge^2, hidden], as the stock module's forward returns them;
        for a batched tower (no grid_thw), its tokens [B, T, D]; for a padded tower (its
        image_position_ids in place of grid_thw), its soft tokens [B, P / k^2, hidden]."""
        return self.run_all(pixel_values, grid_thw)[0]

    def run_all(self, pixel_values: torch.Tensor | np.ndarray,
                grid_thw: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """Every output of the file: image_features, then kept_index and neighbor_index where the
        file has them (ipcv-export --diagnostic-outputs; engines and .pt2 files always)."""
        pixels = torch.as_tensor(pixel_values)
        if pixels.dtype != torch.float32:
            raise ValueError(f"pixel_values must be float32, got {pixels.dtype}")
        if self.padded:
            inputs = self._padded(pixels, grid_thw)
        else:
            inputs = self._image_batch(pixels) if self.patch_size else self._packed(pixels, grid_thw)
        return tuple(t.cpu() for t in self._run(*inputs))

    def _packed(self, pixels: torch.Tensor, grid_thw: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        if grid_thw is None:
            raise ValueError("this file takes packed patches: pass grid_thw with pixel_values")
        grid = torch.as_tensor(grid_thw)
        if grid.dtype != torch.int64:
            raise ValueError(f"grid_thw must be int64, as the file declares image_grid_thw, got {grid.dtype}")
        grid = check_grid(grid, self.merge_size)
        patches = sum(slice_lengths(grid))
        if pixels.ndim != 2 or pixels.shape[1] != self.input_width:
            raise ValueError(f"pixel_values must have shape [N, {self.input_width}], got {list(pixels.shape)}")
        if pixels.shape[0] != patches:
            raise ValueError(f"pixel_values has {pixels.shape[0]} rows but grid_thw describes {patches} patches")
        if patches < self.min_tokens:
            raise ValueError(f"this file needs at least {self.min_tokens} patches per call, got {patches}")
        largest, images = self._limit("max_tokens"), self._limit("max_images")
        if largest and patches > largest:
            raise ValueError(f"this file takes at most {largest} patches per call, got {patches}: split the call")
        if images and len(grid) > images:
            raise ValueError(f"this file takes at most {images} images per call, got {len(grid)}: split the call")
        return pixels, grid

    def _limit(self, name: str) -> int | None:
        """A size limit the manifest records (the exported graph's dynamic range), None without one."""
        return self.manifest.get("inputs", {}).get(name)

    def _image_batch(self, pixels: torch.Tensor) -> tuple[torch.Tensor]:
        p, multiple = self.patch_size, self.merge_size
        if pixels.ndim != 4 or pixels.shape[1] != self.input_width:
            raise ValueError(f"pixel_values must have shape [B, {self.input_width}, H, W], got {list(pixels.shape)}")
        side = min_side(self.min_tokens, multiple)
        if min(pixels.shape[2:]) < side * p:
            raise ValueError(f"images are too small for this file: each side needs at least {side} patches of {p} pixels")
        images, side_px = self._limit("max_images"), self._limit("max_side")
        if images and pixels.shape[0] > images:
            raise ValueError(f"this file takes at most {images} images per call, got {pixels.shape[0]}")
        if side_px and max(pixels.shape[2:]) > side_px:
            raise ValueError(f"image sides may be at most {side_px} pixels for this file, got {list(pixels.shape[2:])}")
        if pixels.shape[2] % (p * multiple) or pixels.shape[3] % (p * multiple):
            unit = f"the patch size {p}" if multiple == 1 else f"{p * multiple} ({multiple} patches of {p})"
            raise ValueError(f"image height and width must be multiples of {unit}, got {list(pixels.shape[2:])}")
        return (pixels,)

    def _padded(self, pixels: torch.Tensor, position_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """pixel_values [B, P, w] and image_position_ids [B, P, 2] as the processor pads them."""
        if position_ids is None:
            raise ValueError("this file takes padded patches: pass image_position_ids with pixel_values")
        positions = torch.as_tensor(position_ids)
        square = self.merge_size ** 2
        if pixels.ndim != 3 or pixels.shape[2] != self.input_width:
            raise ValueError(f"pixel_values must have shape [B, P, {self.input_width}], got {list(pixels.shape)}")
        if positions.dtype != torch.int64 or list(positions.shape) != [*pixels.shape[:2], 2]:
            raise ValueError(f"image_position_ids must be int64 of shape {[*pixels.shape[:2], 2]}, got "
                             f"{positions.dtype} {list(positions.shape)}")
        patches, images = pixels.shape[1], pixels.shape[0]
        if patches % square or patches < self.min_tokens:
            raise ValueError(f"the padded length P must be a multiple of {square} and at least {self.min_tokens}, "
                             f"got {patches}")
        largest, most, table = self._limit("max_tokens"), self._limit("max_images"), self._limit("position_table")
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

    @abstractmethod
    def _run(self, *inputs: torch.Tensor) -> Sequence[torch.Tensor]:
        """The file's outputs for checked inputs, in its input order (the format's own runtime call)."""

    def preprocess(self, images: Sequence, min_pixels: int | None = None,
                   max_pixels: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(pixel_values, grid_thw) of PIL images from the model's own image processor
        ((pixel_values, image_position_ids) for a padded tower).

        The processor's settings come from the manifest (the checkpoint's preprocessor_config.json
        or the built-in model's); min_pixels / max_pixels override its resize bounds.
        """
        import transformers

        settings = self.manifest.get("preprocessing")
        if self.patch_size:
            raise ValueError(f"{self.path.name} takes image batches [B, C, H, W]: resize and normalise them with "
                             f"{settings['class'] if settings else 'the model processor'}, then call the encoder")
        if not settings:
            raise ValueError(f"{self.path.name} has no manifest with preprocessing settings beside it")
        kwargs = dict(settings["kwargs"])
        if self.padded:
            if min_pixels is not None or max_pixels is not None:
                raise UsageError(f"{self.path.name} sizes images by its soft-token budget, not min/max pixels")
            batch = getattr(transformers, settings["class"])(**kwargs)(images=list(images), return_tensors="pt")
            return batch["pixel_values"].float(), batch["image_position_ids"]
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

    def encode_images(self, images: Sequence, min_pixels: int | None = None,
                      max_pixels: int | None = None) -> list[torch.Tensor]:
        """Embeddings of each PIL image, preprocessed as `preprocess` does. All images go through
        one encoder call; the result is split back per image."""
        pixel_values, grid = self.preprocess(images, min_pixels, max_pixels)
        embeddings = self(pixel_values, grid)
        if self.padded:  # image b's soft tokens are its first (real patches / k^2) rows
            soft = (real_patches(grid).sum(-1) // self.merge_size ** 2).tolist()
            return [rows[:count] for rows, count in zip(embeddings, soft)]
        return list(embeddings.split((grid.prod(-1) // self.merge_size ** 2).tolist()))


def _input_geometry(path: Path, manifest: dict) -> tuple[int, int, int, int | None, bool]:
    """(merge_size, min_tokens, input_width, patch_size, padded) from the manifest of a file whose format
    carries no metadata of its own (.pt2, .engine); UsageError naming a missing entry."""
    try:
        inputs = manifest["inputs"]
        refuse_earlier_contract(path, [t["name"] for t in inputs["tensors"]])
        padded = inputs["layout"] == "padded"
        return (inputs["merge_size"], inputs["min_tokens"], inputs["input_width"],
                None if padded else inputs.get("patch_size"), padded)
    except KeyError as err:
        raise UsageError(f"manifest {path.name}.json lacks {err.args[0]!r} under inputs: it was not written by "
                         "ipcv-export, or was edited") from None


EARLIER_INPUTS = ("position_ids", "segment_ids")
"""Inputs of packed-tower files written before the files computed them from image_grid_thw."""


def refuse_earlier_contract(path: Path, input_names: Sequence[str]) -> None:
    """UsageError for a file that wants position_ids and segment_ids from its caller: the runtimes
    feed pixel_values and image_grid_thw only."""
    if any(name in EARLIER_INPUTS for name in input_names):
        raise UsageError(f"{path.name} was exported by an earlier ipcv-export (inputs {', '.join(input_names)}); "
                         "re-export it with this version, whose files take pixel_values and image_grid_thw")


def _onnx_geometry(path: Path, input_names: Sequence[str], metadata: dict[str, str],
                   pixel_shape: Sequence) -> tuple[int, int, int, int | None, bool]:
    """(merge_size, min_tokens, input_width, patch_size, padded) of an `.onnx` file, from the
    metadata it carries and its pixel_values shape, whichever runtime opened it."""
    refuse_earlier_contract(path, input_names)
    patch, padded = metadata.get("patch_size"), metadata.get("layout") == "padded"
    return (int(metadata.get("merge_size", 2)), int(metadata.get("min_tokens", 1)),
            pixel_shape[-1] if padded else pixel_shape[1], int(patch) if patch and not padded else None, padded)


class OnnxEncoder(EncoderFile):
    """An `.onnx` file in ONNX Runtime (CPU unless other execution providers are given)."""

    def __init__(self, path: Path, manifest: dict | None = None, providers: Sequence[str] = ONNX_PROVIDERS) -> None:
        import onnxruntime

        available = onnxruntime.get_available_providers()
        missing = [p for p in providers if p not in available]
        if missing:
            raise ValueError(f"ONNX Runtime here lacks {', '.join(missing)}; available: {', '.join(available)}")
        self.session = onnxruntime.InferenceSession(str(path), providers=list(providers))
        inputs = self.session.get_inputs()
        super().__init__(path, manifest, *_onnx_geometry(path, [arg.name for arg in inputs],
                                                          self.session.get_modelmeta().custom_metadata_map,
                                                          inputs[0].shape))

    def _run(self, *inputs):
        feeds = {arg.name: tensor.numpy() for arg, tensor in zip(self.session.get_inputs(), inputs)}
        return [torch.from_numpy(out) for out in self.session.run(None, feeds)]


OPENVINO_EXTRA = "pip install 'ipcv-export[openvino]'"


class OpenVinoEncoder(EncoderFile):
    """An `.onnx` file in OpenVINO, f32 unless asked otherwise: on CPUs with AVX512-BF16 its
    default is bf16, whose rounding changes which tokens are kept (serving-runtimes.md)."""

    def __init__(self, path: Path, manifest: dict | None = None, device: str = "CPU",
                 precision: str = "f32") -> None:
        try:
            import openvino
        except ImportError:
            raise UsageError(f"OpenVINO is not installed here: {OPENVINO_EXTRA}") from None
        import onnx

        core = openvino.Core()
        model = core.read_model(str(path))
        self.compiled = core.compile_model(model, device.upper(), {"INFERENCE_PRECISION_HINT": precision})
        header = onnx.load(str(path), load_external_data=False)
        metadata = {prop.key: prop.value for prop in header.metadata_props}
        names = [value.get_any_name() for value in model.inputs]
        pixels = [dim.get_length() if dim.is_static else None for dim in model.inputs[0].get_partial_shape()]
        super().__init__(path, manifest, *_onnx_geometry(path, names, metadata, pixels))
        self.names = names

    def _run(self, *inputs):
        results = self.compiled(dict(zip(self.names, (tensor.numpy() for tensor in inputs))))
        return [torch.from_numpy(results[output].copy()) for output in self.compiled.outputs]


class TorchEncoder(EncoderFile):
    """A `.pt2` file: an AOTInductor package or a saved ExportedProgram, run on `device`."""

    def __init__(self, path: Path, manifest: dict, device: str = "cpu") -> None:
        geometry = _input_geometry(path, manifest)
        self.device = torch.device(device)
        if is_aoti_package(path):
            self.module = torch._inductor.aoti_load_package(str(path))
        else:
            self.module = torch.export.load(str(path)).module().to(self.device)
        super().__init__(path, manifest, *geometry)

    def _run(self, *inputs):
        with torch.no_grad():
            return self.module(*(t.to(self.device) for t in inputs))


class TensorRTEncoder(EncoderFile):
    """A serialized TensorRT engine, run on the current CUDA device with torch-allocated buffers."""

    def __init__(self, path: Path, manifest: dict) -> None:
        import tensorrt as trt

        geometry = _input_geometry(path, manifest)
        self._trt = trt
        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(path.read_bytes())
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        super().__init__(path, manifest, *geometry)

    def _run(self, *inputs):
        trt = self._trt
        feeds = {name: t.cuda().contiguous() for name, t in zip(self.inputs, inputs)}
        for name, tensor in feeds.items():
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        results = []
        for name in self.outputs:
            dtype = torch.from_numpy(np.empty(0, trt.nptype(self.engine.get_tensor_dtype(name)))).dtype
            results.append(torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=dtype, device="cuda"))
            self.context.set_tensor_address(name, results[-1].data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        stream.synchronize()
        return results


def is_aoti_package(path: Path) -> bool:
    """AOTInductor packages hold compiled code under data/aotinductor/; saved programs do not."""
    with zipfile.ZipFile(path) as archive:
        return any("/data/aotinductor/" in name for name in archive.namelist())


def read_manifest(path: Path) -> dict | None:
    """The manifest beside an encoder file, None when there is none; UsageError when it is not a
    JSON object."""
    manifest = Path(f"{path}.json")
    return read_json_object(manifest) if manifest.is_file() else None


RUNTIMES = ("onnxruntime", "openvino")
"""What runs an `.onnx` file in `load`: ONNX Runtime (the default) or OpenVINO (an optional extra)."""


def load(path: str | Path, providers: Sequence[str] = ONNX_PROVIDERS, device: str = "cpu",
         runtime: str = "onnxruntime") -> EncoderFile:
    """Open an exported encoder file (.onnx, .pt2 or .engine) for `encoder(pixel_values, grid_thw)`.

    providers: ONNX Runtime execution providers for .onnx files, in order of preference.
    device: where a .pt2 program runs (an AOTInductor package runs where it was compiled for), or
    the OpenVINO device of an .onnx file run in OpenVINO.
    runtime: what runs an .onnx file, one of RUNTIMES; OpenVINO runs it in f32.
    """
    path = Path(path)
    if runtime not in RUNTIMES:
        raise UsageError(f"unknown runtime {runtime!r} for .onnx files; choose from {', '.join(RUNTIMES)}")
    if not path.is_file():
        raise UsageError(f"no encoder file at {path}")
    if path.suffix not in (".onnx", ".pt2", ".engine"):
        raise UsageError(f"cannot load {path.name}: supported formats are .onnx, .pt2, .engine")
    if runtime == "openvino" and path.suffix != ".onnx":
        raise UsageError(f"OpenVINO runs .onnx files; {path.name} is not one")
    manifest = read_manifest(path)
    if path.suffix == ".onnx":
        if runtime == "openvino":
            return OpenVinoEncoder(path, manifest, device)
        return OnnxEncoder(path, manifest, [providers] if isinstance(providers, str) else providers)
    if manifest is None:
        raise UsageError(f"{path.name} needs its manifest {path.name}.json beside it (merge size, input width)")
    if path.suffix == ".pt2":
        return TorchEncoder(path, manifest, device)
    return TensorRTEncoder(path, manifest)
