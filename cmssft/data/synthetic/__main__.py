"""``python -m cmssft.data.synthetic --layout {sysu,regdb,llcm} --out DIR ...``: write a synthetic dataset."""

from __future__ import annotations

import argparse
import re
import shutil
from pathlib import Path

from cmssft.data.synthetic.generate import LAYOUT_ENTRIES, LAYOUTS, generate_dataset, is_empty_dir
from cmssft.errors import UserError, run_cli


class _Parser(argparse.ArgumentParser):
    """argparse that reports mistakes as a one-line :class:`UserError` instead of usage + exit."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{message} (see --help)")


def parse_size(text: str) -> tuple[int, int]:
    """``128x64`` -> (128, 64): height first, as everywhere in this project."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match:
        raise UserError(f"--size must look like HEIGHTxWIDTH (e.g. 128x64), got {text!r}")
    return int(match.group(1)), int(match.group(2))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m cmssft.data.synthetic", description=__doc__)
    parser.add_argument("--layout", required=True, choices=LAYOUTS, help="folder layout to write")
    parser.add_argument("--out", required=True, help="dataset root to create")
    parser.add_argument("--ids", type=int, default=None, help="identities (default 32 sysu, 40 regdb, 24 llcm)")
    parser.add_argument("--size", default="128x64", help="image HEIGHTxWIDTH (default 128x64)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--difficulty", type=float, default=0.5, help="0 (easy) .. 1 (hard), default 0.5")
    parser.add_argument("--like-sysu", action="store_true", help="the real SYSU-MM01 ids, splits and counts")
    parser.add_argument("--workers", type=int, default=1, help="processes that render")
    parser.add_argument(
        "--force", action="store_true", help="replace this layout's folders in a non-empty --out"
    )
    return parser


def prepare_out(out: Path, layout: str, force: bool) -> None:
    """Refuse a non-empty folder unless ``force``; then remove only the folders this layout owns."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    if is_empty_dir(out):
        return
    if not force:
        raise UserError(f"--out {out} is not empty; pass --force to overwrite it")
    for name in LAYOUT_ENTRIES[layout]:
        entry = out / name
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        elif entry.exists() or entry.is_symlink():
            entry.unlink()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    height, width = parse_size(args.size)
    out = Path(args.out)
    prepare_out(out, args.layout, args.force)
    report = generate_dataset(
        args.layout,
        out,
        ids=args.ids,
        height=height,
        width=width,
        seed=args.seed,
        difficulty=args.difficulty,
        like_sysu=args.like_sysu,
        workers=args.workers,
    )
    print(
        f"wrote {report.num_images} images ({report.num_rgb} RGB, {report.num_ir} IR, {report.num_ids} ids) "
        f"to {report.root} in {report.seconds:.1f} s: {report.images_per_s:.0f} images/s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
