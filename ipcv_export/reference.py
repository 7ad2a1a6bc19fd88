"""The eager reference of IPCV (ipcv.md), in plain PyTorch on the model's own modules.

This is the oracle every exported file is checked against. It is written for reading, not for
speed or export: a stable sort for the selection, `torch.cdist` for neighbours, boolean-free
index assignment for reintegration, and the stock block's own forward (with transformers' SDPA
attention, one segment at a time) wherever a block runs unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .config import IpcvConfig
from .inputs import check_grid, position_ids, real_patches, segment_ids
from .models.description import ModelDescription, PaddedParts, TowerParts
from .models.qwen2_vl import QWEN2_VL
from .tokens import WEIGHT_EPSILON, area_weights, rankable, unit_rows



@dataclass
class ReferenceResult:
    """Packed towers: one selection per call; batched towers add a leading [B] axis to each."""

    embeddings: torch.Tensor  # [N / merge^2, hidden], the merger's output, in the processor's order
    keep: torch.Tensor  # [K] ascending indices of the kept tokens (in the description's token order)
    neighbors: torch.Tensor  # [R, k'] indices into keep of each removed token's neighbours
    distances: torch.Tensor  # [R, K] fp32 distances between removed and kept tokens at l_p
    taps: list[torch.Tensor] = field(default_factory=list)  # each tapped block's merger output, as embeddings


@torch.no_grad()
def ipcv_reference(visual: torch.nn.Module, pixel_values: torch.Tensor, grid_thw: torch.Tensor,
                   config: IpcvConfig, neighbors: torch.Tensor | None = None,
                   keep: torch.Tensor | None = None, description: ModelDescription | None = None) -> ReferenceResult:
    """Run the encoder `visual` (a stock Qwen2-VL-style vision module) with IPCV.

    From the tower's `description` (None: every field's default): `block_segments`, the per-block
    attention segments (window ids in a windowed tower's window blocks; by default every block
    attends within each image); `embed` (patches plus resampled positions; by default the module's
    patch embedding); `token_order`, the order of the blocks' tokens (window-major in a windowed
    tower): the tokens are put in it after the patch embedding, keep and neighbours index it,
    and the merger's output is put back in the processor's order.

    `neighbors` and `keep` replace the neighbour search's and the selection's results, so that a
    file whose discrete choices differ from ours (equally distant neighbours; or, in fp16/bf16,
    scores computed from rounded states) can be compared value by value (see verify.py).
    """
    description = description or QWEN2_VL
    block_segments, token_order, embed = description.block_segments, description.token_order, description.embed
    run_block, run_stabilized_block = description.run_block, description.run_stabilized_block
    taps = dict(description.taps(visual)) if description.taps else {}  # block -> its merger
    tapped: dict[int, torch.Tensor] = {}  # block -> its merger's output, in token order
    grid = check_grid(grid_thw, visual.spatial_merge_size)
    positions, images = position_ids(grid, visual.spatial_merge_size), segment_ids(grid)
    group = visual.spatial_merge_size ** 2
    place = (token_order(visual.config, positions, images) if token_order
             else torch.arange(len(images)))
    order = torch.argsort(place)
    x = embed(visual, pixel_values, grid) if embed else visual.patch_embed(pixel_values)  # each row alone
    positions, images, x = positions[order], images[order], x[order]
    blocks = list(visual.blocks)
    segs = ([attention.segments for attention in block_segments(visual.config, positions, images)]
            if block_segments else [images] * len(blocks))
    cos, sin = visual.rotary_pos_emb(x, positions)
    n = x.shape[0]

    # Blocks before the pruning point run unchanged.
    for index, (block, seg) in enumerate(zip(blocks[:config.prune_layer - 1], segs)):
        x = run_block(block, x, cos, sin, seg)
        if index in taps:
            tapped[index] = taps[index](x)
    x_after = run_block(blocks[config.prune_layer - 1], x, cos, sin, segs[config.prune_layer - 1])
    if config.prune_layer - 1 in taps:
        tapped[config.prune_layer - 1] = taps[config.prune_layer - 1](x_after)

    # 1. Prune: keep the K tokens that block l_p-1 changed most (ties to the lower index).
    score = rankable((x_after.float() - x.float()).pow(2).sum(-1))  # NaN counts as 0
    k = min(max((n * config.retention_e4) // 10_000, 1), n)
    if keep is None:
        keep = (per_image_keep(score, images, k, config.retention_e4) if config.per_image_selection
                else torch.sort(score, descending=True, stable=True).indices[:k].sort().values)
    rem = torch.ones(n, dtype=torch.bool).index_fill_(0, keep, False).nonzero().flatten()
    kept_then, removed_then = x_after[keep], x_after[rem]

    # 2. NGR: neighbours once, at the pruning point; reconstruction from their drift.
    k_prime = min(config.neighbors, k)
    distances = torch.cdist(removed_then.float(), kept_then.float())
    if neighbors is None:
        neighbors = distances.topk(k_prime, largest=False).indices

    weights = ngr_weights(removed_then, kept_then[neighbors], config)

    def reconstruct(kept_now: torch.Tensor) -> torch.Tensor:
        return removed_then + mean_drift((kept_now - kept_then)[neighbors], weights)

    def full_sequence(kept_now: torch.Tensor) -> torch.Tensor:
        z = torch.empty(n, kept_now.shape[1], dtype=kept_now.dtype)
        z[keep] = kept_now
        z[rem] = reconstruct(kept_now)
        return z

    # 3. Attention stabilisation, then 4. kept-only blocks.
    y = kept_then
    stabilized = range(config.prune_layer, min(config.prune_layer + config.as_depth, len(blocks)))
    for index in range(config.prune_layer, len(blocks)):
        if index in stabilized:
            y = run_stabilized_block(blocks[index], full_sequence(y), y, keep, cos, sin, segs[index])
        else:
            y = run_block(blocks[index], y, cos[keep], sin[keep], segs[index][keep])
        if index in taps:  # a tap after l_p reads every token: rebuilt as at the end (ipcv.md)
            tapped[index] = taps[index](full_sequence(y))

    # 5. Reintegrate every token in its place, then the merger as it is.
    back = place[::group] // group  # merged rows back in the processor's order
    merged = visual.merger(full_sequence(y))[back]
    return ReferenceResult(merged, keep, neighbors, distances, [tapped[index][back] for index in taps])


def per_image_keep(score: torch.Tensor, segments: torch.Tensor, k: int, retention_e4: int) -> torch.Tensor:
    """Per-image selection (config.per_image_selection): each segment's best (N_s * rho) // 10^4
    tokens, then the best of the others until K; ascending indices."""
    order = torch.sort(score, descending=True, stable=True).indices
    chosen = torch.zeros_like(score, dtype=torch.bool)
    for segment in segments.unique():
        members = order[segments[order] == segment]
        chosen[members[:len(members) * retention_e4 // 10_000]] = True
    others = order[~chosen[order]]
    chosen[others[:k - int(chosen.sum())]] = True
    return chosen.nonzero().flatten()


def ngr_weights(removed: torch.Tensor, neighbor_states: torch.Tensor, config: IpcvConfig) -> torch.Tensor | None:
    """[..., R, k'] weights of each removed token's neighbours ([..., R, k', D] states at l_p) for
    `ngr_weighting="similarity"`: inverse squared distances, normalised; None for the plain mean."""
    if config.ngr_weighting == "mean":
        return None
    inverse = 1 / ((neighbor_states.float() - removed.float().unsqueeze(-2)).pow(2).sum(-1) + WEIGHT_EPSILON)
    return inverse / inverse.sum(-1, keepdim=True)


def mean_drift(drift: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """[..., R, D] average of the neighbours' drift [..., R, k', D]: plain, or weighted."""
    return drift.mean(-2) if weights is None else (drift * weights.unsqueeze(-1)).sum(-2)


def stock_reference(visual: torch.nn.Module, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
    """The unmodified encoder's output (transformers' own forward)."""
    with torch.no_grad():
        return visual(pixel_values, grid_thw=check_grid(grid_thw, visual.spatial_merge_size)).pooler_output



@torch.no_grad()
def batched_reference(parts: TowerParts, special_tokens: int, pixel_values: torch.Tensor, config: IpcvConfig,
                      neighbors: torch.Tensor | None = None, keep: torch.Tensor | None = None,
                      ngr: bool = True, across_images: bool = False) -> ReferenceResult:
    """IPCV on a tower that batches whole images (ipcv.md, towers with a CLS token), through the
    stock parts: selection, neighbours and reconstruction per image; the special tokens always kept.

    An AS block is the stock block run on the rebuilt sequence, read at the kept rows: everything
    in a block but attention acts on each token alone, and attention rows are independent per
    query, so those rows are exactly "queries from kept rows, keys and values from all rows".
    Results are batched: keep [B, S + K], neighbors [B, R, k'], distances [B, R, S + K]; with
    `across_images`, neighbours are searched among the kept tokens of all images, and neighbors
    and distances index the flattened [B * (S + K)] kept tokens. Merge selection (`merge_plan`)
    keeps the merged tokens' places, starts them from the mean of what they absorbed, and gives
    each merged-away token its owner as its one neighbour (within its image). `ngr=False` is the plain-pruning
    baseline of the fidelity study: removed tokens keep their pruning-point states (no drift), in
    AS blocks and at reintegration.
    """
    blocks, s = parts.blocks, special_tokens
    x = parts.embed(pixel_values)
    for block in blocks[:config.prune_layer - 1]:
        x = block(x)
    x_after = blocks[config.prune_layer - 1](x)
    batch, n, _ = x.shape
    rows = torch.arange(batch)[:, None]

    # 1. Prune, per image: the K patch tokens block l_p-1 changed most (or the first K of the
    # spread order; or hybrid and bipartite: half by that order, half by the score or by
    # distinctness from that half); specials always kept.
    k = min(max(((n - s) * config.retention_e4) // 10_000, 1), n - s)
    merging = config.selection == "merge"
    if merging and (keep is None or neighbors is None):  # the kept places and the owners come together
        planned_keep, planned_owner = merge_plan(x_after, s, k)
        keep = planned_keep if keep is None else keep
        neighbors = planned_owner if neighbors is None else neighbors
    if keep is None:
        score = rankable((x_after.float() - x.float()).pow(2).sum(-1)[:, s:])
        if config.selection != "score":  # the first K (spread) or K // 2 of the spread order win outright
            order = spread_order(pixel_values.shape[3] // parts.patch_size, n - s)
            base = order[:k if config.selection == "spread" else k // 2]
            if config.selection == "bipartite":
                score = distinctness(x_after[:, s:], base)
            score = score.index_fill(1, base, torch.inf)
        best = torch.sort(score, descending=True, stable=True).indices[:, :k].sort(-1).values
        keep = torch.cat([torch.arange(s).expand(batch, s), best + s], 1)
    removed_mask = torch.ones(batch, n, dtype=torch.bool)
    removed_mask[rows, keep] = False
    rem = torch.arange(n).expand(batch, n)[removed_mask].reshape(batch, n - keep.shape[1])
    kept_then, removed_then = x_after[rows, keep], x_after[rows, rem]
    if merging:
        kept_then = merged_states(x_after, keep, rem, neighbors[..., 0])

    # 2. NGR within each image (or across images): neighbours once, among the kept tokens, specials
    # included; merging: each merged-away token's owner, within its image.
    across_images = across_images and not merging
    candidates = kept_then.flatten(0, 1).expand(batch, -1, -1) if across_images else kept_then
    if merging:  # 0 at the owner, inf elsewhere: any other neighbour fails the parity gate
        distances = torch.full((batch, rem.shape[1], keep.shape[1]), torch.inf).scatter(-1, neighbors, 0.0)
    else:
        distances = torch.cdist(removed_then.float(), candidates.float())
    if neighbors is None:
        neighbors = distances.topk(min(config.neighbors, candidates.shape[1]), largest=False).indices

    weights = ngr_weights(removed_then, candidates[rows[:, :, None], neighbors], config)

    def full_sequence(kept_now: torch.Tensor) -> torch.Tensor:
        drift = kept_now - kept_then
        if across_images:
            drift = drift.flatten(0, 1).expand(batch, -1, -1)
        drift = mean_drift(drift[rows[:, :, None], neighbors], weights) if ngr else 0
        z = torch.empty_like(x_after)
        z[rows, keep] = kept_now
        z[rows, rem] = removed_then + drift
        return z

    # 3. Attention stabilisation, then 4. kept-only blocks, then 5. reintegration and the head.
    y = kept_then
    stabilized = range(config.prune_layer, min(config.prune_layer + config.as_depth, len(blocks)))
    for index in range(config.prune_layer, len(blocks)):
        y = blocks[index](full_sequence(y))[rows, keep] if index in stabilized else blocks[index](y)
    return ReferenceResult(parts.head(full_sequence(y), pixel_values.shape[3] // parts.patch_size), keep, neighbors,
                           distances)


def merge_plan(x: torch.Tensor, special_tokens: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ToMe's bipartite merging of each image's patches (x [B, N, D] after S special tokens) down to
    K (config.SELECTIONS, `merge`): keep [B, S + K], the places of the tokens never merged away, and
    owner [B, R, 1], the row in keep whose token each removed patch joined."""
    keeps, owners = [], []
    for image in x:
        origin, group = _merge_image(image[special_tokens:].float(), k)
        removed = torch.ones(len(group), dtype=torch.bool).index_fill_(0, origin, False).nonzero().flatten()
        keeps.append(torch.cat([torch.arange(special_tokens), origin + special_tokens]))
        owners.append(group[removed] + special_tokens)
    return torch.stack(keeps), torch.stack(owners).unsqueeze(-1)


def _merge_image(patches: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(origin [K] ascending patch indices, group [P] each patch's row in origin). A round splits
    the current tokens (means of the patches they hold) by position: A even, B odd; the
    min(|A|, n - K) A tokens whose best cosine to a B token is largest (ranked by relu(1 + cosine),
    ties to the lower index) join that B token."""
    group, origin = torch.arange(len(patches)), torch.arange(len(patches))
    while len(origin) > k:
        n = len(origin)
        sums = torch.zeros(n, patches.shape[1]).index_add_(0, group, patches)
        states = sums / torch.bincount(group, minlength=n)[:, None]
        unit = unit_rows(states)
        a, b = torch.arange(0, n, 2), torch.arange(1, n, 2)
        best, match = (unit[a] @ unit[b].T).max(-1)
        moving = torch.sort(rankable(1 + best), descending=True, stable=True).indices[:min(len(a), n - k)]
        joins = torch.arange(n).index_copy(0, a[moving], b[match[moving]])
        survivors = torch.ones(n, dtype=torch.bool).index_fill_(0, a[moving], False)
        group = (survivors.cumsum(0) - 1)[joins[group]]
        origin = origin[survivors]
    return origin, group


def merged_states(x: torch.Tensor, keep: torch.Tensor, rem: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    """[B, S + K, D] mean state of each kept token's group: itself and the removed tokens it owns."""
    batch, n, width = x.shape
    group = torch.empty(batch, n, dtype=torch.long)
    rows = torch.arange(batch)[:, None]
    group[rows, keep] = torch.arange(keep.shape[1]).expand_as(keep)
    group[rows, rem] = owner
    sums = torch.zeros(batch, keep.shape[1], width).scatter_add_(1, group[..., None].expand(-1, -1, width), x.float())
    counts = torch.zeros(batch, keep.shape[1]).scatter_add_(1, group, torch.ones(batch, n))
    return (sums / counts[..., None]).to(x.dtype)


def distinctness(patches: torch.Tensor, destinations: torch.Tensor) -> torch.Tensor:
    """[B, P] relu(1 - the largest cosine of each patch state ([B, P, D]) to the `destinations`
    ([M] patch indices)): bipartite selection's score, low for what a destination nearly repeats."""
    unit = unit_rows(patches.float())
    return rankable(1 - (unit @ unit[:, destinations].transpose(1, 2)).amax(-1))


def spread_order(columns: int, patches: int) -> torch.Tensor:
    """The patches of a row-major grid in coarse-to-fine order (config.SELECTIONS, `spread`): sorted
    by a code that reads, from the lowest bit of the coordinates up, (row xor column) then row."""
    def code(index: int) -> int:
        row, column = divmod(index, columns)
        value, bits = 0, max(row, column).bit_length()
        for b in range(bits):
            value = (value << 2) | (((row >> b) ^ (column >> b)) & 1) << 1 | (row >> b) & 1
        return value << 2 * (32 - bits)  # align codes of different lengths at the top

    return torch.tensor(sorted(range(patches), key=code))


@torch.no_grad()
def padded_reference(parts: PaddedParts, pixel_values: torch.Tensor, position_ids: torch.Tensor, config: IpcvConfig,
                     neighbors: torch.Tensor | None = None, keep: torch.Tensor | None = None) -> ReferenceResult:
    """IPCV on a padded tower (Gemma 4: `models/gemma4.py`) through its stock parts, image by image
    on the real patches only: no padding enters any block, the selection or the neighbour search.

    Image b of V real patches keeps K_b = max((V * rho_e4) // 10^4, 1) of them; NGR and AS run over
    its V patches; the stock pooler then sees every patch in its place (padding zero, as the stock
    tower leaves it) and the embedder projects. Results come in the file's padded layout: keep
    [B, K] (K = (P * rho_e4) // 10^4 slots: the image's kept patches, then its first K - K_b padding
    tokens), neighbors [B, R, k'] (k' = min(k, K); index K for none: a padding token's, and past
    an image's own K_b), distances [B, R, K + 1] (inf for padding and for the "none" column), and
    embeddings [B, P / k^2, hidden] (image b's S_b soft tokens, then zeros).
    """
    n = pixel_values.shape[1]
    slots = (n * config.retention_e4) // 10_000
    k_prime = min(config.neighbors, slots)
    results = []
    for image in range(pixel_values.shape[0]):
        real = int(real_patches(position_ids[image]).sum())
        image_keep = None if keep is None else keep[image][keep[image] < real]
        image_neighbors = None if neighbors is None else neighbors[image]
        results.append(_padded_image(parts, pixel_values[image, :real], position_ids[image, :real], n, slots, k_prime,
                                     config, image_keep, image_neighbors))
    keeps, neighbor_rows, distance_rows, hidden = zip(*results)
    embeddings = parts.head(torch.stack(hidden), position_ids)
    return ReferenceResult(embeddings, torch.stack(keeps), torch.stack(neighbor_rows), torch.stack(distance_rows))


def _padded_image(parts: PaddedParts, pixels: torch.Tensor, positions: torch.Tensor, n: int, slots: int, k_prime: int,
                  config: IpcvConfig, keep: torch.Tensor | None,
                  neighbors: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One image of `padded_reference`: (keep [K], neighbors [R, k'], distances [R, K + 1], the
    rebuilt last block's output [P, D] with zero padding rows), given its V real patches."""
    real = pixels.shape[0]
    x = parts.embed(pixels, positions)
    layers = parts.blocks

    def block(index: int, states: torch.Tensor, at: torch.Tensor) -> torch.Tensor:  # stock layer, no padding
        return layers[index](states, positions[at])

    everything = torch.arange(real)
    for index in range(config.prune_layer - 1):
        x = block(index, x, everything)
    x_after = block(config.prune_layer - 1, x, everything)[0]
    own = max((real * config.retention_e4) // 10_000, 1)
    if keep is None:
        score = rankable((x_after.float() - x[0].float()).pow(2).sum(-1))
        keep = torch.sort(score, descending=True, stable=True).indices[:own].sort().values
    rem = torch.ones(real, dtype=torch.bool).index_fill_(0, keep, False).nonzero().flatten()
    kept_then, removed_then = x_after[keep], x_after[rem]
    distances = torch.cdist(removed_then.float(), kept_then.float())
    if neighbors is None:
        neighbors = distances.topk(min(k_prime, own), largest=False).indices
    else:  # the file's choice, in the padded layout: this image's removed patches come first
        neighbors = neighbors[:len(rem), :min(k_prime, own)]
    weights = ngr_weights(removed_then, kept_then[neighbors], config)

    def full_sequence(kept_now: torch.Tensor) -> torch.Tensor:
        z = torch.empty(real, kept_now.shape[-1], dtype=kept_now.dtype)
        z[keep] = kept_now
        z[rem] = removed_then + mean_drift((kept_now - kept_then)[neighbors], weights)
        return z

    y = kept_then
    stabilized = range(config.prune_layer, min(config.prune_layer + config.as_depth, len(layers)))
    for index in range(config.prune_layer, len(layers)):
        if index in stabilized:
            y = block(index, full_sequence(y)[None], everything)[0][keep]
        else:
            y = block(index, y[None], keep)[0]
    hidden = torch.zeros(n, y.shape[-1], dtype=y.dtype)
    hidden[:real] = full_sequence(y)

    fill = torch.arange(real, real + slots - own)
    padding_removed = n - real - len(fill)
    none = torch.full((padding_removed, k_prime), slots)
    neighbor_rows = torch.cat([F.pad(neighbors, (0, k_prime - neighbors.shape[1]), value=slots), none])
    distance_rows = torch.full((len(rem) + padding_removed, slots + 1), torch.inf)
    distance_rows[:len(rem), :own] = distances
    return torch.cat([keep, fill]), neighbor_rows, distance_rows, hidden


def mixed_cells(rows: int, columns: int, retention_e4: int, cell: int = 2) -> tuple[int, int, int]:
    """(cell rows, cell columns, fine cells) of mixed-resolution tokens (FIDELITY.md, issue 23)
    on a rows x columns patch grid: c x c cells tile its first c * (rows // c) rows and columns
    (c = `cell`), and F fine cells give about rho * N patch tokens in all (c^2 per fine cell,
    (c - 1)^2 per coarse cell, 1 per patch left over): F = C (c^2 rho - (c - 1)^2) // (2c - 1),
    none at rho <= ((c - 1) / c)^2. For c = 2, F = C (4 rho - 1) // 3."""
    cell_rows, cell_columns = rows // cell, columns // cell
    cells, coarse = cell_rows * cell_columns, (cell - 1) ** 2
    fine = cells * (cell * cell * retention_e4 - coarse * 10_000) // ((cell * cell - coarse) * 10_000)
    return cell_rows, cell_columns, max(0, fine)


def shrink_cells(grid: torch.Tensor, cell: int) -> torch.Tensor:
    """[..., H, W] -> [..., H (c - 1) / c, W (c - 1) / c]: every c x c block of the last two axes
    area-resized to (c - 1) x (c - 1) (H and W multiples of c; c = 2: 2 x 2 means)."""
    weights = torch.tensor(area_weights(cell), dtype=grid.dtype)
    height, width = grid.shape[-2:]
    grid = grid.reshape(*grid.shape[:-2], height // cell, cell, width // cell, cell)
    grid = torch.einsum("...ajbk,ij,lk->...aibl", grid, weights, weights)
    return grid.reshape(*grid.shape[:-4], height // cell * (cell - 1), width // cell * (cell - 1))


@torch.no_grad()
def mixed_reference(parts: TowerParts, special_tokens: int, pixel_values: torch.Tensor, retention: float,
                    keep: torch.Tensor | None = None, neighbors: torch.Tensor | None = None,
                    cell: int = 2) -> ReferenceResult:
    """Mixed-resolution tokens (`--selection mixed`), one image at a time, with c x c cells of
    patches (c = `cell`, d = c - 1): the tower's own embedding of the image and of its cell part
    shrunk by d / c (`shrink_cells`: c = 2 is 2 x 2 pixel means; d x d coarse tokens per cell at
    the shrunk grid's positions); the F cells whose c^2 patch tokens differ most from their mean
    keep those tokens, every other cell is its d^2 coarse tokens. The blocks run on [specials, the
    fine cells' patches (ascending cells, each in raster order), the coarse cells' tokens (ascending
    cells, each in raster order), the patches outside every cell (raster order)]. Then each fine
    cell stands for its outputs shrunk to d x d, the coarse grid is resized bilinearly (half-pixel
    centres) back to c x c per cell, every patch of a coarse cell takes it, and the head runs on the
    full grid.

    In IPCV's terms (the parity gate's): keep [B, S + c^2 F + X] are the tokens computed at full
    resolution, neighbors [B, R, 1] each other patch's cell, at distance 0 (inf to every other
    cell, so any other choice fails the gate). A given `keep` (a file's choice) fixes the fine
    cells; `neighbors` follow from it and are ignored."""
    p, s, c, d = parts.patch_size, special_tokens, cell, cell - 1
    rows, columns = pixel_values.shape[2] // p, pixel_values.shape[3] // p
    cell_rows, cell_columns, fine = mixed_cells(rows, columns, round(retention * 10_000), c)
    patch = torch.arange(rows * columns).reshape(rows, columns)
    in_cells = patch[:c * cell_rows, :c * cell_columns].reshape(cell_rows, c, cell_columns, c).transpose(1, 2)
    in_cells = in_cells.reshape(-1, c * c)
    leftover = torch.ones(rows, columns, dtype=torch.bool)
    leftover[:c * cell_rows, :c * cell_columns] = False
    leftover_patches = patch[leftover]
    results = []
    for index, pixels in enumerate(pixel_values.split(1)):
        full = parts.embed(pixels)
        width = full.shape[-1]
        coarse = parts.embed(shrink_cells(pixels[:, :, :c * cell_rows * p, :c * cell_columns * p], c))[0, s:]
        coarse = coarse.reshape(cell_rows, d, cell_columns, d, width).transpose(1, 2).reshape(-1, d * d, width)
        grid = full[0, s:].reshape(rows, columns, -1)
        cells = grid[:c * cell_rows, :c * cell_columns].reshape(cell_rows, c, cell_columns, c, -1).transpose(1, 2)
        cells = cells.reshape(cell_rows * cell_columns, c * c, -1).float()
        if keep is None:
            detail = (cells - cells.mean(1, keepdim=True)).pow(2).sum((1, 2))
            chosen = torch.sort(detail, descending=True, stable=True).indices[:fine]
            is_fine = torch.zeros(len(cells), dtype=torch.bool)
            is_fine[chosen] = True
        else:
            is_fine = torch.isin(in_cells[:, 0] + s, keep[index])
        fine_patches = in_cells[is_fine].flatten()
        x = torch.cat([full[:, :s], full[:, s:][:, fine_patches], coarse[~is_fine].reshape(1, -1, width),
                       full[:, s:][:, leftover_patches]], 1)
        for block in parts.blocks:
            x = block(x)
        out_fine, out_coarse, out_leftover = x[0, s:].split([len(fine_patches), int((~is_fine).sum()) * d * d,
                                                             len(leftover_patches)])
        cell_states = torch.empty(len(cells), d * d, width, dtype=x.dtype)
        shrunk = shrink_cells(out_fine.reshape(-1, c, c, width).permute(0, 3, 1, 2), c)
        cell_states[is_fine] = shrunk.permute(0, 2, 3, 1).reshape(-1, d * d, width)
        cell_states[~is_fine] = out_coarse.reshape(-1, d * d, width)
        coarse_grid = cell_states.reshape(cell_rows, cell_columns, d, d, width).permute(4, 0, 2, 1, 3)
        coarse_grid = coarse_grid.reshape(1, width, d * cell_rows, d * cell_columns)
        upsampled = F.interpolate(coarse_grid, size=(c * cell_rows, c * cell_columns), mode="bilinear",
                                  align_corners=False)[0]
        tokens = torch.empty(rows, columns, width, dtype=x.dtype)
        tokens[:c * cell_rows, :c * cell_columns] = upsampled.permute(1, 2, 0)
        tokens = tokens.reshape(rows * columns, -1)
        tokens[fine_patches] = out_fine
        tokens[leftover_patches] = out_leftover
        embeddings = parts.head(torch.cat([x[:, :s], tokens[None]], 1), columns)
        coarse_patches = in_cells[~is_fine].flatten().sort()
        owner = torch.arange(len(cells)).repeat_interleave(c * c).reshape(-1, c * c)[~is_fine].flatten()
        owner = owner[coarse_patches.indices]
        kept = torch.cat([torch.arange(s), torch.cat([fine_patches, leftover_patches]).sort().values + s])
        distances = torch.full((len(owner), len(cells)), torch.inf).scatter(1, owner[:, None], 0.0)
        results.append((embeddings[0], kept, owner[:, None], distances))
    embeddings, kept, owners, distances = (torch.stack(parts_) for parts_ in zip(*results))
    return ReferenceResult(embeddings, kept, owners, distances)
