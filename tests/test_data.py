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
