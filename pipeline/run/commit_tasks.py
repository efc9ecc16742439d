"""The commit's work on groups of parts, one call per Ray task (plain functions: the commit wires them).

Rows are addressed as (part, row): a part's position in the listing of the folder being committed and a row's
position in that part. An *exception* is a published row the commit does not keep as it is: a sample whose key
an earlier sample owns, renamed and made a `duplicate_key` row. Exceptions are found per hash range of keys, so
that no process holds every key.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.io.sinks import CAPTIONS, FILTERED, WEBDATASET_COLUMNS, OutputDir
from pipeline.io.sources import Shard
from pipeline.run.data_stages import STAGING_ONLY, write_webdataset_tar
from pipeline.run.filtering import FilterSettings, TopFraction, fit_clusters, keep_mask, nearest_cluster
from pipeline.run.selection import ranking
from pipeline.run.tasks import by_range, hash_ranges
from schemas.captions import captions_schema, conform, embedding_matrix, validate_table

EXCEPTIONS_SCHEMA = pa.schema([("part", pa.int32()), ("row", pa.int32()), ("new_key", pa.string()),
                               ("first_source", pa.string())])
Part = tuple[int, str]  # (position in the listing, path)


def key_ranges(output_url: str, parts: list[Part], ranges: int) -> list[pa.Table] | pa.Table:
    """Every row's (key, source, index, status, part, row), split into `ranges` tables by a hash of its key
    (one range: the table itself, as a Ray task of one return value returns it). A part settled by a commit
    that stopped halfway has no index any more (null here): its keys are settled already."""
    output = OutputDir(output_url)
    tables = []
    for position, path in parts:
        table = output.read_table(path, ["key", "source", "index", "status"], optional={"index": pa.int64()})
        tables.append(table.append_column("part", pa.array(np.full(table.num_rows, position, np.int32)))
                      .append_column("row", pa.array(np.arange(table.num_rows, dtype=np.int32))))
    rows = pa.concat_tables(tables, promote_options="default")  # index: null in settled parts
    return by_range(rows, hash_ranges(rows.column("key"), ranges), ranges)


def find_exceptions(shard_order: list[str], parts_per_group: int, *pieces: pa.Table) -> tuple[pa.Table, list[int]]:
    """The samples of one key range that lose their key, and the groups of `parts_per_group` parts they fall in.

    Of the samples sharing a key, the first in input order (shard, then position) keeps it; the others are
    renamed `KEY@SOURCE#INDEX`. A settled row (no index) that holds a key was found its first holder before."""
    pieces = [piece for piece in pieces if piece.num_rows]
    if not pieces:
        return EXCEPTIONS_SCHEMA.empty_table(), []
    rows = pa.concat_tables(pieces, promote_options="default").to_pandas()
    rows["index"] = rows["index"].astype("Int64")
    rank = {url: i for i, url in enumerate(shard_order)}
    rows["rank"] = rows["source"].map(rank).fillna(len(rank))
    rows = rows.sort_values(["key", "rank", "index", "source"], kind="stable", na_position="first")
    renamed = rows.duplicated("key", keep="first")
    owner = rows.groupby("key", sort=False)["source"].transform("first")
    renames = rows[renamed]
    exceptions = pa.table({
        "part": pa.array(renames["part"].to_numpy(np.int32)), "row": pa.array(renames["row"].to_numpy(np.int32)),
        "new_key": pa.array([f"{k}@{s}#{i}" for k, s, i in zip(renames["key"], renames["source"], renames["index"],
                                                                 strict=True)], pa.string()),
        "first_source": pa.array(list(owner[renamed]), pa.string()),
    }, schema=EXCEPTIONS_SCHEMA)
    groups = np.unique(exceptions.column("part").to_numpy() // parts_per_group)
    return exceptions, groups.tolist()


def _exceptions_by_part(exceptions: list[pa.Table]) -> dict[int, dict[int, tuple[str, str]]]:
    """part -> row -> (new key, first source)."""
    by_part: dict[int, dict[int, Any]] = {}
    for table in exceptions:
        for part, row, new_key, first in zip(*(table.column(c).to_pylist() for c in EXCEPTIONS_SCHEMA.names),
                                             strict=True):
            by_part.setdefault(part, {})[row] = (new_key, first)
    return by_part


def _ranked_rows(table: pa.Table, excepted: dict[int, Any]) -> np.ndarray:
    """Rows that take part in the top fraction: ok, and not renamed."""
    mask = pc.equal(table.column("status"), "ok").to_numpy(zero_copy_only=False).copy()
    mask[list(excepted)] = False
    return mask


def rank_parts(output_url: str, parts: list[Part], centroids: np.ndarray | None, *exceptions: pa.Table,
               ) -> tuple[pa.Table, np.ndarray]:
    """The ranked rows of some parts as a ranking table (see `selection`), and how many fall in each cluster."""
    output = OutputDir(output_url)
    excepted = _exceptions_by_part(list(exceptions))
    columns = ["key", "status", "clip_score"] + (["image_embedding"] if centroids is not None else [])
    clusters, scores, keys = [np.zeros(0, np.int32)], [np.zeros(0)], [pa.array([], pa.string())]
    for position, path in parts:
        table = output.read_table(path, columns)
        table = table.filter(pa.array(_ranked_rows(table, excepted.get(position, {}))))
        clusters.append(np.zeros(table.num_rows, np.int32) if centroids is None
                        else nearest_cluster(embedding_matrix(table), centroids).astype(np.int32))
        scores.append(table.column("clip_score").to_numpy(zero_copy_only=False))
        keys.append(table.column("key").combine_chunks())
    table = ranking(np.concatenate(clusters), np.concatenate(scores), pa.concat_arrays(keys))
    return table, np.bincount(table.column("cluster").to_numpy(), minlength=1 if centroids is None else len(centroids))


def key_digests(keys: list[str]) -> np.ndarray:
    """The order k-means samples rows in (`filtering.CLUSTER_SAMPLE`: the first by this digest), as numbers."""
    return np.array([int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") for key in keys],
                    dtype=np.uint64)


def first_digests(output_url: str, parts: list[Part], size: int, *exceptions: pa.Table) -> pa.Table:
    """The `size` ranked rows of some parts first by key digest: (digest, part, row)."""
    output = OutputDir(output_url)
    excepted = _exceptions_by_part(list(exceptions))
    found = []
    for position, path in parts:
        table = output.read_table(path, ["key", "status"])
        rows = np.flatnonzero(_ranked_rows(table, excepted.get(position, {})))
        keys = table.column("key").take(pa.array(rows)).to_pylist()
        found.append(pa.table({"digest": key_digests(keys), "part": np.full(len(rows), position, np.int32),
                               "row": rows.astype(np.int32)}))
    return smallest_digests(size, *found)


def smallest_digests(size: int, *tables: pa.Table) -> pa.Table:
    """The `size` rows of some (digest, part, row) tables first by digest."""
    table = pa.concat_tables(tables) if tables else pa.table({"digest": pa.array([], pa.uint64()),
                                                              "part": pa.array([], pa.int32()),
                                                              "row": pa.array([], pa.int32())})
    return table.take(pc.sort_indices(table, [("digest", "ascending")])[:size])


def embeddings_at(output_url: str, parts: list[Part], wanted: pa.Table) -> pa.Table | None:
    """The image embeddings of the (part, row) pairs in `wanted` that lie in these parts, with their digests."""
    output = OutputDir(output_url)
    found = []
    for position, path in parts:
        mine = wanted.filter(pc.equal(wanted.column("part"), position))
        if mine.num_rows:
            rows = output.read_table(path, ["image_embedding"]).take(mine.column("row"))
            found.append(pa.table({"digest": mine.column("digest"), "image_embedding": rows.column("image_embedding")}))
    return pa.concat_tables(found) if found else None


def fit_sampled(clusters: int, *found: pa.Table | None) -> np.ndarray | None:
    """Centroids fitted on the sampled rows `embeddings_at` found, in the order of their digests (None: none)."""
    tables = [table for table in found if table is not None]
    if not tables:
        return None
    return fit_clusters(embedding_matrix(pa.concat_tables(tables).sort_by("digest")), clusters)


def write_parts(output_url: str, parts: list[Part], settings: FilterSettings, top: TopFraction | None,
                embedding_dim: int, metadata_json: str, captioned: bool, *exceptions: pa.Table) -> dict[str, Any]:
    """Some captions/ parts with their renames applied and their keep flags set, written in place, and their
    kept rows to filtered/ under the same names; returns their counts."""
    output = OutputDir(output_url)
    excepted = _exceptions_by_part(list(exceptions))
    schema = captions_schema(embedding_dim, metadata_json)
    counts: dict[str, Any] = {"by_status": Counter(), "kept": 0, "parts": len(parts)}
    for position, path in parts:
        table = _apply_renames(output.read_table(path), excepted.get(position, {}))
        table = table.drop_columns([c for c in STAGING_ONLY if c in table.column_names])
        keep = table.schema.get_field_index("keep")  # null until settled: write_part sets it
        table = conform(table.set_column(keep, "keep", pc.fill_null(table.column(keep), False)), schema)
        counts["kept"] += write_part(output, settings, top, table, embedding_dim, captioned,
                                     path.rsplit("/", 1)[-1])
        counts["by_status"].update(table.column("status").to_pylist())
    return counts


def write_part(output: OutputDir, settings: FilterSettings, top: TopFraction | None, table: pa.Table,
               embedding_dim: int, captioned: bool, name: str) -> int:
    """One captions/ part with its keep flags set by the filter, and its kept rows as the filtered/ part
    of the same name (written when it keeps none too: readers of filtered/ then always find a table, if an
    empty one); returns how many rows it kept."""
    keep = keep_mask(settings, top, table.column("status").to_pylist(),
                     table.column("clip_score").to_numpy(zero_copy_only=False), table.column("key").to_pylist(),
                     embedding_matrix(table) if top is not None and top.centroids is not None else None)
    position = table.schema.get_field_index("keep")
    table = table.set_column(position, table.schema.field(position), pa.array(keep))  # the schema's field: not null
    validate_table(table, embedding_dim, captioned=captioned)
    output.write_parquet(table, CAPTIONS, name)
    kept_rows = table.filter(pc.field("keep"))
    output.write_parquet(kept_rows, FILTERED, name)
    return kept_rows.num_rows


def _apply_renames(table: pa.Table, renames: dict[int, tuple[str, str]]) -> pa.Table:
    """A part's renamed rows as `duplicate_key` rows under their new key."""
    if not renames:
        return table
    hits = [renames.get(row) for row in range(table.num_rows)]
    is_renamed = pa.array([hit is not None for hit in hits])
    becomes_duplicate = pc.and_(is_renamed, pc.equal(table.column("status"), "ok"))  # a failed row keeps its reason
    replacements = {
        "key": pa.array([hit[0] if hit else key for hit, key in zip(hits, table.column("key").to_pylist(),
                                                                   strict=True)], pa.string()),
        "status": pc.if_else(becomes_duplicate, "duplicate_key", table.column("status")),
        "error": pc.if_else(becomes_duplicate,
                            pa.array([f"key also used by an earlier sample in {hit[1]}" if hit else None
                                      for hit in hits], pa.string()), table.column("error")),
    }
    for name in ("caption", "clip_score", "image_embedding", "candidates"):
        column = table.column(name)
        replacements[name] = pc.if_else(is_renamed, pa.nulls(len(table), column.type), column)
    for name, values in replacements.items():
        table = table.set_column(table.schema.get_field_index(name), name, values)
    return table


def kept_by_shard(output_url: str, parts: list[Part], positions: dict[str, int], ranges: int,
                  ) -> list[pa.Table] | pa.Table:
    """The kept rows of some filtered/ parts (the columns a WebDataset copy needs), split into `ranges` tables
    by their shard's input position (one range: the table itself)."""
    output = OutputDir(output_url)
    rows = pa.concat_tables([output.read_table(path, list(WEBDATASET_COLUMNS)) for _, path in parts])
    # a source that is no input shard of the run has no tar to go to
    position = np.array([positions.get(source, -1) for source in rows.column("source").to_pylist()], dtype=np.int64)
    return by_range(rows, np.where(position >= 0, position % ranges, -1), ranges)


def write_webdataset_tars(shards: list[tuple[int, Shard]], output_url: str, image_column: str | None,
                          key_column: str, provenance: dict[str, Any], *pieces: pa.Table) -> list[dict[str, Any]]:
    """The tars of some input shards (with their input positions), from their kept rows; a shard without
    kept rows gets no tar."""
    rows = pa.concat_tables(pieces)
    stats = []
    for position, shard in shards:
        kept = rows.filter(pc.equal(rows.column("source"), shard.url))
        if kept.num_rows:
            stats.append(write_webdataset_tar(kept, position, shard, output_url, image_column, key_column, provenance))
    return stats
