"""The pipeline, top to bottom: load -> capture -> passes -> lower -> verify -> write.

Each stage reports one line with its time. The file is written under a temporary name in the
output folder and renamed only after verification passes, so a failure or Ctrl-C never leaves a
half-written or unverified file under the requested name.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__
from .capture import capture
from .compress import OUTPUT_NAMES, compress
from .config import IpcvConfig, UsageError
from .lower.onnx import DEFAULT_OPSET, to_onnx
from .models import LoadedEncoder, load_encoder
from .runtime import OnnxEncoder
from .tokens import min_tokens
from .verify import ParityCheck, check_parity

VERIFY_GRIDS = ([[1, 16, 24]], [[1, 8, 8], [1, 12, 8]], [[3, 8, 8]])
"""Single image, two images of different sizes, a 3-slice video: none is the capture example."""
FP32_ATOL = 1e-4


@dataclass
class ExportResult:
    path: Path
    manifest: dict = field(default_factory=dict)


def export(model: str | LoadedEncoder, output: str | Path, config: IpcvConfig = IpcvConfig(), *,
           opset: int = DEFAULT_OPSET, verify: bool = True,
           report: Callable[[str], None] = print) -> ExportResult:
    """Export `model` (built-in name, checkpoint folder or LoadedEncoder) with IPCV to `output` (.onnx)."""
    output = Path(output)
    _check_output(output)
    timings: dict[str, float] = {}

    with _stage("load", timings, report):
        encoder = model if isinstance(model, LoadedEncoder) else load_encoder(model)
        config.check(encoder.depth)
    with _stage("capture", timings, report):
        program = capture(encoder)
    with _stage("passes", timings, report):
        program = compress(program, encoder, config)
    with _atomic_path(output) as partial:
        with _stage("lower", timings, report):
            metadata = {"merge_size": str(encoder.merge_size), "min_tokens": str(min_tokens(config.retention_e4)),
                        "ipcv_export_version": __version__}
            to_onnx(program, partial, OUTPUT_NAMES, opset, metadata)
        checks: list[ParityCheck] = []
        if verify:
            with _stage("verify", timings, report):
                checks = _verify(partial, encoder, config)
        else:
            report("verify: SKIPPED (--skip-verify): this file was not checked against the reference")
    manifest = _manifest(encoder, config, opset, checks, verify, timings)
    _atomic_write_text(Path(f"{output}.json"), json.dumps(manifest, indent=2))
    report(f"wrote {output} ({output.stat().st_size / 1e6:.1f} MB) and {output}.json")
    return ExportResult(output, manifest)


def _check_output(output: Path) -> None:
    if output.suffix != ".onnx":
        raise UsageError(f"unsupported output format {output.suffix or '(none)'!r} for {output}: use .onnx")
    folder = output.parent
    if not folder.is_dir():
        raise UsageError(f"output folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"output folder {folder} is not writable")


@contextlib.contextmanager
def _stage(name: str, timings: dict[str, float], report: Callable[[str], None]) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - start, 3)
    report(f"{name}: {timings[name]:.1f} s")


@contextlib.contextmanager
def _atomic_path(target: Path) -> Iterator[Path]:
    """A temporary path beside `target`, renamed onto it (with its external data) on success only."""
    handle, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial.onnx", dir=target.parent)
    os.close(handle)
    partial = Path(name)
    data = Path(f"{partial}.data")
    try:
        yield partial
        if data.exists():
            raise UsageError("models over 2 GB (external data) are not supported by this version's atomic writer")
        _make_readable(partial)
        os.replace(partial, target)
    finally:
        for leftover in (partial, data):
            leftover.unlink(missing_ok=True)


def _atomic_write_text(path: Path, text: str) -> None:
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(handle, "w") as f:
        f.write(text)
    _make_readable(Path(name))
    os.replace(name, path)


def _make_readable(path: Path) -> None:
    """mkstemp creates files private (0600); give them the permissions a plain open() would."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)


def _verify(path: Path, encoder: LoadedEncoder, config: IpcvConfig) -> list[ParityCheck]:
    runner = OnnxEncoder(path)
    generator = torch.Generator().manual_seed(1)
    checks = []
    for grid in VERIFY_GRIDS:
        grid_thw = torch.tensor(grid)
        pixels = torch.randn(int(grid_thw.prod(-1).sum()), encoder.input_width, generator=generator)
        checks.append(check_parity(runner.run_all, encoder.module, config, grid_thw, pixels, FP32_ATOL))
    return checks


def _manifest(encoder: LoadedEncoder, config: IpcvConfig, opset: int, checks: list[ParityCheck],
              verified: bool, timings: dict[str, float]) -> dict:
    import onnx
    import onnxruntime
    import transformers

    return {
        "tool": {"name": "ipcv-export", "version": __version__},
        "source": encoder.source,
        "architecture": encoder.description.architecture,
        "ipcv": {"retention": config.retention, "prune_layer": config.prune_layer,
                 "as_depth": config.as_depth, "neighbors": config.neighbors},
        "inputs": {
            "pixel_values": "float32 [N, C*T*P*P]; N = sum over grid_thw rows of t*h*w",
            "position_ids": "int64 [N, 2]: (row, column) of each patch, merge x merge blocks in order",
            "segment_ids": "int64 [N]: index of the image or temporal slice of each patch",
            "rules": f"N a multiple of {encoder.merge_size ** 2}, N >= {min_tokens(config.retention_e4)}; "
                     "build position_ids/segment_ids with ipcv_export.inputs.engine_inputs(grid_thw, merge_size)",
        },
        "outputs": {"embeddings": "float32 [N / merge^2, hidden]", "kept_index": "int64 [K]",
                    "neighbor_index": f"int64 [N - K, {config.neighbors}]"},
        "precision": "fp32", "opset": opset,
        "verification": {"verified": verified, "atol": FP32_ATOL,
                         "checks": [vars(c) for c in checks]},
        "timings_s": timings,
        "packages": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
    }
