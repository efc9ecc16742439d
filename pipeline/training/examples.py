"""Training examples: read once from the data into a store on local disk (images decoded to the training size, or
only their embeddings), then streamed every epoch through a shuffle buffer, so that a run's memory does not grow
with its data. Every process of a run writes the same store and draws the same batches from it."""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from tqdm import tqdm

from pipeline.training.parallel import ONE_PROCESS, Parallel
from schemas.captions import embedding_matrix

log = logging.getLogger(__name__)

MAX_LISTED_SKIPS = 20
CHUNK_BYTES = 32 << 20  # a store file: the unit of shuffling files and of reading
STORE_FILE = "store.json"  # written last: a store without it was cut short and is written again


@dataclass
class Block:
    """Examples in a row: `values` (uint8 pixels (N, S, S, 3) or float32 embeddings (N, D)), their reference
    captions and, when the data has them, hard negative captions (one list per example, maybe empty)."""

    references: list[list[str]]
    negatives: list[list[str]]
    values: np.ndarray

    def __len__(self) -> int:
        return len(self.references)

    def take(self, rows: np.ndarray | list[int]) -> Block:
        return Block([self.references[i] for i in rows], [self.negatives[i] for i in rows], self.values[rows])

    def slice(self, start: int, stop: int) -> Block:
        return Block(self.references[start:stop], self.negatives[start:stop], self.values[start:stop])

    @staticmethod
    def concat(blocks: list[Block]) -> Block:
        if len(blocks) == 1:
            return blocks[0]
        return Block([r for b in blocks for r in b.references], [n for b in blocks for n in b.negatives],
                     np.concatenate([b.values for b in blocks]))


class ExampleStore:
    """A folder of Arrow IPC files of a few thousand examples each (`references`, `negatives`, `values`) and
    STORE_FILE, which describes them."""

    def __init__(self, folder: Path):
        self.folder = folder
        info = json.loads((folder / STORE_FILE).read_text())
        self.count: int = info["count"]
        self.shape: tuple[int, ...] = tuple(info["shape"])
        self.dtype = np.dtype(info["dtype"])
        self.has_negatives: bool = info["negatives"]
        self.files: list[str] = info["files"]
        self._largest_file_rows: int = info["largest_file_rows"]
        self._row_bytes: int = info["row_bytes"]

    def _table(self, name: str) -> pa.Table:
        with pa.OSFile(str(self.folder / name)) as handle:  # read, not mapped: the pages do not stay in the RSS
            return pa.ipc.open_file(handle).read_all()

    def _read(self, name: str) -> Block:
        table = self._table(name)
        values = table.column("values").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        return Block(table.column("references").to_pylist(), table.column("negatives").to_pylist(),
                     values.reshape(table.num_rows, *self.shape))

    def blocks(self) -> Iterator[Block]:
        """The examples in the order they were written, a file at a time."""
        for name in self.files:
            yield self._read(name)

    def captions(self) -> Iterator[list[str]]:
        """Every example's reference captions, in order."""
        for name in self.files:
            yield from self._table(name).column("references").to_pylist()

    def map(self, function: Callable[[np.ndarray], np.ndarray], folder: Path) -> ExampleStore:
        """A store of the same examples whose values are `function` of these (pixels -> embeddings)."""
        with StoreWriter(folder) as writer:
            for block in self.blocks():
                writer.add(Block(block.references, block.negatives, function(block.values)))
        return writer.store

    def shuffled(self, seed: int, buffer_bytes: int) -> Iterator[Block]:
        """Every example once, in an order drawn from `seed`: the files in a random order, each example through a
        shuffle buffer of about `buffer_bytes` (as tf.data's: an example arriving at a full buffer takes the place
        of a random one, which leaves). A store smaller than the buffer comes out in a uniformly random order."""
        rng = np.random.default_rng(seed)
        # at least two files' worth, so that a file arriving at a full buffer finds as many examples to replace
        capacity = max(buffer_bytes // self._row_bytes, 2 * self._largest_file_rows)
        buffer: Block | None = None
        for index in rng.permutation(len(self.files)):
            block = self._read(self.files[index])
            if buffer is None or len(buffer) + len(block) <= capacity:
                buffer = Block.concat([buffer, block]) if buffer is not None else block.take(np.arange(len(block)))
                continue
            slots = rng.choice(len(buffer), size=len(block), replace=False)
            yield buffer.take(slots)
            buffer.values[slots] = block.values
            for slot, references, negatives in zip(slots.tolist(), block.references, block.negatives, strict=True):
                buffer.references[slot] = references
                buffer.negatives[slot] = negatives
        if buffer is not None:
            yield buffer.take(rng.permutation(len(buffer)))

    def batches(self, batch_size: int, seed: int, buffer_bytes: int, keep_last: bool = False) -> Iterator[Block]:
        """`shuffled` in batches of `batch_size`; a last, smaller batch only with `keep_last`."""
        pending: Block | None = None
        for block in self.shuffled(seed, buffer_bytes):
            pending = block if pending is None else Block.concat([pending, block])
            whole = len(pending) - len(pending) % batch_size
            for start in range(0, whole, batch_size):
                yield pending.slice(start, start + batch_size)
            pending = pending.slice(whole, len(pending))
        if keep_last and pending is not None and len(pending):
            yield pending


class StoreWriter:
    """Writes blocks of examples, in order, as an ExampleStore at `folder` (anything there before is replaced);
    `store` is the store once the writer is closed."""

    def __init__(self, folder: Path):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        self.folder = folder
        self.store: ExampleStore | None = None
        self._pending: list[Block] = []
        self._pending_bytes = 0
        self._files: list[str] = []
        self._rows: list[int] = []
        self._count = 0
        self._text_bytes = 0
        self._all_negatives = True
        self._shape: tuple[int, ...] | None = None
        self._dtype: np.dtype | None = None

    @property
    def count(self) -> int:
        return self._count

    @property
    def shape(self) -> tuple[int, ...] | None:
        """An example's values' shape (None before the first)."""
        return self._shape

    def add(self, block: Block) -> None:
        if not len(block):
            return
        if self._shape is not None and block.values.shape[1:] != self._shape:
            raise ValueError(f"examples of shape {block.values.shape[1:]} cannot join those of {self._shape}")
        self._shape, self._dtype = block.values.shape[1:], block.values.dtype
        self._pending.append(block)
        self._pending_bytes += block.values.nbytes
        self._count += len(block)
        self._text_bytes += sum(len(t) for texts in block.references + block.negatives for t in texts)
        self._all_negatives = self._all_negatives and all(block.negatives)
        if self._pending_bytes >= CHUNK_BYTES:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        block = Block.concat(self._pending)
        self._pending, self._pending_bytes = [], 0
        width = int(np.prod(block.values.shape[1:]))
        values = pa.FixedSizeListArray.from_arrays(pa.array(block.values.reshape(-1)), width)
        table = pa.table({"references": pa.array(block.references, pa.list_(pa.string())),
                          "negatives": pa.array(block.negatives, pa.list_(pa.string())), "values": values})
        name = f"examples-{len(self._files):05d}.arrow"
        with pa.OSFile(str(self.folder / name), "wb") as handle, pa.ipc.new_file(handle, table.schema) as writer:
            writer.write_table(table)
        self._files.append(name)
        self._rows.append(len(block))

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is not None:
            return
        self._flush()
        if not self._count:
            return
        # what an example costs in a shuffle buffer: its values, and its captions as Python strings (about twice
        # their UTF-8 size)
        row_bytes = int(np.prod(self._shape)) * self._dtype.itemsize + 2 * self._text_bytes // self._count + 1
        info = {"count": self._count, "shape": list(self._shape), "dtype": self._dtype.str,
                "negatives": self._all_negatives, "files": self._files, "largest_file_rows": max(self._rows),
                "row_bytes": row_bytes}
        (self.folder / STORE_FILE).write_text(json.dumps(info))
        self.store = ExampleStore(self.folder)


def add_image_examples(writer: StoreWriter, specs: list[str], image_spec, limit: int | None = None,
                       progress: Callable[..., Any] = tqdm, image_root: str | None = None,
                       encode: Callable[[torch.Tensor], torch.Tensor] | None = None, encode_batch: int = 256,
                       parallel: Parallel = ONE_PROCESS, exchange_every: int = 1024) -> None:
    """Images + reference captions from WebDataset / Parquet / folders (KEY.json 'captions' list, else
    KEY.txt or a caption column) or caption files (`pipeline.io.caption_files`: COCO, Karpathy, JSON Lines),
    whose relative image paths are taken from `image_root`, else from the caption file's folder; the first
    `limit` captioned samples (an image among them that does not decode is left out), added to `writer` as uint8
    pixels, or with `encode` (uint8 images -> embeddings, a frozen encoder) as the embeddings of `encode_batch`
    images at a time: only they are kept. ValueError where the data has none.
    Across processes, each decodes (and encodes) every `world_size`-th image only; every `exchange_every` samples
    their shares are exchanged, so that every process writes the same store."""
    from pipeline.io.images import ImageError, decode_image

    bar = progress(desc="loading images" if encode is None else "encoding images", unit="img")
    share = _Share()
    before = writer.count
    for position, (image_bytes, references, hard_negatives) in enumerate(_caption_records(specs, image_root)):
        if limit is not None and position >= limit:
            break
        if position % parallel.world_size == parallel.rank:
            try:
                share.add(position, decode_image(image_bytes, image_spec).pixels, references, hard_negatives)
                bar.update()
            except ImageError as exc:
                log.warning("skipping an image: %s", exc)
        if (position + 1) % exchange_every == 0:
            writer.add(share.exchange(parallel, encode, encode_batch))
            share = _Share()
    writer.add(share.exchange(parallel, encode, encode_batch))
    bar.close()
    if writer.count == before:
        raise ValueError(f"no usable image + caption pairs in {', '.join(specs)}")


class _Share:
    """One process's decoded samples since the last exchange."""

    def __init__(self):
        self.positions: list[int] = []
        self.pixels: list[np.ndarray] = []
        self.references: list[list[str]] = []
        self.negatives: list[list[str]] = []

    def add(self, position: int, pixels: np.ndarray, references: list[str], negatives: list[str]) -> None:
        self.positions.append(position)
        self.pixels.append(pixels)
        self.references.append(references)
        self.negatives.append(negatives)

    def exchange(self, parallel: Parallel, encode: Callable[[torch.Tensor], torch.Tensor] | None,
                 encode_batch: int) -> Block:
        """Every process's samples (encoded where asked), in the data's order."""
        values = None
        if self.pixels:
            pixels = np.stack(self.pixels)
            values = pixels if encode is None else np.concatenate(
                [encode(torch.from_numpy(pixels[i:i + encode_batch])).numpy() for i in range(0, len(pixels),
                                                                                              encode_batch)])
        shares = parallel.gather_objects((self.positions, self.references, self.negatives, values))
        positions = [p for share in shares for p in share[0]]
        order = sorted(range(len(positions)), key=positions.__getitem__)
        references = [r for share in shares for r in share[1]]
        negatives = [n for share in shares for n in share[2]]
        arrays = [share[3] for share in shares if share[3] is not None]
        if not arrays:
            return Block([], [], np.zeros((0,)))
        return Block([references[i] for i in order], [negatives[i] for i in order], np.concatenate(arrays)[order])


def _caption_records(specs: list[str], image_root: str | None = None
                     ) -> Iterator[tuple[bytes, list[str], list[str]]]:
    """(image bytes, reference captions, hard negative captions) from every kind of input."""
    from pipeline.io.caption_files import expand_labelled_inputs, read_labelled_inputs
    from pipeline.io.sources import record_metadata, reference_captions, text_list

    caption_files, shards = expand_labelled_inputs(specs)
    unusable = 0
    for record in read_labelled_inputs(caption_files, shards, image_root):
        meta = record_metadata(record)
        references = reference_captions(record, meta) if record["status"] == "ok" and record["image"] else []
        if references:
            yield record["image"], references, text_list(meta.get("negatives"))
            continue
        unusable += 1
        if unusable <= MAX_LISTED_SKIPS:  # a LAION Parquet may hold thousands of failed downloads
            reason = f"{record['status']}: {record['error']}" if record["status"] != "ok" else "no caption"
            log.warning("skipping %s of %s: %s", record["key"], record["source"], reason)
        elif unusable == MAX_LISTED_SKIPS + 1:
            log.warning("more unusable samples are skipped without a warning each")


def add_embedding_examples(writer: StoreWriter, specs: list[str], text_column: str = "caption",
                           caption_files: tuple[str, ...] = ()) -> dict[str, Any]:
    """This project's own output, added to `writer`: the image embeddings of its ok rows, L2-normalized, and their
    reference captions: each row's `text_column` (`caption`, or the `original_text` that came with the image), or,
    given `caption_files`, every caption those files hold for the row's image, joined by key (the image path as
    the file writes it, else its file name, with or without extension), as ClipCap trains from embeddings made
    once. A spec is an output folder (its filtered/ part: the pseudo-label set, every ok row of an --embed-only
    output), its captions/ or filtered/, or Parquet files; read a batch of rows at a time. Returns the output's
    'captioner' metadata; ValueError where it has no row to train on."""
    import fsspec
    import pyarrow.parquet as pq

    from pipeline.io.caption_files import find_caption_files
    from pipeline.io.sinks import FILTERED

    references = _references_by_key(find_caption_files(list(caption_files))) if caption_files else None
    columns = ["key", "status", "image_embedding"] + ([] if references is not None else [text_column])
    metadata, unmatched, before = {}, 0, writer.count
    for spec in specs:
        fs, path = fsspec.core.url_to_fs(spec)
        path = path.rstrip("/")
        if fs.isdir(path) and not fs.glob(f"{path}/*.parquet") and fs.isdir(f"{path}/{FILTERED}"):
            path = f"{path}/{FILTERED}"
        files = sorted(fs.glob(f"{path}/*.parquet")) if fs.isdir(path) else sorted(fs.glob(path))
        if not files:
            raise ValueError(f"--embeddings-from {spec}: no Parquet files there (give an output folder, its "
                             "captions/ or filtered/, or Parquet files)")
        for file in files:
            with fs.open(file, "rb") as handle:
                parquet = pq.ParquetFile(handle)
                metadata = json.loads((parquet.schema_arrow.metadata or {}).get(b"captioner", b"{}"))
                if text_column not in parquet.schema_arrow.names and references is None:
                    raise ValueError(f"{file} has no column {text_column!r}")
                for batch in parquet.iter_batches(batch_size=8192, columns=columns, use_threads=False):
                    block, missing = _embedding_block(pa.Table.from_batches([batch]), text_column, references)
                    writer.add(block)
                    unmatched += missing
    if unmatched:
        log.warning("%d ok rows of %s have no caption in %s (joined by key or file name)", unmatched,
                    ", ".join(specs), ", ".join(caption_files))
    if writer.count == before:
        where = ", ".join(caption_files) if references is not None else f"their {text_column!r} column"
        raise ValueError(f"no ok rows of {', '.join(specs)} with an image_embedding and a caption in {where}"
                         + (" (an --embed-only output has no captions: train on its original_text or on a caption "
                            "file)" if text_column == "caption" and references is None else ""))
    return metadata


def _embedding_block(table: pa.Table, text_column: str, references: dict[str, list[str]] | None
                     ) -> tuple[Block, int]:
    """The ok rows of `table` that have a caption; and the number of ok rows whose key no caption file has."""
    table = table.filter(pc.equal(table.column("status"), "ok"))
    if references is None:
        texts = [[text] if text else [] for text in table.column(text_column).to_pylist()]
        unmatched = 0
    else:
        texts = [references.get(key) or references.get(_file_name(key), []) for key in table.column("key").to_pylist()]
        unmatched = sum(not found for found in texts)
    table = table.filter(pa.array([bool(found) for found in texts], pa.bool_()))
    embeddings = embedding_matrix(table)
    embeddings /= np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    captions = [found for found in texts if found]
    return Block(captions, [[] for _ in captions], embeddings), unmatched


def _file_name(key: str) -> str:
    return key.rsplit("/", 1)[-1]


def _references_by_key(caption_files: list[str]) -> dict[str, list[str]]:
    """Each image path's captions, over every caption file, also under the path's file name and under that name
    without its extension, where no other image has it: an output of an images folder keys them by their path
    below it, a WebDataset of the images by their stem."""
    from pipeline.io.caption_files import caption_entries

    by_path: dict[str, list[str]] = {}
    for file in caption_files:
        for image, captions, _ in caption_entries(file):
            by_path.setdefault(image, []).extend(captions)
    aliases = {image: (_file_name(image), _file_name(image).rsplit(".", 1)[0]) for image in by_path}
    taken = Counter(alias for names in aliases.values() for alias in set(names))
    return {alias: by_path[image] for image, names in aliases.items() for alias in names if taken[alias] == 1} \
        | by_path

