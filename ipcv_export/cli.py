"""`ipcv-export`: a thin command line over `ipcv_export.export`, and `ipcv-export generate` over
`ipcv_export.Pipeline` (IPCV encoder file + IVC-Prune in the LLM)."""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys

from . import __version__
from .folders import FOLDER_FORMATS
from .config import (DEFAULT_OPSET, FORMATS, MIXED_CELLS, NGR_WEIGHTINGS, PRECISIONS, RUNTIMES,
                     SELECTIONS, IpcvConfig, Method, ShapeProfile, Target, UsageError)

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_PARITY, EXIT_INCOMPATIBLE, EXIT_NO_TENSORRT = 0, 1, 2, 3, 4, 5
EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143  # 128 + SIGINT, 128 + SIGTERM

EPILOG = f"""examples:
  ipcv-export --model tiny-qwen2-vl --retention 0.5 -o encoder.onnx
  ipcv-export generate --model tiny-qwen2-vl-chat --image photo.jpg --prompt "Describe it." \\
      --retention 0.5 --llm-retention 0.5     (see ipcv-export generate --help)
  ipcv-export --model ./Qwen2-VL-7B-Instruct --retention 0.35 --precision fp16 \\
      --min-patches 256 --opt-patches 5120 --max-patches 16384 -o qwen2vl.engine

formats (from the suffix, or --format):
  .onnx            ONNX, opset {DEFAULT_OPSET}, checked in ONNX Runtime (CPU)
  .engine / .plan  TensorRT engine built from the checked ONNX file (needs the tensorrt package)
  .pt2             AOTInductor package (torch._inductor.aoti_load_package); with
                   --format exported-program, the ExportedProgram (torch.export.load)
  Beside each file, <file>.json: the manifest (inputs, settings, verification, timings).
  --format ort-genai -o DIR   an ONNX Runtime GenAI model folder from a chat model (built-in
                   chat name or checkpoint folder with its tokenizer): the IPCV vision.onnx,
                   embedding.onnx, the decoder from ORT GenAI's builder, genai_config.json,
                   processor_config.json, tokenizer; verified by generating (needs onnxruntime-genai).
                   Qwen2-VL, Qwen2.5-VL, Qwen3-VL (served without its DeepStack outputs, which
                   ORT GenAI does not read) and Qwen3.5

exit codes:
  {EXIT_OK}  written and verified            {EXIT_PARITY}  the file disagreed with the reference (nothing written)
  {EXIT_USAGE}  bad option or input (nothing)   {EXIT_INCOMPATIBLE}  graph fails the TensorRT or int32 check (nothing)
  {EXIT_FAILED}  other failure (nothing)        {EXIT_NO_TENSORRT}  tensorrt missing: the checked .onnx was written instead
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C; nothing written)  {EXIT_TERMINATED}  terminated (SIGTERM; nothing written)
"""


METHOD_FLAGS = ("--retention", "--prune-layer", "--as-depth", "--neighbors", "--selection", "--mixed-cell",
                "--ngr-weighting", "--per-image-selection")


class _Parser(argparse.ArgumentParser):
    """Whole flag names only (an abbreviation such as --reten would slip past the --budget conflict
    check, which reads argv), and usage errors in one line."""

    def __init__(self, **kwargs) -> None:
        super().__init__(allow_abbrev=False, **kwargs)

    def error(self, message: str):  # one line, exit 2 (argparse prints the whole usage otherwise)
        self.exit(EXIT_USAGE, f"ipcv-export: error: {message}\n")


def _number(kind):
    def parse(text: str):
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}") from None
    return parse


def build_parser() -> argparse.ArgumentParser:
    d, shape = IpcvConfig(), ShapeProfile()
    p = _Parser(prog="ipcv-export", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
                description="Compile IPCV token compression into a vision encoder and write it as a file (ONNX, "
                            "TensorRT engine or AOTInductor package) whose output stands in for the original "
                            "encoder's: same tokens, same order, less compute. Every file is checked against an "
                            "eager PyTorch reference before it is kept.")
    p.add_argument("--model", help="built-in model name (see --list-models) or a local Hugging Face checkpoint "
                                   "folder (safetensors; nothing is downloaded)")
    p.add_argument("-o", "--output", help="output file; the format follows the suffix (see below)")
    p.add_argument("--format", choices=(*FORMATS, *FOLDER_FORMATS),
                   help="output format when the suffix is not enough (default: from the suffix)")
    method = p.add_argument_group("IPCV method (docs/ipcv.md in the repository)")
    method.add_argument("--retention", type=_number(float), default=d.retention,
                        help=f"fraction rho of tokens computed in full after the pruning block, in (0, 1]; "
                             f"1 exports the original encoder (default {d.retention})")
    method.add_argument("--prune-layer", type=_number(int),
                        help=f"block l_p before which tokens are pruned, in [1, depth-1] (default {d.prune_layer}; "
                             "InternViT: 7, as its authors)")
    method.add_argument("--as-depth", type=_number(int),
                        help=f"attention-stabilised blocks Delta after l_p, >= 0 (default {d.as_depth}; InternViT: 3)")
    method.add_argument("--neighbors", type=_number(int),
                        help=f"kept neighbours k that rebuild each pruned token, >= 1 (default {d.neighbors}; "
                             "merge and mixed selection: 1, the token or cell it is rebuilt from)")
    method.add_argument("--selection", choices=SELECTIONS, default=d.selection,
                        help="which tokens stay: 'score' = the paper's importance score; 'spread' = a fixed "
                             "coarse-to-fine spread over each image's grid; 'hybrid' = half by the spread, half by the "
                             "score; 'bipartite' = half by the spread, half the patches least like those (ToMe's "
                             "matching rule); 'merge' = ToMe's rounds of merging, each merged-away token rebuilt "
                             "from the token it joined; 'mixed' = mixed-resolution tokens: detailed 2 x 2 cells of "
                             "patches as their four tokens, the others as one token of the image halved, about rho "
                             "of the patches (rho > 0.25; no pruning layer) (all but score: towers that batch whole images; "
                             f"see FIDELITY.md) (default {d.selection})")
    method.add_argument("--mixed-cell", type=int, choices=MIXED_CELLS, default=d.mixed_cell,
                        help="with --selection mixed: the cell side c in patches; each coarse cell enters as "
                             "(c-1) x (c-1) tokens of the image shrunk by (c-1)/c (2 = halved; 3 and 4 are milder, "
                             "for rho above 4/9 and 9/16: FIDELITY.md, fifth look) (default %(default)s)")
    method.add_argument("--ngr-weighting", choices=NGR_WEIGHTINGS, default=d.ngr_weighting,
                        help="how a pruned token averages its neighbours' drift: 'mean' = the paper's; 'similarity' = "
                             f"weighted by inverse squared distance at the pruning point (default {d.ngr_weighting})")
    method.add_argument("--per-image-selection", action="store_true",
                        help="packed towers (Qwen): each image or video slice keeps its own share of tokens, the few "
                             "slots left go to the best of the rest; the authors select over the whole call (default). "
                             "Towers that batch whole images always select per image")
    method.add_argument("--budget", type=_number(float), metavar="F",
                        help="instead of the settings above: the best measured setting (FIDELITY.md, DINOv2 "
                             "on real photos) whose FLOPs on this model at --opt-patches are at most F of the "
                             "original's, in (0, 1]")
    target = p.add_argument_group("target")
    target.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="TensorRT engine precision; other formats are fp32 (default fp32)")
    target.add_argument("--min-patches", type=_number(int),
                        help=f"smallest N (patches per call; per image for towers that batch whole images, padded "
                             f"or not) of the engine's profile (default {shape.min_tokens}, rounded up to the tower's "
                             "multiple)")
    target.add_argument("--opt-patches", type=_number(int),
                        help=f"N the engine is tuned for, and where the compute ratio is counted (default {shape.opt_tokens}; "
                             "towers that batch whole images: patches per image at their native size, e.g. 576)")
    target.add_argument("--max-patches", type=_number(int),
                        help=f"largest N of the profile; the TensorRT check evaluates TopK sizes there (default "
                             f"{shape.max_tokens}, rounded down to the tower's multiple)")
    target.add_argument("--timing-cache", metavar="FILE", help="TensorRT timing cache, read and updated across builds")
    target.add_argument("--opset", type=_number(int), default=DEFAULT_OPSET,
                        help=f"ONNX opset in [18, 23]; 18 to 20 for TensorRT 10 (default {DEFAULT_OPSET}); 23 writes attention as "
                             "ONNX's Attention operator, which ONNX Runtime runs without holding the N x N scores "
                             "(the memory route for large N; TensorRT cannot parse it)")
    target.add_argument("--atol", type=_number(float), metavar="TOL",
                        help="absolute tolerance of the parity gate on the embeddings (default 1e-4 for fp32 files; "
                             "reduced-precision engines add it to their relative limit); the kept set must still match")
    target.add_argument("--runtime", choices=RUNTIMES,
                        help="which runtime an .onnx file is for: portable (default; operators every runtime "
                             "takes, TensorRT included), tensorrt (full-attention blocks attend per row of "
                             "image_grid_thw when the rows are equal: equal images, or a video passed as t rows "
                             "of [1, h, w]; a failed TensorRT check refuses the file; what .engine means), "
                             "onnxruntime (full-attention blocks loop over the "
                             "images and video slices of a call instead of a dense masked product: the stock "
                             "kernels' cost; TensorRT cannot build it)")
    target.add_argument("--diagnostic-outputs", action="store_true",
                        help="an .onnx file also returns kept_index and neighbor_index after image_features "
                             "(which patches were computed in full, what each removed one was rebuilt from); "
                             "without it the file has the one output a serving runtime reads. Engines and .pt2 "
                             "files always return all three")
    target.add_argument("--skip-verify", action="store_true",
                        help="do not check the file against the eager reference (loud, and recorded in the manifest)")
    p.add_argument("--list-models", action="store_true", help="list the built-in models and exit")
    p.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    p.add_argument("-v", "--verbose", action="store_true", help="also print per-grid diffs and every compatibility finding")
    p.add_argument("--version", action="version", version=f"ipcv-export {__version__}")
    return p


GENERATE_EPILOG = """The encoder file is exported from the model's vision tower at --retention (ONNX, verified)
once and cached ($IPCV_EXPORT_CACHE, else ~/.cache/ipcv-export; keyed by the weights, the
settings files, the retention and the tool's code), unless --encoder names one; --no-cache exports
into a temporary folder for this run only. The LLM prunes the first image's tokens
before layer --llm-layer (ivc-prune.md). Built-in chat models have random weights and a byte
tokenizer: their text is noise, their token counts and timings are real.

exit codes: 0 ok, 1 other failure, 2 bad option or input, 130 interrupted, 143 terminated (SIGTERM)
"""


def build_generate_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ipcv-export generate", formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog=GENERATE_EPILOG,
                description="Answer a prompt about images with IPCV in the vision encoder and IVC-Prune in the "
                            "LLM, and report visual token counts, encoder and prefill time, KV-cache size and "
                            "decode speed.")
    p.add_argument("--model", required=True, help="built-in chat model (see ipcv-export --list-models) or a local "
                                                   "Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoint folder with tokenizer files (not Qwen3.5: "
                                                   "IVC-Prune needs attention in every LLM layer)")
    p.add_argument("--image", action="append", default=[], metavar="FILE",
                   help="image file; repeat for several (only the first image's tokens are pruned in the LLM)")
    p.add_argument("--prompt", required=True, help="the question or instruction")
    p.add_argument("--retention", type=_number(float),
                   help=f"IPCV retention in the encoder, in (0, 1] (default {IpcvConfig().retention}); "
                        "not with --encoder, whose file has its own")
    p.add_argument("--llm-retention", type=_number(float), default=0.5,
                   help="IVC-Prune retention of the first image's tokens in the LLM, in (0, 1] (default 0.5)")
    p.add_argument("--llm-layer", type=_number(int),
                   help="decoder layer k before which the LLM prunes (default: 16 for 28-layer models, 22 for "
                        "36-layer ones, else about 4/7 of the depth; never before Qwen3-VL's DeepStack layers)")
    p.add_argument("--encoder", metavar="FILE", help="an encoder file exported by ipcv-export for this model")
    p.add_argument("--no-cache", action="store_true",
                   help="export the encoder for this run only (default: reuse the file an earlier run of the same "
                        "model and --retention cached in $IPCV_EXPORT_CACHE or ~/.cache/ipcv-export, or cache it)")
    p.add_argument("--max-new-tokens", type=_number(int), default=32, help="tokens to generate (default 32)")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the generated text")
    p.add_argument("-v", "--verbose", action="store_true", help="show library warnings")
    return p


def generate_main(argv: list[str]) -> int:
    try:
        args = build_generate_parser().parse_args(argv)
    except SystemExit as stop:
        return int(stop.code or 0)
    if args.encoder and args.retention is not None:
        return _fail(EXIT_USAGE, "--retention sets the encoder export; --encoder gives a file exported with its own "
                                 "retention (see its manifest): drop one")
    if args.max_new_tokens < 1:
        return _fail(EXIT_USAGE, f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not args.verbose:
        _quiet_libraries()
    report = (lambda _line: None) if args.quiet else print
    from .llm.chat_models import load_chat_model
    from .llm.pipeline import Pipeline

    try:
        images = [_read_image(path) for path in args.image]
        chat = load_chat_model(args.model)
        chat.check_question(args.prompt)  # before the encoder export, which takes minutes
        retention = IpcvConfig().retention if args.retention is None else args.retention
        pipeline = Pipeline(chat, encoder=args.encoder, retention=retention,
                            llm_retention=args.llm_retention, llm_layer=args.llm_layer, report=report,
                            cache_encoder=not args.no_cache)
        result = pipeline.generate(images, args.prompt, max_new_tokens=args.max_new_tokens)
    except UsageError as err:
        return _fail(EXIT_USAGE, str(err))
    print(result.text if args.quiet else f"generated: {result.text!r}")
    for line in result.lines():
        report(line)
    return EXIT_OK


def _read_image(path: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise UsageError(f"image {path!r} does not exist") from None
    except (UnidentifiedImageError, OSError) as err:
        raise UsageError(f"image {path!r} cannot be read ({err})") from None


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, so that staging folders and temporary files are
    removed on the way out as for Ctrl-C."""


def _terminate(_signum, _frame) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    """The command line; Ctrl-C and SIGTERM at any point (imports included) end in one line."""
    import threading

    in_main_thread = threading.current_thread() is threading.main_thread()  # signal handlers live there only
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    try:
        return _main(sys.argv[1:] if argv is None else argv)
    except Terminated:
        return _fail(EXIT_TERMINATED, "terminated, nothing written")
    except KeyboardInterrupt:
        return _fail(EXIT_INTERRUPTED, "interrupted, nothing written")
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str]) -> int:
    if argv[:1] == ["generate"]:
        return generate_main(argv[1:])
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # --help, --version, or a one-line usage error already printed
        return int(stop.code or 0)
    if args.list_models:
        from .loading import builtin_models

        from .llm.chat_models import builtin_chat_models

        for name, description in (builtin_models() | builtin_chat_models()).items():
            print(f"{name:24s} {description}")
        return EXIT_OK
    if not args.model or not args.output:
        return _fail(EXIT_USAGE, "--model and -o/--output are required (see --help)")
    given = [flag for flag in METHOD_FLAGS if any(a == flag or a.startswith(flag + "=") for a in argv)]
    if args.budget is not None and given:
        return _fail(EXIT_USAGE, f"--budget chooses the method settings itself; drop {', '.join(given)}")
    report = (lambda _line: None) if args.quiet else print
    if not args.verbose:
        _quiet_libraries()
    from .lower.tensorrt import TensorRTMissing
    from .api import export
    from .pipeline import IncompatibleGraph
    from .verify import ParityError

    try:
        method, target = method_and_target(args)
        export(args.model, target, method, report=report, verbose=args.verbose)
    except ParityError as err:
        return _fail(EXIT_PARITY, f"verification failed, nothing written: {err}")
    except IncompatibleGraph as err:
        return _fail(EXIT_INCOMPATIBLE, str(err))
    except UsageError as err:
        return _fail(EXIT_USAGE, str(err))
    except TensorRTMissing as err:
        return _fail(EXIT_NO_TENSORRT, str(err))
    except OSError as err:  # the disk filled up, the folder went away: the system's words, in one line
        if args.verbose:
            raise
        return _fail(EXIT_FAILED, f"{err.strerror or err}{f': {err.filename}' if err.filename else ''}; nothing written")
    return EXIT_OK


def method_and_target(args: argparse.Namespace) -> tuple[Method, Target]:
    """The export's two arguments from the parsed flags: each flag is the field of the same name
    (--skip-verify is verify=False)."""
    method = Method(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Method)})
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Target) if f.name != "verify"}
    return method, Target(**given, verify=not args.skip_verify)


def _quiet_libraries() -> None:
    """Hide library chatter that says nothing about this export (deprecations inside torch and
    transformers, the ONNX exporter listing torchvision ops it skips, transformers' bars while it
    loads or saves a checkpoint); -v shows it."""
    import logging
    import warnings

    import torch  # noqa: F401  (importing torch resets its loggers' levels: quiet them after it)

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


def _fail(code: int, message: str) -> int:
    print(f"ipcv-export: error: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
