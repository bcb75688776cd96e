"""What every command-line tool shares: errors a user can fix come out as one line, not a traceback.

    if __name__ == "__main__":
        run(main)

``run`` calls ``main(argv)``; a ``ValueError`` (bad configuration value or key, bad annotation, wrong
checkpoint), a missing or unreadable file, a non-finite loss or a missing optional package is printed as
``error: <message>`` on standard error and the process exits with status 2. ``--debug`` anywhere on the
command line shows the full traceback instead. Any other exception is a defect and keeps its traceback.
"""

from __future__ import annotations

import sys
from typing import Callable, List, Optional

USER_ERRORS = (ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError,
               FloatingPointError, ImportError)


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


def run(main: Callable[[Optional[List[str]]], object], argv: Optional[List[str]] = None) -> None:
    """Run a tool's ``main(argv)`` (default: the command line) with one-line errors; see the module doc."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [arg for arg in argv if arg != "--debug"]
    try:
        main(argv)
    except USER_ERRORS as exc:
        if debug:
            raise
        print(f"error: {one_line(exc)}", file=sys.stderr)
        sys.exit(2)
