"""Shared helpers for dataset loaders: checked file reading and tree checks."""

from __future__ import annotations

import os
from pathlib import Path

from cmssft.errors import DatasetError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


def require_dir(path: Path, layout_hint: str) -> None:
    """Fail with one line that says what was expected where."""
    if not path.exists():
        raise DatasetError(f"{path} does not exist; expected {layout_hint}")
    if not path.is_dir():
        raise DatasetError(f"{path} is not a directory; expected {layout_hint}")


def found_entries(folder: Path, shown: int = 8) -> str:
    """What ``folder`` holds, for messages: ``cam1, cam2, exp`` (sorted, the first few), or ``nothing``."""
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return "nothing"
    if not names:
        return "nothing"
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def list_images(folder: Path) -> list[Path]:
    """Image files of ``folder`` in sorted file-name order (the order protocols rely on)."""
    return [folder / name for name in list_image_names(folder)]


def list_image_names(folder: str | os.PathLike[str]) -> list[str]:
    """File names of :func:`list_images`, sorted; one ``os.scandir`` and no stat per regular file.

    Raises ``FileNotFoundError``/``NotADirectoryError`` when ``folder`` is not a directory.
    """
    with os.scandir(folder) as entries:
        # Path(name).suffix.lower() in IMAGE_SUFFIXES: the name ends with one, and not only of it (".jpg")
        names = [e.name for e in entries if e.name.lower().endswith(IMAGE_SUFFIXES) and e.name.rfind(".") > 0
                 and e.is_file()]
    names.sort()
    return names


def read_text_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 text file; a missing, unreadable or binary file is a :class:`DatasetError`."""
    return read_text(path).splitlines()


def read_text(path: Path) -> str:
    """A UTF-8 text file; errors name the file (and the line of a byte that is not UTF-8)."""
    if not path.is_file():
        raise DatasetError(f"missing file {path}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise DatasetError(f"{path}:{line}: not UTF-8 text (byte {err.start})") from None
    except OSError as err:
        raise DatasetError(f"cannot read {path} ({err.strerror or err})") from None


def read_id_list(path: Path) -> list[int]:
    """Read a SYSU-MM01 ``exp/*_id.txt``: one line of comma-separated integers."""
    text = " ".join(read_text_lines(path)).strip()
    ids = []
    for i, token in enumerate(t.strip() for t in text.split(",")):
        if not token:
            continue
        if not (token.isascii() and token.isdigit()):
            raise DatasetError(f"{path}: entry {i + 1} ({token!r}) is not an integer id")
        ids.append(int(token))
    if not ids:
        raise DatasetError(f"{path}: no identity ids found")
    return ids

