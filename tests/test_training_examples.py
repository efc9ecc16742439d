"""The store of training examples: written once in files, streamed every epoch through a shuffle buffer that
holds a bounded part of it, every example once an epoch, in an order drawn from the epoch's seed."""

from __future__ import annotations

import numpy as np
import pytest

import pipeline.training.examples as training_examples
from pipeline.training.examples import STORE_FILE, Block, ExampleStore, StoreWriter

ROWS = 1000
ROW_BYTES = 64 * 4  # a float32 embedding of 64


@pytest.fixture
def store(tmp_path, monkeypatch) -> ExampleStore:
    """ROWS examples in files of 50: example i's embedding is all i, its caption "i"."""
    monkeypatch.setattr(training_examples, "CHUNK_BYTES", 50 * ROW_BYTES)
    with StoreWriter(tmp_path / "store") as writer:
        for start in range(0, ROWS, 10):
            rows = range(start, start + 10)
            writer.add(Block([[str(i), f"{i}."] for i in rows], [[f"not {i}"] for i in rows],
                             np.repeat(np.arange(start, start + 10, dtype=np.float32)[:, None], 64, axis=1)))
    return writer.store


def _order(batches) -> list[int]:
    rows = []
    for batch in batches:
        ids = batch.values[:, 0].astype(int).tolist()
        assert [references[0] for references in batch.references] == [str(i) for i in ids]  # still paired
        assert [negatives[0] for negatives in batch.negatives] == [f"not {i}" for i in ids]
        rows.extend(ids)
    return rows


def test_the_store_keeps_every_example_in_files_in_order(store):
    assert store.count == ROWS and store.shape == (64,) and store.has_negatives
    assert len(store.files) == ROWS // 50
    assert _order(store.blocks()) == list(range(ROWS))
    assert list(store.captions()) == [[str(i), f"{i}."] for i in range(ROWS)]


def test_each_epoch_streams_every_example_once_through_a_bounded_buffer(store, monkeypatch):
    """A buffer of 200 examples (four files): the first batch leaves after a few files are read, not the whole
    store, and still comes from all over the files read so far; the epoch has every example once."""
    reads = []
    real_read = ExampleStore._read
    monkeypatch.setattr(ExampleStore, "_read", lambda self, name, *a: reads.append(name) or real_read(self, name, *a))
    buffer_bytes = 200 * store._row_bytes
    batches = store.batches(32, seed=1, buffer_bytes=buffer_bytes)
    first = next(batches)
    assert len(reads) <= 5
    assert len({i // 50 for i in _order([first])}) >= 3  # drawn from several files, not one file's run
    order = _order([first, *batches])
    assert len(order) == ROWS // 32 * 32 and len(set(order)) == len(order)
    assert _order(store.shuffled(1, buffer_bytes)) != list(range(ROWS))
    assert sorted(_order(store.shuffled(1, buffer_bytes))) == list(range(ROWS))


def test_the_order_is_the_epoch_seed_s(store):
    """Every process of a run draws the same batches from the same seed; another epoch, another order."""
    buffer_bytes = 200 * store._row_bytes
    assert _order(store.batches(32, 5, buffer_bytes)) == _order(store.batches(32, 5, buffer_bytes))
    assert _order(store.batches(32, 5, buffer_bytes)) != _order(store.batches(32, 6, buffer_bytes))


def test_a_store_within_the_buffer_is_shuffled_whole_and_the_last_batch_is_kept_when_asked(store):
    order = _order(store.shuffled(3, buffer_bytes=10 * ROWS * store._row_bytes))
    assert sorted(order) == list(range(ROWS))
    # whole: an example of the last file is as likely anywhere, not held back to the end as a buffer's would be
    assert np.mean([order.index(i) for i in range(950, ROWS)]) < 0.7 * ROWS
    sizes = [len(batch) for batch in store.batches(300, 3, 10 * ROWS * store._row_bytes, keep_last=True)]
    assert sizes == [300, 300, 300, 100]


def test_map_makes_a_store_of_new_values_for_the_same_examples(store, tmp_path):
    doubled = store.map(lambda values: values[:, :8] * 2, tmp_path / "doubled")
    assert doubled.count == ROWS and doubled.shape == (8,)
    block = Block.concat(list(doubled.blocks()))
    assert block.values[:, 0].tolist() == [2.0 * i for i in range(ROWS)]
    assert block.references == [[str(i), f"{i}."] for i in range(ROWS)]


def test_a_store_cut_short_is_not_a_store(tmp_path):
    """A run killed while writing leaves files without the store's description: it is written again."""
    with pytest.raises(RuntimeError), StoreWriter(tmp_path / "store") as writer:
        writer.add(Block([["a"]], [[]], np.zeros((1, 4), np.float32)))
        raise RuntimeError("killed")
    assert writer.store is None and not (tmp_path / "store" / STORE_FILE).exists()
