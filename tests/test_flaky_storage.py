"""Transient storage errors are retried; bytes really missing are still recorded as damage; a shard that kept
failing is not marked finished, so the next run reads it again."""

from __future__ import annotations

import io
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import jpeg_bytes, tar_corpus
from fsspec.implementations.local import LocalFileSystem

import pipeline.io.retry as retry
from pipeline.io.retry import TransientIOError, is_transient
from pipeline.io.sinks import STAGING, OutputDir
from pipeline.io.sources import PARQUET, WEBDATASET, Shard, read_samples
from pipeline.run.data_stages import SHARD_RECORDS, ShardDatasource


class _FlakyFile(io.RawIOBase):
    """A file that raises ConnectionResetError once `fail_after` bytes of it were read."""

    def __init__(self, handle, fail_after: int):
        self.handle, self.fail_after = handle, fail_after

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.handle.seek(offset, whence)

    def tell(self) -> int:
        return self.handle.tell()

    def readinto(self, buffer) -> int:
        if self.handle.tell() + len(buffer) > self.fail_after:
            raise ConnectionResetError(104, "Connection reset by peer")
        data = self.handle.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def close(self) -> None:
        self.handle.close()
        super().close()


class FlakyFileSystem(LocalFileSystem):
    """Local files whose first `failing_opens` opens for reading break mid-stream (after `fail_after` bytes), and
    whose first `failing_writes` writes are refused as a storage service's 503 would be."""

    protocol = "flaky"
    failing_opens = 0
    fail_after = 0
    failing_writes = 0
    lost_moves = 0
    opens = 0

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(path.removeprefix("flaky://"))

    def _open(self, path, mode="rb", **kwargs):
        handle = super()._open(path, mode, **kwargs)
        if "r" in mode:
            FlakyFileSystem.opens += 1
            if FlakyFileSystem.failing_opens > 0:
                FlakyFileSystem.failing_opens -= 1
                return io.BufferedReader(_FlakyFile(handle, FlakyFileSystem.fail_after))
        elif FlakyFileSystem.failing_writes > 0:
            FlakyFileSystem.failing_writes -= 1
            handle.close()
            raise OSError("503 Service Unavailable (SlowDown): reduce your request rate")
        return handle

    def mv(self, path1, path2, **kwargs):
        super().mv(path1, path2, **kwargs)
        if FlakyFileSystem.lost_moves > 0:  # moved, but the answer never came back
            FlakyFileSystem.lost_moves -= 1
            raise ConnectionResetError("connection reset by peer")


@pytest.fixture
def flaky(monkeypatch):
    fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)
    monkeypatch.setattr(retry, "FIRST_WAIT_S", 0.0)
    for name, value in (("failing_opens", 0), ("fail_after", 0), ("failing_writes", 0), ("lost_moves", 0),
                        ("opens", 0)):
        monkeypatch.setattr(FlakyFileSystem, name, value)
    return FlakyFileSystem


def test_errors_that_pass_are_told_from_damage():
    assert is_transient(ConnectionResetError(104, "Connection reset by peer"))
    assert is_transient(TimeoutError("read timed out"))
    assert is_transient(OSError("An error occurred (SlowDown) when calling the GetObject operation"))
    wrapped = OSError("read failed")
    wrapped.__cause__ = ConnectionResetError()
    assert is_transient(wrapped)
    from aiohttp import ClientPayloadError  # s3fs's client, when the network cut a download short
    assert is_transient(ClientPayloadError("Response payload is not completed: <ContentLengthError: 400, "
                                           "message='Not enough data to satisfy content length header.'>"))
    for damage in (FileNotFoundError("no such file"), PermissionError("denied"), EOFError("unexpected end of data"),
                   OSError("Not a gzipped file (b'PK')"), ValueError("bad header")):
        assert not is_transient(damage)


def test_a_tar_cut_off_by_the_network_is_read_again_not_recorded_as_truncated(tmp_path, flaky):
    [shard] = tar_corpus(tmp_path, shards=1, per_shard=6)
    clean = list(read_samples(Shard(str(shard), WEBDATASET)))
    flaky.failing_opens, flaky.fail_after = 2, shard.stat().st_size // 2  # twice cut mid-stream, then whole
    again = list(read_samples(Shard(f"flaky://{shard}", WEBDATASET)))
    assert [(r["key"], r["status"], r["image"]) for r in again] == [(r["key"], r["status"], r["image"]) for r in clean]
    assert flaky.opens == 3 and all(r["status"] == "ok" for r in again)


def test_a_tar_that_keeps_failing_stops_the_read_and_bytes_really_missing_stay_truncated(tmp_path, flaky):
    [shard] = tar_corpus(tmp_path, shards=1, per_shard=40)
    flaky.failing_opens, flaky.fail_after = 100, shard.stat().st_size // 2
    records = []
    with pytest.raises(TransientIOError, match=r"failed 5 times, after \d+ samples.*Connection reset"):
        records.extend(read_samples(Shard(f"flaky://{shard}", WEBDATASET)))
    assert records and all(r["status"] == "ok" for r in records)  # what was read is good; no damage row
    assert flaky.opens == 5

    cut = tmp_path / "cut.tar"
    cut.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    flaky.failing_opens = 0
    statuses = [r["status"] for r in read_samples(Shard(f"flaky://{cut}", WEBDATASET))]
    assert statuses[-1] == "truncated_shard" and flaky.opens == 6  # read once: nothing to try again


def test_a_parquet_read_broken_mid_file_is_read_again(tmp_path, flaky):
    path = tmp_path / "images.parquet"
    table = pa.table({"key": [f"k{i}" for i in range(200)], "jpg": [jpeg_bytes(i) for i in range(200)]})
    pq.write_table(table, path, row_group_size=50)
    flaky.failing_opens, flaky.fail_after = 1, path.stat().st_size // 2
    records = list(read_samples(Shard(f"flaky://{path}", PARQUET)))
    assert [r["key"] for r in records] == table.column("key").to_pylist()
    assert all(r["status"] == "ok" for r in records) and flaky.opens == 2


def test_output_writes_refused_for_a_while_are_written_whole_and_leave_no_temporary(tmp_path, flaky):
    output = OutputDir(f"flaky://{tmp_path / 'out'}")
    flaky.failing_writes = 2
    output.write_parquet(pa.table({"x": [1, 2, 3]}), "captions", "part-a.parquet")
    assert pq.read_table(tmp_path / "out" / "captions" / "part-a.parquet").column("x").to_pylist() == [1, 2, 3]
    assert [str(p.relative_to(tmp_path)) for p in (tmp_path / "out").rglob("*")] == ["out/captions",
                                                                                  "out/captions/part-a.parquet"]
    flaky.failing_writes = 100
    with pytest.raises(TransientIOError, match=r"writing .*run\.json failed 5 times"):
        output.write_json({"a": 1}, "run.json")
    assert not (tmp_path / "out" / "run.json").exists()


def test_a_rename_whose_answer_was_lost_is_not_done_twice(tmp_path, flaky):
    """On an object store a rename is a copy and a delete: a try that did both but lost its answer must not
    make the next try fail for want of the temporary file."""
    output = OutputDir(f"flaky://{tmp_path / 'out'}")
    flaky.lost_moves = 1
    output.write_json({"a": 1}, "run.json")
    assert output.read_json("run.json") == {"a": 1}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["run.json"]


def _read_task_blocks(shard: Path, out: Path, url: str) -> list[pa.Table]:
    source = ShardDatasource([Shard(url, WEBDATASET)], {}, None, "key", str(out))
    [task] = source.get_read_tasks(1)
    return list(task())


def test_a_shard_that_kept_failing_is_not_marked_finished_and_the_next_run_reads_it(tmp_path, flaky):
    [shard] = tar_corpus(tmp_path / "in", shards=1, per_shard=6)
    out = tmp_path / "out"
    flaky.failing_opens, flaky.fail_after = 100, shard.stat().st_size // 2
    with pytest.raises(TransientIOError):
        _read_task_blocks(shard, out, f"flaky://{shard}")
    assert not (out / STAGING / SHARD_RECORDS).exists()  # not finished: a rerun reads the shard again

    flaky.failing_opens = 1  # the storage recovers after one more failure
    blocks = _read_task_blocks(shard, out, f"flaky://{shard}")
    assert sum(block.num_rows for block in blocks) == 6
    assert [p.name.rsplit(".", 1)[1] for p in (out / STAGING / SHARD_RECORDS).iterdir()] == ["6"]
