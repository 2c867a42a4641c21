"""What every command line of the package shares: one-line errors with exit code 2, positive integers.

``lowmem``, ``lowmem train``, ``python -m lowmem_course.student`` and ``python -m lowmem_course.skills``
report bad input the same way: one line on stderr, ``PROG: error: REASON``, and exit code 2, never a
usage block or a traceback. Text that came from the user or from a file (a path, a config's
``name_or_path``) goes through ``printable`` before it reaches the terminal, so a newline cannot
split the line and an escape sequence cannot repaint the screen.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import NoReturn

from lowmem_course import family

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # C0 and C1 control characters and DEL


def printable(text: object) -> str:
    """``str(text)`` with every control character (newline, ESC, ...) written as its escape, e.g. ``\\x1b``."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], str(text))


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage error, or any bad input (``fail``), in one line and exits 2."""

    def error(self, message: str) -> NoReturn:
        self.fail(message)

    def fail(self, message: object) -> NoReturn:
        """Print ``PROG: error: MESSAGE`` as one line on stderr and exit 2."""
        sys.stderr.write(f"{self.prog}: error: {one_line(message)}\n")
        raise SystemExit(2)


def one_line(message: object) -> str:
    """``message`` (an exception or text) as one printable line: its lines joined by spaces."""
    return printable(" ".join(line.strip() for line in str(message).strip().splitlines()))


def positive_int(text: str) -> int:
    """An argparse type: a positive integer (``ArgumentTypeError`` otherwise)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def check_out_folder(path: Path) -> None:
    """``ValueError`` unless ``path`` is a folder, or could be created as one, outside the shipped students.

    Nothing is created: a command checks its ``--out`` before its other inputs and writes only after.
    """
    family.refuse_shipped(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {path} is a file, not a folder")
    parent = next(p for p in (path.absolute(), *path.absolute().parents) if p.exists())
    if not parent.is_dir():
        raise ValueError(f"--out {path} cannot be created: {parent} is not a folder")
