"""ExportedProgram -> `.pt2` files: an AOTInductor package, or the ExportedProgram itself.

Both are written after the same decomposition as the ONNX path, so `ipcv::segment_attention`
becomes a masked scaled-dot-product attention and the file loads without this project:
`torch._inductor.aoti_load_package(path)` (Python, or C++ through AOTIModelPackageLoader) for the
package, `torch.export.load(path).module()` for the program. N stays dynamic in both.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .. import ops


def to_aoti(program: torch.export.ExportedProgram, path: Path) -> Path:
    """Compile `program` ahead of time with Inductor for the device its weights are on.

    Compiling takes about a minute for a small model on two CPU cores (C++ code generation).
    """
    decomposed = ops.decompose(program)
    torch._inductor.aoti_compile_and_package(decomposed, package_path=str(path))
    return path


def to_exported_program(program: torch.export.ExportedProgram, path: Path) -> Path:
    """`torch.export.save` of the rewritten program, for users who compile it themselves."""
    torch.export.save(ops.decompose(program), str(path))
    return path
