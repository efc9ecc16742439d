"""`--input` specs -> shards: paths, globs, brace ranges and fsspec URLs, checked before any work."""

from __future__ import annotations

import os
import posixpath
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from braceexpand import UnbalancedBracesError, braceexpand
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from pipeline.io.sources.parquet import DEFAULT_KEY_COLUMN, _image_column, _names
from pipeline.io.sources.records import FOLDER, PARQUET, WEBDATASET, InputError, Shard, _image_extension
from pipeline.text import describe_error, one_line

# "r|*" decompresses gzip, bzip2 and xz transparently, so compressed WebDataset shards work as well.
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")


_GLOB_CHARS = re.compile(r"[*?\[]")


def expand_inputs(specs: list[str], image_column: str | None = None,
                  key_column: str = DEFAULT_KEY_COLUMN) -> list[Shard]:
    """Expand `--input` specs (path, glob, brace range, fsspec URL) into shards: sorted within each spec,
    specs in the given order, each shard once. Lists and validates only; raises InputError on bad usage.

    A Parquet file without the default key column gets "<name>/<row>" keys; a key column named
    otherwise must be there (a misspelt name would silently give every row such a key).
    """
    if not specs:
        raise InputError("no --input given")
    shards: dict[str, Shard] = {}  # insertion-ordered; the same shard named twice is kept once
    for spec in specs:
        if not spec.strip():  # '' would be the current directory
            raise InputError("empty --input")
        try:
            found = _expand_spec(spec)
        except InputError:
            raise
        except Exception as exc:  # what a storage backend raises: botocore's NoCredentialsError is no OSError
            raise InputError(f"cannot read --input {spec!r}: {describe_error(exc)}") from None
        for shard in sorted(found, key=lambda s: s.url):
            shards.setdefault(shard.url, shard)
    parquet_urls = [s.url for s in shards.values() if s.kind == PARQUET]
    if parquet_urls:
        # One footer read per file; threads hide object-store latency when there are many files.
        with ThreadPoolExecutor(max_workers=min(8, len(parquet_urls))) as pool:
            list(pool.map(lambda url: _check_parquet(url, image_column, key_column), parquet_urls))
        names = _relative_names(parquet_urls)
        shards.update({url: Shard(url, PARQUET, names[url]) for url in parquet_urls})
    return list(shards.values())


def _relative_names(urls: list[str]) -> dict[str, str]:
    """Each URL's path below the URLs' common folder, without its .parquet suffix."""
    parts = [url.split("/") for url in urls]
    common = 0
    while all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    return {url: "/".join(p[common:])[: -len(".parquet")] for url, p in zip(urls, parts, strict=True)}


def _expand_spec(spec: str) -> list[Shard]:
    try:
        items = list(braceexpand(spec))
    except UnbalancedBracesError:
        raise InputError(f"unbalanced braces in --input {spec!r}") from None
    braced = items != [spec]
    listings: dict[str, dict[str, dict[str, Any]]] = {}
    found: list[Shard] = []
    for item in items:
        fs, path = _url_to_fs(item, spec)
        info = _stat(fs, path, listings if braced else None)
        if info is None and _GLOB_CHARS.search(path):
            found.extend(_to_shard(fs, match, match_info)
                         for match, match_info in sorted(fs.glob(path, detail=True).items())
                         if not _hidden_match(path, match))
        elif info is None and braced:
            raise InputError(f"shard missing: {item} (from brace range {spec!r})")
        elif info is None:
            raise InputError(f"no such file or directory: {spec!r}")
        else:
            found.append(_to_shard(fs, path, info))
    if not found:
        raise InputError(f"no file matches {spec!r}")
    return found


def _hidden_match(pattern: str, match: str) -> bool:
    """A glob match below a hidden name (".x", macOS "._shard.tar") that the pattern does not spell out:
    shells and Python's glob skip those, and folder inputs do."""
    prefix = pattern[: _GLOB_CHARS.search(pattern).start()]
    folder = prefix[: prefix.rfind("/") + 1]  # the pattern's folder before its first wildcard
    if any(part.startswith(".") for part in pattern[len(folder):].split("/")):
        return False
    return any(part.startswith(".") for part in match[len(folder):].split("/"))


def _url_to_fs(item: str, spec: str) -> tuple[fsspec.AbstractFileSystem, str]:
    try:
        return url_to_fs(item)
    except (ValueError, ImportError) as exc:  # unknown protocol, or its fsspec backend not installed
        raise InputError(f"cannot open --input {spec!r}: {one_line(exc)}") from None


def _stat(fs: fsspec.AbstractFileSystem, path: str,
          listings: dict[str, dict[str, dict[str, Any]]] | None) -> dict[str, Any] | None:
    """File info, or None when the path does not exist. With `listings`, each parent directory is
    listed once, so a brace range of N shards costs one listing instead of N stat calls on an object
    store; a miss is confirmed with a direct stat before it is reported."""
    if listings is not None:
        parent = posixpath.dirname(path.rstrip("/"))
        if parent not in listings:
            try:
                listings[parent] = {entry["name"].rstrip("/"): entry for entry in fs.ls(parent, detail=True)}
            except (FileNotFoundError, NotADirectoryError):
                listings[parent] = {}
        if path.rstrip("/") in listings[parent]:
            return listings[parent][path.rstrip("/")]
    try:
        return fs.info(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise InputError(f"cannot access {path}: {one_line(exc)}") from None


def _to_shard(fs: fsspec.AbstractFileSystem, path: str, info: dict[str, Any]) -> Shard:
    local = isinstance(fs, LocalFileSystem)
    path = os.path.normpath(path) if local else path.rstrip("/") or "/"  # a/../b and a//b are one shard
    url = path if local else fs.unstrip_protocol(path)
    if info.get("type") == "directory":
        if local and not os.access(path, os.R_OK | os.X_OK):
            raise InputError(f"cannot read directory {url}: permission denied")
        _check_folder(fs, path, url)
        return Shard(url, FOLDER)
    name = path.lower()
    if name.endswith(TAR_SUFFIXES):
        kind = WEBDATASET
    elif name.endswith(".parquet"):
        kind = PARQUET
    else:
        raise InputError(f"unknown input format: {url} (expected .tar, .parquet or a directory of images)")
    if local and not os.access(path, os.R_OK):
        raise InputError(f"cannot read {url}: permission denied")
    return Shard(url, kind)


def _check_folder(fs: fsspec.AbstractFileSystem, path: str, url: str) -> None:
    """A folder input must hold at least one image; the walk is lazy and stops at the first one."""
    shard_files = 0
    for _, dirs, files in fs.walk(path):
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # hidden folders are skipped when reading too
        if any(_image_extension(name) for name in files):
            return
        shard_files += sum(name.lower().endswith((*TAR_SUFFIXES, ".parquet")) for name in files)
    hint = f"; it holds {shard_files} .tar/.parquet files: name them instead, e.g. '{url}/*.tar'" if shard_files else ""
    raise InputError(f"no image files in directory {url}{hint}")


def _check_parquet(url: str, image_column: str | None, key_column: str) -> None:
    try:
        with fsspec.open(url, "rb") as f:
            schema = pq.read_schema(f)
    except (FileNotFoundError, PermissionError) as exc:
        raise InputError(f"cannot read {url}: {one_line(exc)}") from None
    except (OSError, pa.ArrowException):
        return  # a corrupt file is bad data, not bad usage: read_samples reports it as "unreadable_shard"
    except Exception as exc:  # the storage backend's own errors (credentials, network)
        raise InputError(f"cannot read {url}: {describe_error(exc)}") from None
    _image_column(schema, image_column, url)
    if key_column != DEFAULT_KEY_COLUMN and key_column not in schema.names:
        raise InputError(f"key column {key_column!r} not found in {url} (columns: {_names(schema)})")
