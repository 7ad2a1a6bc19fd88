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

from .config import UsageError, read_json_object
from .layouts import LAYOUTS
from .layouts.base import FileInputs, Layout

ONNX_PROVIDERS = ("CPUExecutionProvider",)


class EncoderFile(ABC):
    """Input preparation and checks (the file's layout's); subclasses run the prepared tensors."""

    def __init__(self, path: Path, manifest: dict | None, layout: Layout, inputs: FileInputs) -> None:
        self.path = path
        self.manifest = manifest or {}
        self.layout = layout
        self.expected = inputs

    @property
    def merge_size(self) -> int:
        """The multiple the file's grid sides must be (the merger's side, or a batched tower's grid multiple)."""
        return self.expected.merge_size

    @property
    def min_tokens(self) -> int:
        """The fewest patches per call (per image of a batched or padded file) the file takes."""
        return self.expected.min_tokens

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
        inputs = self.layout.check_inputs(pixels, grid_thw, self.expected)
        return tuple(t.cpu() for t in self._run(*inputs))

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
        settings = self.manifest.get("preprocessing") or {}
        return self.layout.preprocess(settings, images, min_pixels, max_pixels, self.path.name)

    def encode_images(self, images: Sequence, min_pixels: int | None = None,
                      max_pixels: int | None = None) -> list[torch.Tensor]:
        """Embeddings of each PIL image, preprocessed as `preprocess` does. All images go through
        one encoder call; the result is split back per image."""
        call = self.preprocess(images, min_pixels, max_pixels)
        return self.layout.per_image(self(*call), call, self.expected.merge_size)


def _manifest_inputs(path: Path, manifest: dict) -> tuple[Layout, FileInputs]:
    """The layout and inputs from the manifest of a file whose format carries no metadata of its
    own (.pt2, .engine); UsageError naming a missing entry."""
    try:
        inputs = manifest["inputs"]
        refuse_earlier_contract(path, [t["name"] for t in inputs["tensors"]])
        layout = LAYOUTS[inputs["layout"]]
        patch = inputs.get("patch_size") if layout.name == "images" else None
        return layout, FileInputs(inputs["merge_size"], inputs["min_tokens"], inputs["input_width"], patch, inputs)
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


def _onnx_inputs(path: Path, input_names: Sequence[str], metadata: dict[str, str], pixel_shape: Sequence,
                 manifest: dict | None) -> tuple[Layout, FileInputs]:
    """The layout and inputs of an `.onnx` file, from the metadata it carries (a `layout`, or a
    `patch_size` alone for a batch of images) and its pixel_values shape, whichever runtime opened
    it; the manifest beside it, where there is one, adds the size limits."""
    refuse_earlier_contract(path, input_names)
    patch = metadata.get("patch_size")
    layout = LAYOUTS[metadata.get("layout", "images" if patch else "packed")]
    width = pixel_shape[1] if layout.name == "images" else pixel_shape[-1]
    limits = (manifest or {}).get("inputs", {})
    return layout, FileInputs(int(metadata.get("merge_size", 2)), int(metadata.get("min_tokens", 1)), width,
                              int(patch) if layout.name == "images" else None, limits)


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
        super().__init__(path, manifest, *_onnx_inputs(path, [arg.name for arg in inputs],
                                                        self.session.get_modelmeta().custom_metadata_map,
                                                        inputs[0].shape, manifest))

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
        super().__init__(path, manifest, *_onnx_inputs(path, names, metadata, pixels, manifest))
        self.names = names

    def _run(self, *inputs):
        results = self.compiled(dict(zip(self.names, (tensor.numpy() for tensor in inputs))))
        return [torch.from_numpy(results[output].copy()) for output in self.compiled.outputs]


class TorchEncoder(EncoderFile):
    """A `.pt2` file: an AOTInductor package or a saved ExportedProgram, run on `device`."""

    def __init__(self, path: Path, manifest: dict, device: str = "cpu") -> None:
        layout, inputs = _manifest_inputs(path, manifest)
        self.device = torch.device(device)
        if is_aoti_package(path):
            self.module = torch._inductor.aoti_load_package(str(path))
        else:
            self.module = torch.export.load(str(path)).module().to(self.device)
        super().__init__(path, manifest, layout, inputs)

    def _run(self, *inputs):
        with torch.no_grad():
            return self.module(*(t.to(self.device) for t in inputs))


class TensorRTEncoder(EncoderFile):
    """A serialized TensorRT engine, run on the current CUDA device with torch-allocated buffers."""

    def __init__(self, path: Path, manifest: dict) -> None:
        import tensorrt as trt

        layout, inputs = _manifest_inputs(path, manifest)
        self._trt = trt
        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(path.read_bytes())
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        super().__init__(path, manifest, layout, inputs)

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
