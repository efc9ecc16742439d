"""Whether an output starts, resumes, is re-filtered or is refused, and which samples earlier attempts staged."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
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
    OutputDir,
    part_shard,
    shard_id,
)
from pipeline.io.sources import Shard
from pipeline.run.data_stages import SHARD_RECORDS, shard_markers
from pipeline.run.errors import UsageError
from pipeline.run.tasks import by_range, cluster_cpus, hash_ranges, split_into_ranges, task
from pipeline.text import describe_error

PARTS_PER_TASK = 64


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


@dataclass(frozen=True)
class Staged:
    """What earlier attempts of a run staged: the shards staged completely (read to their end, every sample
    staged: not read again), the positions staged of the others, and how many samples in all."""

    finished: set[str]
    partial: dict[str, set[int]]
    rows: int


def staged_samples(output: OutputDir) -> Staged:
    """Read by Ray tasks over groups of staged parts, by hash ranges of the shard: the driver receives the
    positions of the shards not staged completely only (those in flight when the attempt stopped), not those
    of every staged sample."""
    paths = output.parts(STAGING)
    if not paths:
        return Staged(set(), {}, 0)
    foreign = [path for path in paths if part_shard(path) is None]
    if foreign:  # parts that hold several shards' rows cannot be published shard by shard
        raise UsageError(f"{output.url}/{STAGING} holds parts this version does not write (e.g. "
                         f"{foreign[0].rsplit('/', 1)[-1]}): finish that run with the version that started it, or "
                         "use --overwrite")
    markers = shard_markers(output)
    cpus = cluster_cpus()
    per_task = max(1, min(PARTS_PER_TASK, -(-len(paths) // (2 * cpus))))
    ranges = max(1, min(cpus, -(-len(paths) // per_task)))
    pieces = split_into_ranges(staged_positions, ranges, [(output.url, paths[start:start + per_task])
                                                         for start in range(0, len(paths), per_task)])
    progress = task(shard_progress, spread=False)
    shared_markers = ray.put(markers)
    finished, partial, rows = set(), {}, 0
    for done, unfinished, count in ray.get([progress.remote(shared_markers, *(piece[r] for piece in pieces))
                                            for r in range(ranges)]):
        finished |= done
        partial |= unfinished
        rows += count
    return Staged(finished, partial, rows)


def staged_positions(output_url: str, paths: list[str], ranges: int) -> list[pa.Table] | pa.Table:
    """The distinct (source, index) of some staged parts, split into `ranges` tables by a hash of the source
    (one range: the table itself)."""
    output = OutputDir(output_url)
    rows = pa.concat_tables([output.read_table(path, ["source", "index"]) for path in paths])
    rows = rows.group_by(["source", "index"]).aggregate([])
    return by_range(rows, hash_ranges(rows.column("source"), ranges), ranges)


def shard_progress(markers: dict[str, int], *pieces: pa.Table) -> tuple[set[str], dict[str, set[int]], int]:
    """For the shards of one range: those staged completely, the staged positions of the others, and how many
    samples are staged."""
    rows = pa.concat_tables(pieces).group_by(["source", "index"]).aggregate([])
    positions: dict[str, set[int]] = {}
    for source, index in zip(rows.column("source").to_pylist(), rows.column("index").to_pylist(), strict=True):
        positions.setdefault(source, set()).add(index)
    # a marker counts the shard's records: positions staged all lie below it
    finished = {source for source, staged in positions.items()
                if markers.get(shard_id(source)) is not None and len(staged) >= markers[shard_id(source)]}
    return finished, {source: staged for source, staged in positions.items() if source not in finished}, rows.num_rows


def jsonable(data: Any) -> Any:
    return json.loads(json.dumps(data, default=str))
