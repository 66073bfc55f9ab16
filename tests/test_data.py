from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import multivariate_normal

from harness import data


def test_digits_shapes_ranges_determinism() -> None:
    a, b = data.load("digits"), data.load("digits")
    assert a.x_train.shape == (data.DIGITS_TRAIN, 64) == (1500, 64) and a.x_test.shape == (297, 64)
    assert set(np.unique(a.x_train)) == {0.0, 1.0}
    np.testing.assert_array_equal(a.x_train, b.x_train)
    grey = data.load("digits", binarize=False)
    assert grey.x_train.min() >= 0 and grey.x_train.max() <= 1 and len(np.unique(grey.x_train)) == 17
    # binarized by the fixed rule x/16 > 0.5
    np.testing.assert_array_equal(a.x_train, (grey.x_train > 0.5).astype(float))


def test_synthetic_matches_its_model() -> None:
    ds = data.load("synthetic", n_train=20000, n_test=10, x_dim=5, latent=2, obs_sigma=0.3, seed=3)
    m = ds.info["model"]
    assert ds.x_train.shape == (20000, 5) and ds.x_test.shape == (10, 5)
    # sample moments agree with the model's
    np.testing.assert_allclose(ds.x_train.mean(0), m.b, atol=0.05)
    np.testing.assert_allclose(np.cov(ds.x_train.T), m.covariance(), rtol=0.06, atol=0.03)  # ~4 SE at N=20000
    # exact log-density against scipy
    np.testing.assert_allclose(m.log_px(ds.x_test), multivariate_normal(m.b, m.covariance()).logpdf(ds.x_test), rtol=1e-12)


def _idx_bytes(arr: np.ndarray) -> bytes:
    return bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()


def write_data_files(folder: Path) -> dict[str, Path]:
    """A good .npz and IDX folder and one file (or folder) per malformation the harness must
    reject before any job runs; shared with tests/test_config.py and tests/test_faults.py."""
    rng = np.random.default_rng(0)
    img = lambda n, side=8: rng.integers(0, 256, (n, side, side), dtype=np.uint8)  # noqa: E731
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}

    def npz(name: str, **arrays: np.ndarray) -> None:
        out[name] = folder / f"{name}.npz"
        np.savez(out[name], **arrays)

    def idx(name: str, train: bytes, test: bytes, gz: bool = False) -> None:
        d = out[name] = folder / name
        d.mkdir(exist_ok=True)
        for stem, raw in (("train-images-idx3-ubyte", train), ("t10k-images-idx3-ubyte", test)):
            (d / (stem + (".gz" if gz else ""))).write_bytes(gzip.compress(raw) if gz else raw)

    npz("good", x_train=img(96), x_test=img(32))
    # values a model cannot take as configured (checked against data.scale, binarize, threshold, likelihood)
    npz("normal", x_train=rng.standard_normal((96, 8, 8)), x_test=rng.standard_normal((32, 8, 8)))
    npz("float255", x_train=255.0 * rng.random((96, 8, 8)), x_test=255.0 * rng.random((32, 8, 8)))
    npz("binary_uint8", x_train=rng.integers(0, 2, (96, 8, 8), dtype=np.uint8), x_test=rng.integers(0, 2, (32, 8, 8), dtype=np.uint8))
    npz("good_float", x_train=rng.random((96, 64)), x_test=rng.random((32, 64)))
    npz("no_arrays", images=img(4))
    npz("one_array", x_train=img(4))
    npz("sizes", x_train=img(16, 8), x_test=img(8, 7))  # 8x8 training images, 7x7 test images
    npz("all_nan", x_train=np.full((16, 64), np.nan), x_test=np.full((8, 64), np.nan))
    planted = rng.random((16, 64))
    planted[3, 5] = np.inf
    npz("inf", x_train=planted, x_test=rng.random((8, 64)))
    npz("strings", x_train=np.array([["a", "b"], ["c", "d"]]), x_test=np.array([["a", "b"]]))
    npz("flat", x_train=np.arange(10.0), x_test=np.arange(10.0))  # 1-D: not images
    npz("empty", x_train=np.zeros((0, 8, 8)), x_test=np.zeros((0, 8, 8)))
    out["junk"] = folder / "junk.npz"
    out["junk"].write_bytes(b"PK\x03\x04 this is not a zip archive")
    out["text"] = folder / "images.txt"
    out["text"].write_text("0 1 0 1\n")
    idx("idx_good", _idx_bytes(img(96)), _idx_bytes(img(32)))
    idx("idx_good_gz", _idx_bytes(img(96)), _idx_bytes(img(32)), gz=True)
    idx("idx_magic", b"\x01\x02\x03\x04" + bytes(100), _idx_bytes(img(4)))
    idx("idx_size", _idx_bytes(img(16))[:-10], _idx_bytes(img(4)))  # header declares 10 more bytes than it holds
    idx("idx_size_gz", _idx_bytes(img(16)) + b"extra", _idx_bytes(img(4)), gz=True)
    idx("idx_sizes", _idx_bytes(img(16, 8)), _idx_bytes(img(4, 6)))
    idx("idx_labels", bytes([0, 0, 8, 1]) + struct.pack(">I", 16) + bytes(16), _idx_bytes(img(4)))
    out["idx_no_test"] = folder / "idx_no_test"
    out["idx_no_test"].mkdir(exist_ok=True)
    (out["idx_no_test"] / "train-images-idx3-ubyte").write_bytes(_idx_bytes(img(4)))
    out["empty_folder"] = folder / "empty_folder"
    out["empty_folder"].mkdir(exist_ok=True)
    return out


#: malformed data files: (name in write_data_files, what the message says)
BAD_FILES = [
    ("no_arrays", "lacks arrays ['x_test', 'x_train']"),
    ("one_array", "lacks arrays ['x_test']"),
    ("sizes", "training images are 8x8 but test images are 7x7"),
    ("all_nan", "non-finite"),
    ("inf", "non-finite"),
    ("strings", "not numbers"),
    ("flat", "not a set of images"),
    ("empty", "not a set of images"),
    ("junk", "not a readable .npz"),
    ("text", "neither a .npz file nor a folder"),
    ("idx_magic", "bad magic number"),
    ("idx_size", "holds 1014 bytes of data, its header declares 1024"),
    ("idx_size_gz", "holds 1029 bytes of data, its header declares 1024"),
    ("idx_sizes", "training images are 8x8 but test images are 6x6"),
    ("idx_labels", "not a set of images"),
    ("idx_no_test", "no test images"),
    ("empty_folder", "no train images"),
]


@pytest.fixture(scope="module")
def data_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_data_files(tmp_path_factory.mktemp("data"))


@pytest.mark.parametrize("name,says", BAD_FILES)
def test_malformed_file_rejected_by_inspect_and_load(data_files: dict[str, Path], name: str, says: str) -> None:
    """The cheap check (headers only) and the loader reject the same files, each message naming
    the path, the problem and the formats expected."""
    path = data_files[name]
    for check in (lambda: data.inspect(path), lambda: data.load("mnist", path=str(path))):
        with pytest.raises(data.DataError) as info:
            check()
        msg = str(info.value)
        assert str(path) in msg and says in msg and data.FORMATS in msg, msg


@pytest.mark.parametrize("name", ["good", "good_float", "idx_good", "idx_good_gz"])
def test_inspect_good_files(data_files: dict[str, Path], name: str) -> None:
    info = data.inspect(data_files[name])
    ds = data.load("mnist", path=str(data_files[name]))
    assert (info.n_train, info.n_test, info.x_dim) == (*map(len, (ds.x_train, ds.x_test)), ds.x_dim) == (96, 32, 64)
    assert info.format == ("idx" if name.startswith("idx") else "npz")


def test_inspect_streams_large_float_arrays(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The finiteness scan reads float arrays in chunks: a NaN in a later chunk is found and placed."""
    monkeypatch.setattr(data, "_SCAN_BYTES", 8 * 100)  # 100 float64 values per chunk
    x = np.zeros((50, 64))
    x[40, 3] = np.nan  # value 2563: chunk 25
    p = tmp_path / "late_nan.npz"
    np.savez_compressed(p, x_train=x, x_test=np.zeros((5, 64)))
    with pytest.raises(data.DataError, match=r"x_train holds non-finite values \(NaN or inf; 1 in values 2500..2599\)"):
        data.inspect(p)
    np.savez_compressed(p, x_train=np.zeros((50, 64)), x_test=np.zeros((5, 64)))
    assert data.inspect(p).n_train == 50  # re-checked: the cache key has the file's size and time


@pytest.mark.parametrize("compress", [False, True])
def test_idx_folder(tmp_path: Path, compress: bool) -> None:
    rng = np.random.default_rng(0)
    train, test = rng.integers(0, 256, (10, 28, 28)), rng.integers(0, 256, (4, 28, 28))
    for name, arr in (("train-images-idx3-ubyte", train), ("t10k-images-idx3-ubyte", test)):
        raw = _idx_bytes(arr)
        if compress:
            (tmp_path / (name + ".gz")).write_bytes(gzip.compress(raw))
        else:
            (tmp_path / name).write_bytes(raw)
    ds = data.load("mnist", path=str(tmp_path))
    assert ds.x_train.shape == (10, 784) and ds.x_test.shape == (4, 784)
    np.testing.assert_array_equal(ds.x_train, (train.reshape(10, -1) / 255.0 > 0.5).astype(float))
    grey = data.load("fashion_mnist", path=str(tmp_path), binarize=False)
    np.testing.assert_allclose(grey.x_test, test.reshape(4, -1) / 255.0)


def test_npz(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    p = tmp_path / "mnist.npz"
    np.savez(p, x_train=rng.integers(0, 256, (6, 28, 28)).astype(np.uint8), x_test=rng.integers(0, 256, (3, 28, 28)).astype(np.uint8))
    ds = data.load("mnist", path=str(p))
    assert ds.x_train.shape == (6, 784) and set(np.unique(ds.x_train)) <= {0.0, 1.0}


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope.npz"
    with pytest.raises(data.DataError, match=str(missing)):
        data.load("mnist", path=str(missing))
    with pytest.raises(data.DataError, match="no train images"):
        data.load("mnist", path=str(tmp_path))
    bad = tmp_path / "bad.npz"
    np.savez(bad, images=np.zeros((2, 2)))
    with pytest.raises(data.DataError, match="lacks arrays"):
        data.load("mnist", path=str(bad))
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    with pytest.raises(data.DataError, match="not a readable .npz"):
        data.load("mnist", path=str(junk))
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + struct.pack(">3I", 2, 2, 2) + b"\x00")
    with pytest.raises(data.DataError, match="declares 8"):
        data.read_idx(tmp_path / "train-images-idx3-ubyte")
    with pytest.raises(data.DataError, match="bad magic"):
        (tmp_path / "x").write_bytes(b"\x01\x02\x03\x04")
        data.read_idx(tmp_path / "x")


def test_batches_fixed_seed_full_batches() -> None:
    x = np.arange(103)[:, None].astype(float)
    e0 = list(data.batches(x, 10, seed=0, epoch=0))
    assert len(e0) == 10 and all(b.shape == (10, 1) for b in e0)
    assert len(np.unique(np.concatenate(e0))) == 100  # no repeats within an epoch
    np.testing.assert_array_equal(np.concatenate(e0), np.concatenate(list(data.batches(x, 10, 0, 0))))
    assert not np.array_equal(np.concatenate(e0), np.concatenate(list(data.batches(x, 10, 0, 1))))
    with pytest.raises(data.DataError, match="exceeds"):
        list(data.batches(x, 200, 0, 0))


def test_scaling_is_explicit_and_recorded(data_files: dict[str, Path]) -> None:
    """Integer pixels are divided by 255, float arrays by 1, unless data.scale says otherwise;
    never decided from the values; the scale used is in the Dataset and in the record's config."""
    from harness.config import record_config

    ints = data.load("mnist", path=str(data_files["good"]), binarize=False)
    raw = np.load(data_files["good"])["x_train"].reshape(96, -1)
    np.testing.assert_allclose(ints.x_train, raw / 255.0)
    assert ints.info["scale"] == 255.0
    floats = data.load("mnist", path=str(data_files["good_float"]), binarize=False)
    np.testing.assert_array_equal(floats.x_train, np.load(data_files["good_float"])["x_train"])
    assert floats.info["scale"] == 1.0
    halved = data.load("mnist", path=str(data_files["float255"]), binarize=False, scale=510)
    assert halved.x_train.max() <= 0.5 and halved.info["scale"] == 510
    assert data.inspect(data_files["float255"]).hi > 250 and not data.inspect(data_files["float255"]).integer
    resolved = {"data": {"source": "mnist", "path": str(data_files["good"]), "scale": None, "n_train": None}}
    assert record_config(resolved)["data"] == {"source": "mnist", "path": str(data_files["good"]), "scale": 255.0}
    digits = record_config({"data": {"source": "digits", "path": None, "scale": None, "n_train": None}})["data"]
    assert digits == {"source": "digits"}  # keys digits never reads are not recorded
