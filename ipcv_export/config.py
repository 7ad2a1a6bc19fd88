"""IPCV hyper-parameters (ipcv.md, notation) and their checks."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

from .folders import FOLDER_FORMATS

RETENTION_SCALE = 10_000
"""Retention is fixed to 4 decimals: K = (N * round(rho * 1e4)) // 1e4 (ipcv.md, step 1)."""

DEFAULT_OPSET = 18
OPSETS = range(18, 24)
"""Opsets a file may be written at: torch.onnx's dynamo exporter writes 18 and later; 23 is the
newest whose operators (Attention among them) ONNX Runtime runs."""


class UsageError(ValueError):
    """A user-supplied value is out of range or unusable; the message is one line naming it."""


def first_line(err: BaseException) -> str:
    """An exception's message cut to its first line (its type name when it has none), for one-line errors."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def read_json_object(path: Path, error: type[UsageError] = UsageError) -> dict:
    """The JSON object in the file at `path`; `error` (one line) when it is not JSON or not an object."""
    try:
        content = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise error(f"{path} is not valid JSON: {err}") from None
    if not isinstance(content, dict):
        raise error(f"{path} must hold a JSON object, not a {type(content).__name__}")
    return content


SELECTIONS = ("score", "spread", "hybrid", "bipartite", "merge", "mixed")
"""How the kept tokens are chosen: `score`, ipcv.md's importance score (the paper's); `spread`,
a fixed coarse-to-fine order over each image's patch grid (FIDELITY.md: better fidelity per FLOP
on a trained DINOv2); `hybrid`, half of them by the spread order (coverage), the other half by
the score; `bipartite`, half by the spread order, the other half the patches least like any of
those (ToMe's bipartite matching picks what NGR rebuilds); `merge`, ToMe's rounds of bipartite
merging down to K tokens: each kept token carries the mean state of the patches merged into it,
and each merged-away patch is rebuilt from that one owner (neighbors must be 1); `mixed`,
mixed-resolution tokens (mixed_resolution.py): no pruning inside the tower, the blocks run on the
c^2 patch tokens of each detailed c x c cell (c = `mixed_cell`, 2 by default) and (c - 1)^2 tokens
of the image shrunk by (c - 1) / c for every other cell, about rho of the patches in all
(rho > ((c - 1) / c)^2; prune layer, AS depth and NGR weighting do not apply, neighbors is 1: a
coarse cell's patches are rebuilt from its cell grid). All but score: towers that batch whole
images only."""

MIXED_CELLS = (2, 3, 4)
"""Cell sides of mixed selection: coarse cells at 1/2, 2/3 or 3/4 of the image's scale."""


NGR_WEIGHTINGS = ("mean", "similarity")
"""How NGR averages the neighbours' drift: `mean`, the paper's plain mean; `similarity`, weights by
inverse squared distance at the pruning point (tokens.neighbor_weights; the paper leaves the
weighting open)."""


@dataclass(frozen=True)
class IpcvConfig:
    """retention rho in (0, 1]; prune_layer l_p >= 1; as_depth Delta >= 0; neighbors k >= 1;
    selection one of SELECTIONS; ngr_weighting one of NGR_WEIGHTINGS; per_image_selection: packed
    towers select within each image (a deviation from the authors' call-wide selection; towers
    that batch whole images always select per image)."""

    retention: float = 0.5
    prune_layer: int = 3
    as_depth: int = 7
    neighbors: int = 10
    selection: str = "score"
    ngr_weighting: str = "mean"
    per_image_selection: bool = False
    mixed_cell: int = 2

    @property
    def retention_e4(self) -> int:
        """rho to 4 decimals as an integer: K = (N * retention_e4) // 10^4."""
        return round(self.retention * RETENTION_SCALE)

    def check(self, depth: int) -> "IpcvConfig":
        """Raise UsageError for a value outside its range for an encoder of `depth` blocks."""
        check_retention(self.retention)
        if not 1 <= self.prune_layer < depth:
            raise UsageError(f"prune layer must be in [1, {depth - 1}] for this {depth}-block encoder, got {self.prune_layer}")
        if self.as_depth < 0:
            raise UsageError(f"AS depth must be >= 0, got {self.as_depth}")
        if self.neighbors < 1:
            raise UsageError(f"neighbors must be >= 1, got {self.neighbors}")
        if self.selection not in SELECTIONS:
            raise UsageError(f"unknown selection {self.selection!r}; choose from {', '.join(SELECTIONS)}")
        if self.selection == "merge" and self.neighbors != 1:
            raise UsageError(f"merge selection rebuilds each merged-away token from its one owner: neighbors must "
                             f"be 1, got {self.neighbors}")
        if self.selection == "mixed" and self.neighbors != 1:
            raise UsageError(f"mixed selection rebuilds each coarse patch from its own cell: neighbors must be 1, "
                             f"got {self.neighbors}")
        if self.mixed_cell not in MIXED_CELLS:
            raise UsageError(f"mixed cell side must be one of {', '.join(map(str, MIXED_CELLS))}, got {self.mixed_cell}")
        if self.mixed_cell != 2 and self.selection != "mixed":
            raise UsageError(f"a mixed cell side applies to --selection mixed only, not {self.selection}")
        cell, coarse = self.mixed_cell, (self.mixed_cell - 1) ** 2
        if self.selection == "mixed" and cell * cell * self.retention_e4 <= coarse * RETENTION_SCALE:
            raise UsageError(f"mixed selection with {cell} x {cell} cells needs a retention above "
                             f"{coarse / cell ** 2:.4g} ({coarse} token(s) per cell is the image shrunk by "
                             f"{cell - 1}/{cell}), got {self.retention}")
        if self.ngr_weighting not in NGR_WEIGHTINGS:
            raise UsageError(f"unknown NGR weighting {self.ngr_weighting!r}; choose from {', '.join(NGR_WEIGHTINGS)}")
        return self


@dataclass(frozen=True)
class Method:
    """The IPCV method as asked for, before a model is known: None leaves a setting to the family's
    default (ModelDescription.method_defaults), else IpcvConfig's; merge and mixed selection default
    to one neighbour. `budget` (a FLOP fraction in (0, 1]) replaces the other settings by the best measured
    setting that fits it on the model (budget.py). Resolved against a model into an IpcvConfig."""

    retention: float = IpcvConfig.retention
    prune_layer: int | None = None
    as_depth: int | None = None
    neighbors: int | None = None
    selection: str = IpcvConfig.selection
    ngr_weighting: str = IpcvConfig.ngr_weighting
    per_image_selection: bool = IpcvConfig.per_image_selection
    mixed_cell: int = IpcvConfig.mixed_cell
    budget: float | None = None

    def __post_init__(self) -> None:
        """UsageError for a budget beside settings it would replace (as the command line refuses)."""
        if self.budget is None:
            return
        given = [f.name for f in fields(self) if f.name != "budget" and getattr(self, f.name) != f.default]
        if given:
            raise UsageError(f"a budget chooses the method settings itself; drop {', '.join(given)}")

    def settings(self) -> dict:
        """The IpcvConfig fields asked for, None where the family decides."""
        return {name: value for name, value in vars(self).items() if name != "budget"}


def check_retention(value: float, name: str = "retention") -> int:
    """Retention as an integer count of 10^-4 (K = L * it // 10^4); UsageError unless in (0, 1]."""
    if not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise UsageError(f"{name} must be in (0, 1], got {value!r}")
    if round(value * RETENTION_SCALE) < 1:
        raise UsageError(f"{name} must be at least 0.0001 (4 decimals are kept), got {value!r}")
    return round(value * RETENTION_SCALE)


PRECISIONS = ("fp32", "fp16", "bf16")
FORMAT_SUFFIXES = {"onnx": (".onnx",), "engine": (".engine", ".plan"), "aoti": (".pt2",), "exported-program": (".pt2",)}
"""Output formats and the file suffixes each may be written under."""
FORMATS = tuple(FORMAT_SUFFIXES)
SUFFIX_FORMATS = {".onnx": "onnx", ".engine": "engine", ".plan": "engine", ".pt2": "aoti"}
"""The format an output name implies when none is named."""
RUNTIMES = ("portable", "onnxruntime", "tensorrt")
"""Which runtime an ONNX file is for (each its form in ops.ATTENTION_FORMS). `portable` (the default
for .onnx): operators every runtime takes, TensorRT included, and the TensorRT check only reports.
`tensorrt` (what .engine means): full-attention blocks choose in the graph between a batch of the
call's equal rows and the dense product, and a failed TensorRT check refuses the file.
`onnxruntime`: attention over several segments as a Loop over segments, which TensorRT cannot
build; the check only reports."""


@dataclass(frozen=True)
class ShapeProfile:
    """The range of N (patches per call) a file is built and checked for: TensorRT's optimisation
    profile (min / opt / max) and the N at which TopK sizes and FLOPs are evaluated."""

    min_tokens: int = 64
    opt_tokens: int = 5120
    max_tokens: int = 16384

    def check(self, merge_size: int, smallest: int, largest: int) -> "ShapeProfile":
        """Raise UsageError unless smallest <= min <= opt <= max <= largest, all multiples of merge^2."""
        group = merge_size ** 2
        for name, value in (("min", self.min_tokens), ("opt", self.opt_tokens), ("max", self.max_tokens)):
            if value % group:
                raise UsageError(f"--{name}-patches must be a multiple of {group} (merge size squared), got {value}")
        if smallest > self.min_tokens:
            raise UsageError(f"this retention keeps K >= 1 token only from {smallest} patches per call (image) on: "
                             f"raise the retention, or --min-patches (now {self.min_tokens}) to at least {smallest}")
        if not smallest <= self.min_tokens <= self.opt_tokens <= self.max_tokens <= largest:
            raise UsageError(f"patch profile must satisfy {smallest} <= min <= opt <= max <= {largest}, got "
                             f"{self.min_tokens} / {self.opt_tokens} / {self.max_tokens}")
        return self


@dataclass(frozen=True)
class Target:
    """What an export writes and for which runtime. `output`: the file (its suffix gives the format
    unless `format` names one of FORMATS), or the folder of one of folders.FOLDER_FORMATS. `runtime`: one of
    RUNTIMES for .onnx files (default portable) and engines (tensorrt). `precision`: of a TensorRT
    engine. The patch profile (`min_patches` / `opt_patches` / `max_patches`, ShapeProfile's range;
    `opt_patches` None: the native grid of a tower that batches whole images, else 5120).
    `min_patches` / `max_patches` None: ShapeProfile's, rounded to the tower's multiple (a padded
    tower's P is a multiple of k^2). `diagnostic_outputs`: an .onnx file also returns kept_index and neighbor_index. `verify` False
    skips the parity gate (recorded); `atol` replaces its absolute tolerance."""

    output: Path
    format: str | None = None
    runtime: str | None = None
    precision: str = "fp32"
    opset: int = DEFAULT_OPSET
    min_patches: int | None = None
    opt_patches: int | None = None
    max_patches: int | None = None
    timing_cache: Path | None = None
    diagnostic_outputs: bool = False
    verify: bool = True
    atol: float | None = None

    def __post_init__(self) -> None:
        """Paths as given (str or Path) become Paths; `format` and `runtime` left None become what
        the output name and the format imply; UsageError for a value out of range or a setting the
        format does not take (whether the output can be written is the pipeline's to check)."""
        object.__setattr__(self, "output", Path(self.output))
        if self.timing_cache is not None:
            object.__setattr__(self, "timing_cache", Path(self.timing_cache))
        if self.format in FOLDER_FORMATS:
            return  # the folder writer checks its own settings
        format = _file_format(self.output, self.format)
        object.__setattr__(self, "format", format)
        object.__setattr__(self, "runtime", _file_runtime(format, self.runtime))
        if self.precision not in PRECISIONS:
            raise UsageError(f"unknown precision {self.precision!r}; choose from {', '.join(PRECISIONS)}")
        if self.precision != "fp32" and format != "engine":
            raise UsageError(f"--precision {self.precision} applies to TensorRT engines; {format} files are written in fp32")
        if self.atol is not None and not 0 <= self.atol < 1:
            raise UsageError(f"--atol must be in [0, 1), got {self.atol}")
        if self.opset not in OPSETS:
            raise UsageError(f"--opset must be in [{OPSETS[0]}, {OPSETS[-1]}] (TensorRT 10 parses 18 to 20), "
                             f"got {self.opset}")
        if self.timing_cache and format != "engine":
            raise UsageError(f"--timing-cache applies to TensorRT engines; {format} files are not built by TensorRT")


def _file_format(output: Path, format: str | None) -> str:
    """The file format `format` names, or the output's suffix implies; UsageError if they disagree."""
    if format is None:
        format = SUFFIX_FORMATS.get(output.suffix)
        if format is None:
            raise UsageError(f"unsupported output format {output.suffix or '(none)'!r} for {output}: "
                             f"use .onnx, .engine or .pt2, or name one with --format")
    elif format not in FORMATS:
        raise UsageError(f"unknown format {format!r}; choose from {', '.join((*FORMATS, *FOLDER_FORMATS))}")
    if output.suffix not in FORMAT_SUFFIXES[format]:
        raise UsageError(f"format {format} writes {' or '.join(FORMAT_SUFFIXES[format])} files, not {output.name}")
    return format


def _file_runtime(format: str, runtime: str | None) -> str:
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
