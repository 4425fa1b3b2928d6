import numpy as np
import pytest

from pipeline.data.store import ArrayStore, ArrayStoreWriter, StoreError


def test_roundtrip_across_shards(tmp_path):
    data = np.random.default_rng(0).integers(0, 255, (23, 5, 4), dtype=np.uint8)
    w = ArrayStoreWriter(tmp_path / "s", (5, 4), np.uint8, shard_size=5)
    w.append(data[:7])
    w.append(data[7:])
    store = w.close()
    assert len(store) == 23 and store.shape == (23, 5, 4)
    assert len(list((tmp_path / "s").glob("shard-*.npy"))) == 5
    np.testing.assert_array_equal(store.read(np.arange(23)), data)
    idx = np.array([22, 0, 11, 5, 5])
    np.testing.assert_array_equal(store.read(idx), data[idx])
    got = np.concatenate([b for _, b in ArrayStore(tmp_path / "s").iter_batches(6)])
    np.testing.assert_array_equal(got, data)


def test_incomplete_store_is_refused(tmp_path):
    w = ArrayStoreWriter(tmp_path / "s", (2,), np.float16, shard_size=2)
    w.append(np.ones((5, 2)))  # two full shards flushed, no index yet: a killed writer
    assert not (tmp_path / "s" / "index.json").exists()
    assert not list((tmp_path / "s").glob("*.tmp"))
    with pytest.raises(StoreError, match="not a complete array store"):
        ArrayStore(tmp_path / "s")


def test_shape_mismatch(tmp_path):
    w = ArrayStoreWriter(tmp_path / "s", (2, 2), np.uint8)
    with pytest.raises(StoreError):
        w.append(np.zeros((1, 3, 2)))
