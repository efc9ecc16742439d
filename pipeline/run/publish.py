"""Shards to captions/ while the run goes on: each shard is published once every sample of it is staged, so that
a long run's rows can be read long before it ends.

A shard is published once, from the staged parts its id names: of a sample staged twice (a retried write) the
first copy by part name is taken; its rows go, in input order, to parts named by the shard and a range of
positions (`published_name`), each written whole under a temporary name and renamed; then
`_staging/published/SHARD_ID.json` records it with its counts. A published part is never written again during
the run (an attempt that stopped halfway through a shard writes only the parts still missing), so a reader of
captions/ never sees half a part or a sample twice. Published rows are provisional: `keep` is null and the
staging column `index` is still there until the commit at the end (`commit.finalize`) settles every part in
place: second holders of a key renamed, keep set, filtered/ written.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from pipeline.io.sinks import CAPTIONS, STAGING, OutputDir, part_shard, published_name
from pipeline.run.data_stages import shard_markers
from pipeline.run.errors import StagingNotListed
from pipeline.run.tasks import task
from pipeline.text import one_line

log = logging.getLogger(__name__)

PUBLISHED = "published"  # under STAGING: SHARD_ID.json for every shard published, with its counts
POLL_S = 10.0  # how often the run looks for shards staged completely
PROVENANCE = ("node", "actor", "compute", "actor_peak_rss_mb")  # staging columns counted, not published
COUNTS_PER_TASK = 1000  # published records one task sums


def publish_shard(output_url: str, source_id: str, paths: list[str], records: int | None, rows_per_file: int,
                  ) -> dict[str, Any] | None:
    """Publish one shard from its staged parts `paths`; None, publishing nothing, while fewer than `records`
    of its samples are staged (`records` None: publish what is staged, as the run's last step does)."""
    output = OutputDir(output_url)
    if records is not None:  # the positions alone: a shard not complete yet is looked at again next round
        positions = [output.read_table(path, ["index"]).column("index").to_numpy() for path in paths]
        if len(np.unique(np.concatenate(positions or [[]]))) < records:
            return None
    counts = {"rows": 0} | _no_counts()
    if paths:
        rows = pa.concat_tables([output.read_table(path) for path in paths], promote_options="default")
        _, first = np.unique(rows.column("index").to_numpy(), return_index=True)  # sorted by position
        rows = rows.take(pa.array(first))
        _count_provenance(rows, counts)
        rows = rows.drop_columns([name for name in PROVENANCE if name in rows.column_names])
        rows = rows.set_column(rows.schema.get_field_index("keep"), pa.field("keep", pa.bool_()),
                               pa.nulls(rows.num_rows, pa.bool_()))  # settled by the commit
        chunks = rows.column("index").to_numpy() // rows_per_file
        source = rows.column("source")[0].as_py()
        for chunk in np.unique(chunks):
            name = published_name(source, int(chunk))
            if not output.exists(CAPTIONS, name):  # written by an attempt that stopped halfway: it stays as it is
                output.write_parquet(rows.filter(pa.array(chunks == chunk)), CAPTIONS, name)
        counts["rows"] = rows.num_rows
    output.write_json(counts, STAGING, PUBLISHED, f"{source_id}.json")
    return counts


def _count_provenance(rows: pa.Table, counts: dict[str, Any]) -> None:
    """Where a shard's captioned rows were computed, for run.json."""
    captioned = rows.filter(pc.equal(rows.column("status"), "ok"))  # not rows failed before the models
    for name, column in (("by_node", "node"), ("by_actor", "actor"), ("by_compute", "compute")):
        counts[name].update(captioned.column(column).to_pylist())
    counts["actor_peak_rss_mb"] = max(counts["actor_peak_rss_mb"], pc.max(rows.column("actor_peak_rss_mb")).as_py()
                                      or 0.0)


class Publisher:
    """Publishes shards as they are staged completely, from a thread of the driver while the model stage runs
    (`start`), then everything staged (`finish`). It holds the ids of shards published and in flight, not rows."""

    def __init__(self, output: OutputDir, rows_per_file: int, shards: int | None = None):
        self.output = output
        self.rows_per_file = rows_per_file
        self.shards = shards  # in the run, for the progress line
        self.rows_published = 0  # by this attempt
        self.first_published: float | None = None  # when this attempt saw its first shard published (time.time())
        self.published = {path.rsplit("/", 1)[-1].removesuffix(".json")
                          for path in output.parts(f"{STAGING}/{PUBLISHED}", pattern="*.json")}
        self.in_flight: dict[str, ray.ObjectRef] = {}
        self._part_rows: dict[str, int] = {}  # staged part -> its rows, for the shards waiting to be published
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._poll, name="publisher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop looking for finished shards (the model stage ended or failed); tasks in flight finish."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def finish(self, parts_written: set[str]) -> None:
        """Publish every shard not published yet with what is staged of it (a shard that --limit cut short
        too). Every part this attempt wrote must be listed: publishing without one would lose its rows."""
        self.stop()
        self._collect(wait=True, retry_failed=True)
        paths = self.output.parts(STAGING)  # one listing: the parts checked are the parts published
        unlisted = parts_written - {path.rsplit("/", 1)[-1] for path in paths}
        if unlisted:
            raise StagingNotListed(f"{len(unlisted)} part(s) this run wrote are not listed in {self.output.url}/"
                                   f"{STAGING} (e.g. {min(unlisted)}); nothing was committed or deleted: submit "
                                   "the job again")
        self._submit(paths, shard_markers(self.output), final=True)
        self._collect(wait=True, retry_failed=False)

    def _poll(self) -> None:
        while not self._stop.wait(POLL_S):
            try:
                if self._collect(wait=False, retry_failed=True):
                    log.info("captions/: %d%s shards published (%d rows by this attempt)", len(self.published),
                             f" of {self.shards}" if self.shards else "", self.rows_published)
                markers = shard_markers(self.output)
                waiting = {shard: records for shard, records in markers.items()
                           if shard not in self.published and shard not in self.in_flight}
                if waiting:
                    paths = self.output.parts(STAGING)
                    self._submit(paths, self._staged_whole(paths, waiting), final=False)
            except Exception as exc:
                log.warning("publishing finished shards failed (tried again): %s", one_line(str(exc)))

    def _staged_whole(self, paths: list[str], waiting: dict[str, int]) -> dict[str, int]:
        """The shards of `waiting` (id -> records) whose staged parts hold at least their records, from the parts'
        footers, each read once. A task per waiting shard and round, starting a worker process each on a machine
        whose cores the model actors hold, took a third of a 2-core run."""
        self._part_rows = {path: self._part_rows[path] if path in self._part_rows else self.output.rows_in(path)
                           for path in paths if part_shard(path) in waiting}
        staged = Counter()
        for path, rows in self._part_rows.items():
            staged[part_shard(path)] += rows
        return {shard: records for shard, records in waiting.items() if staged[shard] >= records}

    def _submit(self, paths: list[str], markers: dict[str, int], final: bool) -> None:
        """A publish task for each shard of `markers` (id -> records) not published or in flight (final: each shard
        with staged samples too, publishing what is staged of it)."""
        by_shard: dict[str, list[str]] = {}
        for path in paths:
            by_shard.setdefault(part_shard(path), []).append(path)
        # during the run they take no CPU, like the read tasks: the model actors may hold every one
        publish = task(publish_shard, cpus=1 if final else 0)
        for shard in sorted(set(markers) | (set(by_shard) if final else set())):
            if shard not in self.published and shard not in self.in_flight:
                self.in_flight[shard] = publish.remote(self.output.url, shard, by_shard.get(shard, []),
                                                       None if final else markers[shard], self.rows_per_file)

    def _collect(self, wait: bool, retry_failed: bool) -> int:
        """Take in the publish tasks that finished (wait: all of them); a shard not complete yet is tried again,
        and so is one whose task failed (retry_failed; else its error is raised). Returns how many shards were
        published."""
        if not self.in_flight:
            return 0
        refs = list(self.in_flight.values())
        ready = set(ray.wait(refs, num_returns=len(refs), timeout=None if wait else 0)[0])
        published = 0
        for shard, ref in list(self.in_flight.items()):
            if ref in ready:
                del self.in_flight[shard]
                try:
                    counts = ray.get(ref)
                except Exception as exc:
                    if not retry_failed:
                        raise
                    log.warning("publishing a shard failed (tried again): %s", one_line(str(exc)))
                    continue
                if counts is not None:
                    if self.first_published is None:
                        self.first_published = time.time()
                    self.published.add(shard)
                    self.rows_published += counts["rows"]
                    published += 1
        return published


def provenance_counts(output: OutputDir) -> dict[str, Any]:
    """The published shards' counts of where their rows were computed, summed (read by tasks: a run of many
    shards has many of these files)."""
    names = [path.rsplit("/", 1)[-1] for path in output.parts(f"{STAGING}/{PUBLISHED}", pattern="*.json")]
    read = task(_summed_counts)
    return _sum(ray.get([read.remote(output.url, names[start:start + COUNTS_PER_TASK])
                         for start in range(0, len(names), COUNTS_PER_TASK)]))


def _summed_counts(output_url: str, names: list[str]) -> dict[str, Any]:
    output = OutputDir(output_url)
    return _sum([output.read_json(STAGING, PUBLISHED, name) for name in names])


def _no_counts() -> dict[str, Any]:
    return {"by_node": Counter(), "by_actor": Counter(), "by_compute": Counter(), "actor_peak_rss_mb": 0.0}


def _sum(counts: list[dict[str, Any]]) -> dict[str, Any]:
    total = _no_counts()
    for one in counts:
        for name in ("by_node", "by_actor", "by_compute"):
            total[name].update(one[name])
        total["actor_peak_rss_mb"] = max(total["actor_peak_rss_mb"], one["actor_peak_rss_mb"])
    return total
