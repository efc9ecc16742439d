"""The commit's work on groups of parts, one call per Ray task (plain functions: the commit wires them).

Rows are addressed as (part, row): a part's position in the listing of the folder being committed and a row's
position in that part. An *exception* is a staged row the commit does not write as staged: a second copy of a
sample (a retried write), dropped; or a sample whose key an earlier sample owns, renamed and made a
`duplicate_key` row. Exceptions are found per hash range of keys, so that no process holds every key.
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

EXCEPTIONS_SCHEMA = pa.schema([("part", pa.int32()), ("row", pa.int32()),
                               ("new_key", pa.string()),  # null: the row is a second copy, dropped
                               ("first_source", pa.string())])
Part = tuple[int, str]  # (position in the listing, path)


def key_ranges(output_url: str, parts: list[Part], ranges: int) -> list[pa.Table] | pa.Table:
    """Every row's (key, source, index, status, part, row), split into `ranges` tables by a hash of its key
    (one range: the table itself, as a Ray task of one return value returns it)."""
    output = OutputDir(output_url)
    tables = []
    for position, path in parts:
        table = output.read_table(path, ["key", "source", "index", "status"])
        tables.append(table.append_column("part", pa.array(np.full(table.num_rows, position, np.int32)))
                      .append_column("row", pa.array(np.arange(table.num_rows, dtype=np.int32))))
    rows = pa.concat_tables(tables)
    return by_range(rows, hash_ranges(rows.column("key"), ranges), ranges)


def find_exceptions(shard_order: list[str], parts_per_group: int, *pieces: pa.Table) -> tuple[pa.Table, list[int]]:
    """The exceptions among the rows of one key range, and the groups of `parts_per_group` parts they fall in.

    The first copy of a sample (lowest part, then row) is the one written. Of the samples sharing a key, the
    first in input order (shard, then position) keeps it; the others are renamed `KEY@SOURCE#INDEX`."""
    pieces = [piece for piece in pieces if piece.num_rows]
    if not pieces:
        return EXCEPTIONS_SCHEMA.empty_table(), []
    rows = pa.concat_tables(pieces).to_pandas().sort_values(["part", "row"], kind="stable")
    copies = rows.duplicated(["source", "index"], keep="first")
    firsts = rows[~copies].copy()
    rank = {url: i for i, url in enumerate(shard_order)}
    firsts["rank"] = firsts["source"].map(rank).fillna(len(rank))
    firsts = firsts.sort_values(["key", "rank", "index", "source"], kind="stable")
    renamed = firsts.duplicated("key", keep="first")
    owner = firsts.groupby("key", sort=False)["source"].transform("first")
    renames = firsts[renamed]
    dropped = rows[copies]
    exceptions = pa.table({
        "part": pa.array(np.concatenate([renames["part"], dropped["part"]]).astype(np.int32)),
        "row": pa.array(np.concatenate([renames["row"], dropped["row"]]).astype(np.int32)),
        "new_key": pa.array([f"{k}@{s}#{i}" for k, s, i in zip(renames["key"], renames["source"], renames["index"],
                                                                 strict=True)] + [None] * len(dropped), pa.string()),
        "first_source": pa.array(list(owner[renamed]) + [None] * len(dropped), pa.string()),
    }, schema=EXCEPTIONS_SCHEMA)
    groups = np.unique(exceptions.column("part").to_numpy() // parts_per_group)
    return exceptions, groups.tolist()


def _exceptions_by_part(exceptions: list[pa.Table]) -> dict[int, dict[int, tuple[str, str] | None]]:
    """part -> row -> (new key, first source), or None for a dropped copy."""
    by_part: dict[int, dict[int, Any]] = {}
    for table in exceptions:
        for part, row, new_key, first in zip(*(table.column(c).to_pylist() for c in EXCEPTIONS_SCHEMA.names),
                                             strict=True):
            by_part.setdefault(part, {})[row] = None if new_key is None else (new_key, first)
    return by_part


def _ranked_rows(table: pa.Table, excepted: dict[int, Any]) -> np.ndarray:
    """Rows that take part in the top fraction: ok, and neither a second copy nor renamed."""
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
    """Some parts with their exceptions applied and their keep flags set, to captions/ and filtered/ under
    the same names; returns their counts."""
    output = OutputDir(output_url)
    excepted = _exceptions_by_part(list(exceptions))
    schema = captions_schema(embedding_dim, metadata_json)
    counts: dict[str, Any] = {"by_status": Counter(), "by_node": Counter(), "by_actor": Counter(),
                              "by_compute": Counter(), "actor_peak_rss_mb": 0.0, "kept": 0, "parts": len(parts)}
    for position, path in parts:
        table = _apply_exceptions(output.read_table(path), excepted.get(position, {}))
        if "node" in table.column_names:  # a staged part: where its rows were captioned
            _count_staged(table, counts)
        table = conform(table.drop_columns([c for c in STAGING_ONLY if c in table.column_names]), schema)
        counts["kept"] += write_part(output, settings, top, table, embedding_dim, captioned,
                                     path.rsplit("/", 1)[-1])
        counts["by_status"].update(table.column("status").to_pylist())
    return counts


def _count_staged(table: pa.Table, counts: dict[str, Any]) -> None:
    captioned = table.filter(pc.equal(table.column("status"), "ok"))  # not rows failed before the models
    counts["by_node"].update(captioned.column("node").to_pylist())
    for name, column in (("by_actor", "actor"), ("by_compute", "compute")):
        # parts staged by a version that did not record them
        counts[name].update(captioned.column(column).to_pylist() if column in table.column_names
                            else ["unrecorded"] * captioned.num_rows)
    counts["actor_peak_rss_mb"] = max(counts["actor_peak_rss_mb"],
                                      pc.max(table.column("actor_peak_rss_mb")).as_py() or 0.0)


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


def _apply_exceptions(table: pa.Table, excepted: dict[int, Any]) -> pa.Table:
    """A staged part without its second copies, its renamed rows `duplicate_key` rows under their new key."""
    if not excepted:
        return table
    renames = {row: hit for row, hit in excepted.items() if hit is not None}
    if renames:
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
    dropped = np.zeros(table.num_rows, dtype=bool)
    dropped[[row for row, hit in excepted.items() if hit is None]] = True
    return table.filter(pa.array(~dropped))


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
