"""`ipcv-export`: a thin command line over `ipcv_export.export`."""

from __future__ import annotations

import argparse
import sys

from . import __version__
from .config import IpcvConfig, UsageError
from .lower.onnx import DEFAULT_OPSET
from .verify import ParityError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_PARITY = 0, 1, 2, 3

EPILOG = f"""examples:
  ipcv-export --model tiny-qwen2-vl --retention 0.5 -o encoder.onnx
  ipcv-export --model ./Qwen2-VL-7B-Instruct --retention 0.35 --prune-layer 3 --as-depth 7 -o qwen2vl.onnx

exit codes: {EXIT_OK} written and verified; {EXIT_USAGE} bad option or input (nothing written);
  {EXIT_PARITY} the file disagreed with the eager reference (nothing written); {EXIT_FAILED} other failure.
"""


class _Parser(argparse.ArgumentParser):
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
    d = IpcvConfig()
    p = _Parser(prog="ipcv-export", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
                description="Compile IPCV token compression into a vision encoder and write it as an ONNX file "
                            "whose output stands in for the original encoder's (same tokens, same order).")
    p.add_argument("--model", help="built-in model name (see --list-models) or a local Hugging Face checkpoint folder")
    p.add_argument("-o", "--output", help="output file; format from the suffix: .onnx")
    p.add_argument("--retention", type=_number(float), default=d.retention,
                   help=f"fraction rho of tokens computed in full after the pruning block, in (0, 1] (default {d.retention})")
    p.add_argument("--prune-layer", type=_number(int), default=d.prune_layer,
                   help=f"block l_p before which tokens are pruned, in [1, depth-1] (default {d.prune_layer})")
    p.add_argument("--as-depth", type=_number(int), default=d.as_depth,
                   help=f"number of attention-stabilised blocks Delta, >= 0 (default {d.as_depth})")
    p.add_argument("--neighbors", type=_number(int), default=d.neighbors,
                   help=f"neighbours k used to reconstruct each pruned token, >= 1 (default {d.neighbors})")
    p.add_argument("--opset", type=_number(int), default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    p.add_argument("--skip-verify", action="store_true",
                   help="do not check the file against the eager reference (recorded in the manifest)")
    p.add_argument("--list-models", action="store_true", help="list the built-in models and exit")
    p.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    p.add_argument("--version", action="version", version=f"ipcv-export {__version__}")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # --help, --version, or a one-line usage error already printed
        return int(stop.code or 0)
    if args.list_models:
        from .models import builtin_models

        for name, description in builtin_models().items():
            print(f"{name:24s} {description}")
        return EXIT_OK
    if not args.model or not args.output:
        return _fail(EXIT_USAGE, "--model and -o/--output are required (see --help)")
    config = IpcvConfig(args.retention, args.prune_layer, args.as_depth, args.neighbors)
    report = (lambda _line: None) if args.quiet else print
    from .pipeline import export

    try:
        export(args.model, args.output, config, opset=args.opset, verify=not args.skip_verify, report=report)
    except ParityError as err:
        return _fail(EXIT_PARITY, f"verification failed, nothing written: {err}")
    except UsageError as err:
        return _fail(EXIT_USAGE, str(err))
    except KeyboardInterrupt:
        return _fail(130, "interrupted, nothing written")
    return EXIT_OK


def _fail(code: int, message: str) -> int:
    print(f"ipcv-export: error: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
