"""ONNX file -> serialized TensorRT engine, with the TensorRT Python API (TensorRT 10).

The engine is built from the verified ONNX file with one optimisation profile (over N for packed
towers; over the number of images and their height and width for towers that batch whole
images), the precision flag asked for, and a timing cache file reused across builds (it makes
rebuilds of the same model take seconds instead of minutes). Where `tensorrt` is not importable,
the pipeline keeps the ONNX file and prints `trtexec_command(...)`, which builds the same engine.
"""

from __future__ import annotations

import importlib.util
import shlex
from pathlib import Path

from ..config import ShapeProfile, UsageError
from ..layouts import LAYOUTS
from ..layouts.base import Shapes

INSTALL_HINT = "pip install tensorrt (needs NVIDIA's package index and a CUDA GPU)"


class TensorRTMissing(RuntimeError):
    """`tensorrt` cannot be imported here; the message says what to do instead."""


def tensorrt_available() -> bool:
    return importlib.util.find_spec("tensorrt") is not None


ENGINE_MAX_IMAGES = 16
"""Images (tiles, videos) per call an engine accepts: InternVL's 12 tiles and a thumbnail,
LLaVA-NeXT's 5 tiles fit; for packed towers, rows of image_grid_thw."""


def profile_shapes(inputs: dict, profile: ShapeProfile) -> Shapes:
    """The profile's input shapes from the manifest's `inputs` (its layout's `engine_shapes`, up to
    ENGINE_MAX_IMAGES images); a manifest without a layout is packed."""
    return LAYOUTS[inputs.get("layout", "packed")].engine_shapes(inputs, profile, ENGINE_MAX_IMAGES)


def trtexec_command(onnx_path: Path, engine_path: Path, shapes: Shapes, precision: str,
                    timing_cache: Path | None = None) -> str:
    """The trtexec command line that builds the same engine as `build_engine`."""
    def flag(which: int) -> str:
        return ",".join(f"{name}:{'x'.join(map(str, bounds[which]))}" for name, bounds in shapes.items())

    args = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={engine_path}",
            f"--minShapes={flag(0)}", f"--optShapes={flag(1)}", f"--maxShapes={flag(2)}"]
    if precision != "fp32":
        args.append(f"--{precision}")
    if timing_cache is not None:
        args.append(f"--timingCacheFile={timing_cache}")
    return shlex.join(args)


def build_engine(onnx_path: Path, engine_path: Path, shapes: Shapes, precision: str = "fp32",
                 timing_cache: Path | None = None) -> Path:
    """Parse `onnx_path`, build for the profile `shapes` and `precision`, write the serialized engine.

    The caller makes the write atomic (engine_path is a temporary name). The timing cache is read
    if it exists and written back after the build.
    """
    try:
        import tensorrt as trt
    except ImportError as err:
        raise TensorRTMissing(f"tensorrt is not importable ({err}); {INSTALL_HINT}") from None

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UsageError(f"TensorRT could not parse {onnx_path.name}: {errors}")

    config = builder.create_builder_config()
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    optimisation = builder.create_optimization_profile()
    for name, (minimum, optimum, maximum) in shapes.items():
        optimisation.set_shape(name, minimum, optimum, maximum)
    config.add_optimization_profile(optimisation)
    cache_bytes = timing_cache.read_bytes() if timing_cache is not None and timing_cache.exists() else b""
    config.set_timing_cache(config.create_timing_cache(cache_bytes), ignore_mismatch=False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT failed to build the engine (see its log above)")
    engine_path.write_bytes(bytes(serialized))
    if timing_cache is not None:
        timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    return engine_path
