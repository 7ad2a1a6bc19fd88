"""`--budget F`: the IPCV setting with the best measured fidelity among those whose FLOPs on the
model being exported are at most F times the original's.

The candidates and their fidelity are measured, not estimated: `benchmarks/fidelity.py --sweep`
runs each setting on real photographs with real weights (DINOv2 ViT-S/14) and writes
`budget_settings.json` (which records how). FLOPs come from the exported family's own cost model
at the profile's N, which the counted graph equals; settings the family cannot run (spread
selection on packed towers, a pruning layer beyond its depth) are skipped.
"""

from __future__ import annotations

import json
from pathlib import Path

from .config import IpcvConfig, UsageError
from .flops import floor_ratio
from .models.encoder import LoadedEncoder
from .passes import check_supported

SETTINGS = Path(__file__).with_name("budget_settings.json")
FIELDS = ("retention", "prune_layer", "as_depth", "neighbors", "selection", "mixed_cell")
"""What a table entry records of its setting; entries measured before a field existed lack it and
take IpcvConfig's default (`setting_of`)."""


def setting_of(entry: dict) -> IpcvConfig:
    """The IpcvConfig a budget table entry was measured with."""
    return IpcvConfig(**{field: entry[field] for field in FIELDS if field in entry})


def choose_setting(encoder: LoadedEncoder, budget: float, tokens: int) -> tuple[IpcvConfig, dict]:
    """(config, record for the manifest) of the best measured setting within `budget`; ranked by
    the worst photo's mean patch cosine, then the mean, then fewer FLOPs."""
    if not 0 < budget <= 1:
        raise UsageError(f"--budget must be in (0, 1] (a fraction of the original encoder's FLOPs), got {budget}")
    if encoder.description.tower_shape is None:
        raise UsageError(f"--budget needs a cost model; {encoder.description.architecture} has none")
    table = json.loads(SETTINGS.read_text())
    fitting, cheapest = [], 1.0
    for entry in table["settings"]:
        config = setting_of(entry)
        if not _runs_on(config, encoder):
            continue
        ratio = floor_ratio(encoder, config, tokens)
        cheapest = min(cheapest, ratio)
        if ratio <= budget:
            fitting.append((entry["worst_patch_cosine"], entry["mean_patch_cosine"], -ratio, config, entry))
    if not fitting:
        raise UsageError(f"no measured setting fits a budget of {budget} on this model at N={tokens}; "
                         f"the cheapest costs {cheapest:.3f} of the original")
    worst, mean, negative_ratio, config, entry = max(fitting, key=lambda item: item[:3])
    record = {"budget": budget, "flop_ratio": round(-negative_ratio, 4), "at_tokens": tokens,
              "measured_worst_patch_cosine": worst, "measured_mean_patch_cosine": mean, "measured": table["measured"]}
    return config, record


def _runs_on(config: IpcvConfig, encoder: LoadedEncoder) -> bool:
    try:
        config.check(encoder.depth)
        check_supported(config, encoder.description)
    except UsageError:
        return False
    return True
