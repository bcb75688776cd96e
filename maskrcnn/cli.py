"""What every command-line tool shares: errors a user can fix come out as one line, faults keep their traceback.

    if __name__ == "__main__":
        run(main)

``run`` calls ``main(argv)``. A problem the user can fix is printed as ``error: <message>`` on standard
error and the process exits with status 2:

- an :class:`~maskrcnn.errors.InputError` (bad configuration value or key, bad annotation, checkpoint that
  does not fit, bad option), which the package raises where it finds such a problem;
- a missing file or folder, a path of the wrong kind or one already taken, a permission refused
  (``FileNotFoundError``, ``IsADirectoryError``, ``NotADirectoryError``, ``FileExistsError``,
  ``PermissionError``);
- a :class:`~maskrcnn.errors.MissingPackageError` (an optional package a chosen setting needs);
- a ``FloatingPointError``: training stopped on a non-finite loss, naming the iteration and the loss term.

Anything else, a plain ``ValueError`` from inside numpy or torch included, is a defect and keeps its
traceback. ``--debug`` anywhere on the command line shows the traceback of user errors too. Warnings are
printed as one line each, ``warning: <message>``. A tool checks its own options before the library sees them
(:func:`require_at_least`), so that a bad value is an error naming the option, not a fault deep inside.
"""

from __future__ import annotations

import sys
import warnings
from argparse import Namespace
from typing import Callable, List, Optional

from maskrcnn.errors import InputError, MissingPackageError

USER_ERRORS = (InputError, MissingPackageError, FileNotFoundError, IsADirectoryError, NotADirectoryError,
               FileExistsError, PermissionError, FloatingPointError)


def one_line(exc: BaseException) -> str:
    """The exception's message on one line: its lines joined with '; ' (with a space after a line ending in
    a colon). An error re-raised from a data loader worker carries the worker's traceback in its message;
    only the original message is kept."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if lines and lines[0].startswith("Caught ") and "worker process" in lines[0]:
        lines = [lines[-1].split(": ", 1)[-1]]
    text = lines[0] if lines else type(exc).__name__
    for previous, line in zip(lines, lines[1:]):
        text += (" " if previous.endswith(":") else "; ") + line
    return text


def require_at_least(args: Namespace, **minimums: float) -> None:
    """Raise :class:`InputError` for the first option of ``args`` (parsed options) below its minimum, named as
    the command line spells it: ``require_at_least(args, batch_size=1)`` -> ``--batch-size must be at least 1,
    got 0``."""
    for name, minimum in minimums.items():
        value = getattr(args, name)
        if value < minimum:
            raise InputError(f"--{name.replace('_', '-')} must be at least {minimum}, got {value}")


def run(main: Callable[[Optional[List[str]]], object], argv: Optional[List[str]] = None) -> None:
    """Run a tool's ``main(argv)`` (default: the command line) with one-line errors; see the module doc."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [arg for arg in argv if arg != "--debug"]
    format_warning = warnings.formatwarning
    warnings.formatwarning = lambda message, *args, **kwargs: f"warning: {one_line(message)}\n"
    try:
        main(argv)
    except USER_ERRORS as exc:
        if debug:
            raise
        print(f"error: {one_line(exc)}", file=sys.stderr)
        sys.exit(2)
    finally:
        warnings.formatwarning = format_warning
