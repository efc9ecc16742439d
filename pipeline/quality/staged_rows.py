"""Staged parts as a captioning run leaves them, without the models: random embeddings, scores and keys in the
staging schema, with the irregularities the commit must undo (a sample staged twice by a retried write, a key
used by two shards, failed samples). For measuring and testing the commit at sizes no model run reaches here."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline.io.sinks import STAGING, OutputDir, by_shard, part_name
from pipeline.run.data_stages import staging_schema

SHARD_SAMPLES = 10_000  # samples per input shard, as img2dataset writes them
METADATA = json.dumps({"model": "staged-rows"})


@dataclass(frozen=True)
class StagedRows:
    """What to write: `rows` samples in parts of `rows_per_part`, and how irregular they are."""

    rows: int
    rows_per_part: int = 4096
    embedding_dim: int = 512
    failed: float = 0.01  # samples that failed before the models
    shared_keys: float = 0.001  # samples whose key a sample of another shard also has
    retried: float = 0.02  # parts whose second half is staged again in a part of its own
    shard_samples: int = SHARD_SAMPLES
    seed: int = 0

    def shards(self) -> list[str]:
        return [_shard_url(i) for i in range(-(-self.rows // self.shard_samples))]

    def parts(self) -> int:
        return -(-self.rows // self.rows_per_part)

    def part(self, number: int) -> list[pa.Table]:
        """Part `number`'s table, and a second, overlapping one when that part's write was retried."""
        rng = np.random.default_rng([self.seed, number])
        samples = np.arange(number * self.rows_per_part, min(self.rows, (number + 1) * self.rows_per_part))
        shard, index = samples // self.shard_samples, samples % self.shard_samples
        keys = [f"{s:05d}{i:04d}" for s, i in zip(shard, index, strict=True)]
        for row in np.flatnonzero(rng.random(len(samples)) < self.shared_keys):
            other = rng.integers(self.rows)  # that sample's key, from whichever shard holds it
            keys[row] = f"{other // self.shard_samples:05d}{other % self.shard_samples:04d}"
        ok = rng.random(len(samples)) >= self.failed
        embeddings = rng.standard_normal((len(samples), self.embedding_dim)).astype(np.float16)
        scores = np.round(rng.normal(0.3, 0.05, len(samples)), 3).astype(np.float32)  # rounded: ties happen
        n = len(samples)
        columns = {
            "key": keys, "source": [_shard_url(s) for s in shard],
            "status": np.where(ok, "ok", "decode_error").tolist(),
            "error": [None if good else "cannot identify image file" for good in ok],
            "width": np.where(ok, 640, None).tolist(), "height": np.where(ok, 480, None).tolist(),
            "caption": [f"bir görüntü {key}" if good else None for key, good in zip(keys, ok, strict=True)],
            "clip_score": pa.array(scores, mask=~ok),
            "image_embedding": pa.FixedSizeListArray.from_arrays(
                pa.array(embeddings.reshape(-1), pa.float16()), self.embedding_dim, mask=pa.array(~ok)),
            "candidates": [None] * n, "keep": [False] * n, "original_text": [None] * n,
            "original_clip_score": [None] * n, "index": index,
            "node": ["node-a"] * n, "actor": [f"actor-{number % 4}"] * n, "compute": ["cpu bfloat16"] * n,
            "actor_peak_rss_mb": np.full(n, 2048.0, np.float32),
        }
        table = pa.table(columns, schema=staging_schema(self.embedding_dim, METADATA))
        tables = [table]
        if rng.random() < self.retried:
            tables.append(table.slice(n // 2))
        return tables


def _shard_url(number: int) -> str:
    return f"s3://corpus/{number:05d}.tar"


def write_staged(output_url: str, spec: StagedRows, numbers: range | None = None) -> int:
    """Write parts `numbers` (all by default) of `spec` under output_url's staging folder; returns the rows."""
    output = OutputDir(output_url)
    written = 0
    for number in numbers if numbers is not None else range(spec.parts()):
        for table in spec.part(number):
            for source, rows in by_shard(table):
                output.write_parquet(rows, STAGING, part_name(source, rows.column("index").to_pylist()))
                written += rows.num_rows
    return written
