"""Search your own images with a trained checkpoint: every query image against a gallery of images.

``python search.py --checkpoint best.pth --query q/ --gallery g/ --out results/`` lists the images
of two folders (recursively) or two CSV lists, extracts their features in batches (images of any
size, resized by the test transform of the checkpoint's config), ranks the gallery for every query
with the chosen SSTN mode, block by block (memory grows with the gallery's features, never with
queries x gallery), and writes to ``--out``:

- ``results.csv``: ``query, query_modality, rank, gallery, gallery_modality, distance``, the top-k
  of every query, rank 1 first (ascending distance, ties to the earlier gallery image);
- ``images.csv``: ``role, path, modality, modality_from, status``: every input image, how its
  modality was decided, and why it was skipped when it was;
- ``query_features.npz``, ``gallery_features.npz``: the features in the format ``eval.py --features``
  reads (paths relative to the folder or CSV), to reuse them without the model;
- ``pictures/NNNNN_<name>.png``: the query, then its top-k, each captioned with rank and distance.

Modality of an image (0 RGB, 1 IR), first rule that applies: ``--query-modality`` /
``--gallery-modality``; a CSV's ``modality`` column; the nearest folder whose name holds a
modality word (``ir``, ``nir``, ``thermal``, ``infrared`` / ``rgb``, ``vis``, ``visible``,
``color``); the pixels (gray, i.e. equal channels: IR; else RGB). Unreadable images are skipped
and listed; an empty folder, no readable image left, or an unusable checkpoint is a one-line error.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from cmssft.config import Config
from cmssft.data.records import Modality
from cmssft.data.transforms import EvalTransform, read_image
from cmssft.engine.checkpoint import load_checkpoint
from cmssft.engine.inference import (
    Bank,
    ScorerState,
    extract_features,
    model_from_checkpoint,
    model_score_fn,
    scorer_state,
)
from cmssft.errors import DatasetError, UserError
from cmssft.evaluation.features_io import save_features
from cmssft.evaluation.metrics import ranked_top_k
from cmssft.evaluation.visualize import captioned_ranked_list, save_png
from cmssft.models import fixed_scoring
from cmssft.models.sstn import MODES
from cmssft.utils.runtime import resolve_device

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
MODALITY_WORDS = {
    "ir": Modality.IR, "nir": Modality.IR, "thermal": Modality.IR, "infrared": Modality.IR,
    "rgb": Modality.RGB, "vis": Modality.RGB, "visible": Modality.RGB, "color": Modality.RGB,
    "colour": Modality.RGB,
}
MODALITY_NAMES = {"rgb": Modality.RGB, "ir": Modality.IR}
GRAY_TOLERANCE = 2.0  # mean |R - G| and |G - B| (of 255) below which an image counts as gray, i.e. IR
PIXELS = "pixels"  # the rule of images whose modality their pixels decide
SHOWN = 3  # skipped images named in the summary line


@dataclass(frozen=True)
class Entry:
    """One input image: the file, its name in the outputs, and its modality if known before reading."""

    path: Path
    name: str  # relative to the folder or as the CSV lists it
    modality: Modality | None  # None: decided from the pixels when the image is read
    rule: str  # how the modality is decided: the flag, "list", "folder 'Thermal'" or PIXELS


@dataclass
class Side:
    """The readable images of one role and their bank (rows in ``entries`` order)."""

    role: str
    entries: list[Entry]
    modality: list[Modality]
    rules: list[str]
    bank: Bank
    skipped: list[tuple[Entry, str]]


# --------------------------------------------------------------------------- listing images


def list_entries(source: str | Path, role: str, forced: Modality | None) -> list[Entry]:
    """The images a ``--query``/``--gallery`` argument names: a folder (recursively) or a CSV list."""
    source = Path(source)
    if source.is_file() and source.suffix.lower() == ".csv":
        entries = _csv_entries(source, forced, role)
    elif source.is_dir():
        entries = _folder_entries(source, forced, role)
    else:
        what = "does not exist" if not source.exists() else "is neither a folder nor a .csv list"
        raise UserError(f"--{role} {source} {what}")
    if not entries:
        raise UserError(f"--{role} {source} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return entries


def _folder_entries(folder: Path, forced: Modality | None, role: str) -> list[Entry]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir())
    entries = []
    for path in files:
        relative = path.relative_to(folder)
        modality, rule = _known_modality(forced, role, None, [folder.resolve().name, *relative.parent.parts])
        entries.append(Entry(path, relative.as_posix(), modality, rule))
    return entries


def _csv_entries(listing: Path, forced: Modality | None, role: str) -> list[Entry]:
    """Rows of a CSV with a ``path`` column (relative to the CSV's folder) and an optional ``modality``."""
    with open(listing, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if rows and "path" not in rows[0]:
        raise UserError(f"--{role} {listing}: a list needs a 'path' column (and may have 'modality': rgb or ir), "
                        f"found {', '.join(map(repr, rows[0]))}")
    entries = []
    for line, row in enumerate(rows, start=2):
        name = (row.get("path") or "").strip()
        if not name:
            raise UserError(f"--{role} {listing}, line {line}: empty path")
        listed = (row.get("modality") or "").strip().lower()
        if listed and listed not in MODALITY_NAMES:
            raise UserError(f"--{role} {listing}, line {line}: modality {listed!r} is not rgb or ir")
        path = Path(name) if Path(name).is_absolute() else listing.parent / name
        parts = list(Path(name).parent.parts)
        modality, rule = _known_modality(forced, role, MODALITY_NAMES.get(listed), parts)
        entries.append(Entry(path, name, modality, rule))
    return entries


def _known_modality(
    forced: Modality | None, role: str, listed: Modality | None, folders: Sequence[str]
) -> tuple[Modality | None, str]:
    """The modality the flag, the list or the folder names give (None: left to the pixels) and its rule."""
    if forced is not None:
        return forced, f"--{role}-modality"
    if listed is not None:
        return listed, "list"
    for folder in reversed(folders):  # the nearest folder decides
        modality = folder_modality(folder)
        if modality is not None:
            return modality, f"folder '{folder}'"
    return None, PIXELS


def folder_modality(name: str) -> Modality | None:
    """The modality a folder name states by one of :data:`MODALITY_WORDS` (``Thermal``, ``test_nir``), else None."""
    words = {MODALITY_WORDS[w] for w in re.split(r"[^a-z0-9]+", name.lower()) if w in MODALITY_WORDS}
    return words.pop() if len(words) == 1 else None


def is_gray(image: np.ndarray) -> bool:
    """Whether a uint8 [H, W, 3] image has (nearly) equal channels, as IR images stored in colour do."""
    pixels = image.astype(np.int16)
    return bool(np.abs(pixels[..., 0] - pixels[..., 1]).mean() < GRAY_TOLERANCE
                and np.abs(pixels[..., 1] - pixels[..., 2]).mean() < GRAY_TOLERANCE)


def read_entry(entry: Entry) -> tuple[np.ndarray, Modality]:
    """uint8 [H, W, 3] pixels (IR: gray replicated, as in evaluation) and the modality; DatasetError if unreadable."""
    if entry.modality is not None:
        return read_image(str(entry.path), entry.modality), entry.modality
    image = read_image(str(entry.path), Modality.RGB)
    if not is_gray(image):
        return image, Modality.RGB
    return read_image(str(entry.path), Modality.IR), Modality.IR


# --------------------------------------------------------------------------- features


class EntryImages(Dataset):
    """Items ``{"image" [3, H, W], "modality", "ok"}``; an unreadable image gives zeros and ``ok`` False."""

    def __init__(self, entries: Sequence[Entry], transform: EvalTransform) -> None:
        self.entries, self.transform = list(entries), transform

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict:
        try:
            image, modality = read_entry(self.entries[index])
        except DatasetError:
            blank = torch.zeros(3, self.transform.height, self.transform.width)
            return {"image": blank, "modality": 0, "ok": False}
        return {"image": self.transform(image, modality), "modality": int(modality), "ok": True}


def extract_side(
    model: torch.nn.Module, entries: list[Entry], role: str, cfg: Config, device: torch.device,
    batch_size: int, workers: int,
) -> Side:
    """Features of one role's images; unreadable images are dropped and returned with their reason."""
    loader = DataLoader(EntryImages(entries, EvalTransform(cfg.data.height, cfg.data.width)), batch_size=batch_size,
                        num_workers=workers, pin_memory=device.type == "cuda")
    bank = extract_features(model, loader, device, flip=cfg.eval.flip, desc=f"{role} features", extra_keys=("ok",))
    ok = bank.pop("ok").bool()
    skipped = [(entries[i], _problem(entries[i])) for i in torch.nonzero(~ok).flatten().tolist()]
    kept = [e for e, good in zip(entries, ok.tolist(), strict=True) if good]
    bank = {k: v[ok] for k, v in bank.items()}
    modality = [Modality(int(m)) for m in bank["modality"].tolist()]
    rules = [e.rule if e.modality is not None else f"{PIXELS} ({'gray' if m == Modality.IR else 'colour'})"
             for e, m in zip(kept, modality, strict=True)]
    return Side(role, kept, modality, rules, bank, skipped)


def _problem(entry: Entry) -> str:
    """Why an image the loader could not use is unreadable (read again: only skipped images are)."""
    try:
        read_entry(entry)
    except DatasetError as err:
        message, prefix = str(err), f"cannot read image {entry.path} ("
        return message[len(prefix):-1] if message.startswith(prefix) and message.endswith(")") else message
    return "unreadable"


# --------------------------------------------------------------------------- outputs


def describe_side(side: Side, source: str) -> str:
    """One line: how many images, of which modality, decided how; and how many were skipped."""
    counts = Counter(zip(side.modality, side.rules, strict=True))
    parts = [f"{n} {m.name} ({rule})" for (m, rule), n in sorted(counts.items(), key=lambda x: (x[0][0], x[0][1]))]
    line = f"{side.role} {source}: {len(side.entries)} images: {', '.join(parts)}"
    return line + (f"; {len(side.skipped)} unreadable skipped" if side.skipped else "")


def skipped_line(side: Side) -> str:
    shown = [f"{e.name} ({p})" for e, p in side.skipped[:SHOWN]]
    more = f" and {len(side.skipped) - SHOWN} more" if len(side.skipped) > SHOWN else ""
    return f"skipped {len(side.skipped)} unreadable {side.role} image(s): {', '.join(shown)}{more} (see images.csv)"


def write_images_csv(path: Path, sides: Sequence[Side]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["role", "path", "modality", "modality_from", "status"])
        for side in sides:
            for entry, modality, rule in zip(side.entries, side.modality, side.rules, strict=True):
                writer.writerow([side.role, entry.name, modality.name.lower(), rule, "ok"])
            for entry, problem in side.skipped:
                writer.writerow([side.role, entry.name, "", entry.rule, f"skipped: {problem}"])


def write_results_csv(path: Path, query: Side, gallery: Side, index: torch.Tensor, dist: torch.Tensor) -> None:
    """``index``/``dist``: ``[Q, k]`` ranked gallery rows and distances."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["query", "query_modality", "rank", "gallery", "gallery_modality", "distance"])
        for qi, (row, values) in enumerate(zip(index.tolist(), dist.tolist(), strict=True)):
            for rank, (gi, d) in enumerate(zip(row, values, strict=True), start=1):
                writer.writerow([query.entries[qi].name, query.modality[qi].name.lower(), rank,
                                 gallery.entries[gi].name, gallery.modality[gi].name.lower(), f"{d:.7g}"])


def save_side_features(path: Path, side: Side, scorer: ScorerState) -> None:
    bank = side.bank
    save_features(path, [e.name for e in side.entries], bank["shared"], specific=bank.get("specific"),
                  pool=bank.get("pool"), modality=bank["modality"], scorer_config=scorer.config,
                  scorer_state=scorer.tensors)


def draw_pictures(
    folder: Path, query: Side, gallery: Side, index: torch.Tensor, dist: torch.Tensor, scoring: str, limit: int | None
) -> int:
    """One PNG per query (the first ``limit``): title (``scoring``: how distances were computed), query, then
    the top-k with rank and distance."""
    folder.mkdir(parents=True, exist_ok=True)
    count = len(query.entries) if limit is None else min(limit, len(query.entries))
    gallery_modalities = "/".join(sorted({m.name for m in gallery.modality}))
    for qi in range(count):
        entry = query.entries[qi]
        ranked = [(str(gallery.entries[gi].path), [f"rank {r}", f"d {_short_distance(d)}",
                                                    _short_name(gallery.entries[gi].name)])
                  for r, (gi, d) in enumerate(zip(index[qi].tolist(), dist[qi].tolist(), strict=True), start=1)]
        title = [f"query {qi + 1}: {entry.name} ({query.modality[qi].name}, {query.rules[qi]})",
                 f"top {len(ranked)} of {len(gallery.entries)} gallery images ({gallery_modalities}), {scoring}"]
        image = captioned_ranked_list(str(entry.path), ["query", query.modality[qi].name, _short_name(entry.name)],
                                      ranked, title)
        save_png(image, folder / f"{qi + 1:05d}_{_safe(entry.name)}.png")
    return count


def _short_distance(d: float) -> str:
    return f"{d:.4f}" if abs(d) >= 1e-3 or d == 0 else f"{d:.1e}"


def _short_name(name: str, chars: int = 14) -> str:
    """The end of a path, which tells gallery images apart, in at most ``chars`` characters."""
    return name if len(name) <= chars else ".." + name[-(chars - 2):]


def _safe(name: str) -> str:
    stem = name.rsplit(".", 1)[0]
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem)[-80:]


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="search.py", description="Rank a gallery of your own images for every query "
                                "image with a trained checkpoint; writes results.csv, pictures and features.")
    p.add_argument("--checkpoint", required=True, help="best.pth or last.pth of a run")
    p.add_argument("--query", required=True, help="folder of query images (searched recursively) or a CSV list "
                   "with a 'path' column (optional 'modality': rgb/ir)")
    p.add_argument("--gallery", required=True, help="folder or CSV list of gallery images")
    for role in ("query", "gallery"):
        p.add_argument(f"--{role}-modality", choices=["auto", "rgb", "ir"], default="auto",
                       help=f"modality of every {role} image (default auto: list column, folder name, pixels)")
    p.add_argument("--mode", choices=list(MODES), help="SSTN test mode (default: the checkpoint's)")
    p.add_argument("--topk", type=int, default=10, help="gallery images listed and drawn per query")
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--pictures", type=int, help="draw only the first N queries (default: all; 0: none)")
    p.add_argument("--batch-size", type=int, help="images per batch (default: the checkpoint's eval.batch_size)")
    p.add_argument("--workers", type=int, default=2, help="data loading processes (0: in this process)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    return p


def load_model(path: str, device: torch.device) -> tuple[torch.nn.Module, Config, ScorerState]:
    """The checkpoint's model on ``device``, its config, and the scorer state a features file stores."""
    state = load_checkpoint(path)
    model, cfg = model_from_checkpoint(state, str(path))
    return model.to(device).eval(), cfg, scorer_state(state)


def search(args: argparse.Namespace) -> None:
    """Everything :func:`main` does: list, extract (query side first: an unusable one stops before the
    gallery is read), rank, write."""
    if args.topk < 1 or (args.batch_size is not None and args.batch_size < 1) or args.workers < 0:
        raise UserError(f"--topk and --batch-size must be >= 1 and --workers >= 0, got {args.topk}, "
                        f"{args.batch_size}, {args.workers}")
    entries = {role: list_entries(getattr(args, role), role, MODALITY_NAMES.get(getattr(args, f"{role}_modality")))
               for role in ("query", "gallery")}
    device = resolve_device(args.device)
    model, cfg, scorer = load_model(args.checkpoint, device)
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"--out {out} cannot be created ({err.strerror or err})") from None
    mode = args.mode or cfg.model.sstn.test_mode
    scoring = fixed_scoring(cfg) or f"SSTN {mode}"
    sides = {}
    for role in ("query", "gallery"):
        side = extract_side(model, entries[role], role, cfg, device, args.batch_size or cfg.eval.batch_size,
                            args.workers)
        print(describe_side(side, getattr(args, role)))
        if side.skipped:
            print(f"warning: {skipped_line(side)}", file=sys.stderr)
        if not side.entries:
            raise UserError(f"--{role} {getattr(args, role)}: none of its {len(side.skipped)} images can be read "
                            f"(e.g. {side.skipped[0][0].name}: {side.skipped[0][1]})")
        sides[role] = side
    query, gallery = sides["query"], sides["gallery"]
    dist = model_score_fn(model, mode, device)(query.bank, gallery.bank)
    index, values = ranked_top_k(dist, args.topk)
    write_results_csv(out / "results.csv", query, gallery, index, values)
    write_images_csv(out / "images.csv", [query, gallery])
    for side in (query, gallery):
        save_side_features(out / f"{side.role}_features.npz", side, scorer)
    drawn = draw_pictures(out / "pictures", query, gallery, index, values, scoring, args.pictures)
    print(f"ranked {len(gallery.entries)} gallery images for {len(query.entries)} queries ({scoring}, "
          f"{cfg.data.height}x{cfg.data.width} input): {out / 'results.csv'} (top {index.shape[1]}), "
          f"{drawn} pictures in {out / 'pictures'}, features in {out}/{{query,gallery}}_features.npz")


def main(argv: list[str] | None = None) -> int:
    search(build_parser().parse_args(argv))
    return 0
