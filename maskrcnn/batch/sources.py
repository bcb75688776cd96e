"""Which images a batch job reads: a folder, a glob, a text file of paths, or a Parquet file's path column."""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import List, Union

import pyarrow as pa
import pyarrow.parquet as pq

from maskrcnn.errors import InputError
from maskrcnn.fileio import image_files

PATH_COLUMN = "path"  # the column of a Parquet input that holds the image paths


def list_inputs(source: Union[str, Path], *, path_column: str = PATH_COLUMN, recursive: bool = False) -> List[str]:
    """The image paths ``source`` names, absolute, in order, each once.

    source: a folder (its image files, sorted; with ``recursive`` its whole tree), a glob pattern (``*``,
        ``?``, ``[``; ``**`` spans folders; the matching files, sorted), a ``.parquet`` file (the
        ``path_column`` column, in row order) or any other file: a text file of paths, one a line (blank
        lines and lines starting with ``#`` skipped). Relative paths are taken from the working folder.
    Paths are made absolute, without resolving links, so that a worker elsewhere and a rerun name each
    image alike; a path listed twice counts once.
    """
    text = str(source)
    path = Path(source)
    if path.is_dir():
        found = [str(p) for p in image_files(path, recursive=recursive)]
    elif any(char in text for char in "*?["):
        found = sorted(p for p in glob.glob(text, recursive=True) if os.path.isfile(p))
        if not found:
            raise InputError(f"no file matches the pattern {text}")
    elif not path.is_file():
        raise FileNotFoundError(f"input not found: {text} (expected a folder, a glob, a text file of paths or a "
                                ".parquet file)")
    elif path.suffix.lower() == ".parquet":
        found = _parquet_paths(path, path_column)
    else:
        found = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()
                 if line.strip() and not line.lstrip().startswith("#")]
        if not found:
            raise InputError(f"{path} lists no image path (one path a line)")
    return list(dict.fromkeys(os.path.abspath(p) for p in found))


def _parquet_paths(path: Path, column: str) -> List[str]:
    """The non-empty strings of one column of a Parquet file; InputError naming the file and its columns."""
    try:
        columns = pq.read_schema(path).names
    except pa.ArrowException as error:
        raise InputError(f"cannot read {path} as Parquet: {error}") from None
    if column not in columns:
        raise InputError(f"{path} has no column {column!r} of image paths (its columns: {', '.join(columns)})")
    values = pq.read_table(path, columns=[column]).column(column).to_pylist()
    bad = [i for i, value in enumerate(values) if not isinstance(value, str) or not value]
    if bad:
        raise InputError(f"{path}: column {column!r} holds {len(bad)} values that are not paths (first at row {bad[0]})")
    return values
