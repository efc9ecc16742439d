"""The commit: staged parts -> captions/ (every sample exactly once, with keep) + filtered/, and the decisions
around it: whether an output starts, resumes, is re-filtered or is refused; which samples are staged already;
duplicate keys renamed; the WebDataset copy of the kept rows."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from pipeline.config import RunConfig, differing_keys
from pipeline.io.sinks import (
    CAPTIONS,
    FILTERED,
    REFILTER,
    REPORT,
    RUN_JSON,
    STAGING,
    STAGING_CONFIG,
    WEBDATASET,
    WEBDATASET_COLUMNS,
    OutputDir,
    read_columns,
)
from pipeline.io.sources import Shard
from pipeline.run.data_stages import SHARD_RECORDS, STAGING_ONLY, write_webdataset_tar
from pipeline.run.errors import StagingNotListed, UsageError
from pipeline.run.filtering import TopFraction, keep_mask, top_fraction
from pipeline.text import describe_error
from schemas.captions import captions_schema, conform, embedding_matrix, validate_table

log = logging.getLogger(__name__)


def prepare_output(output: OutputDir, config: RunConfig, defining: dict[str, Any],
                    ) -> tuple[dict[str, Any] | None, bool]:
    """Decide between a fresh start, a resume, a re-filter and a refusal. Returns the old summary when
    the run already finished, and whether its rows must be re-filtered (only the filter changed, under
    --overwrite, or an earlier re-filter was interrupted)."""
    finished = output.read_json(RUN_JSON)
    refiltering = output.read_json(REFILTER)  # where an interrupted re-filter was heading
    staged = output.read_json(STAGING, STAGING_CONFIG)
    # An attempt that staged nothing (refused at actor placement, killed while starting) left only its
    # configuration: nothing to keep, so it binds no later command.
    started_only = staged is not None and finished is None and refiltering is None and not (
        output.parts(STAGING) or output.parts(f"{STAGING}/{SHARD_RECORDS}", pattern="*"))
    if started_only:
        staged = None
    recorded = refiltering or (finished or {}).get("output_defining") or staged
    different = recorded is not None and jsonable(recorded) != jsonable(defining)
    if different and not config.overwrite:
        ours, theirs = jsonable(defining), jsonable(recorded)
        changed = differing_keys(ours["config"], theirs.get("config") or {})
        changed += [name for key, name in (("model_sha256", "model"), ("shards_sha256", "the shards --input matches"))
                    if ours.get(key) != theirs.get(key)]
        raise UsageError(f"{config.output} holds a run with a different configuration ({', '.join(changed)}); "
                         f"use another --output, or --overwrite to replace it")
    if recorded is None and not started_only and not output.is_empty() and not config.overwrite:
        raise UsageError(f"{config.output} is not empty and holds no run of this tool; "
                         f"use an empty --output, or --overwrite")
    try:  # the first write: an output nobody may write to is one line, before any work
        output.clean_temporaries()
        if staged is None and finished is None and refiltering is None:
            output.write_json(defining, STAGING, STAGING_CONFIG)
    except Exception as exc:  # a storage backend's own errors are not all OSErrors
        raise UsageError(f"cannot write --output {config.output}: {describe_error(exc)}") from None
    if finished is not None and (different or refiltering) and _only_filter_differs(finished, defining):
        return finished, True
    if different and config.overwrite:
        for folder in (CAPTIONS, FILTERED, WEBDATASET, STAGING, REFILTER, RUN_JSON, REPORT):
            output.remove(folder)
        finished = None
    if finished is not None:
        output.remove(STAGING)  # a run killed after its commit record but before this clean-up
        return finished, False
    if different:  # replaced under --overwrite
        output.write_json(defining, STAGING, STAGING_CONFIG)
    return None, False


def shards_digest(shards: list[Shard]) -> str:
    return hashlib.sha256("\n".join(sorted(shard.url for shard in shards)).encode("utf-8")).hexdigest()


def _only_filter_differs(finished: dict[str, Any], defining: dict[str, Any]) -> bool:
    def without_filter(settings: dict[str, Any]) -> dict[str, Any]:
        settings = jsonable(settings)
        settings["config"].pop("filter", None)
        return settings
    return without_filter(finished["output_defining"]) == without_filter(defining)


def refilter(output: OutputDir, config: RunConfig, summary: dict[str, Any], defining: dict[str, Any],
             embedding_dim: int, metadata_json: str) -> dict[str, Any]:
    """A finished run under new filter settings, from the scores stored in captions/: every part is
    rewritten with its new keep flags (and its filtered/ part with the kept rows), no model runs.
    REFILTER names the target until run.json records it, so an interrupted re-filter is completed by
    the next run before anything else; the WebDataset copy of the old filtered set is dropped (the caller
writes the new one)."""
    started = time.time()
    output.write_json(defining, REFILTER)
    output.remove(WEBDATASET)
    output.remove(REPORT)  # a page of the old filter's figures
    paths = output.parts(CAPTIONS)
    scores = read_columns(output, CAPTIONS, ["key", "status", "clip_score"], paths)
    is_ok = pc.equal(scores.column("status"), "ok") if scores is not None else None
    top = None if scores is None else top_fraction(
        config.filter, scores.filter(is_ok).column("clip_score").to_numpy(zero_copy_only=False),
        scores.filter(is_ok).column("key").to_pylist(),
        _embeddings_of(output, paths, is_ok.to_numpy(zero_copy_only=False)))
    schema = captions_schema(embedding_dim, metadata_json)
    kept = 0
    for path in paths:
        table = output.read_table(path)
        name = path.rsplit("/", 1)[-1]
        kept += _write_part(output, config, top, conform(table, schema), embedding_dim, name)
    summary.pop("webdataset", None)
    summary["config"], summary["output_defining"] = config.to_json(), defining
    summary["counts"] = {k: v for k, v in summary["counts"].items() if not k.startswith("top_fraction_cutoff")}
    summary["counts"] |= {"kept": kept, **_cutoff_counts(top)}
    summary["timings"]["refilter_s"] = round(time.time() - started, 3)
    summary["config"]["write_webdataset"] = False  # the old copy is gone; the caller writes a new one if asked
    output.write_json(summary, RUN_JSON)
    output.remove(REFILTER)
    return summary


def _write_part(output: OutputDir, config: RunConfig, top: TopFraction | None, table: pa.Table,
                embedding_dim: int, name: str) -> int:
    """One captions/ part with its keep flags set by the filter, and its kept rows as the filtered/ part
    of the same name (written when it keeps none too: readers of filtered/ then always find a table, if an
    empty one); returns how many rows it kept."""
    keep = keep_mask(config.filter, top, table.column("status").to_pylist(),
                     table.column("clip_score").to_numpy(zero_copy_only=False), table.column("key").to_pylist(),
                     embedding_matrix(table) if top is not None and top.centroids is not None else None)
    position = table.schema.get_field_index("keep")
    table = table.set_column(position, table.schema.field(position), pa.array(keep))  # the schema's field: not null
    validate_table(table, embedding_dim, captioned=not config.embed_only)
    output.write_parquet(table, CAPTIONS, name)
    kept_rows = table.filter(pc.field("keep"))
    output.write_parquet(kept_rows, FILTERED, name)
    return kept_rows.num_rows


def committed_samples(output: OutputDir) -> dict[str, set[int]]:
    """(source -> positions) of the samples already staged by earlier attempts of this run."""
    staged = read_columns(output, STAGING, ["source", "index"])
    done: dict[str, set[int]] = {}
    if staged is not None:
        for source, index in zip(staged.column("source").to_pylist(), staged.column("index").to_pylist(), strict=True):
            done.setdefault(source, set()).add(index)
    return done


def finalize(output: OutputDir, config: RunConfig, shard_order: list[str], embedding_dim: int,
              metadata_json: str, parts_written: set[str]) -> dict[str, Any]:
    """Staged parts -> captions/ (every sample exactly once, with keep) and filtered/ (kept rows).

    A sample staged twice (a retried write) is written once. Two samples that share a key (the same
    key in two shards) are both kept: the first in input order keeps the key, the others become
    `duplicate_key` rows under a key that names their shard and position. The global top fraction
    reads the stored scores only: it costs no model re-run. Every part this attempt wrote must be listed
    first: committing without one would drop its rows, since the staging area is deleted after the commit.
    """
    staged_paths = output.parts(STAGING)  # one listing: the parts checked are the parts committed
    unlisted = parts_written - {path.rsplit("/", 1)[-1] for path in staged_paths}
    if unlisted:
        raise StagingNotListed(f"{len(unlisted)} part(s) this run wrote are not listed in {output.url}/{STAGING} "
                               f"(e.g. {min(unlisted)}); nothing was committed or deleted: submit the job again")
    staged = read_columns(output, STAGING, ["key", "source", "index", "status", "clip_score"], staged_paths)
    columns = [staged.column(c).to_pylist() for c in staged.column_names] if staged is not None else [[]] * 5
    renamed = _renamed_duplicates(*columns[:3], shard_order)
    ok_keys, ok_scores, ok_rows, seen = [], [], [], set()
    for key, source, index, status, score in zip(*columns, strict=True):
        ok_rows.append((source, index) not in seen and (source, index) not in renamed and status == "ok")
        if ok_rows[-1]:
            ok_keys.append(key)
            ok_scores.append(score)
        seen.add((source, index))
    top = top_fraction(config.filter, np.array(ok_scores, dtype=np.float64), ok_keys,
                       _embeddings_of(output, staged_paths, np.array(ok_rows, dtype=bool)))
    schema = captions_schema(embedding_dim, metadata_json)
    written: set[tuple[str, int]] = set()
    counts: Counter[str] = Counter()
    by_node: Counter[str] = Counter()
    by_actor: Counter[str] = Counter()
    by_compute: Counter[str] = Counter()
    actor_peak_mb = 0.0
    kept = 0
    for path in staged_paths:
        table = output.read_table(path)
        table = _mark_duplicates(_drop_written(table, written), renamed)
        captioned = table.filter(pc.equal(table.column("status"), "ok"))  # not rows failed before the models
        by_node.update(captioned.column("node").to_pylist())
        # parts staged by a version that did not record them
        for counter, column in ((by_actor, "actor"), (by_compute, "compute")):
            counter.update(captioned.column(column).to_pylist() if column in table.column_names
                           else ["unrecorded"] * captioned.num_rows)
        actor_peak_mb = max(actor_peak_mb, pc.max(table.column("actor_peak_rss_mb")).as_py() or 0.0)
        table = conform(table.drop_columns([c for c in STAGING_ONLY if c in table.column_names]), schema)
        kept += _write_part(output, config, top, table, embedding_dim, path.rsplit("/", 1)[-1])
        counts.update(table.column("status").to_pylist())
    if not output.parts(CAPTIONS):  # inputs without one sample (an empty tar): readers still find the tables
        _write_part(output, config, top, schema.empty_table(), embedding_dim, "part-empty.parquet")
    return {"rows": sum(counts.values()), "by_status": dict(sorted(counts.items())), "kept": kept,
            **_cutoff_counts(top), "rows_by_node": dict(by_node), "rows_by_actor": dict(by_actor),
            "rows_by_compute": dict(by_compute),
            "model_actor_peak_rss_mb": round(actor_peak_mb, 1)}


def _cutoff_counts(top: TopFraction | None) -> dict[str, Any]:
    return top.to_json() if top is not None else {"top_fraction_cutoff_score": None}


def _embeddings_of(output: OutputDir, paths: list[str], rows: np.ndarray) -> Callable[[], Iterator[np.ndarray]]:
    """The image embeddings of some rows (`rows`: a mask over the parts' rows, in the order of `paths`), read a
    part at a time whenever the returned function is called."""
    def blocks() -> Iterator[np.ndarray]:
        start = 0
        for path in paths:
            part = output.read_table(path, ["image_embedding"])
            yield embedding_matrix(part)[rows[start:start + part.num_rows]]
            start += part.num_rows
    return blocks


def export_webdataset(output: OutputDir, config: RunConfig, shards: list[Shard],
                       provenance: dict[str, Any]) -> dict[str, Any]:
    """filtered/ -> WEBDATASET/: the kept rows grouped by input shard, one Ray task per shard that
    re-reads it for the images (the run stores no image bytes) and writes its tar."""
    kept = read_columns(output, FILTERED, list(WEBDATASET_COLUMNS))
    rows_of: dict[str, list[int]] = {}
    for row, source in enumerate(kept.column("source").to_pylist() if kept is not None else []):
        rows_of.setdefault(source, []).append(row)
    write = ray.remote(num_cpus=1)(write_webdataset_tar)
    tasks = [write.remote(kept.take(rows_of[shard.url]), position, shard, output.url, config.image_column,
                          config.key_column, provenance)
             for position, shard in enumerate(shards) if shard.url in rows_of]
    stats = ray.get(tasks)
    missing = sum(row["missing"] for row in stats)
    if missing:
        log.warning("%d kept samples were not found in their input shards again; not in %s", missing, WEBDATASET)
    return {"folder": WEBDATASET, "tars": len(stats), "samples": sum(row["samples"] for row in stats),
            "missing": missing}


def _renamed_duplicates(keys: list[str], sources: list[str], indices: list[int],
                        shard_order: list[str]) -> dict[tuple[str, int], tuple[str, str]]:
    """(source, index) -> (new key, first source) for every sample whose key an earlier sample holds."""
    rank = {url: i for i, url in enumerate(shard_order)}
    owners: dict[str, list[tuple[int, int, str]]] = {}
    for key, source, index in zip(keys, sources, indices, strict=True):
        owners.setdefault(key, []).append((rank.get(source, len(rank)), index, source))
    renamed = {}
    for key, samples in owners.items():
        unique = sorted(set(samples))
        for _, index, source in unique[1:]:
            renamed[(source, index)] = (f"{key}@{source}#{index}", unique[0][2])
    return renamed


def _drop_written(table: pa.Table, written: set[tuple[str, int]]) -> pa.Table:
    """Rows of samples not written yet (a retried block can never add a sample twice)."""
    first = []
    for source, index in zip(table.column("source").to_pylist(), table.column("index").to_pylist(), strict=True):
        first.append((source, index) not in written)
        written.add((source, index))
    return table.filter(pa.array(first, pa.bool_()))


def _mark_duplicates(table: pa.Table, renamed: dict[tuple[str, int], tuple[str, str]]) -> pa.Table:
    hits = [renamed.get((s, i)) for s, i in zip(table.column("source").to_pylist(), table.column("index").to_pylist(),
                                                strict=True)]
    if not any(hits):
        return table
    is_duplicate = pa.array([hit is not None for hit in hits])
    replacements = {
        "key": pa.array([hit[0] if hit else key for hit, key in zip(hits, table.column("key").to_pylist(),
                                                                   strict=True)], pa.string()),
        # a row that already failed keeps its own reason; only an ok row becomes duplicate_key
        "status": pc.if_else(pc.and_(is_duplicate, pc.equal(table.column("status"), "ok")), "duplicate_key",
                             table.column("status")),
        "error": pc.if_else(pc.and_(is_duplicate, pc.equal(table.column("status"), "ok")),
                            pa.array([f"key also used by an earlier sample in {hit[1]}" if hit else None
                                      for hit in hits], pa.string()), table.column("error")),
    }
    for name in ("caption", "clip_score", "image_embedding", "candidates"):
        column = table.column(name)
        replacements[name] = pc.if_else(is_duplicate, pa.nulls(len(table), column.type), column)
    for name, values in replacements.items():
        table = table.set_column(table.schema.get_field_index(name), name, values)
    return table


def jsonable(data: Any) -> Any:
    return json.loads(json.dumps(data, default=str))
