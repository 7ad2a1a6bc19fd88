"""The file pipeline, top to bottom: load -> capture -> compress -> lower -> check -> verify -> write.

`export_file` composes the public steps: `capture.capture` (the stock module as an ExportedProgram),
`compress.compress` (the IPCV passes), `lower` (a file), `check` (static checks of an ONNX file)
and `verify` (the file against the eager reference). Each stage reports one line with its time.
Every file is first written into a private staging folder inside the output folder, checked, and
only then renamed onto the requested name (with its external data and manifest), so a failure or
Ctrl-C never leaves a half-written or unchecked file under that name, and an existing output is
replaced only on success. Serving folders are written by `folders/`, which call this pipeline.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from . import __version__, outputs
from .budget import choose_setting
from .capture import capture
from .compress import compress, min_patches
from .config import IpcvConfig, Method, ShapeProfile, Target, UsageError
from .contract import feature_names, output_names
from .flops import program_flops
from .layouts import LAYOUTS, layout_of
from .loading import load_encoder
from .lower import pt2, tensorrt
from .lower.int32_check import check_int32
from .lower.onnx import keep_outputs, to_onnx
from .lower.tensorrt_compat import TOPK_MAX_K, check_tensorrt_compat
from .manifest import build_manifest
from .models.encoder import LoadedEncoder
from .passes import check_supported
from .runtime import EncoderFile, OnnxEncoder, TensorRTEncoder, TorchEncoder
from .strategies import strategy_of
from .tokens import kept_count
from .verify import TOLERANCES, ParityCheck, Tolerance


class IncompatibleGraph(UsageError):
    """The ONNX graph fails a static check (TensorRT compatibility, integers within int32); nothing
    was kept."""


@dataclass
class ExportResult:
    path: Path
    manifest: dict = field(default_factory=dict)


def export_file(model: str | LoadedEncoder, target: Target | str | Path, method: Method = Method(), *,
                report: Callable[[str], None] = print, verbose: bool = False) -> ExportResult:
    """Export `model` (built-in name, checkpoint folder or LoadedEncoder) with the IPCV `method` to
    the file `target` (a Target, or just the output path); `api.export` is the public entry, which
    also writes serving folders. `verbose` reports per-grid diffs and every static-check finding.
    Raises UsageError (bad input), ParityError (the file disagrees with the reference),
    IncompatibleGraph, or tensorrt.TensorRTMissing (an engine was asked for; the checked ONNX file
    was written instead).
    """
    target = target if isinstance(target, Target) else Target(target)
    output, format = target.output, target.format
    _check_output(target)
    timings: dict[str, float] = {}
    with contextlib.ExitStack() as held:
        for name in _written_names(output, format):
            held.enter_context(outputs.locked(name))
        with _stage("load", timings, report):
            encoder = model if isinstance(model, LoadedEncoder) else load_encoder(model)
            config, profile, chosen = _resolve(encoder, method, target, report)
        with _stage("capture", timings, report, silent=True):
            original = capture(encoder)
        with _stage("passes", timings, report, silent=True):
            program = compress(original, encoder, config)
            compute = _compute(original, program, encoder, profile.opt_tokens)
        diagnostics = _diagnostics_kept(format, target.diagnostic_outputs)
        manifest = build_manifest(encoder, config, format, target.precision, target.opset, target.runtime, profile,
                                  compute, min_patches(config), diagnostics)
        if chosen:
            manifest["ipcv"]["chosen_for_budget"] = chosen
        with outputs.staging(output.parent) as staging:
            staged = staging / output.name
            lowered = "onnx" if format == "engine" else format  # engines are built from the checked ONNX file
            lowered_path = staged.with_suffix(".onnx") if format == "engine" else staged
            with _stage("lower", timings, report, f"({lowered})", silent=True):
                lower(program, lowered_path, lowered, encoder, config, opset=target.opset, runtime=target.runtime)
            if lowered == "onnx":
                with _stage("check", timings, report):
                    check(lowered_path, manifest, profile, report, verbose)
            manifest["verification"] = _verify_stage(lowered_path, lowered, manifest, encoder, config, target,
                                                     timings, report, verbose)
            if not diagnostics:  # an .onnx file (or the one kept for a missing TensorRT), after the gate
                keep_outputs(lowered_path, feature_names(len(encoder.tap_blocks)))
            if format == "engine":
                _build_engine(lowered_path, staged, output, manifest, profile, target, timings, report)
                manifest["verification"] = _verify_stage(staged, "engine", manifest, encoder, config, target,
                                                         timings, report, verbose)
            with _stage("write", timings, report):
                manifest["timings_s"] = timings
                outputs.write_manifest(staged, manifest)
                outputs.commit(staged, output)
    report(f"wrote {output} ({_size(output) / 1e6:.1f} MB) and {output}.json; expected compute "
           f"{compute['ratio']:.3f} of the original encoder at N={profile.opt_tokens} (FLOP count)")
    return ExportResult(output, manifest)


def lower(program: torch.export.ExportedProgram, path: Path, format: str, encoder: LoadedEncoder,
          config: IpcvConfig, *, opset: int, runtime: str) -> None:
    """Write `program` as a file of `format` at `path` (an ONNX file in the attention form of
    `runtime`, one of config.RUNTIMES)."""
    if format == "onnx":
        layout = layout_of(encoder)
        metadata = {"merge_size": str(encoder.merge_size), "min_tokens": str(min_patches(config)),
                    "ipcv_export_version": __version__, **layout.onnx_metadata(encoder)}
        to_onnx(program, path, output_names(len(encoder.tap_blocks)), opset, metadata, runtime,  # ops.ATTENTION_FORMS
                layout.input_names)
    elif format == "aoti":
        pt2.to_aoti(program, path)
    else:
        pt2.to_exported_program(program, path)


def check(path: Path, manifest: dict, profile: ShapeProfile, report: Callable[[str], None] = print,
          verbose: bool = False) -> None:
    """The static checks of an ONNX file, recorded in `manifest`: TensorRT compatibility (it
    refuses a file for TensorRT) and integers within int32 at the manifest's largest calls (it
    refuses any file). IncompatibleGraph on a refusal."""
    compat = check_tensorrt_compat(path, profile.max_tokens)
    manifest["tensorrt_compat"] = compat.as_dict()
    report(f"  {compat.summary()}")
    if verbose:
        for finding in compat.findings:
            report(f"  {finding}")
    int32 = check_int32(path, LAYOUTS[manifest["inputs"]["layout"]].extreme_calls(manifest["inputs"]))
    manifest["int32"] = int32.as_dict()
    report(f"  {int32.summary()}")
    if verbose:
        for finding in int32.findings[1:]:
            report(f"  {finding}")
    if manifest["runtime"] == "tensorrt" and not compat.ok:
        raise IncompatibleGraph(f"not TensorRT-compatible, no engine built: {compat.summary()}")
    if not int32.ok:
        raise IncompatibleGraph(f"refused, nothing written: {int32.summary()}")


def verify(path: Path, runtime: str, manifest: dict, encoder: LoadedEncoder, config: IpcvConfig, *,
           precision: str = "fp32", tolerance: Tolerance = TOLERANCES["fp32"], report: Callable[[str], None] = print,
           verbose: bool = False) -> dict:
    """Run the file (`runtime`: onnx, engine, or a .pt2 format; an engine's `precision`) on its
    layout's verification calls against the eager reference; the record for the manifest, or
    ParityError on a mismatch."""
    runner = _open(path, runtime, manifest)
    layout, strategy = layout_of(encoder), strategy_of(config)
    calls = strategy.verification_calls(layout, encoder, config, min_patches(config), torch.Generator().manual_seed(1))
    checks: list[ParityCheck] = []
    for call in tqdm(calls, desc="verify", leave=False, disable=not sys.stderr.isatty()):
        checks.append(strategy.check_call(layout, runner.run_all, encoder, config, call, tolerance))
        if verbose:
            report(f"  {checks[-1].grid}: max abs diff {checks[-1].max_abs_diff:.2e} (limit {checks[-1].limit:.1e})")
    return {"verified": True, "runtime": runtime, "precision": precision, "tolerance": vars(tolerance),
            "checks": [vars(c) for c in checks], "worst_abs_diff": max(c.max_abs_diff for c in checks)}


def _resolve(encoder: LoadedEncoder, method: Method, target: Target,
             report: Callable[[str], None]) -> tuple[IpcvConfig, ShapeProfile, dict | None]:
    """The configuration the file runs, its patch profile, and the budget's choice (None without
    a budget)."""
    config = encoder.method_config(**method.settings())
    opt_patches = target.opt_patches
    if opt_patches is None:
        opt_patches = encoder.native_patches or ShapeProfile().opt_tokens
    chosen = None
    if method.budget is not None:
        config, chosen = choose_setting(encoder, method.budget, opt_patches)
        report(f"  budget {method.budget}: {strategy_of(config).describe(config)}, {chosen['flop_ratio']:.3f} of the "
               f"original FLOPs "
               f"(measured worst-photo patch cosine {chosen['measured_worst_patch_cosine']:.3f})")
    config.check(encoder.depth)
    check_supported(config, encoder.description)
    group = encoder.merge_size ** 2  # the profile's defaults, rounded to the tower's multiple
    smallest = min_patches(config)
    default_least = max(ShapeProfile.min_tokens, strategy_of(config).default_min_patches(config))
    least = target.min_patches if target.min_patches is not None else -(-default_least // group) * group
    most = target.max_patches if target.max_patches is not None else ShapeProfile.max_tokens // group * group
    profile = ShapeProfile(least, opt_patches, most).check(encoder.merge_size, smallest, layout_of(encoder).largest)
    return _as_run(config, encoder, profile, report), profile, chosen


def _verify_stage(path: Path, runtime: str, manifest: dict, encoder: LoadedEncoder, config: IpcvConfig,
                  target: Target, timings: dict[str, float], report: Callable[[str], None], verbose: bool) -> dict:
    """`verify` as a timed stage at the file's precision (an engine's is the target's, every other
    file's fp32), or the record of its skipping (--skip-verify)."""
    if not target.verify:
        report("verify: SKIPPED (--skip-verify): this file was NOT checked against the reference")
        return {"verified": False, "skipped_by_user": True}
    precision = "fp32" if runtime != "engine" else target.precision
    tolerance = TOLERANCES[precision]
    if target.atol is not None:
        tolerance = dataclasses.replace(tolerance, atol=target.atol)
    with _stage("verify", timings, report, f"({runtime}, {precision})"):
        return verify(path, runtime, manifest, encoder, config, precision=precision, tolerance=tolerance, report=report,
                      verbose=verbose)


def _build_engine(onnx_path: Path, staged: Path, output: Path, manifest: dict, profile: ShapeProfile, target: Target,
                  timings: dict[str, float], report: Callable[[str], None]) -> None:
    """Build the TensorRT engine from the checked ONNX file (which then goes); TensorRTMissing
    after keeping that file where TensorRT is not installed."""
    if not tensorrt.tensorrt_available():
        _missing_tensorrt(onnx_path, output, profile, target.precision, target.timing_cache, manifest, timings)
    with _stage("build", timings, report, "(TensorRT)", silent=True):
        tensorrt.build_engine(onnx_path, staged, tensorrt.profile_shapes(manifest["inputs"], profile),
                              target.precision, target.timing_cache)
    onnx_path.unlink()


def _as_run(config: IpcvConfig, encoder: LoadedEncoder, profile: ShapeProfile,
            report: Callable[[str], None]) -> IpcvConfig:
    """The configuration the file will run, so that the manifest records it: an AS depth reaching
    past the last block is cut to the blocks there are (said in one line). UsageError for more
    neighbours than the neighbour search can use (TensorRT's TopK limit, or every kept token of
    the largest call in the profile: beyond that each extra column is padding at every size)."""
    config = strategy_of(config).as_run(config, encoder.depth, report)
    batch = encoder.description.image_batch
    largest_kept = kept_count(profile.max_tokens, config.retention_e4) + (batch.special_tokens if batch else 0)
    usable = TOPK_MAX_K if batch and batch.neighbors_across_images else min(TOPK_MAX_K, largest_kept)
    if config.neighbors > usable:
        raise UsageError(f"neighbors must be at most {usable} here (the kept tokens of the largest call, "
                         f"{profile.max_tokens} patches, and TensorRT's TopK limit {TOPK_MAX_K}), got {config.neighbors}")
    return config


def _diagnostics_kept(format: str, asked: bool) -> bool:
    """Whether the written file returns kept_index and neighbor_index after image_features. An
    `.onnx` file (also the one written for a missing TensorRT) returns them only when asked, so a
    runtime that reads one output gets one. Engines keep them: the reduced-precision gate compares
    the engine with the reference run on the engine's own kept set. `.pt2` files keep them: their
    parity gate reads them from the compiled package, which cannot be trimmed after compiling."""
    fallback_onnx = format == "engine" and not tensorrt.tensorrt_available()
    return asked or not (format == "onnx" or fallback_onnx)


def _check_output(target: Target) -> None:
    """UsageError unless the output file can be written: its folder exists and is writable, no
    earlier export's companions are in the way."""
    output, format = target.output, target.format
    folder = output.parent
    if output.is_dir():
        raise UsageError(f"output {output} is a folder; give a file name")
    if not folder.is_dir():
        raise UsageError(f"output folder {folder} does not exist")
    outputs.check_writable(folder)
    for name in _written_names(output, format):
        outputs.check_companions(name)
    fallback = output.with_suffix(".onnx")
    if format == "engine" and not tensorrt.tensorrt_available():
        taken = [path for path in (fallback, Path(f"{fallback}.json")) if path.exists()]
        if taken:
            raise UsageError(f"TensorRT is not installed here, so -o {output.name} would write the checked ONNX "
                             f"file {fallback} instead, and {taken[0]} exists: move it or give another name")


def _written_names(output: Path, format: str) -> list[Path]:
    """The names an export may write: an engine export writes its checked ONNX file instead when
    TensorRT is missing."""
    return [output, output.with_suffix(".onnx")] if format == "engine" else [output]


def _open(path: Path, runtime: str, manifest: dict) -> EncoderFile:
    if runtime == "onnx":
        return OnnxEncoder(path, manifest)
    if runtime == "engine":
        return TensorRTEncoder(path, manifest)
    return TorchEncoder(path, manifest)


def _missing_tensorrt(onnx_path: Path, output: Path, profile: ShapeProfile, precision: str, timing_cache: Path | None, manifest: dict,
                      timings: dict[str, float]) -> None:
    """Keep the checked ONNX file beside the requested engine path, then raise TensorRTMissing."""
    kept = output.with_suffix(".onnx")
    manifest["format"] = "onnx"
    manifest["timings_s"] = timings
    manifest["tensorrt_build"] = {"built": False, "reason": "tensorrt is not importable",
                                  "command": tensorrt.trtexec_command(kept, output,
                                                                     tensorrt.profile_shapes(manifest["inputs"], profile),
                                                                     precision, timing_cache)}
    outputs.write_manifest(onnx_path, manifest)
    outputs.commit(onnx_path, kept)
    raise tensorrt.TensorRTMissing(f"TensorRT is not installed here ({tensorrt.INSTALL_HINT}); wrote the checked ONNX file "
                          f"{kept} instead. Build the engine with:\n  {manifest['tensorrt_build']['command']}")


def _compute(original: torch.export.ExportedProgram, program: torch.export.ExportedProgram,
             encoder: LoadedEncoder, tokens: int) -> dict:
    """FLOPs of the original and the IPCV program at N = tokens, counted on their graphs."""
    before = program_flops(original, encoder, tokens)
    after = program_flops(program, encoder, tokens)
    return {"tokens": tokens, "flops_original": before, "flops_ipcv": after, "ratio": round(after / before, 4)}


@contextlib.contextmanager
def _stage(name: str, timings: dict[str, float], report: Callable[[str], None], detail: str = "",
           silent: bool = False) -> Iterator[None]:
    """Time one stage and report it when done. A `silent` stage (one that reports nothing while it
    runs) shows its name on a terminal meanwhile, then clears it: lowering a 7B-shape tower takes
    a minute."""
    label = f"{name}{' ' + detail if detail else ''}"
    live = silent and sys.stderr.isatty()
    if live:
        sys.stderr.write(f"{label} ...")
        sys.stderr.flush()
    start = time.perf_counter()
    try:
        yield
    finally:
        if live:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
    elapsed = time.perf_counter() - start
    timings[name] = round(timings.get(name, 0.0) + elapsed, 3)
    report(f"{label}: {elapsed:.1f} s")


def _size(path: Path) -> int:
    data = Path(f"{path}.data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


