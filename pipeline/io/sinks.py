"""Output side: atomic Parquet parts, the staging area that makes runs resumable, and the final
captions/ + filtered/ + run.json.

Layout of an output directory (local path or any fsspec URL):
  _staging/config.json   what defines this run's rows; a resume must match it
  _staging/part-*.parquet   model-stage output, one file per written block, each written atomically
  captions/part-*.parquet   every input row exactly once, with `keep`
  filtered/part-*.parquet   the kept rows
  filtered_wds/NNNNN.tar    with --write-webdataset: the kept rows with their images, one tar per input shard
  run.json               written last: the commit record of a finished run

A part's name is a hash of its keys, so a retried write replaces its own file instead of adding a
duplicate; files are written under a hidden temporary name and renamed, so a reader never sees a
half-written file (on object stores a single PUT is atomic and readers skip the hidden names).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import tarfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.io.retry import ATTEMPTS, retrying
from schemas.captions import ADDED_COLUMNS, with_added_columns

STAGING = "_staging"
CAPTIONS = "captions"
FILTERED = "filtered"
WEBDATASET = "filtered_wds"
# The filtered columns a WebDataset sample carries (in KEY.txt and KEY.json).
WEBDATASET_COLUMNS = ("key", "source", "caption", "clip_score", "original_text", "original_clip_score", "width",
                      "height")
RUN_JSON = "run.json"
REPORT = "report.html"  # jobs/report.py's page of the run, removed whenever run.json is rewritten
REFILTER = "_refilter.json"  # the configuration a re-filter in progress is heading to
STAGING_CONFIG = "config.json"
TMP_PREFIX = "._tmp-"


class OutputDir:
    """An output directory on any fsspec filesystem. Every operation is retried on transient storage errors
    (`pipeline.io.retry`)."""

    def __init__(self, url: str):
        # No listings cache: the driver lists what worker processes wrote, and an object store's cached
        # listing (s3fs, gcsfs) missed every staged part, so the run was committed empty and its rows deleted.
        self.fs, self.root = fsspec.core.url_to_fs(url, use_listings_cache=False)
        self.root = self.root.rstrip("/")
        self.url = url

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def exists(self, *parts: str) -> bool:
        path = self.path(*parts)
        return retrying(lambda: self.fs.exists(path), f"looking for {path}")

    def is_file(self) -> bool:
        """Whether the output path is a file. Unlike fsspec's isfile(), which answers False for any error, a
        store that refuses access (no credentials, no permission) raises here, before any work is done."""
        try:
            return retrying(lambda: self.fs.info(self.root), f"looking at {self.root}").get("type") == "file"
        except FileNotFoundError:
            return False

    def is_empty(self) -> bool:
        return not self.exists() or not retrying(lambda: self.fs.ls(self.root), f"listing {self.root}")

    def parts(self, folder: str, pattern: str = "*.parquet") -> list[str]:
        """Committed files of a folder (Parquet parts by default), sorted (temporary files are never listed)."""
        if not self.exists(folder):
            return []
        pattern = self.path(folder, pattern)
        names = retrying(lambda: self.fs.glob(pattern), f"listing {pattern}")
        return sorted(name for name in names if not name.rsplit("/", 1)[-1].startswith(TMP_PREFIX))

    def read_json(self, *parts: str) -> dict[str, Any] | None:
        if not self.exists(*parts):
            return None
        path = self.path(*parts)
        return json.loads(retrying(lambda: self.fs.cat_file(path), f"reading {path}").decode("utf-8"))

    def write_json(self, data: dict[str, Any], *parts: str) -> None:
        text = json.dumps(data, indent=2, ensure_ascii=False, default=str)
        self.write_file(lambda handle: handle.write(text.encode("utf-8")), *parts)

    def write_parquet(self, table: pa.Table, *parts: str) -> str:
        return self.write_file(lambda handle: pq.write_table(table, handle, compression="zstd"), *parts)

    def write_file(self, write: Callable[[Any], None], *parts: str, repeatable: bool = True) -> str:
        """Create a file by `write(handle)` under a temporary name, then rename it into place. A write that
        fails for a transient reason is done again from the start, unless `write` cannot be called twice
        (`repeatable=False`: it consumes a stream); the rename is retried on its own."""
        path = self.path(*parts)
        folder, name = path.rsplit("/", 1)
        retrying(lambda: self.fs.makedirs(folder, exist_ok=True), f"creating {folder}")
        # beside the output's folders, not in them: a reader that lists captions/*.parquet while a part is being
        # written (fsspec's glob, DuckDB) never picks up the half-written file
        temporary = f"{self.root}/{TMP_PREFIX}{uuid.uuid4().hex}-{name}"

        def write_temporary() -> None:
            with self.fs.open(temporary, "wb") as handle:  # a new try writes the whole file again
                write(handle)

        def move() -> None:
            try:
                self.fs.mv(temporary, path)
            except FileNotFoundError:
                # an object store renames by copy + delete: a try whose answer was lost may have done both
                if not self.fs.exists(path):
                    raise

        try:
            retrying(write_temporary, f"writing {path}", attempts=ATTEMPTS if repeatable else 1)
            retrying(move, f"renaming {temporary}")
        finally:
            with contextlib.suppress(Exception):  # a leftover is removed by the next run's clean-up
                if self.fs.exists(temporary):
                    self.fs.rm(temporary)
        return path

    def rows_in(self, path: str) -> int:
        """How many rows a Parquet part holds (from its footer)."""
        def read() -> int:
            with self.fs.open(path, "rb") as handle:
                return pq.ParquetFile(handle).metadata.num_rows
        return retrying(read, f"reading {path}")

    def read_table(self, path: str, columns: list[str] | None = None,
                   optional: dict[str, pa.DataType] | None = None) -> pa.Table:
        """One Parquet part (a path `parts` listed): every column, or some (as `read_part` reads them)."""
        def read() -> pa.Table:
            with self.fs.open(path, "rb") as handle:
                # use_threads=False: pyarrow's threaded reads from Python file objects can abort at exit
                return pq.read_table(handle, use_threads=False) if columns is None else read_part(handle, columns,
                                                                                                   optional)
        return retrying(read, f"reading {path}")

    def remove(self, *parts: str) -> None:
        if self.exists(*parts):
            path = self.path(*parts)
            retrying(lambda: self.fs.rm(path, recursive=True), f"removing {path}")

    def clean_temporaries(self) -> int:
        """Delete temporary files left by writers that were killed mid-write."""
        pattern = self.path("**", TMP_PREFIX + "*")
        stale = retrying(lambda: [p for p in self.fs.glob(pattern) if self.fs.isfile(p)], f"listing {pattern}")
        for path in stale:
            retrying(lambda path=path: self.fs.rm(path), f"removing {path}")
        return len(stale)


def write_webdataset_shard(output: OutputDir, name: str, records: Iterable[dict], rows: dict[str, dict],
                           provenance: dict[str, Any], to_portable: Callable[[bytes], tuple[bytes, str]]) -> dict:
    """Write the kept samples among `records` (one input shard's sample records, in order) as the tar
    WEBDATASET/`name`: KEY.jpg|png|webp (the input image via `to_portable`), KEY.txt (the caption, if any),
    KEY.json (score, provenance). `rows` maps a kept key to its filtered row; only the first record of a
    key is taken (a later one is a renamed duplicate, never kept). Returns the counts written / missing."""
    pending = dict(rows)
    written = without_image = 0

    def write(handle) -> None:
        nonlocal written, without_image
        stems: set[str] = set()
        # stream mode ("w|"): object-store handles cannot seek
        with tarfile.open(fileobj=handle, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for record in records:
                row = pending.pop(record["key"], None)
                if row is None:
                    continue
                if not record["image"]:  # the input changed since the run: reported as missing
                    without_image += 1
                    continue
                image, extension = to_portable(record["image"])
                stem = _unique(webdataset_stem(row["key"]), stems)
                meta = {**{name: row.get(name) for name in WEBDATASET_COLUMNS}, **provenance}
                members = [(extension, image), ("json", json.dumps(meta, ensure_ascii=False).encode("utf-8"))]
                if row["caption"] is not None:  # none in an --embed-only output
                    members.insert(1, ("txt", row["caption"].encode("utf-8")))
                for suffix, data in members:
                    info = tarfile.TarInfo(f"{stem}.{suffix}")
                    info.size, info.mode, info.mtime = len(data), 0o644, int(time.time())
                    tar.addfile(info, io.BytesIO(data))
                written += 1

    output.write_file(write, WEBDATASET, name, repeatable=False)
    return {"samples": written, "missing": len(pending) + without_image}


def webdataset_stem(key: str) -> str:
    """A sample key as a tar member name without extension. WebDataset splits a member name at the
    first dot of its last path component, so dots become underscores; empty, '.' and '..' path parts
    are dropped (no absolute or climbing paths). KEY.json keeps the exact key."""
    parts = [part.replace(".", "_") for part in key.replace("\0", "").split("/") if part not in ("", ".", "..")]
    return "/".join(parts) or "_"


def _unique(stem: str, taken: set[str]) -> str:
    """`stem`, or `stem_N` when an earlier sample of the tar took it (WebDataset would merge the two)."""
    candidate, number = stem, 1
    while candidate in taken:
        candidate, number = f"{stem}_{number}", number + 1
    taken.add(candidate)
    return candidate


def shard_id(url: str) -> str:
    """A shard's name in the output's file names."""
    return hashlib.sha256(url.encode("utf-8")).hexdigest()[:32]


def part_name(source: str, indices: list[int]) -> str:
    """A staged part's name: its shard's id, then a digest of its samples' positions, so that the same samples
    always get the same file name and other samples another one, and a listing tells each shard's parts apart.
    Named by (source, position), not by key: a shard repeating another's keys (the same images as .tar and as
    .parquet) made a part of the same name, which replaced the first, and those rows were lost."""
    digest = hashlib.sha256(",".join(map(str, sorted(indices))).encode()).hexdigest()[:20]
    return f"part-{shard_id(source)}-{digest}.parquet"


def by_shard(rows: pa.Table) -> Iterator[tuple[str, pa.Table]]:
    """`rows` split by their source: a staged part holds one shard's rows (`part_name`)."""
    for source in pc.unique(rows.column("source")).to_pylist():
        yield source, rows.filter(pc.equal(rows.column("source"), source))


STAGED_PART = re.compile(r"part-([0-9a-f]{32})-[0-9a-f]{20}\.parquet")


def part_shard(name: str) -> str | None:
    """The shard id a staged part's name starts with (`part_name`); None for a name `part_name` does not make."""
    found = STAGED_PART.fullmatch(name.rsplit("/", 1)[-1])
    return found.group(1) if found else None


def published_name(source: str, chunk: int) -> str:
    """The captions/ part of a shard's samples at positions [chunk * rows_per_file, (chunk + 1) * rows_per_file):
    the same samples always go to the same part, whichever attempt publishes them."""
    return f"part-{shard_id(source)}-{chunk:05d}.parquet"


def read_part(handle: Any, columns: list[str], optional: dict[str, pa.DataType] | None = None) -> pa.Table:
    """Some columns of one Parquet part; a column added after the part was written (ADDED_COLUMNS), or one of
    `optional`, reads as nulls where the part lacks it; any other missing one is an error, as pyarrow's
    read_table raises it."""
    part = pq.ParquetFile(handle)
    present = part.schema_arrow.names
    added = ADDED_COLUMNS | (optional or {})
    missing = [name for name in columns if name not in present and name not in added]
    if missing:
        raise pa.ArrowInvalid(f"no column {missing[0]!r} in this part (it has {', '.join(present)})")
    # use_threads=False: pyarrow's threaded reads from Python file objects can abort at exit
    return with_added_columns(part.read(columns=[name for name in columns if name in present], use_threads=False),
                              columns, added)
