"""Datasets and the fixed-seed batching every framework shares. Nothing is ever downloaded.

- `digits`: scikit-learn's bundled 8x8 digits (1,797 images), scaled to [0, 1] by /16 and
  binarized at 0.5; fixed train/test split (last 297 of a seed-0 permutation are test).
- `synthetic`: drawn from a known linear-Gaussian model, x = z W + b + sigma * noise, so that
  log p(x) is exact; any size and dimension.
- `mnist` / `fashion_mnist`: read from local IDX files (gzip or raw) or a .npz file at `path`.
"""

from __future__ import annotations

import gzip
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SOURCES = ("digits", "synthetic", "mnist", "fashion_mnist")
DIGITS_TEST = 297
DIGITS_TRAIN = 1797 - DIGITS_TEST  # scikit-learn ships 1,797 digits
SPLIT_SEED = 0


class DataError(ValueError):
    """A data set could not be read; the message names the file and the problem."""


@dataclass
class Dataset:
    name: str
    x_train: np.ndarray  # (N, D) float64
    x_test: np.ndarray
    binary: bool  # values are exactly 0 or 1
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def x_dim(self) -> int:
        return int(self.x_train.shape[1])


def load(
    source: str = "digits",
    *,
    path: str | None = None,
    binarize: bool = True,
    threshold: float = 0.5,
    n_train: int = 2000,
    n_test: int = 500,
    x_dim: int = 16,
    latent: int = 4,
    obs_sigma: float = 0.5,
    seed: int = 0,
) -> Dataset:
    """Load a data set by name; see the module docstring."""
    if source == "digits":
        return _digits(binarize, threshold)
    if source == "synthetic":
        return synthetic(n_train, n_test, x_dim, latent, obs_sigma, seed)
    if source in ("mnist", "fashion_mnist"):
        if not path:
            raise DataError(f"data={source} needs data.path=<.npz file or folder of IDX files>")
        return _mnist_like(source, Path(path), binarize, threshold)
    raise DataError(f"unknown data source {source!r}; choose from {', '.join(SOURCES)}")


def _binarize(x: np.ndarray, binarize: bool, threshold: float) -> np.ndarray:
    return (x > threshold).astype(np.float64) if binarize else x.astype(np.float64)


def _split(x: np.ndarray, n_test: int) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(SPLIT_SEED).permutation(len(x))
    return x[perm[:-n_test]], x[perm[-n_test:]]


def _digits(binarize: bool, threshold: float) -> Dataset:
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    x = load_digits().data / 16.0
    x_train, x_test = _split(_binarize(x, binarize, threshold), DIGITS_TEST)
    return Dataset("digits", x_train, x_test, binary=binarize, info={"image_shape": (8, 8)})


@dataclass
class LinearGaussian:
    """x = z W + b + sigma * noise, z ~ N(0, I). W has shape (latent, x_dim)."""

    W: np.ndarray
    b: np.ndarray
    sigma: float

    def covariance(self) -> np.ndarray:
        return self.W.T @ self.W + self.sigma**2 * np.eye(self.W.shape[1])

    def log_px(self, x: np.ndarray) -> np.ndarray:
        """Exact log N(x; b, W^T W + sigma^2 I), per example."""
        cov = self.covariance()
        d = x - self.b
        chol = np.linalg.cholesky(cov)
        sol = np.linalg.solve(chol, d.T)  # (D, N)
        logdet = 2.0 * np.sum(np.log(np.diag(chol)))
        return -0.5 * (np.sum(sol**2, axis=0) + logdet + len(self.b) * np.log(2.0 * np.pi))


def linear_gaussian_model(x_dim: int, latent: int, sigma: float, seed: int) -> LinearGaussian:
    rng = np.random.default_rng([seed, 1])
    return LinearGaussian(
        W=rng.normal(0.0, 1.0 / np.sqrt(latent), size=(latent, x_dim)),
        b=rng.normal(0.0, 0.5, size=x_dim),
        sigma=sigma,
    )


def synthetic(n_train: int, n_test: int, x_dim: int, latent: int, sigma: float, seed: int) -> Dataset:
    model = linear_gaussian_model(x_dim, latent, sigma, seed)
    rng = np.random.default_rng([seed, 2])
    n = n_train + n_test
    x = rng.standard_normal((n, latent)) @ model.W + model.b + sigma * rng.standard_normal((n, x_dim))
    return Dataset("synthetic", x[:n_train], x[n_train:], binary=False, info={"model": model})


# --- MNIST-like files ---------------------------------------------------------------

_IDX_NAMES = {
    "train": ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) into an array of its declared shape."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path) as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"data file not found: {path}") from None
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated (header)")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    size = int(np.prod(shape))
    if len(raw) - header != size:
        raise DataError(f"{path} holds {len(raw) - header} bytes of data, its header declares {size}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _find_idx(folder: Path, split: str) -> Path:
    for stem in _IDX_NAMES[split]:
        for suffix in ("", ".gz"):
            p = folder / (stem + suffix)
            if p.exists():
                return p
    names = " or ".join(f"{s}[.gz]" for s in _IDX_NAMES[split])
    raise DataError(f"no {split} images in {folder}: expected {names}")


def _mnist_like(source: str, path: Path, binarize: bool, threshold: float) -> Dataset:
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if path.is_dir():
        x_train, x_test = (read_idx(_find_idx(path, s)) for s in ("train", "test"))
    elif path.suffix == ".npz":
        try:
            with np.load(path) as f:
                missing = {"x_train", "x_test"} - set(f.files)
                if missing:
                    raise DataError(f"{path} lacks arrays {sorted(missing)} (has {sorted(f.files)})")
                x_train, x_test = f["x_train"], f["x_test"]
        except (OSError, ValueError) as exc:
            if isinstance(exc, DataError):
                raise
            raise DataError(f"{path} is not a readable .npz file: {exc}") from None
    else:
        raise DataError(f"{path}: expected a .npz file or a folder of IDX files")
    out = []
    for x in (x_train, x_test):
        if x.ndim < 2:
            raise DataError(f"{path}: images must have at least 2 dimensions, got shape {x.shape}")
        x = x.reshape(len(x), -1).astype(np.float64)
        out.append(_binarize(x / 255.0 if x.max() > 1.0 else x, binarize, threshold))
    return Dataset(source, out[0], out[1], binary=binarize, info={"path": str(path)})


# --- batching -------------------------------------------------------------------------


def batches(x: np.ndarray, batch_size: int, seed: int, epoch: int) -> Iterator[np.ndarray]:
    """Shuffled full batches for one epoch; the same for every framework given the seed.
    The last partial batch is dropped so that shapes stay fixed (no retracing)."""
    if batch_size > len(x):
        raise DataError(f"batch size {batch_size} exceeds the {len(x)} examples available")
    perm = np.random.default_rng([seed, epoch]).permutation(len(x))
    for i in range(len(x) // batch_size):
        yield x[perm[i * batch_size : (i + 1) * batch_size]]


def noise(shape: tuple[int, ...], seed: int, *extra: int) -> np.ndarray:
    """Harness-supplied standard-normal noise, reproducible from (seed, *extra)."""
    return np.random.default_rng([seed, *extra]).standard_normal(shape)
