"""The light Ray Data pieces of the pipeline: the shard datasource, the CPU decode stage and the
staging sink. `pipeline.run.model_stage` holds the model actor; `pipeline.run.chain` chains them.

Nothing here imports torch or transformers: read, decode and write tasks run in many short-lived
worker processes, and importing the model stack costs each of them ~10 s of CPU on a small machine."""

from __future__ import annotations

import logging
import resource
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasink, Datasource, ReadTask, WriteResult

from pipeline.io.images import ImageError, ImageSpec, decode_image, portable_image
from pipeline.io.sinks import (
    STAGING,
    WEBDATASET,
    OutputDir,
    by_shard,
    part_name,
    shard_id,
    write_webdataset_shard,
)
from pipeline.io.sources import Shard, read_samples
from schemas.captions import captions_schema

log = logging.getLogger(__name__)

# `index` is a record's position in its shard: (source, index) names a sample even when keys repeat,
# so resume and de-duplication of retried work never confuse two samples that share a key.
SAMPLE_SCHEMA = pa.schema([
    ("key", pa.string()), ("source", pa.string()), ("index", pa.int64()), ("image", pa.large_binary()),
    ("original_text", pa.string()), ("status", pa.string()), ("error", pa.string()),
])
ROWS_PER_READ_BLOCK = 256
# Under STAGING: one empty file per shard read to its end, named SHARD_ID.RECORDS, so a resumed run
# can skip the shards whose every record is staged without reading them again (one listing, no reads).
SHARD_RECORDS = "shards"


class ShardDatasource(Datasource):
    """One read task per shard; each streams its shard in blocks of ROWS_PER_READ_BLOCK records,
    skips the records that a previous attempt of this run already committed, and at the shard's end
    records its number of records in the output's staging folder (see `resume.staged_samples`)."""

    def __init__(self, shards: list[Shard], done: dict[str, set[int]], image_column: str | None,
                 key_column: str, output_url: str):
        super().__init__()
        self.shards = shards
        self.done = done
        self.image_column = image_column
        self.key_column = key_column
        self.output_url = output_url

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       **kwargs: Any) -> list[ReadTask]:
        tasks = []
        for shard in self.shards:
            done = self.done.get(shard.url, set())

            def read(shard: Shard = shard, done: set[int] = done, image_column: str | None = self.image_column,
                     key_column: str = self.key_column, output_url: str = self.output_url) -> Iterator[pa.Table]:
                records = yield from _read_blocks(shard, done, image_column, key_column)
                OutputDir(output_url).write_file(lambda handle: None, STAGING, SHARD_RECORDS,
                                                 f"{shard_id(shard.url)}.{records}")

            metadata = BlockMetadata(num_rows=None, size_bytes=None, input_files=[shard.url], exec_stats=None)
            tasks.append(ReadTask(read, metadata, schema=SAMPLE_SCHEMA, per_task_row_limit=per_task_row_limit))
        return tasks

    def get_name(self) -> str:
        return "ReadShards"


def shard_markers(output: OutputDir) -> dict[str, int]:
    """shard id -> its number of records, for every shard read to its end."""
    markers = {}
    for path in output.parts(f"{STAGING}/{SHARD_RECORDS}", pattern="*"):
        shard, _, records = path.rsplit("/", 1)[-1].partition(".")
        markers[shard] = int(records)
    return markers


def _read_blocks(shard: Shard, done: set[int], image_column: str | None,
                 key_column: str) -> Generator[pa.Table, None, int]:
    """Yields the blocks of records not in `done`; returns the shard's number of records."""
    rows: list[dict[str, Any]] = []
    records = 0
    for index, record in enumerate(read_samples(shard, image_column=image_column, key_column=key_column)):
        records = index + 1
        if index in done:
            continue
        rows.append({name: record.get(name) for name in SAMPLE_SCHEMA.names} | {"index": index})
        if len(rows) >= ROWS_PER_READ_BLOCK:
            yield pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA)
            rows = []
    if rows:
        yield pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA)
    return records


@dataclass(frozen=True)
class ImageSpecs:
    """The input sizes the model stage needs: the encoder's, and the scorer's when it differs."""

    encoder: ImageSpec
    scorer: ImageSpec | None = None


def decode_images(batch: pa.Table, spec: ImageSpecs) -> pa.Table:
    """CPU stage: image bytes -> uint8 pixels at the model's input size (a fixed-size binary column,
    so it crosses the object store as one buffer), plus original size and status. A bad image becomes
    a status row with zero pixels; it never raises."""
    n = batch.num_rows
    sizes = {"pixels": spec.encoder} | ({"scorer_pixels": spec.scorer} if spec.scorer else {})
    pixels = {name: np.zeros((n, s.size, s.size, 3), dtype=np.uint8) for name, s in sizes.items()}
    width: list[int | None] = [None] * n
    height: list[int | None] = [None] * n
    status = batch.column("status").to_pylist()
    error = batch.column("error").to_pylist()
    for i, data in enumerate(batch.column("image").to_pylist()):
        if status[i] != "ok":
            continue
        try:
            for name, image_spec in sizes.items():
                decoded = decode_image(data, image_spec)
                pixels[name][i] = decoded.pixels
            width[i], height[i] = decoded.width, decoded.height
        except ImageError as exc:
            status[i], error[i] = exc.status, str(exc)
    columns = {name: batch.column(name) for name in ("key", "source", "index", "original_text")}
    columns |= {"status": pa.array(status, pa.string()), "error": pa.array(error, pa.string()),
                "width": pa.array(width, pa.int32()), "height": pa.array(height, pa.int32())}
    for name, array in pixels.items():
        row_bytes = array[0].nbytes if n else 0
        columns[name] = pa.FixedSizeBinaryArray.from_buffers(pa.binary(max(row_bytes, 1)), n,
                                                             [None, pa.py_buffer(array.tobytes())])
    return pa.table(columns)


def pixels_from_column(column: pa.ChunkedArray, size: int) -> np.ndarray:
    """The (N, size, size, 3) uint8 array behind a fixed-size binary pixels column, without copying
    when the column is one chunk."""
    array = column.combine_chunks()
    width = size * size * 3
    data = np.frombuffer(array.buffers()[1], dtype=np.uint8)
    return data[array.offset * width:(array.offset + len(array)) * width].reshape(len(array), size, size, 3)


# Staging-only columns, dropped when captions/ is written: the sample's position in its shard, and
# where it was captioned (node, actor, device and precision, the peak memory of that actor so far) for run.json.
STAGING_ONLY = ("index", "node", "actor", "compute", "actor_peak_rss_mb")


def staging_schema(embedding_dim: int, metadata_json: str | None = None) -> pa.Schema:
    """The output schema plus the staging-only columns."""
    schema = captions_schema(embedding_dim, metadata_json).append(pa.field("index", pa.int64(), nullable=False))
    for name, kind in (("node", pa.string()), ("actor", pa.string()), ("compute", pa.string()),
                       ("actor_peak_rss_mb", pa.float32())):
        schema = schema.append(pa.field(name, kind))
    return schema


def peak_rss_mb() -> float:
    """This process's peak resident memory so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class StagingSink(Datasink):
    """Writes model-stage output as atomic Parquet parts of at most `rows_per_part` rows under _staging/
    (Ray hands it blocks of at least that many rows, where the run has them)."""

    def __init__(self, output_url: str, rows_per_part: int):
        self.output_url = output_url
        self.rows_per_part = rows_per_part
        self.parts_written: set[str] = set()  # filled on the driver once the writes are done

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_part

    def write(self, blocks, ctx) -> list[str]:
        output = OutputDir(self.output_url)
        names = []
        for block in blocks:
            table = block if isinstance(block, pa.Table) else pa.Table.from_pandas(block)
            if not table.num_rows:  # e.g. an empty tar's: a block without columns
                continue
            # parts of one shard each (its parts are found by name when it is published), of at most
            # rows_per_part rows, each named by its own samples
            for source, rows in by_shard(table):
                for start in range(0, rows.num_rows, self.rows_per_part):
                    part = rows.slice(start, self.rows_per_part)
                    names.append(part_name(source, part.column("index").to_pylist()))
                    output.write_parquet(part, STAGING, names[-1])
        return names

    def on_write_complete(self, write_result: WriteResult[list[str]]) -> None:
        self.parts_written = {name for names in write_result.write_returns for name in names}

    def get_name(self) -> str:
        return "StagingParquet"


def write_webdataset_tar(rows: pa.Table, position: int, shard: Shard, output_url: str, image_column: str | None,
                        key_column: str, provenance: dict[str, Any]) -> dict[str, Any]:
    """The kept `rows` of one input shard, re-read from it for their images, as the tar NNNNN.tar
    (the shard's input position) plus NNNNN_stats.json, as img2dataset names them. The stats file is
    written last, so a shard that has one is complete and a resumed export skips it."""
    output = OutputDir(output_url)
    stats_name = f"{position:05d}_stats.json"
    stats = output.read_json(WEBDATASET, stats_name)
    if stats is None:
        records = read_samples(shard, image_column=image_column, key_column=key_column)
        counts = write_webdataset_shard(output, f"{position:05d}.tar", records,
                                        {row["key"]: row for row in rows.to_pylist()}, provenance, portable_image)
        stats = {"source": shard.url, "tar": f"{position:05d}.tar", **counts}
        output.write_json(stats, WEBDATASET, stats_name)
    return stats
