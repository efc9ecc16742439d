"""Output side: atomic Parquet parts, the staging area that makes runs resumable, and the final
captions/ + filtered/ + run.json.

Layout of an output directory (local path or any fsspec URL):
  _staging/config.json   what defines this run's rows; a resume must match it
  _staging/part-*.parquet   model-stage output, one file per written block, each written atomically
  captions/part-*.parquet   every input row exactly once, with `keep`
  filtered/part-*.parquet   the kept rows
  run.json               written last: the commit record of a finished run

A part's name is a hash of its keys, so a retried write replaces its own file instead of adding a
duplicate; files are written under a hidden temporary name and renamed, so a reader never sees a
half-written file (on object stores a single PUT is atomic and readers skip the hidden names).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

STAGING = "_staging"
CAPTIONS = "captions"
FILTERED = "filtered"
RUN_JSON = "run.json"
STAGING_CONFIG = "config.json"
_TMP_PREFIX = "._tmp-"


class OutputDir:
    """An output directory on any fsspec filesystem."""

    def __init__(self, url: str):
        self.fs, self.root = fsspec.core.url_to_fs(url)
        self.root = self.root.rstrip("/")
        self.url = url

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.path(*parts))

    def is_file(self) -> bool:
        return self.fs.isfile(self.root)

    def is_empty(self) -> bool:
        return not self.fs.exists(self.root) or not self.fs.ls(self.root)

    def parts(self, folder: str) -> list[str]:
        """Committed Parquet files of a folder, sorted (temporary files are never listed)."""
        if not self.exists(folder):
            return []
        names = self.fs.glob(self.path(folder, "*.parquet"))
        return sorted(name for name in names if not name.rsplit("/", 1)[-1].startswith(_TMP_PREFIX))

    def read_json(self, *parts: str) -> dict[str, Any] | None:
        if not self.exists(*parts):
            return None
        with self.fs.open(self.path(*parts), "rb") as handle:
            return json.loads(handle.read().decode("utf-8"))

    def write_json(self, data: dict[str, Any], *parts: str) -> None:
        text = json.dumps(data, indent=2, ensure_ascii=False, default=str)
        self._atomic_write(self.path(*parts), lambda handle: handle.write(text.encode("utf-8")))

    def write_parquet(self, table: pa.Table, *parts: str) -> str:
        path = self.path(*parts)
        self._atomic_write(path, lambda handle: pq.write_table(table, handle, compression="zstd"))
        return path

    def remove(self, *parts: str) -> None:
        if self.exists(*parts):
            self.fs.rm(self.path(*parts), recursive=True)

    def clean_temporaries(self) -> int:
        """Delete temporary files left by writers that were killed mid-write."""
        stale = [p for p in self.fs.glob(self.path("**", _TMP_PREFIX + "*")) if self.fs.isfile(p)]
        for path in stale:
            self.fs.rm(path)
        return len(stale)

    def _atomic_write(self, path: str, write) -> None:
        folder, name = path.rsplit("/", 1)
        self.fs.makedirs(folder, exist_ok=True)
        temporary = f"{folder}/{_TMP_PREFIX}{uuid.uuid4().hex}-{name}"
        try:
            with self.fs.open(temporary, "wb") as handle:
                write(handle)
            self.fs.mv(temporary, path)
        finally:
            if self.fs.exists(temporary):
                self.fs.rm(temporary)


def part_name(keys: list[str]) -> str:
    """Content-derived name: the same rows always get the same file name."""
    digest = hashlib.sha256("\0".join(sorted(keys)).encode("utf-8")).hexdigest()[:20]
    return f"part-{digest}.parquet"


def read_columns(output: OutputDir, folder: str, columns: list[str]) -> pa.Table | None:
    """Some columns of every committed part of a folder, concatenated (None when there is none)."""
    tables = []
    for path in output.parts(folder):
        with output.fs.open(path, "rb") as handle:
            # use_threads=False: pyarrow's threaded reads from Python file objects can abort at exit
            tables.append(pq.read_table(handle, columns=columns, use_threads=False))
    return pa.concat_tables(tables) if tables else None
