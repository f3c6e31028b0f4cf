"""Ranked-list pictures: a query and its top-k gallery images, true matches framed green.

Output arrays are (H, W, 3) uint8 RGB, ready for ``SummaryWriter.add_image(...,
dataformats="HWC")`` or :func:`save_png`. Unreadable images (missing or empty files)
are drawn as grey tiles, so pictures never fail an evaluation. Without identities
(searching one's own images) :func:`captioned_ranked_list` writes a title and a caption
under every tile instead (rank, distance).
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


def load_tile(path: str, height: int, width: int, keep_aspect: bool = False) -> np.ndarray:
    """(height, width, 3) uint8 RGB of an image, or a grey tile when it cannot be read.

    ``keep_aspect``: scale to fit and pad with white instead of stretching (images of any shape).
    """
    image = cv2.imread(path, cv2.IMREAD_COLOR) if Path(path).is_file() else None
    if image is None:
        return np.full((height, width, 3), 128, dtype=np.uint8)
    image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    if not keep_aspect:
        return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
    scale = min(height / image.shape[0], width / image.shape[1])
    size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
    image = cv2.resize(image, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    top, left = (height - size[1]) // 2, (width - size[0]) // 2
    tile = np.full((height, width, 3), 255, dtype=np.uint8)
    tile[top : top + size[1], left : left + size[0]] = image
    return tile


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


FONT = cv2.FONT_HERSHEY_SIMPLEX
TEXT = (0, 0, 0)
CAPTION_SCALE, TITLE_SCALE = 0.5, 0.55
LINE_HEIGHT = 20  # pixels per text line at these scales
NEUTRAL_BORDER = (170, 170, 170)


def _text_band(lines: Sequence[str], width: int, scale: float) -> np.ndarray:
    """White (len(lines) * LINE_HEIGHT + 4, width, 3) band with black text lines, left-aligned."""
    band = np.full((len(lines) * LINE_HEIGHT + 4, width, 3), 255, dtype=np.uint8)
    for i, line in enumerate(lines):
        cv2.putText(band, line, (4, (i + 1) * LINE_HEIGHT - 4), FONT, scale, TEXT, 1, cv2.LINE_AA)
    return band


def _text_width(lines: Sequence[str], scale: float) -> int:
    return max((cv2.getTextSize(line, FONT, scale, 1)[0][0] for line in lines), default=0) + 8


def captioned_ranked_list(
    query_path: str,
    query_caption: Sequence[str],
    ranked: Sequence[tuple[str, Sequence[str]]],
    title: Sequence[str] = (),
    height: int = 192,
    width: int = 96,
    border: int = 3,
    gap: int = 16,
) -> np.ndarray:
    """A title, then one row: the query and its ranked ``(path, caption lines)``, each tile captioned below.

    Tiles keep each image's aspect ratio, so images of any size read as they are.
    """
    lines = max([len(query_caption), *(len(c) for _, c in ranked)])
    tile_width = max(width + 2 * border, _text_width([*query_caption, *(x for _, c in ranked for x in c)],
                                                      CAPTION_SCALE))

    def column(path: str, caption: Sequence[str], color: tuple[int, int, int]) -> np.ndarray:
        tile = _framed(load_tile(path, height, width, keep_aspect=True), color, border)
        pad = tile_width - tile.shape[1]
        tile = np.pad(tile, ((0, 0), (pad // 2, pad - pad // 2), (0, 0)), constant_values=255)
        return np.concatenate([tile, _text_band([*caption, *[""] * (lines - len(caption))], tile_width,
                                                CAPTION_SCALE)])

    columns = [column(query_path, query_caption, QUERY_BORDER)]
    columns.append(np.full((columns[0].shape[0], gap, 3), 255, dtype=np.uint8))
    for path, caption in ranked:
        columns.append(column(path, caption, NEUTRAL_BORDER))
        columns.append(np.full((columns[0].shape[0], 4, 3), 255, dtype=np.uint8))
    row = np.concatenate(columns[:-1] if ranked else columns, axis=1)
    total = max(row.shape[1], _text_width(title, TITLE_SCALE))
    row = np.pad(row, ((0, 0), (0, total - row.shape[1]), (0, 0)), constant_values=255)
    parts = [_text_band(title, total, TITLE_SCALE)] if title else []
    return np.ascontiguousarray(np.concatenate([*parts, row]))


def save_png(image: np.ndarray, path: str | Path) -> Path:
    """Write an (H, W, 3) uint8 RGB array as PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write {path}")
    return path
