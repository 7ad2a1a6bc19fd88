"""Cost of IPCV's token bookkeeping next to the encoder's (issue 7, target 5).

    .venv/bin/python benchmarks/selection_overhead.py --model qwen2-vl-7b-shape --tokens 16384 \\
        --encoder-seconds 140

Exports the token steps alone as a small ONNX graph over [N, d] states, the way the passes insert
them: importance score, exact top-K selection, neighbour search, one reconstruction per AS block
and one before the merger, and the scatter back into place. Times it in ONNX Runtime CPU (2
threads, median of 5 after a warm-up) and prints it as a share of --encoder-seconds (one run of
the IPCV file at the same N, e.g. from benchmarks/memory.py).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import onnxruntime
import torch

from ipcv_export import tokens
from ipcv_export.config import IpcvConfig
from ipcv_export.loading import load_encoder


class TokenSteps(torch.nn.Module):
    """The bookkeeping of one IPCV file, with the blocks' work replaced by fixed drifts."""

    def __init__(self, config: IpcvConfig) -> None:
        super().__init__()
        self.config = config

    def forward(self, before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
        config = self.config
        keep, rem, slot = tokens.select_tokens(tokens.importance_score(before, after),
                                               tokens.kept_count(after.shape[0], config.retention_e4))
        kept, removed = after.index_select(0, keep), after.index_select(0, rem)
        neighbors = tokens.nearest_kept(kept, removed, config.neighbors)
        now = kept
        for _ in range(config.as_depth + 1):  # each AS block, then reintegration
            now = now + 0.01
            rebuilt = tokens.reconstruct(now, kept, removed, neighbors)
        return tokens.scatter_back(now, rebuilt, slot)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2-vl-7b-shape")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--retention", type=float, default=0.5)
    parser.add_argument("--encoder-seconds", type=float, help="one run of the IPCV file at the same N")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    width = load_encoder(args.model).module.config
    width = getattr(width, "embed_dim", None) or width.hidden_size
    config = IpcvConfig(args.retention)
    generator = torch.Generator().manual_seed(0)
    before = torch.randn(args.tokens, width, generator=generator)
    after = before + torch.randn(args.tokens, width, generator=generator)
    path = Path(tempfile.mkdtemp(prefix="ipcv-bench-")) / "token_steps.onnx"
    dynamic = torch.export.Dim("n", min=64)
    torch.onnx.export(TokenSteps(config), (before[:256], after[:256]), path, dynamo=True, verbose=False,
                      input_names=["before", "after"], dynamic_shapes=({0: dynamic}, {0: dynamic}))
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = args.threads
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = {"before": before.numpy(), "after": after.numpy()}
    session.run(None, feeds)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    share = f", {100 * seconds / args.encoder_seconds:.2f}% of the encoder's {args.encoder_seconds:.1f} s" \
        if args.encoder_seconds else ""
    print(f"N={args.tokens}, d={width}, rho={args.retention}, k={config.neighbors}, Delta={config.as_depth}: "
          f"token steps {1e3 * seconds:.0f} ms (median of 5){share}")


if __name__ == "__main__":
    main()
