"""Ranked-list pictures: a query and its top-k gallery images, true matches framed green.

Output arrays are (H, W, 3) uint8 RGB, ready for ``SummaryWriter.add_image(...,
dataformats="HWC")`` or :func:`save_png`. Unreadable images (missing or empty files)
are drawn as grey tiles, so pictures never fail an evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import Tensor

from cmssft.data.records import Sample
from cmssft.evaluation.metrics import Exclusion, get_exclusion

GREEN = (0, 200, 0)
RED = (220, 0, 0)
QUERY_BORDER = (60, 60, 60)


def load_tile(path: str, height: int, width: int) -> np.ndarray:
    """(height, width, 3) uint8 RGB of an image, or a grey tile when it cannot be read."""
    image = cv2.imread(path, cv2.IMREAD_COLOR) if Path(path).is_file() else None
    if image is None:
        return np.full((height, width, 3), 128, dtype=np.uint8)
    image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)


def _framed(tile: np.ndarray, color: tuple[int, int, int], border: int) -> np.ndarray:
    return cv2.copyMakeBorder(tile, border, border, border, border, cv2.BORDER_CONSTANT, value=color)


def ranked_list_image(
    query: Sample,
    ranked: Sequence[Sample],
    height: int = 128,
    width: int = 64,
    border: int = 4,
    gap: int = 12,
) -> np.ndarray:
    """One row: the query, a gap, then ``ranked`` in order; green frame = same identity."""
    tiles = [_framed(load_tile(query.path, height, width), QUERY_BORDER, border)]
    spacer = np.full((height + 2 * border, gap, 3), 255, dtype=np.uint8)
    tiles.append(spacer)
    for s in ranked:
        color = GREEN if s.pid == query.pid else RED
        tiles.append(_framed(load_tile(s.path, height, width), color, border))
        tiles.append(np.full((height + 2 * border, 2, 3), 255, dtype=np.uint8))
    return np.ascontiguousarray(np.concatenate(tiles[:-1] if ranked else tiles, axis=1))


def top_k(
    dist_row: Tensor,
    query: Sample,
    gallery: Sequence[Sample],
    k: int = 10,
    exclusion: Exclusion = "none",
) -> list[Sample]:
    """The ``k`` nearest gallery samples of one query (a (G,) distance row), exclusions applied."""
    g_pids = torch.tensor([s.pid for s in gallery])
    g_cams = torch.tensor([s.camid for s in gallery])
    removed = get_exclusion(exclusion)(torch.tensor([[query.pid]]), torch.tensor([[query.camid]]),
                                       g_pids[None, :], g_cams[None, :]).reshape(-1)
    order = torch.sort(dist_row.detach().cpu(), stable=True).indices
    order = order[~removed[order]][:k]
    return [gallery[i] for i in order.tolist()]


def ranked_lists_image(
    dist: Tensor,
    queries: Sequence[Sample],
    gallery: Sequence[Sample],
    query_indices: Sequence[int],
    k: int = 10,
    exclusion: Exclusion = "none",
    height: int = 128,
    width: int = 64,
) -> np.ndarray:
    """Rows of :func:`ranked_list_image` for the chosen queries of a (Q, G) distance matrix."""
    rows = []
    for qi in query_indices:
        ranked = top_k(dist[qi], queries[qi], gallery, k, exclusion)
        rows.append(ranked_list_image(queries[qi], ranked, height, width))
    widest = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 6), (0, widest - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    return np.concatenate(rows, axis=0)


def save_png(image: np.ndarray, path: str | Path) -> Path:
    """Write an (H, W, 3) uint8 RGB array as PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write {path}")
    return path
