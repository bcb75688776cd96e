"""The packed annotations' cache file: a file cut short or altered anywhere is rebuilt, never loaded; the cache
can live in a folder of its own when the json's folder is read-only."""

import contextlib
import json
import pickle
import subprocess
import warnings

import pytest

from maskrcnn.config import Config
from maskrcnn.data.annotation_cache import cache_path
from maskrcnn.data.coco import CocoDetection
from maskrcnn.data.loader import build_train_dataset
from maskrcnn.data.shapes import generate_shapes
from test_coco_dataset import _assert_same_records, _records

PREFIX = 24  # magic, header length, header checksum


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    generate_shapes(out, num_train=12, num_val=2, seed=0, min_size=64, max_size=112)
    return out / "annotations" / "instances_train.json", out / "train"


@pytest.fixture
def cached(shapes, tmp_path):
    """A copy of the shapes json with its cache built; returns (json, image folder, cache file, records)."""
    ann_file = tmp_path / "ann.json"
    ann_file.write_bytes(shapes[0].read_bytes())
    records = _records(CocoDetection(ann_file, shapes[1], cache=False))
    CocoDetection(ann_file, shapes[1])
    cache = cache_path(ann_file)
    assert cache.is_file()
    return ann_file, shapes[1], cache, records


def _header(cache):
    raw = cache.read_bytes()
    length = int.from_bytes(raw[8:16], "little")
    return json.loads(raw[PREFIX:PREFIX + length]), PREFIX + length


def _flip(cache, offset):
    raw = bytearray(cache.read_bytes())
    raw[offset] ^= 0x10
    cache.write_bytes(bytes(raw))


def _reload_warns(cached, message):
    """Build the dataset again: one warning matching ``message``, the records of the json, a sound cache."""
    ann_file, image_dir, cache, records = cached
    with pytest.warns(UserWarning, match=message) as caught:
        ds = CocoDetection(ann_file, image_dir)
    assert len(caught) == 1 and "\n" not in str(caught[0].message)
    _assert_same_records(_records(ds), records)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _assert_same_records(_records(CocoDetection(ann_file, image_dir)), records)  # the rebuilt cache is sound


@pytest.mark.parametrize("keep", [0.5, 0.99, 0.001])
def test_cache_cut_short_is_rebuilt(cached, keep):
    cache = cached[2]
    raw = cache.read_bytes()
    cache.write_bytes(raw[:int(len(raw) * keep)])
    _reload_warns(cached, r"annotation cache .* is damaged \(.*(cut short|do not start).*\); rebuilding it")


def test_flipped_byte_in_the_arrays_is_rebuilt(cached):
    cache = cached[2]
    header, data_start = _header(cache)
    _flip(cache, data_start + header["arrays"]["coords"]["offset"] + 5)  # one polygon coordinate
    _reload_warns(cached, r"damaged \(its arrays fail their checksum\)")


@pytest.mark.parametrize("field", ["shape", "category name", "length", "magic"])
def test_flipped_byte_in_the_header_is_rebuilt(cached, field):
    cache = cached[2]
    raw = cache.read_bytes()
    offset = {"shape": raw.index(b'"shape": [') + 10, "category name": raw.index(b'"circle"') + 2,
              "length": 8, "magic": 3}[field]
    _flip(cache, offset)
    _reload_warns(cached, r"damaged")


def test_pickled_dataset_refuses_a_cache_replaced_since(cached, shapes):
    ann_file, image_dir, cache, _ = cached
    blob = pickle.dumps(CocoDetection(ann_file, image_dir))
    header, data_start = _header(cache)
    _flip(cache, data_start + header["arrays"]["coords"]["offset"] + 5)
    pickle.loads(blob)  # a worker checks the header and the length, not the data (the parent did)
    _flip(cache, PREFIX + 40)
    with pytest.raises(RuntimeError, match="changed or vanished since the dataset was built"):
        pickle.loads(blob)


@contextlib.contextmanager
def _read_only(folder):
    """Make ``folder`` unwritable, also for root (immutable attribute where chmod does not stop root);
    skip where neither can."""
    folder.chmod(0o555)
    immutable = False
    try:
        if _writable(folder):
            immutable = subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
        if _writable(folder):
            pytest.skip("cannot make a folder read-only for this user")
        yield
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        folder.chmod(0o755)


def _writable(folder):
    probe = folder / "probe"
    try:
        probe.write_bytes(b"")
    except OSError:
        return False
    probe.unlink()
    return True


def test_cache_dir_holds_the_cache_of_a_json_in_a_read_only_folder(shapes, tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    ann_file = data / "ann.json"
    ann_file.write_bytes(shapes[0].read_bytes())
    records = _records(CocoDetection(ann_file, shapes[1], cache=False))
    with _read_only(data):
        with pytest.warns(UserWarning, match="cannot write the annotation cache"):
            CocoDetection(ann_file, shapes[1])  # beside the json: impossible, kept in memory
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            built = CocoDetection(ann_file, shapes[1], cache_dir=tmp_path / "cache")
        cache = cache_path(ann_file, tmp_path / "cache")
        assert list((tmp_path / "cache").glob("ann.json.*.maskrcnn-cache")) == [cache]
        monkeypatch.setattr("maskrcnn.data.coco.pack_annotations",
                            lambda ann_file, skip: pytest.fail("rebuilt despite a valid cache"))
        loaded = CocoDetection(ann_file, shapes[1], cache_dir=tmp_path / "cache")
    _assert_same_records(_records(built), records)
    _assert_same_records(_records(loaded), records)
    assert not cache_path(ann_file).exists()


def test_jsons_of_one_name_get_their_own_cache_in_a_cache_dir(tmp_path):
    first, second = tmp_path / "a" / "ann.json", tmp_path / "b" / "ann.json"
    assert cache_path(first, tmp_path) != cache_path(second, tmp_path)


def test_config_cache_dir_reaches_the_dataset(shapes, tmp_path):
    cfg = Config()
    cfg.data.train_ann, cfg.data.train_images = str(shapes[0]), str(shapes[1])
    cfg.data.annotation_cache_dir = str(tmp_path / "cache")
    build_train_dataset(cfg)
    assert cache_path(shapes[0], tmp_path / "cache").is_file()
