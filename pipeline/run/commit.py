"""The commit: the published captions/ parts settled (every sample exactly once, with keep) and filtered/ (the
kept rows); the re-filter of a finished run; the WebDataset copy of the kept rows.

Every step runs as Ray tasks over groups of parts (`commit_tasks`), so the commit spreads over the cluster
and the driver holds the listing of parts, object references and counts, never the rows: duplicate keys are
found per hash range of keys, the exact top fraction by a search over sorted rankings (`selection`), and each
group's parts are rewritten in place by the task that reads them.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray

from pipeline.config import RunConfig
from pipeline.io.sinks import (
    CAPTIONS,
    FILTERED,
    REFILTER,
    REPORT,
    RUN_JSON,
    WEBDATASET,
    OutputDir,
)
from pipeline.io.sources import Shard
from pipeline.run.commit_tasks import (
    Part,
    embeddings_at,
    find_exceptions,
    first_digests,
    fit_sampled,
    kept_by_shard,
    key_ranges,
    rank_parts,
    smallest_digests,
    write_part,
    write_parts,
    write_webdataset_tars,
)
from pipeline.run.filtering import CLUSTER_SAMPLE, FilterSettings, TopFraction
from pipeline.run.publish import Publisher, provenance_counts
from pipeline.run.selection import Row, Window, add_counts, count_through, find_cutoffs, sample_windows
from pipeline.run.tasks import cluster_cpus, split_into_ranges, task
from schemas.captions import captions_schema

log = logging.getLogger(__name__)

GROUP_ROWS = 262_144  # rows one task commits, about
RANGE_ROWS = 2_000_000  # rows of one hash range of keys, about: one task holds their keys
SHARDS_PER_EXPORT_TASK = 64
MERGE_FAN_IN = 16  # samples of key digests one task merges


@dataclass(frozen=True)
class _Plan:
    """The parts of a folder, in groups of `per_group` (one task each), and how many key ranges."""

    groups: list[list[Part]]
    per_group: int
    ranges: int

    @staticmethod
    def of(output: OutputDir, paths: list[str]) -> _Plan:
        parts = list(enumerate(paths))
        if not parts:
            return _Plan([], 1, 1)
        rows_per_part = max(1, output.rows_in(paths[0]))
        cpus = cluster_cpus()
        per_group = max(1, min(GROUP_ROWS // rows_per_part, -(-len(parts) // (2 * cpus))))
        groups = [parts[start:start + per_group] for start in range(0, len(parts), per_group)]
        ranges = max(min(cpus, len(groups)), -(-len(parts) * rows_per_part // RANGE_ROWS))
        return _Plan(groups, per_group, ranges)


def finalize(output: OutputDir, config: RunConfig, shard_order: list[str], embedding_dim: int,
             metadata_json: str, parts_written: set[str], publisher: Publisher | None = None) -> dict[str, Any]:
    """Staged parts -> captions/ (every sample exactly once, with keep) and filtered/ (kept rows).

    The shards not published while the run went on are published first (`publish`: there a sample staged
    twice, by a retried write, is taken once). Then every captions/ part is settled in place: of the samples
    that share a key (the same key in two shards), the first in input order keeps it, the others become
    `duplicate_key` rows under a key that names their shard and position; keep is set and the filtered/ part
    of the same name written. The global top fraction reads the stored scores only: it costs no model re-run.
    Every part this attempt wrote must be listed first: committing without one would drop its rows, since the
    staging area is deleted after the commit.
    """
    (publisher or Publisher(output, config.rows_per_file)).finish(parts_written)
    plan = _Plan.of(output, output.parts(CAPTIONS))
    exceptions = _exceptions(output, plan, shard_order)
    top = _top_fraction(output, config.filter, plan, exceptions)
    counts = _write(output, config, plan, top, exceptions, embedding_dim, metadata_json)
    if not output.parts(CAPTIONS):  # inputs without one sample (an empty tar): readers still find the tables
        write_part(output, config.filter, top, captions_schema(embedding_dim, metadata_json).empty_table(),
                   embedding_dim, not config.embed_only, "part-empty.parquet")
    provenance = provenance_counts(output)
    return {"rows": sum(counts["by_status"].values()), "by_status": dict(sorted(counts["by_status"].items())),
            "kept": counts["kept"], **_cutoff_counts(top), "rows_by_node": dict(provenance["by_node"]),
            "rows_by_actor": dict(provenance["by_actor"]), "rows_by_compute": dict(provenance["by_compute"]),
            "model_actor_peak_rss_mb": round(provenance["actor_peak_rss_mb"], 1),
            "parts_committed_by_node": dict(counts["parts_by_node"])}


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
    plan = _Plan.of(output, output.parts(CAPTIONS))
    top = _top_fraction(output, config.filter, plan, {})
    kept = _write(output, config, plan, top, {}, embedding_dim, metadata_json)["kept"]
    summary.pop("webdataset", None)
    summary["config"], summary["output_defining"] = config.to_json(), defining
    summary["counts"] = {k: v for k, v in summary["counts"].items() if not k.startswith("top_fraction_cutoff")}
    summary["counts"] |= {"kept": kept, **_cutoff_counts(top)}
    summary["timings"]["refilter_s"] = round(time.time() - started, 3)
    summary["config"]["write_webdataset"] = False  # the old copy is gone; the caller writes a new one if asked
    output.write_json(summary, RUN_JSON)
    output.remove(REFILTER)
    return summary


def _exceptions(output: OutputDir, plan: _Plan, shard_order: list[str]) -> dict[int, list[ray.ObjectRef]]:
    """group -> the exception tables (object references) that name rows of its parts."""
    if not plan.groups:
        return {}
    pieces = split_into_ranges(key_ranges, plan.ranges, [(output.url, group) for group in plan.groups])
    find = task(find_exceptions, returns=2, spread=False)
    order = ray.put(shard_order)
    found = [find.remote(order, plan.per_group, *(group[r] for group in pieces)) for r in range(plan.ranges)]
    by_group: dict[int, list[ray.ObjectRef]] = {}
    for exceptions, groups in found:
        for group in ray.get(groups):
            by_group.setdefault(group, []).append(exceptions)
    return by_group


def _top_fraction(output: OutputDir, settings: FilterSettings, plan: _Plan,
                  exceptions: dict[int, list[ray.ObjectRef]]) -> TopFraction | None:
    """Where the top fraction of the ranked rows ends, in the run or in each cluster."""
    if settings.keep_top_fraction is None or not plan.groups:
        return None
    centroids = None
    if settings.clusters is not None:
        centroids = _fit_clusters(output, settings.clusters, plan, exceptions)
        if centroids is None:
            return None
    rank = task(rank_parts, returns=2)
    shared_centroids = ray.put(centroids)
    ranked = [rank.remote(output.url, group, shared_centroids, *exceptions.get(i, []))
              for i, group in enumerate(plan.groups)]
    rankings = [table for table, _ in ranked]
    counts = np.sum(ray.get([count for _, count in ranked]), axis=0)
    if not counts.sum():
        return None
    sample, count = task(sample_windows, spread=False), task(count_through, spread=False)

    def counted(windows: dict[int, Window], pivots: dict[int, list[Row]]) -> dict[int, np.ndarray]:
        total, pending = None, [count.remote(table, windows, pivots) for table in rankings]
        while pending:  # summed as they come: the driver holds one table's counts at a time
            ready, pending = ray.wait(pending)
            total = add_counts(total, ray.get(ready[0]))
        return total

    cutoffs = find_cutoffs(
        settings.keep_top_fraction, counts.tolist(),
        lambda windows, strides: ray.get([sample.remote(table, windows, strides) for table in rankings]), counted)
    return TopFraction(cutoffs, centroids)


def _fit_clusters(output: OutputDir, clusters: int, plan: _Plan,
                  exceptions: dict[int, list[ray.ObjectRef]]) -> np.ndarray | None:
    """Centroids fitted on the CLUSTER_SAMPLE ranked rows first by key digest (None: no ranked row)."""
    digests, merge = task(first_digests), task(smallest_digests, spread=False)
    samples = [digests.remote(output.url, group, CLUSTER_SAMPLE, *exceptions.get(i, []))
               for i, group in enumerate(plan.groups)]
    while len(samples) > 1:  # merged by tasks, a few at a time: the driver never holds a sample
        samples = [merge.remote(CLUSTER_SAMPLE, *samples[start:start + MERGE_FAN_IN])
                   for start in range(0, len(samples), MERGE_FAN_IN)]
    fetch = task(embeddings_at)
    found = [fetch.remote(output.url, group, samples[0]) for group in plan.groups]
    return ray.get(task(fit_sampled, spread=False).remote(clusters, *found))  # k-means in a task, not here


def _write(output: OutputDir, config: RunConfig, plan: _Plan, top: TopFraction | None,
           exceptions: dict[int, list[ray.ObjectRef]], embedding_dim: int, metadata_json: str) -> dict[str, Any]:
    """Every group's parts to captions/ and filtered/; their counts summed."""
    write = task(_write_parts_on_node)
    shared_top = ray.put(top)
    pending = [write.remote(output.url, group, config.filter, shared_top, embedding_dim, metadata_json,
                            not config.embed_only, *exceptions.get(i, [])) for i, group in enumerate(plan.groups)]
    total: dict[str, Any] = {"by_status": Counter(), "kept": 0, "parts_by_node": Counter()}
    while pending:
        ready, pending = ray.wait(pending)
        node, counts = ray.get(ready[0])
        total["parts_by_node"][node] += counts["parts"]
        total["by_status"].update(counts["by_status"])
        total["kept"] += counts["kept"]
    return total


def _write_parts_on_node(*args: Any) -> tuple[str, dict[str, Any]]:
    return ray.get_runtime_context().get_node_id(), write_parts(*args)


def _cutoff_counts(top: TopFraction | None) -> dict[str, Any]:
    return top.to_json() if top is not None else {"top_fraction_cutoff_score": None}


def export_webdataset(output: OutputDir, config: RunConfig, shards: list[Shard],
                       provenance: dict[str, Any]) -> dict[str, Any]:
    """filtered/ -> WEBDATASET/: the kept rows, split by input shard into ranges of shards by the tasks that
    read filtered/'s parts; one task per range re-reads its shards for the images (the run stores no image
    bytes) and writes their tars."""
    plan = _Plan.of(output, output.parts(FILTERED))
    if not plan.groups:
        return {"folder": WEBDATASET, "tars": 0, "samples": 0, "missing": 0}
    ranges = min(len(shards), max(2 * cluster_cpus(), -(-len(shards) // SHARDS_PER_EXPORT_TASK)))
    positions = ray.put({shard.url: position for position, shard in enumerate(shards)})
    pieces = split_into_ranges(kept_by_shard, ranges, [(output.url, group, positions) for group in plan.groups])
    write = task(write_webdataset_tars)
    stats = [row for rows in ray.get([
        write.remote(list(enumerate(shards))[r::ranges], output.url, config.image_column, config.key_column,
                     provenance, *(piece[r] for piece in pieces)) for r in range(ranges)]) for row in rows]
    missing = sum(row["missing"] for row in stats)
    if missing:
        log.warning("%d kept samples were not found in their input shards again; not in %s", missing, WEBDATASET)
    return {"folder": WEBDATASET, "tars": len(stats), "samples": sum(row["samples"] for row in stats),
            "missing": missing}
