"""Shards published to captions/ while a run goes on: once each, whole, in parts that are never rewritten before
the commit, and a commit at the end that keeps what was published (also when either stopped halfway)."""

from __future__ import annotations

import logging
import re
import shutil
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from conftest import jpeg_bytes, read_parts, tar_corpus, write_tar

import pipeline.run.commit as commit
import pipeline.run.publish as publish
from pipeline.config import ActorRange, GenerationSettings, RunConfig
from pipeline.io.sinks import CAPTIONS, STAGING, OutputDir, part_name, shard_id
from pipeline.quality.staged_rows import METADATA, StagedRows, write_staged
from pipeline.run.chain import run
from pipeline.run.data_stages import SHARD_RECORDS
from pipeline.run.errors import UsageError
from pipeline.run.filtering import FilterSettings
from pipeline.run.publish import Publisher
from pipeline.run.resume import staged_samples


def _mark_read(output: OutputDir, source: str, records: int) -> None:
    output.write_file(lambda handle: None, STAGING, SHARD_RECORDS, f"{shard_id(source)}.{records}")


def _published(folder: Path) -> dict[str, pa.Table]:
    return {path.name: pq.read_table(path) for path in sorted(folder.glob("*.parquet"))}


def _wait_for(condition, seconds: float = 30.0) -> None:
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def test_a_shard_is_published_once_all_of_it_is_staged_and_then_never_changes(ray_local, tmp_path, monkeypatch):
    monkeypatch.setattr(publish, "POLL_S", 0.05)
    spec = StagedRows(rows=300, rows_per_part=40, embedding_dim=8, retried=0.0, shard_samples=100)
    first, second, third = spec.shards()
    out = OutputDir(str(tmp_path / "out"))
    write_staged(out.url, spec, range(0, 5))  # rows 0-199: shards 1 and 2 whole
    _mark_read(out, first, 100)
    _mark_read(out, second, 120)  # read to its end, but 20 of its samples are still being captioned
    submitted = []  # shards a publish task was started for
    real_task = publish.task

    def recording_task(function, cpus):
        remote = real_task(function, cpus=cpus)

        class Recording:
            def remote(self, output_url, source_id, *args):
                submitted.append(source_id)
                return remote.remote(output_url, source_id, *args)

        return Recording()

    monkeypatch.setattr(publish, "task", recording_task)
    publisher = Publisher(out, rows_per_file=30)
    publisher.start()
    try:
        _wait_for(lambda: shard_id(first) in publisher.published)
        time.sleep(0.3)  # a few more rounds: the second shard is not complete
        # nor is it looked at by a task each round: its staged parts' footers count too few rows
        assert submitted == [shard_id(first)]
        published = _published(tmp_path / "out" / CAPTIONS)
        assert len(published) == 4  # positions 0-29, 30-59, 60-89, 90-99
        rows = pa.concat_tables(published.values())
        assert set(rows.column("source").to_pylist()) == {first}
        assert rows.column("index").to_pylist() == list(range(100))  # every sample once, in input order
        assert rows.column("keep").null_count == 100  # settled by the commit
        # a late second copy of published samples (a retried write) with other captions changes nothing
        late = out.read_table(out.parts(STAGING)[0])
        late = late.filter(pc.equal(late.column("source"), first))
        late = late.set_column(late.schema.get_field_index("caption"), late.schema.field("caption"),
                               pa.array(["başka"] * late.num_rows))
        out.write_parquet(late, STAGING, part_name(first, [0]))
        extra = spec.part(5)[0].slice(0, 20)  # the second shard's last samples
        for name, values in (("index", pa.array(range(100, 120))), ("source", pa.array([second] * 20))):
            extra = extra.set_column(extra.schema.get_field_index(name), extra.schema.field(name), values)
        out.write_parquet(extra, STAGING, part_name(second, list(range(100, 120))))
        _wait_for(lambda: shard_id(second) in publisher.published)
    finally:
        publisher.stop()
    after = _published(tmp_path / "out" / CAPTIONS)
    assert all(after[name].equals(table) for name, table in published.items())
    publisher.finish(set())  # the third shard was never read to its end (as --limit leaves one): what is staged
    sources = pa.concat_tables(_published(tmp_path / "out" / CAPTIONS).values()).column("source").to_pylist()
    assert (sources.count(first), sources.count(second), sources.count(third)) == (100, 120, 0)
    assert shard_id(third) not in publisher.published  # nothing of it was staged


def test_a_publish_and_a_commit_stopped_halfway_are_completed_as_if_never_stopped(ray_local, tmp_path):
    spec = StagedRows(rows=1200, rows_per_part=64, embedding_dim=8, failed=0.05, shared_keys=0.05, retried=0.3,
                      shard_samples=300)
    config = RunConfig(inputs=("unused",), output=str(tmp_path / "whole"),
                       filter=FilterSettings(keep_top_fraction=0.5), rows_per_file=50)
    whole = OutputDir(str(tmp_path / "whole"))
    write_staged(whole.url, spec)
    Publisher(whole, config.rows_per_file).finish(set())
    shutil.copytree(tmp_path / "whole", tmp_path / "halfway")
    counts = commit.finalize(whole, config, spec.shards(), spec.embedding_dim, METADATA, set())
    assert counts["by_status"]["duplicate_key"] > 0

    # the same run stopped while publishing (one shard's record and a part gone) and while settling (half the
    # parts settled already, renamed rows among them)
    halfway = OutputDir(str(tmp_path / "halfway"))
    folder = tmp_path / "halfway" / CAPTIONS
    (tmp_path / "halfway" / STAGING / publish.PUBLISHED / f"{shard_id(spec.shards()[1])}.json").unlink()
    unpublished = folder / f"part-{shard_id(spec.shards()[1])}-00002.parquet"
    unpublished.unlink()
    settled = sorted(path.name for path in folder.glob("*.parquet"))[::2]
    for name in settled:
        shutil.copy(tmp_path / "whole" / CAPTIONS / name, folder / name)
    assert any(pq.read_table(folder / name).column("status").to_pylist().count("duplicate_key") for name in settled)
    resumed = commit.finalize(halfway, config, spec.shards(), spec.embedding_dim, METADATA, set())
    assert resumed == counts
    for name in (CAPTIONS, "filtered"):
        assert read_parts(tmp_path / "halfway" / name).sort_by("key").equals(
            read_parts(tmp_path / "whole" / name).sort_by("key"))
    assert unpublished.exists()


def test_captions_are_readable_while_the_run_goes_on(ray_local, tiny_bundle, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(publish, "POLL_S", 0.05)
    caplog.set_level(logging.INFO, logger=publish.__name__)
    tar_corpus(tmp_path / "in", shards=5, per_shard=8)  # published while the large shard is still captioned
    write_tar(tmp_path / "in" / "large.tar", {f"large{i:04d}": {"jpg": jpeg_bytes(1000 + i)} for i in range(600)})
    config = RunConfig(inputs=(str(tmp_path / "in" / "*.tar"),), output=str(tmp_path / "out"),
                       model=str(tiny_bundle), decode=GenerationSettings(max_new_tokens=4), batch_size=4,
                       actors=ActorRange.parse("1"), rows_per_file=16, filter=FilterSettings(keep_top_fraction=0.5))
    seen: list[tuple[bool, list[pa.Table]]] = []  # (run.json there, the parts read)
    errors: list[str] = []
    done = threading.Event()

    def watch() -> None:
        folder = tmp_path / "out" / CAPTIONS
        while not done.is_set():
            finished = (tmp_path / "out" / "run.json").exists()
            tables = []
            # as pyarrow.dataset and datasets list a folder: files named ._tmp-* (being written) are hidden
            for path in sorted(folder.glob("[!._]*.parquet")) if folder.exists() else []:
                try:
                    # a part is there whole or not at all; read through one open file: given a path, pyarrow opens
                    # it twice (footer, then pages), which can see two versions while the commit settles it
                    with path.open("rb") as handle:
                        tables.append(pq.read_table(handle))
                except FileNotFoundError:  # replaced by its settled version since the listing
                    continue
                except Exception as exc:  # half a part: reported by the test, not lost in this thread
                    errors.append(f"{path.name}: {exc}")
            seen.append((finished, tables))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        run(config)
    finally:
        done.set()
        watcher.join()
    assert not errors
    during = [tables for finished, tables in seen if not finished and tables]
    assert during, "nothing was published before the run finished"
    assert any(sum(t.num_rows for t in tables) < 640 for tables in during), "every shard was published at once"
    for tables in during:
        samples = [(source, key) for table in tables for source, key in zip(
            table.column("source").to_pylist(), table.column("key").to_pylist(), strict=True)]
        assert len(samples) == len(set(samples))  # no sample twice
    assert any(re.fullmatch(r"captions/: [1-5] of 6 shards published \(\d+ rows by this attempt\)", record.message)
               for record in caplog.records)  # the run's progress, as shards are published
    final = read_parts(tmp_path / "out" / CAPTIONS)
    assert final.num_rows == 640 and final.column("keep").null_count == 0 and "index" not in final.column_names


def test_staging_left_by_a_version_that_mixed_shards_in_a_part_is_refused_in_one_line(tmp_path):
    out = OutputDir(str(tmp_path / "out"))
    spec = StagedRows(rows=10, rows_per_part=10, embedding_dim=8, shard_samples=5)
    out.write_parquet(spec.part(0)[0], STAGING, "part-0123456789abcdef0123.parquet")  # two shards' rows
    with pytest.raises(UsageError, match=r"holds parts this version does not write .*--overwrite$"):
        staged_samples(out)
