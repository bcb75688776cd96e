"""The cache file of packed annotations: written once, checked on every load, memory-mapped by every process.

The packed arrays of ``x.json`` (:class:`maskrcnn.data.packing.PackedAnnotations`) are written to
``x.json.maskrcnn-cache`` beside the json, or into a cache folder of one's choosing (for a json in a read-only
folder), keyed by the json's size, modification time and content hash. The file is written atomically under
a file lock, so that of several processes or jobs starting at once one builds and the others wait and read
it, and memory-mapped: ranks on one machine and their loader workers share one copy of the pages, and
reading a sample touches no Python object of the dataset, so workers do not grow by copy-on-read.

File layout: 8-byte magic, header length (8 bytes, little-endian), CRC-32 of the header and its padding
(8 bytes), the JSON header (key, categories, skip counts, each array's dtype, shape and offset, the data's
length and CRC-32) padded with spaces to a multiple of 64 bytes, then the arrays, each zero-padded to a
multiple of 64 bytes. Every
byte after the first 24 is covered by one of the two checksums. A file cut short, or with any byte
changed, is never loaded: it is rebuilt with a one-line warning. A changed json is noticed by the key and
the cache rebuilt quietly. The data checksum is one pass of ``zlib.crc32`` over the file (about 0.5 ms per
MB from the page cache), paid by the process that opens the cache; loader workers that receive the
dataset by pickling check the header and the length only.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import warnings
import zlib
from pathlib import Path
from typing import BinaryIO, Callable, Dict, Iterator, Optional, Union

import numpy as np

from maskrcnn.data.packing import PackedAnnotations
from maskrcnn.fileio import atomic_write

CACHE_SUFFIX = ".maskrcnn-cache"  # the packed annotations of ``x.json`` are cached in ``x.json.maskrcnn-cache``
_MAGIC = b"MRCNNPK2"  # the cache file format; a new format gets a new magic (caches of another format are rebuilt)
_OLD_MAGICS = (b"MRCNNPK1",)  # earlier formats: rebuilt without a warning
_PREFIX = len(_MAGIC) + 8 + 8  # magic, header length, header CRC-32
_ALIGN = 64


class CacheDamaged(Exception):
    """A cache file that is cut short or altered; the message says what is wrong."""


def cache_path(ann_file: Path, cache_dir: Optional[Union[str, Path]] = None) -> Path:
    """Where the cache of ``ann_file`` lives: beside it, or in ``cache_dir`` under a name that also carries a
    hash of the json's absolute path (two ``instances_train.json`` of different datasets do not collide)."""
    if not cache_dir:
        return ann_file.with_name(ann_file.name + CACHE_SUFFIX)
    where = hashlib.blake2b(str(ann_file.resolve()).encode("utf-8"), digest_size=8).hexdigest()
    return Path(cache_dir) / f"{ann_file.name}.{where}{CACHE_SUFFIX}"


def load_or_build(ann_file: Path, skip_bad_annotations: bool, build: Callable[[], PackedAnnotations], *,
                  cache_dir: Optional[Union[str, Path]] = None) -> PackedAnnotations:
    """The packed annotations of ``ann_file`` from its cache (see :func:`cache_path`), built (by ``build``)
    and written there first where the cache is missing, stale or damaged. Of processes that find it so at
    once, one builds while the others wait on the lock, then read what it wrote. Where the cache cannot be
    written the annotations stay in memory, with a warning."""
    if not ann_file.is_file():
        raise FileNotFoundError(f"annotation file not found: {ann_file}")
    key = _json_key(ann_file, skip_bad_annotations)
    path = cache_path(ann_file, cache_dir)
    packed = _open_or_warn(path, key)
    if packed is not None:
        return packed
    with contextlib.suppress(OSError):  # a cache folder is made on first use; where it cannot be, see below
        path.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(path.with_name(path.name + ".lock")):
        with contextlib.suppress(CacheDamaged):  # warned above; another process may have rebuilt it since
            packed = open_cache(path, key)
        if packed is not None:
            return packed
        packed = build()
        try:
            write_cache(path, packed, key)
        except OSError as exc:
            warnings.warn(f"cannot write the annotation cache {path} ({exc}); keeping the annotations in memory "
                          "(data.annotation_cache_dir puts the cache elsewhere)")
            return packed
    return _open_or_warn(path, key) or packed


def write_cache(path: Path, packed: PackedAnnotations, key: dict) -> None:
    """Write ``packed`` to ``path`` atomically in the layout of the module docstring."""
    layout, offset, data_crc = {}, 0, 0
    for name, array in packed.arrays.items():
        layout[name] = {"dtype": array.dtype.str, "shape": list(array.shape), "offset": offset}
        data_crc = zlib.crc32(_padding(array.nbytes), zlib.crc32(_bytes_of(array), data_crc))
        offset += array.nbytes + len(_padding(array.nbytes))
    header = json.dumps({"key": key, "categories": [[i, n] for i, n in packed.categories.items()],
                         "skipped": packed.skipped, "arrays": layout, "data_bytes": offset,
                         "data_crc32": data_crc}).encode("utf-8")
    header += b" " * len(_padding(_PREFIX + len(header)))  # JSON allows trailing spaces

    def write(f: BinaryIO) -> None:
        f.write(_MAGIC + len(header).to_bytes(8, "little") + zlib.crc32(header).to_bytes(8, "little") + header)
        for array in packed.arrays.values():
            f.write(_bytes_of(array))
            f.write(_padding(array.nbytes))

    atomic_write(path, write)


def open_cache(path: Path, key: dict, *, data_crc32: Optional[int] = None) -> Optional["CachedAnnotations"]:
    """The arrays memory-mapped from the cache file at ``path``, their checksum verified.

    Returns ``None`` where there is no file, or it is of an earlier format or written for another ``key``.
    Raises :class:`CacheDamaged` where it is cut short or altered. ``data_crc32``: the data checksum a
    process already verified; given, the data's checksum is compared with it instead of recomputed.
    """
    try:
        with open(path, "rb") as f:
            prefix = f.read(_PREFIX)
            size = os.fstat(f.fileno()).st_size
            if prefix[:len(_MAGIC)] in _OLD_MAGICS:
                return None
            if len(prefix) < _PREFIX or prefix[:len(_MAGIC)] != _MAGIC:
                raise CacheDamaged(f"{size} bytes that do not start with a cache header")
            header_length = int.from_bytes(prefix[8:16], "little")
            if _PREFIX + header_length > size:
                raise CacheDamaged(f"cut short in its header ({size} bytes)")
            header_bytes = f.read(header_length)
    except FileNotFoundError:
        return None
    if zlib.crc32(header_bytes) != int.from_bytes(prefix[16:24], "little"):
        raise CacheDamaged("its header fails its checksum")
    header = json.loads(header_bytes)
    if header["key"] != key:
        return None
    data_start = _PREFIX + header_length
    if size != data_start + header["data_bytes"]:
        raise CacheDamaged(f"{size} bytes where its header gives {data_start + header['data_bytes']}"
                           f"{' (cut short)' if size < data_start + header['data_bytes'] else ''}")
    buffer = np.memmap(path, dtype=np.uint8, mode="r")
    if data_crc32 is None:
        if zlib.crc32(buffer[data_start:]) != header["data_crc32"]:
            raise CacheDamaged("its arrays fail their checksum")
    elif data_crc32 != header["data_crc32"]:
        raise CacheDamaged("it was replaced since the dataset was built")
    arrays = {}
    for name, spec in header["arrays"].items():
        dtype = np.dtype(spec["dtype"])
        start = data_start + spec["offset"]
        count = int(np.prod(spec["shape"], dtype=np.int64))
        arrays[name] = buffer[start:start + count * dtype.itemsize].view(dtype).reshape(spec["shape"])
    return CachedAnnotations(arrays, {int(i): n for i, n in header["categories"]}, header["skipped"],
                             path=path, key=key, data_crc32=header["data_crc32"])


class CachedAnnotations(PackedAnnotations):
    """Packed annotations memory-mapped from a cache file; pickled (for spawned loader workers) as the file's
    path, key and data checksum, not as the arrays."""

    def __init__(self, arrays: Dict[str, np.ndarray], categories: Dict[int, str], skipped: Dict[str, int], *,
                 path: Path, key: dict, data_crc32: int):
        super().__init__(arrays, categories, skipped)
        self.path, self.key, self.data_crc32 = path, key, data_crc32

    def __getstate__(self) -> dict:
        return {"path": self.path, "key": self.key, "data_crc32": self.data_crc32}

    def __setstate__(self, state: dict) -> None:
        try:
            packed = open_cache(state["path"], state["key"], data_crc32=state["data_crc32"])
        except CacheDamaged as exc:
            packed, reason = None, f" ({exc})"
        else:
            reason = ""
        if packed is None:
            raise RuntimeError(f"annotation cache {state['path']} changed or vanished since the dataset was "
                               f"built{reason}")
        self.__dict__.update(packed.__dict__)


def _open_or_warn(path: Path, key: dict) -> Optional[CachedAnnotations]:
    """:func:`open_cache`, with a one-line warning instead of :class:`CacheDamaged` (the caller rebuilds)."""
    try:
        return open_cache(path, key)
    except CacheDamaged as exc:
        warnings.warn(f"annotation cache {path} is damaged ({exc}); rebuilding it")
        return None


def _bytes_of(array: np.ndarray) -> memoryview:
    return memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))


def _padding(length: int) -> bytes:
    """Zero bytes that take ``length`` to the next multiple of 64."""
    return bytes(-length % _ALIGN)


def _json_key(ann_file: Path, skip_bad_annotations: bool) -> dict:
    """What a cache of ``ann_file`` must match: its size, modification time and blake2b content hash, and
    the one option that changes the packed content."""
    stat = ann_file.stat()
    with open(ann_file, "rb") as f:
        digest = hashlib.file_digest(f, "blake2b").hexdigest()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "blake2b": digest,
            "skip_bad_annotations": skip_bad_annotations}


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path`` (created if needed; left in place, as removing a lock file
    races with its next user). Where it cannot be created or locked, proceed without it."""
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:
        yield
        return
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock
