"""User-facing errors.

A :class:`UserError` is a mistake the user can fix (bad path, typo in a config,
wrong file format). Command-line entry points print its message on one line and
exit with code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

EXIT_USER_ERROR = 2


class UserError(Exception):
    """An error caused by the user's input, reported without a traceback."""


class ConfigError(UserError):
    """A config file or override that does not match the schema."""


class DatasetError(UserError):
    """A dataset tree, split file or manifest that cannot be read."""


def one_line(message: str) -> str:
    """The user's message alone: a DataLoader worker wraps it in "Caught ... Original Traceback ..."."""
    if "\nOriginal Traceback" not in message:
        return message
    last = [line for line in message.splitlines() if line.strip()][-1]
    _, sep, text = last.partition(": ")  # "cmssft.errors.DatasetError: cannot read image ..."
    return text if sep else last


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Run ``main`` and turn a :class:`UserError` into one line and exit code 2.

    ``--debug`` anywhere on the command line keeps the traceback.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    if debug:
        args.remove("--debug")
    try:
        return int(main(args) or 0)
    except UserError as err:
        if debug:
            raise
        logging.getLogger("cmssft").debug("user error", exc_info=True)
        print(f"error: {one_line(str(err))}", file=sys.stderr)
        return EXIT_USER_ERROR
