"""An output folder of shards that a job can stop anywhere and resume.

    output/
      _run.json            what the rows depend on: model file, runtime, precision, threshold, batch size, format
      part-00000.parquet   rows of whole batches (or part-00000.jsonl: one JSON row a line)
      part-00001.parquet
      .lock                held while a job writes here

Names starting with ``_`` or ``.`` are those Arrow's dataset readers skip: ``pyarrow.parquet.read_table``,
``pandas.read_parquet`` and ``ray.data.read_parquet`` read the folder as one table.

Each shard is written atomically (:func:`maskrcnn.fileio.atomic_write`): it is there complete or not at
all, and its ``path`` column records the inputs it covers. A job on a folder that has shards reads their
``path`` and ``error`` columns, skips those images, and numbers its shards after the last one.
"""

from __future__ import annotations

import fcntl
import json
import re
from pathlib import Path
from typing import Dict, Iterator, List, Sequence, Tuple, Union

import pyarrow.parquet as pq

from maskrcnn.batch.rows import rows_to_table
from maskrcnn.errors import InputError
from maskrcnn.fileio import atomic_write, save_json

FORMATS = ("parquet", "jsonl")
SHARD_SIZE = 256  # images per shard, at least (a shard holds whole batches): what a killed job may redo
_SHARD_NAME = re.compile(r"part-(\d+)\.(parquet|jsonl)")


class ShardFolder:
    """The shards of one output folder, for one job: use as a context manager (it holds the folder's lock).

    On entering: ``done`` (the paths that complete shards cover), ``errors`` (their rows with an error).
    ``add(rows)`` buffers rows and writes a shard each time ``shard_size`` are buffered; ``flush()`` writes
    the rest. Rows are written as given: the caller adds each path once (``done`` grows as rows are added).
    settings: what the rows depend on; a folder written with other settings is refused, naming them.
    """

    def __init__(self, folder: Union[str, Path], *, output_format: str, settings: dict, shard_size: int = SHARD_SIZE):
        if output_format not in FORMATS:
            raise InputError(f"output format must be one of {FORMATS}, got {output_format!r}")
        if shard_size < 1:
            raise InputError(f"shard size must be at least 1 image, got {shard_size}")
        self.folder, self.format, self.shard_size = Path(folder), output_format, shard_size
        self.settings = {**settings, "format": output_format}
        self._buffer: List[dict] = []

    def __enter__(self) -> "ShardFolder":
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.folder / ".lock", "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise InputError(f"another job is writing to {self.folder}") from None
        try:
            self._check_settings()
            for leftover in self.folder.glob(".part-*.tmp"):  # a killed job's shard that never completed
                leftover.unlink()
            shards = list_shards(self.folder)
            self.done, self.errors = set(), 0
            for shard in shards:
                for path, error in _paths_and_errors(shard):
                    self.done.add(path)
                    self.errors += error is not None
            self._next = 1 + max((int(_SHARD_NAME.fullmatch(s.name).group(1)) for s in shards), default=-1)
        except BaseException:
            self._lock.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._lock.close()

    def _check_settings(self) -> None:
        path = self.folder / "_run.json"
        if not path.is_file():
            save_json(path, self.settings)
            return
        written = json.loads(path.read_text(encoding="utf-8"))
        changed = [f"{key} {written.get(key)!r} there, {value!r} now" for key, value in self.settings.items()
                   if written.get(key) != value]
        if changed:
            raise InputError(f"{self.folder} holds rows made with other settings ({'; '.join(changed)}): resume "
                             "with the same settings or write to another folder")

    def add(self, rows: Sequence[dict]) -> None:
        """Buffer ``rows``; write a shard once ``shard_size`` rows are buffered."""
        for row in rows:
            self.done.add(row["path"])
            self.errors += row["error"] is not None
        self._buffer.extend(rows)
        if len(self._buffer) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        """Write the buffered rows as one shard (none if the buffer is empty)."""
        if not self._buffer:
            return
        path = self.folder / f"part-{self._next:05d}.{self.format}"
        rows, self._buffer = self._buffer, []
        if self.format == "parquet":
            table = rows_to_table(rows)
            atomic_write(path, lambda f: pq.write_table(table, f))
        else:
            data = "".join(json.dumps(row) + "\n" for row in rows).encode("utf-8")
            atomic_write(path, lambda f: f.write(data))
        self._next += 1


def list_shards(folder: Union[str, Path]) -> List[Path]:
    """The complete shards of an output folder, in the order they were written."""
    return sorted(p for p in Path(folder).iterdir() if _SHARD_NAME.fullmatch(p.name))


def read_rows(folder: Union[str, Path]) -> List[dict]:
    """Every row of an output folder's shards, shard after shard (rows as :mod:`maskrcnn.batch.rows` makes them)."""
    rows: List[dict] = []
    for shard in list_shards(folder):
        rows.extend(pq.read_table(shard).to_pylist() if shard.suffix == ".parquet" else list(_json_lines(shard)))
    return rows


def _paths_and_errors(shard: Path) -> Iterator[Tuple[str, object]]:
    """(path, error) of each row of a shard, reading only those columns of a Parquet shard."""
    if shard.suffix == ".parquet":
        columns: Dict[str, list] = pq.read_table(shard, columns=["path", "error"]).to_pydict()
        yield from zip(columns["path"], columns["error"])
    else:
        yield from ((row["path"], row["error"]) for row in _json_lines(shard))


def _json_lines(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as lines:
        yield from (json.loads(line) for line in lines if line.strip())
