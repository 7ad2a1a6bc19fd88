"""The pipeline, top to bottom: load -> capture -> passes -> lower -> check -> verify -> write.

Each stage reports one line with its time. Every file is first written into a private staging
folder inside the output folder, checked, and only then renamed onto the requested name (with its
external data and manifest), so a failure or Ctrl-C never leaves a half-written or unchecked file
under that name, and an existing output is replaced only on success.
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
from .capture import MAX_IMAGES, MAX_SIDE, MAX_TOKENS, capture, padded_inputs
from .compress import compress, feature_names, min_patches, output_names
from .config import (FOLDER_FORMAT, FORMAT_SUFFIXES, FORMATS, OPSETS, PRECISIONS, RUNTIMES, IpcvConfig, Method,
                     ShapeProfile, Target, UsageError)
from .flops import program_flops
from .lower import pt2, tensorrt
from .lower.int32_check import check_int32, extreme_calls
from .lower.onnx import INPUT_NAMES, PADDED_INPUT_NAMES, keep_outputs, to_onnx
from .lower.tensorrt_compat import TOPK_MAX_K, check_tensorrt_compat
from .models import LoadedEncoder, load_encoder
from .passes import check_supported
from .runtime import EncoderFile, OnnxEncoder, TensorRTEncoder, TorchEncoder
from .tokens import kept_count, min_side
from .verify import TOLERANCES, ParityCheck, check_batched_parity, check_padded_parity, check_parity

SUFFIX_FORMATS = {".onnx": "onnx", ".engine": "engine", ".plan": "engine", ".pt2": "aoti"}
VERIFY_GRIDS = ([[1, 16, 24]], [[1, 8, 8], [1, 12, 8]], [[3, 8, 8]])
"""Single image, two images of different sizes, a 3-slice video: none is the capture example."""
VERIFY_BATCHES = ((1, 16, 16), (2, 12, 20), (3, 8, 8))
"""Batched towers: (images, rows, columns of patches) per check, none the capture example."""
VERIFY_MIXED = ((1, 16, 16), (2, 12, 18), (3, 11, 13))
"""Batched towers with mixed selection: sides with every remainder modulo each cell side (patches
outside every cell), each side raised to the file's smallest and rounded up to the grid multiple."""
VERIFY_PADDED = (([(4, 3)], 12), ([(2, 2), (1, 3), (3, 3)], 10), ([(5, 2), (2, 1)], 12))
"""Padded towers: images of (columns, rows) in cells of k x k patches, padded to that many cells:
one unpadded image, three of which one fills the row, two with much padding."""


class IncompatibleGraph(UsageError):
    """The ONNX graph fails a static check (TensorRT compatibility, integers within int32); nothing
    was kept."""


@dataclass
class ExportResult:
    path: Path
    manifest: dict = field(default_factory=dict)


def export(model: str | LoadedEncoder, target: Target | str | Path, method: Method = Method(), *,
           report: Callable[[str], None] = print, verbose: bool = False) -> ExportResult:
    """Export `model` (built-in name, checkpoint folder or LoadedEncoder) with the IPCV `method` to
    `target` (a Target, or just the output path). A FOLDER_FORMAT target writes an ONNX Runtime
    GenAI folder (genai_folder.py). `verbose` reports per-grid diffs and every TensorRT finding.
    Raises UsageError (bad input), ParityError (the file disagrees with the reference),
    IncompatibleGraph, or tensorrt.TensorRTMissing (an engine was asked for; the checked ONNX file
    was written instead).
    """
    target = target if isinstance(target, Target) else Target(target)
    if target.format == FOLDER_FORMAT:
        from .genai_folder import export_ort_genai

        return export_ort_genai(model, target, method, report)
    output, opset, atol, timing_cache = target.output, target.opset, target.atol, target.timing_cache
    format = _check_output(output, target.format, target.precision)
    runtime = _check_runtime(format, target.runtime)
    precision, diagnostic_outputs = target.precision, target.diagnostic_outputs
    if atol is not None and not 0 <= atol < 1:
        raise UsageError(f"--atol must be in [0, 1), got {atol}")
    if opset not in OPSETS:
        raise UsageError(f"--opset must be in [{OPSETS[0]}, {OPSETS[-1]}] (TensorRT 10 parses 18 to 20), got {opset}")
    if timing_cache and format != "engine":
        raise UsageError(f"--timing-cache applies to TensorRT engines; {format} files are not built by TensorRT")
    timings: dict[str, float] = {}

    with contextlib.ExitStack() as held:
        for name in _written_names(output, format):
            held.enter_context(outputs.locked(name))
        with _stage("load", timings, report):
            encoder = model if isinstance(model, LoadedEncoder) else load_encoder(model)
            config = encoder.method_config(**method.settings())
            opt_patches = target.opt_patches
            if opt_patches is None:
                opt_patches = encoder.native_patches or ShapeProfile().opt_tokens
            chosen = None
            if method.budget is not None:
                config, chosen = choose_setting(encoder, method.budget, opt_patches)
                report(f"  budget {method.budget}: {_describe(config)}, {chosen['flop_ratio']:.3f} of the original FLOPs "
                       f"(measured worst-photo patch cosine {chosen['measured_worst_patch_cosine']:.3f})")
            config.check(encoder.depth)
            check_supported(config, encoder.description)
            largest = MAX_SIDE ** 2 if encoder.description.image_batch else MAX_TOKENS  # per image / per call
            group = encoder.merge_size ** 2  # the profile's defaults, rounded to the tower's multiple
            smallest = min_patches(config)
            default_least = max(ShapeProfile.min_tokens, smallest if config.selection == "mixed" else 0)
            least = target.min_patches if target.min_patches is not None else -(-default_least // group) * group
            most = target.max_patches if target.max_patches is not None else ShapeProfile.max_tokens // group * group
            profile = ShapeProfile(least, opt_patches, most).check(encoder.merge_size, smallest, largest)
            config = _as_run(config, encoder, profile, report)
        with _stage("capture", timings, report, silent=True):
            original = capture(encoder)
        with _stage("passes", timings, report, silent=True):
            program = compress(original, encoder, config)
            compute = _compute(original, program, encoder, profile.opt_tokens)
        diagnostics = _diagnostics_kept(format, diagnostic_outputs)
        manifest = _manifest(encoder, config, format, precision, opset, profile, compute, diagnostics)
        manifest["runtime"] = runtime
        if chosen:
            manifest["ipcv"]["chosen_for_budget"] = chosen

        with outputs.staging(output.parent) as staging:
            staged = staging / output.name
            lowered = "onnx" if format == "engine" else format  # engines are built from the checked ONNX file
            lowered_path = staged.with_suffix(".onnx") if format == "engine" else staged
            with _stage("lower", timings, report, f"({lowered})", silent=True):
                _lower(program, lowered_path, lowered, opset, encoder, config, runtime)
            if lowered == "onnx":
                with _stage("check", timings, report):
                    compat = check_tensorrt_compat(lowered_path, profile.max_tokens)
                    manifest["tensorrt_compat"] = compat.as_dict()
                    report(f"  {compat.summary()}")
                    if verbose:
                        for finding in compat.findings:
                            report(f"  {finding}")
                    int32 = check_int32(lowered_path, extreme_calls(manifest["inputs"]))
                    manifest["int32"] = int32.as_dict()
                    report(f"  {int32.summary()}")
                    if verbose:
                        for finding in int32.findings[1:]:
                            report(f"  {finding}")
                if runtime == "tensorrt" and not compat.ok:
                    raise IncompatibleGraph(f"not TensorRT-compatible, no engine built: {compat.summary()}")
                if not int32.ok:
                    raise IncompatibleGraph(f"refused, nothing written: {int32.summary()}")
            manifest["verification"] = _verify_stage(lowered_path, lowered, "fp32", manifest, encoder, config,
                                                     target.verify, atol, timings, report, verbose)
            if not diagnostics:  # an .onnx file (or the one kept for a missing TensorRT), after the gate
                keep_outputs(lowered_path, feature_names(len(encoder.tap_blocks)))
            if format == "engine":
                if not tensorrt.tensorrt_available():
                    _missing_tensorrt(lowered_path, output, profile, precision, timing_cache, manifest, timings)
                with _stage("build", timings, report, "(TensorRT)", silent=True):
                    tensorrt.build_engine(lowered_path, staged, tensorrt.profile_shapes(manifest["inputs"], profile),
                                          precision, timing_cache)
                lowered_path.unlink()
                manifest["verification"] = _verify_stage(staged, "engine", precision, manifest, encoder, config,
                                                         target.verify, atol, timings, report, verbose)
            with _stage("write", timings, report):
                manifest["timings_s"] = timings
                outputs.write_manifest(staged, manifest)
                outputs.commit(staged, output)
    report(f"wrote {output} ({_size(output) / 1e6:.1f} MB) and {output}.json; expected compute "
           f"{compute['ratio']:.3f} of the original encoder at N={profile.opt_tokens} (FLOP count)")
    return ExportResult(output, manifest)


def _as_run(config: IpcvConfig, encoder: LoadedEncoder, profile: ShapeProfile,
            report: Callable[[str], None]) -> IpcvConfig:
    """The configuration the file will run, so that the manifest records it: an AS depth reaching
    past the last block is cut to the blocks there are (said in one line). UsageError for more
    neighbours than the neighbour search can use (TensorRT's TopK limit, or every kept token of
    the largest call in the profile: beyond that each extra column is padding at every size)."""
    stabilised = encoder.depth - config.prune_layer
    if config.as_depth > stabilised and config.selection != "mixed":  # mixed selection has no AS blocks
        report(f"  AS depth {config.as_depth} reaches past the last block: the {stabilised} blocks after l_p="
               f"{config.prune_layer} are stabilised (recorded as {stabilised})")
        config = dataclasses.replace(config, as_depth=stabilised)
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


def _describe(config: IpcvConfig) -> str:
    if config.selection == "mixed":
        return (f"rho={config.retention}, selection=mixed (mixed-resolution tokens, "
                f"{config.mixed_cell} x {config.mixed_cell} cells)")
    return (f"rho={config.retention}, l_p={config.prune_layer}, Delta={config.as_depth}, k={config.neighbors}, "
            f"selection={config.selection}, NGR weighting={config.ngr_weighting}, "
            f"per-image selection={config.per_image_selection}")


def _check_output(output: Path, format: str | None, precision: str) -> str:
    """The output format, or UsageError for an unknown suffix/format/precision or an unusable folder."""
    if format is None:
        format = SUFFIX_FORMATS.get(output.suffix)
        if format is None:
            raise UsageError(f"unsupported output format {output.suffix or '(none)'!r} for {output}: "
                             f"use .onnx, .engine or .pt2, or name one with --format")
    elif format not in FORMATS:
        raise UsageError(f"unknown format {format!r}; choose from {', '.join(FORMATS)}")
    if output.suffix not in FORMAT_SUFFIXES[format]:
        raise UsageError(f"format {format} writes {' or '.join(FORMAT_SUFFIXES[format])} files, not {output.name}")
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    if precision != "fp32" and format != "engine":
        raise UsageError(f"--precision {precision} applies to TensorRT engines; {format} files are written in fp32")
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
    return format


def _check_runtime(format: str, runtime: str | None) -> str:
    """The runtime the file is for (RUNTIMES), or UsageError where the format rules it out."""
    if runtime is None:
        return "tensorrt" if format == "engine" else "portable"
    if runtime not in RUNTIMES:
        raise UsageError(f"unknown runtime {runtime!r}; choose from {', '.join(RUNTIMES)}")
    if format == "engine" and runtime == "onnxruntime":
        raise UsageError("--runtime onnxruntime writes a loop TensorRT cannot build; an engine is for tensorrt")
    if format not in ("onnx", "engine") and runtime != "portable":
        raise UsageError(f"--runtime {runtime} chooses the form of an ONNX file; {format} files are not ONNX")
    return runtime


def _written_names(output: Path, format: str) -> list[Path]:
    """The names an export may write: an engine export writes its checked ONNX file instead when
    TensorRT is missing."""
    return [output, output.with_suffix(".onnx")] if format == "engine" else [output]


def _lower(program: torch.export.ExportedProgram, path: Path, format: str, opset: int,
           encoder: LoadedEncoder, config: IpcvConfig, runtime: str) -> None:
    if format == "onnx":
        metadata = {"merge_size": str(encoder.merge_size), "min_tokens": str(min_patches(config)),
                    "ipcv_export_version": __version__}
        if encoder.description.image_batch or encoder.description.padded:
            metadata["patch_size"] = str(encoder.patch_size)
        if encoder.description.padded:
            metadata["layout"] = "padded"
        to_onnx(program, path, output_names(len(encoder.tap_blocks)), opset, metadata, runtime,  # ops.ATTENTION_FORMS
                PADDED_INPUT_NAMES if encoder.description.padded else None)
    elif format == "aoti":
        pt2.to_aoti(program, path)
    else:
        pt2.to_exported_program(program, path)


def _verify_stage(path: Path, runtime: str, precision: str, manifest: dict, encoder: LoadedEncoder,
                  config: IpcvConfig, verify: bool, atol: float | None, timings: dict[str, float],
                  report: Callable[[str], None], verbose: bool) -> dict:
    """Run the file on VERIFY_GRIDS against the eager reference; ParityError on a mismatch. `atol`
    replaces the precision's absolute tolerance (TOLERANCES) where given."""
    tolerance = TOLERANCES[precision] if atol is None else dataclasses.replace(TOLERANCES[precision], atol=atol)
    if not verify:
        report("verify: SKIPPED (--skip-verify): this file was NOT checked against the reference")
        return {"verified": False, "skipped_by_user": True}
    with _stage("verify", timings, report, f"({runtime}, {precision})"):
        runner = _open(path, runtime, manifest)
        generator = torch.Generator().manual_seed(1)
        checks: list[ParityCheck] = []
        batch, padded = encoder.description.image_batch, encoder.description.padded
        cases = VERIFY_PADDED if padded else _batches(encoder, config) if batch else VERIFY_GRIDS
        for case in tqdm(cases, desc="verify", leave=False, disable=not sys.stderr.isatty()):
            if padded:
                cells, length = case
                k = encoder.merge_size
                pixels, positions = padded_inputs([(cols * k, rows * k) for cols, rows in cells], length * k * k,
                                                  encoder.input_width, generator)
                checks.append(check_padded_parity(runner.run_all, encoder.module, config, pixels, positions, tolerance))
            elif batch:
                images, rows, cols = case
                pixels = torch.randn(images, encoder.channels, rows * encoder.patch_size, cols * encoder.patch_size,
                                     generator=generator)
                checks.append(check_batched_parity(runner.run_all, batch.parts(encoder.module), batch.special_tokens,
                                                   config, pixels, tolerance, batch.neighbors_across_images))
            else:
                grid_thw = torch.tensor(case)
                pixels = torch.randn(int(grid_thw.prod(-1).sum()), encoder.input_width, generator=generator)
                checks.append(check_parity(runner.run_all, encoder.module, config, grid_thw, pixels, tolerance,
                                           encoder.description))
            if verbose:
                report(f"  {checks[-1].grid}: max abs diff {checks[-1].max_abs_diff:.2e} (limit {checks[-1].limit:.1e})")
    return {"verified": True, "runtime": runtime, "precision": precision, "tolerance": vars(tolerance),
            "checks": [vars(c) for c in checks], "worst_abs_diff": max(c.max_abs_diff for c in checks)}


def _batches(encoder: LoadedEncoder, config: IpcvConfig) -> tuple[tuple[int, int, int], ...]:
    """The verification batches of a tower that batches whole images (VERIFY_BATCHES, VERIFY_MIXED)."""
    if config.selection != "mixed":
        return VERIFY_BATCHES
    multiple, side = encoder.merge_size, min_side(min_patches(config), encoder.merge_size)
    fit = lambda patches: -(-max(patches, side) // multiple) * multiple  # noqa: E731
    return tuple((images, fit(rows), fit(cols)) for images, rows, cols in VERIFY_MIXED)


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


def _manifest(encoder: LoadedEncoder, config: IpcvConfig, format: str, precision: str, opset: int,
              profile: ShapeProfile, compute: dict, diagnostics: bool) -> dict:
    """Everything a runtime or a reader needs to use and trust the file (see README, manifest)."""
    import onnx
    import onnxruntime
    import transformers

    inputs, outputs = (_image_batch_io(encoder, config) if encoder.description.image_batch
                       else _padded_io(encoder, config) if encoder.description.padded else _packed_io(encoder, config))
    return {
        "tool": {"name": "ipcv-export", "version": __version__},
        "format": format,
        "source": encoder.source,
        "architecture": encoder.description.architecture,
        "ipcv": {"retention": config.retention, "prune_layer": config.prune_layer,
                 "as_depth": config.as_depth, "neighbors": config.neighbors, "selection": config.selection,
                 "ngr_weighting": config.ngr_weighting, "per_image_selection": config.per_image_selection,
                 "mixed_cell": config.mixed_cell},
        "inputs": inputs,
        "outputs": outputs if diagnostics else outputs[:-2],
        "preprocessing": encoder.preprocessing,
        "precision": precision, "opset": opset if format in ("onnx", "engine") else None,
        "profile": vars(profile),
        "compute": compute,
        "packages": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
    }


def _packed_io(encoder: LoadedEncoder, config: IpcvConfig) -> tuple[dict, list[dict]]:
    """The manifest's inputs and outputs of a packed (Qwen-style) tower."""
    merge, smallest = encoder.merge_size, min_patches(config)
    inputs = {
        "layout": "packed", "merge_size": merge, "input_width": encoder.input_width, "min_tokens": smallest,
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


def _image_batch_io(encoder: LoadedEncoder, config: IpcvConfig) -> tuple[dict, list[dict]]:
    """The manifest's inputs and outputs of a tower that batches whole images."""
    p, s, multiple = encoder.patch_size, encoder.special_tokens, encoder.merge_size
    side = min_side(min_patches(config), multiple)
    inputs = {"layout": "images", "patch_size": p, "merge_size": multiple, "input_width": encoder.channels,
              "min_tokens": min_patches(config), "special_tokens": s,
              "max_images": MAX_IMAGES, "max_side": MAX_SIDE * p,
              "tensors": [{"name": INPUT_NAMES[0], "dtype": "float32", "shape": ["B", encoder.channels, "H", "W"]}],
              "rules": f"H and W multiples of {p * multiple}, each at least {side * p} pixels; B <= {MAX_IMAGES}, "
                       f"H, W <= {MAX_SIDE * p}; P = (H/{p})*(W/{p}) patches and T = {s} + P tokens per image"}
    names = output_names()
    features = {"name": names[0], "dtype": "float32", "shape": ["B", "T", "hidden"],
                "meaning": "every token of every image (special tokens first), the original encoder's output"}
    if config.selection == "mixed":
        return inputs, [features, *_mixed_diagnostics(s, config.retention_e4, config.mixed_cell)]
    outputs = [features,
               {"name": names[1], "dtype": "int64", "shape": ["B", f"{s} + P*{config.retention_e4}//10000"],
                "meaning": "per image, ascending indices of the kept tokens (special tokens always kept)"},
               {"name": names[2], "dtype": "int64", "shape": ["B", "T-K", config.neighbors],
                "meaning": "per image, indices into kept_index of each removed token's neighbours; K means none"}]
    return inputs, outputs


def _mixed_diagnostics(special_tokens: int, retention_e4: int, cell: int) -> list[dict]:
    """The diagnostic outputs of a mixed-selection file (`mixed_resolution.selection_outputs`)."""
    names = output_names()
    square, coarse = cell * cell, (cell - 1) ** 2
    fine = (f"F = C*{square * retention_e4 - coarse * 10_000}//{(square - coarse) * 10_000} of the "
            f"C = (H/p//{cell})*(W/p//{cell}) cells of {cell} x {cell} patches")
    return [{"name": names[1], "dtype": "int64", "shape": ["B", f"{special_tokens} + {square}F + X"],
             "meaning": f"per image, ascending indices of the tokens computed at full resolution: the special tokens, "
                        f"the patches of the {fine}, and the X patches outside every cell (the last rows and "
                        f"columns beyond a multiple of {cell})"},
            {"name": names[2], "dtype": "int64", "shape": ["B", f"P-{square}F-X", 1],
             "meaning": f"per image, for each other patch (ascending), the cell (raster order) whose {coarse} token(s) "
                        f"of the image shrunk by {cell - 1}/{cell} it was rebuilt from"}]


def _padded_io(encoder: LoadedEncoder, config: IpcvConfig) -> tuple[dict, list[dict]]:
    """The manifest's inputs and outputs of a tower whose images come as padded patch rows."""
    k, smallest, table = encoder.merge_size, min_patches(config), encoder.position_table
    square = k * k
    largest = MAX_TOKENS // square * square
    inputs = {"layout": "padded", "patch_size": encoder.patch_size, "merge_size": k, "input_width": encoder.input_width,
              "min_tokens": smallest, "max_tokens": largest, "max_images": MAX_IMAGES,
              "position_table": table,
              "tensors": [{"name": PADDED_INPUT_NAMES[0], "dtype": "float32", "shape": ["B", "P", encoder.input_width]},
                          {"name": PADDED_INPUT_NAMES[1], "dtype": "int64", "shape": ["B", "P", 2]}],
              "rules": f"the image processor's pixel_values and image_position_ids as they come: every image padded to "
                       f"P patches, P a multiple of {square}, {-(-max(smallest, 2 * square) // square) * square} <= P <= "
                       f"{largest}; each image's real patches first, positions (x, y) in "
                       f"[0, {table}), then padding at (-1, -1); grid sides multiples of {k}; B <= {MAX_IMAGES}"}
    names = output_names()
    outputs = [{"name": names[0], "dtype": "float32", "shape": ["B", f"P/{square}", "hidden"],
                "meaning": f"per image, its soft tokens (real patches / {square} of them, the processor's "
                           "num_soft_tokens_per_image) first, then zero rows: the original encoder's output per image"},
               {"name": names[1], "dtype": "int64", "shape": ["B", f"P*{config.retention_e4}//10000"],
                "meaning": f"per image, ascending indices of the kept tokens: its max(V*{config.retention_e4}//10000, 1) "
                           "kept real patches (V of them), then its first padding tokens, which fill the slots"},
               {"name": names[2], "dtype": "int64", "shape": ["B", "P-K", config.neighbors],
                "meaning": "per image, indices into kept_index of each removed token's neighbours; K means none "
                           "(always for padding)"}]
    return inputs, outputs
