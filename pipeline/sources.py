"""Input side of the pipeline: `--input` specs -> shards, and shards -> sample records.

`expand_inputs` only lists and validates (it reads nothing but Parquet footers), so bad usage fails
before any work starts. `read_samples` streams one shard; bad data never raises there: it becomes a
record whose `status` names the problem. Each record is a dict with exactly these keys:

    key            str          WebDataset key, Parquet key column (else "<file>/<row>", the file's path
                                relative to the run's Parquet files' common folder, without .parquet),
                                or the path relative to a folder input
    source         str          the shard's URL (for folders: the folder's URL)
    image          bytes|None   the encoded image, None when there is none
    original_text  str|None     KEY.txt, a `caption`/`text` column, or a sibling .txt file
    meta           str|None     KEY.json text (tar, or a sibling .json file in folders)
    status         str          "ok" or an error kind (see below)
    error          str|None     one line, None when status is "ok"

Error kinds: "no_image" (sample without image), "unsupported" (Parquet image column of a type we
cannot read; a folder entry that is a device or FIFO; a tar image member that is a link), "too_large"
(an image file over MAX_IMAGE_BYTES or a txt/json over MAX_TEXT_BYTES, never read), "split_sample" (a
tar key whose members are not contiguous), "read_error" (one file of a folder could not be read), and
three shard-level kinds with key "<shard url>#<kind>" so they stay unique in a run: "unreadable_shard"
(not a tar / not a Parquet file / cannot be opened), "truncated_shard" (tar cut or corrupt after its
start; the complete samples before are yielded) and "trailing_data" (more data after the tar's
end-of-archive blocks, as `cat a.tar b.tar` makes: tar readers stop at the first end, so it is reported).
A tar member repeated within one sample (a second KEY.jpg) starts a sample of its own under the same key,
which the run then marks as a duplicate key. Hidden files (".x", macOS "._x", "__MACOSX/") are not samples.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import lzma
import os
import posixpath
import re
import tarfile
import unicodedata
import zlib
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from braceexpand import UnbalancedBracesError, braceexpand
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from pipeline.text import decode_text, describe_error, one_line, storable

WEBDATASET, PARQUET, FOLDER = "webdataset", "parquet", "folder"

# Lower-case extensions taken as images; when one key has several (KEY.jpg and KEY.png) the first in
# this order wins, so the choice does not depend on member order inside the tar. HEIC/HEIF (iPhone photos)
# cannot be decoded, but they are samples: each becomes a row saying so rather than vanishing from a folder.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "avif", "gif", "bmp", "tif", "tiff", "ppm", "pgm", "pbm", "pnm",
                    "heic", "heif")
# "r|*" decompresses gzip, bzip2 and xz transparently, so compressed WebDataset shards work as well.
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
# jpg: img2dataset; image: Hugging Face datasets; png/webp: img2dataset with another --encode_format.
DEFAULT_IMAGE_COLUMNS = ("jpg", "image", "png", "webp", "jpeg")
DEFAULT_KEY_COLUMN = "key"
HF_KEY_COLUMN = "__key__"  # Hugging Face datasets' webdataset loader keeps each sample's key there
# Matched in any case (LAION's parquet says TEXT); a list of strings (Hugging Face datasets' "captions",
# "sentences") gives every caption as a reference, as KEY.json's "captions" does, and its first as the text.
TEXT_COLUMNS = ("caption", "text", "captions", "sentences", "txt")  # txt: a KEY.txt loaded by datasets
DOWNLOAD_ERROR_COLUMN = "error_message"  # img2dataset's reason for a failed download, quoted in no_image rows
# Files above these sizes are never read, so a hostile multi-gigabyte member cannot fill a reader's memory:
# an uncompressed 100 MP RGB image (ImageSpec's pixel limit) is 300 MB; LAION's json is a few KB.
MAX_IMAGE_BYTES = 320 << 20
MAX_TEXT_BYTES = 4 << 20
# Rows are images (10 KB - 1 MB each): small batches keep the reader's memory flat.
PARQUET_BATCH_ROWS = 64

_GLOB_CHARS = re.compile(r"[*?\[]")
# Same rule as webdataset 1.0.2 `tariterators.base_plus_ext`: the key is the member path up to the
# first dot of its basename (directory prefix kept), the suffix is everything after that dot.
_KEY_RULE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_IMAGE_RANK = {ext: rank for rank, ext in enumerate(IMAGE_EXTENSIONS)}
_NO_IMAGE_RANK = 2 * len(IMAGE_EXTENSIONS)  # worse than any plain (KEY.jpg) or dotted (KEY.x.jpg) image suffix
_SCAN_CHUNK = 1 << 16


class InputError(ValueError):
    """Bad `--input` usage found before any work starts; the message is one line naming the spec or path."""


@dataclass(frozen=True)
class Shard:
    """One unit of reading: a tar, a Parquet file, or a whole image folder."""

    url: str  # local absolute path, or a fully qualified fsspec URL; what `fsspec.open` is given
    kind: str  # WEBDATASET | PARQUET | FOLDER
    # Parquet rows without a key are "<name>/<row>": the path below the run's Parquet files' common
    # folder, so 0000.parquet in train/ and in test/ (Hugging Face's layout) give different keys.
    name: str = ""


# --------------------------------------------------------------------------------------------------
# --input specs -> shards


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


def _image_column(schema: pa.Schema, image_column: str | None, url: str) -> str:
    """The image column's name; InputError when it is missing or of a type we cannot read."""
    if image_column is not None and image_column not in schema.names:
        raise InputError(f"image column {image_column!r} not found in {url} (columns: {_names(schema)})")
    name = image_column or next((c for c in DEFAULT_IMAGE_COLUMNS if c in schema.names), None)
    if name is None:
        raise InputError(f"no image column in {url}: expected one of {', '.join(DEFAULT_IMAGE_COLUMNS)}, or name one "
                         f"with --image-column (columns: {_names(schema)})")
    column_type = schema.field(name).type
    if pa.types.is_dictionary(column_type):  # to_pylist() gives the values
        column_type = column_type.value_type
    # null: the type pandas gives a column whose every value is None (a shard of only failed downloads)
    if not _is_bytes(column_type) and not pa.types.is_null(column_type) and not (
            pa.types.is_struct(column_type) and column_type.get_field_index("bytes") >= 0
            and _is_bytes(column_type.field("bytes").type)):
        raise InputError(f"image column {name!r} in {url} has type {column_type}; "
                         "expected binary or struct<bytes: binary, path: string>")
    return name


def _is_bytes(column_type: pa.DataType) -> bool:
    return pa.types.is_binary(column_type) or pa.types.is_large_binary(column_type) or \
        pa.types.is_binary_view(column_type)


def _names(schema: pa.Schema, limit: int = 12) -> str:
    names = schema.names
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


# --------------------------------------------------------------------------------------------------
# shards -> sample records


def read_samples(shard: Shard, image_column: str | None = None,
                 key_column: str = DEFAULT_KEY_COLUMN) -> Iterator[dict]:
    """Stream the sample records of one shard (schema in the module docstring). Memory stays bounded by
    one tar member, one Parquet row group, or one folder listing."""
    if shard.kind == WEBDATASET:
        return _read_tar(shard.url)
    if shard.kind == PARQUET:
        return _read_parquet(shard, image_column, key_column)
    if shard.kind == FOLDER:
        return _read_folder(shard.url)
    raise ValueError(f"unknown shard kind {shard.kind!r}")


def sample_record(key: str, source: str, image: bytes | None = None, original_text: str | None = None,
                  meta: str | None = None, status: str = "ok", error: str | None = None) -> dict:
    """A record of the shape the module docstring gives."""
    return {"key": key, "source": source, "image": image, "original_text": original_text, "meta": meta,
            "status": status, "error": None if error is None else one_line(error)}


def _shard_error(url: str, status: str, error: str) -> dict:
    return sample_record(f"{url}#{status}", url, status=status, error=error)


class _TrackingTarFile(tarfile.TarFile):
    """tarfile ends iteration silently when a header after the first member is cut short or garbled,
    exactly as for a proper end-of-archive block. `end_error` keeps the header error that ended the
    iteration, so a truncated shard is reported instead of silently read as a shorter one."""

    end_error: tarfile.HeaderError | None = None


class _TrackingTarInfo(tarfile.TarInfo):
    @classmethod
    def fromtarfile(cls, tar: _TrackingTarFile) -> tarfile.TarInfo:  # type: ignore[override]
        try:
            return super().fromtarfile(tar)
        except tarfile.HeaderError as exc:
            tar.end_error = exc
            raise


class _TarSample:
    """The members of one key, holding only what a record needs (one image, txt, json)."""

    def __init__(self, key: str, split: bool) -> None:
        self.key = key
        self.split = split  # the key was already seen earlier in this tar
        self.suffixes: list[str] = []
        self.image_rank = _NO_IMAGE_RANK
        self.image: bytes | None = None
        self.text: bytes | None = None
        self.meta: bytes | None = None
        self.too_large: str | None = None
        self.not_a_file: str | None = None  # an image member that is a link or device: never followed

    def repeats(self, suffix: str) -> bool:
        return suffix in self.suffixes

    def add(self, suffix: str, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        self.suffixes.append(suffix)
        if self.split:
            return
        rank = _image_rank(suffix)
        if not member.isfile():
            if rank is not None and self.not_a_file is None:
                kind = "a symbolic link" if member.issym() else "a hard link" if member.islnk() else "not a file"
                self.not_a_file = f"{member.name} is {kind} in the tar; links are not followed"
            return
        # Members are read only when used; a repeated suffix keeps the first copy.
        if not ((rank is not None and rank < self.image_rank) or (suffix == "txt" and self.text is None)
                or (suffix == "json" and self.meta is None)):
            return
        too_large = _over_limit(f"{self.key}.{suffix}", member.size, image=rank is not None)
        if too_large:
            self.too_large = self.too_large or too_large
            return
        data = _member_bytes(tar, member)
        if rank is not None:
            self.image, self.image_rank = data, rank
        elif suffix == "txt":
            self.text = data
        else:
            self.meta = data

    def record(self, url: str) -> dict:
        found = ", ".join(self.suffixes)
        if self.split:
            return sample_record(self.key, url, status="split_sample",
                           error=f"members of key {self.key!r} are not contiguous in the tar; this later group "
                                 f"({found}) was not merged with the earlier one")
        # `echo caption > KEY.txt` ends in \n; bytes no encoding reads are U+FFFD, the row stays ok (its image is)
        text = None if self.text is None else decode_text(self.text).strip()
        meta = None if self.meta is None else decode_text(self.meta)
        if self.too_large:
            return sample_record(self.key, url, original_text=text, meta=meta, status="too_large", error=self.too_large)
        if self.image is None and self.not_a_file:
            return sample_record(self.key, url, original_text=text, meta=meta, status="unsupported",
                                 error=self.not_a_file)
        if self.image is None:
            return sample_record(self.key, url, original_text=text, meta=meta, status="no_image",
                           error=f"no image member for key {self.key!r} (members: {found})")
        return sample_record(self.key, url, image=self.image, original_text=text, meta=meta)


def _member_bytes(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    data = tar.extractfile(member)
    assert data is not None  # only regular files get here
    return data.read()


def _read_tar(url: str) -> Iterator[dict]:
    with contextlib.ExitStack() as stack:
        try:
            raw = stack.enter_context(fsspec.open(url, "rb"))
            tar = stack.enter_context(_TrackingTarFile.open(fileobj=raw, mode="r|*", tarinfo=_TrackingTarInfo))
        except (tarfile.TarError, EOFError, OSError) as exc:
            yield _shard_error(url, "unreadable_shard", f"not a readable tar file: {exc}")
            return
        yield from _tar_samples(tar, url)


def _tar_samples(tar: _TrackingTarFile, url: str) -> Iterator[dict]:
    """Group consecutive members by key (webdataset's rule). Only the current sample is held in memory;
    the set of keys already seen is kept so that a key reappearing later is reported, not merged."""
    sample: _TarSample | None = None
    seen: set[str] = set()
    complete = 0
    problem: str | None = None
    try:
        while (member := tar.next()) is not None:
            tar.members = []  # stream mode still appends every TarInfo to .members: drop them, memory stays flat
            key, suffix = _split_key(member.name)
            if key is None or suffix is None or member.isdir() or _hidden(member.name):
                continue
            suffix = suffix.lower()
            # a repeated member (a second KEY.jpg right after the first) starts a sample of its own
            if sample is None or key != sample.key or sample.repeats(suffix):
                repeated = sample is not None and key == sample.key
                if sample is not None:
                    yield sample.record(url)
                    complete += 1
                sample = _TarSample(key, split=key in seen and not repeated)
                seen.add(key)
            sample.add(suffix, tar, member)
    except (tarfile.TarError, EOFError, OSError) as exc:
        problem = str(exc)
    else:
        if isinstance(tar.end_error, tarfile.EmptyHeaderError):
            problem = "the archive ends without its end-of-archive blocks"
        elif not isinstance(tar.end_error, tarfile.EOFHeaderError):
            problem = f"bad header: {tar.end_error}"
    if problem is None:
        if sample is not None:
            yield sample.record(url)
        if _data_follows(tar):
            yield _shard_error(url, "trailing_data", "more data follows the tar's end-of-archive blocks (tars joined "
                                                     "with cat?); tar readers stop there, so it was not read")
        return
    # The sample being read when the data ended may be missing members, so it is not yielded as ok.
    dropped = f"; incomplete sample {sample.key!r} skipped" if sample is not None else ""
    yield _shard_error(url, "truncated_shard", f"tar is cut or corrupt after {complete} complete samples: "
                                               f"{problem}{dropped}")


def _data_follows(tar: tarfile.TarFile) -> bool:
    """Whether anything but zero padding follows the end-of-archive blocks (read until it does): in the tar
    stream, or for a compressed tar, after its compressed stream (a second one joined with cat), which
    tarfile's stream never returns."""
    stream = tar.fileobj
    decompressor = getattr(stream, "cmp", None)
    try:
        if decompressor is None:  # an uncompressed tar
            return _not_zeros(iter(lambda: stream.read(_SCAN_CHUNK), b""))
        raw_rest = iter(lambda: stream.fileobj.read(_SCAN_CHUNK), b"")
        # fed by hand: once its stream ends, tarfile's read would take the rest of the file into memory
        decompressed, stream.dbuf, raw, stream.buf = stream.dbuf, b"", stream.buf, b""
        while not decompressor.eof:
            if decompressed.strip(b"\0"):
                return True
            raw = raw or next(raw_rest, b"")
            if not raw:
                return False  # cut after the archive's end: nothing is lost
            decompressed, raw = decompressor.decompress(raw), b""
        after = decompressor.unused_data + raw
        if stream.comptype == "gz":  # tarfile inflates raw deflate data: gzip's 8-byte trailer is left over too
            while len(after) < 8 and (more := next(raw_rest, b"")):
                after += more
            after = after[8:]
        return _not_zeros(itertools.chain((decompressed, after), raw_rest))
    except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError):  # a damaged tail after the end
        return False


def _not_zeros(chunks: Iterable[bytes]) -> bool:
    """Whether any chunk holds a byte other than zero padding (reading no further than that chunk)."""
    return any(chunk.strip(b"\0") for chunk in chunks)


def read_image_file(url: str, key: str, source: str, meta: str | None = None) -> dict:
    """The record of one image file named by path or URL (by a caption file), with the folder reader's
    checks: read_error when it cannot be read, unsupported when it is no regular file (a FIFO would be
    read forever), too_large over MAX_IMAGE_BYTES (never read)."""
    try:
        fs, path = url_to_fs(url)
        info = fs.info(path)
        kind = _file_type(fs, info)
        if kind == "file" and not (too_large := _over_limit(url, info.get("size") or 0, image=True)):
            return sample_record(key, source, image=fs.cat_file(path), meta=meta)
    except (OSError, ValueError) as exc:  # ValueError: a URL of an unknown protocol
        return sample_record(key, source, meta=meta, status="read_error", error=f"cannot read {url}: {exc}")
    if kind != "file":
        return sample_record(key, source, meta=meta, status="unsupported", error=f"not a regular file: {url}")
    return sample_record(key, source, meta=meta, status="too_large", error=too_large)


def _file_type(fs: fsspec.AbstractFileSystem, info: dict[str, Any]) -> str:
    """A listing entry's type, of its target for a link (a broken one raises OSError). The listing already
    gives a link its target's size."""
    if info.get("islink"):
        return fs.info(info["name"]).get("type")  # a path (not a directory entry): LocalFileSystem follows links
    return info.get("type")


def _hidden(name: str) -> bool:
    """Hidden files and macOS archive litter ("._x.jpg" resource forks, "__MACOSX/"): not samples."""
    return any((part.startswith(".") and part not in (".", "..")) or part == "__MACOSX" for part in name.split("/"))


def _image_rank(suffix: str) -> int | None:
    """The preference of an image suffix (lower first): KEY.jpg by IMAGE_EXTENSIONS, then a dotted suffix
    (KEY.x.jpg: webdataset's key ends at the first dot) by its last extension; None when not an image."""
    if suffix in _IMAGE_RANK:
        return _IMAGE_RANK[suffix]
    last = suffix.rsplit(".", 1)[-1]
    return len(IMAGE_EXTENSIONS) + _IMAGE_RANK[last] if last in _IMAGE_RANK else None


def _split_key(name: str) -> tuple[str | None, str | None]:
    match = _KEY_RULE.match(name)
    if not match:
        return None, None
    return storable(match.group(1)), match.group(2)


def _read_parquet(shard: Shard, image_column: str | None, key_column: str) -> Iterator[dict]:
    url = shard.url
    with contextlib.ExitStack() as stack:
        try:
            parquet = pq.ParquetFile(stack.enter_context(fsspec.open(url, "rb")))
        except (OSError, pa.ArrowException) as exc:
            yield _shard_error(url, "unreadable_shard", f"not a readable parquet file: {exc}")
            return
        yield from _parquet_samples(parquet, url, shard.name or posixpath.basename(url)[: -len(".parquet")],
                                    image_column, key_column)


def _parquet_samples(parquet: pq.ParquetFile, url: str, name: str, image_column: str | None,
                     key_column: str) -> Iterator[dict]:
    schema = parquet.schema_arrow
    unsupported: str | None = None
    try:
        image_field: str | None = _image_column(schema, image_column, url)
    except InputError as exc:  # expand_inputs checks this up front; here it is data, so one status per row
        image_field, unsupported = None, str(exc)
    # no key column named: datasets' WebDataset loader's __key__ stands in for the default one
    key_names = (key_column, HF_KEY_COLUMN) if key_column == DEFAULT_KEY_COLUMN else (key_column,)
    key_field = next((name for name in key_names if name in schema.names), None)
    text_field = next((name for wanted in TEXT_COLUMNS for name in schema.names if name.lower() == wanted), None)
    reason_field = DOWNLOAD_ERROR_COLUMN if DOWNLOAD_ERROR_COLUMN in schema.names else None
    columns = list(dict.fromkeys(c for c in (image_field, key_field, text_field, reason_field) if c is not None))
    row = 0
    try:
        # Only the needed columns are read, one batch (within one row group) at a time.
        for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns):
            n = batch.num_rows
            images = batch.column(image_field).to_pylist() if image_field else [None] * n
            keys = batch.column(key_field).to_pylist() if key_field else [None] * n
            texts = batch.column(text_field).to_pylist() if text_field else [None] * n
            reasons = batch.column(reason_field).to_pylist() if reason_field else [None] * n
            for image, key, text, reason in zip(images, keys, texts, reasons, strict=True):
                key_text = _key_text(key) or f"{name}/{row}"
                original_text, meta = _text_cell(text)
                row += 1
                if unsupported is not None:
                    yield sample_record(key_text, url, original_text=original_text, meta=meta, status="unsupported",
                                        error=unsupported)
                    continue
                data, missing = _image_value(image, image_field)
                if data is None:
                    missing += f" ({DOWNLOAD_ERROR_COLUMN}: {reason})" if reason else ""
                    yield sample_record(key_text, url, original_text=original_text, meta=meta, status="no_image",
                                        error=missing)
                else:
                    yield sample_record(key_text, url, image=data, original_text=original_text, meta=meta)
    except (OSError, pa.ArrowException) as exc:
        yield _shard_error(url, "unreadable_shard", f"parquet read failed after {row} rows: {exc}")


def _image_value(value: Any, column: str | None) -> tuple[bytes | None, str | None]:
    """Image bytes from a binary cell or a Hugging Face Image struct, else (None, why)."""
    if isinstance(value, dict):  # {"bytes": ..., "path": ...}
        if value.get("bytes") is not None:
            return value["bytes"], None
        if value.get("path"):
            return None, f"image in column {column!r} is not embedded (path {value['path']!r})"
        return None, f"image column {column!r} is null"
    if value is None:
        return None, f"image column {column!r} is null"
    return value, None


def _read_folder(url: str) -> Iterator[dict]:
    fs, root = url_to_fs(url)
    root = root.rstrip("/")
    listing = fs.find(root, detail=True)  # the one listing; everything below streams file by file
    for path in sorted(listing):
        relative = path[len(root):].lstrip("/")
        if not _image_extension(relative) or _hidden(relative):
            continue  # hidden files (macOS "._x.jpg", ".thumbnails/") are not samples
        key, stem = storable(relative), path.rsplit(".", 1)[0]
        text_path, meta_path = (next((stem + s for s in (suffix, suffix.upper()) if stem + s in listing), None)
                                for suffix in (".txt", ".json"))
        files = {name: listing[name] for name in (path, text_path, meta_path) if name is not None}
        try:
            # a device or FIFO named like an image (a link to /dev/zero) would be read forever; links to
            # files are followed (a Hugging Face hub snapshot's files are links into its blob store)
            special = next((name for name, info in files.items() if _file_type(fs, info) != "file"), None)
        except OSError as exc:
            yield sample_record(key, url, status="read_error", error=f"cannot read {path}: {exc}")
            continue
        if special is not None:
            yield sample_record(key, url, status="unsupported", error=f"not a regular file: {special}")
            continue
        too_large = next((reason for name, info in files.items()
                          if (reason := _over_limit(name, info.get("size") or 0, image=name == path))), None)
        if too_large:
            yield sample_record(key, url, status="too_large", error=too_large)
            continue
        try:
            image = fs.cat_file(path)
            text = None if text_path is None else decode_text(fs.cat_file(text_path)).strip()
            meta = None if meta_path is None else decode_text(fs.cat_file(meta_path))
        except OSError as exc:
            yield sample_record(key, url, status="read_error", error=f"cannot read {path}: {exc}")
            continue
        yield sample_record(key, url, image=image, original_text=text, meta=meta)


def record_metadata(record: dict) -> dict[str, Any]:
    """A record's KEY.json as a dict; {} when there is none or it is not a JSON object (absurdly deep
    nesting included: it raises RecursionError, not a decode error)."""
    try:
        meta = json.loads(record["meta"]) if record.get("meta") else {}
    except (json.JSONDecodeError, RecursionError):
        return {}
    return meta if isinstance(meta, dict) else {}


def text_list(value: Any) -> list[str]:
    """The non-empty strings of a metadata list ("captions", "negatives"), in NFC as generated captions
    are; [] for anything else. JSON may spell lone surrogates ("\\ud800"), which no tokenizer or Arrow
    column takes: replaced."""
    if not isinstance(value, list):
        return []
    return [unicodedata.normalize("NFC", storable(item)) for item in value if isinstance(item, str) and item.strip()]


def reference_captions(record: dict, meta: dict[str, Any]) -> list[str]:
    """A sample's reference captions: its KEY.json "captions", else its own text (KEY.txt, a caption column)."""
    return text_list(meta.get("captions")) or text_list([record.get("original_text")])


# --------------------------------------------------------------------------------------------------
# small helpers


def _over_limit(name: str, size: int, image: bool) -> str | None:
    limit = MAX_IMAGE_BYTES if image else MAX_TEXT_BYTES
    return f"{name} is {size:,} bytes, over the limit of {limit:,}; not read" if size > limit else None


def _image_extension(name: str) -> str | None:
    extension = name.rsplit(".", 1)[-1].lower() if "." in name else ""
    return extension if extension in _IMAGE_RANK else None


def _text_cell(value: Any) -> tuple[str | None, str | None]:
    """A Parquet caption cell -> (original_text, meta): a list of strings is every reference."""
    if value is None:
        return None, None
    if isinstance(value, list):
        references = text_list(value)
        return (references[0], json.dumps({"captions": references}, ensure_ascii=False)) if references else (None, None)
    return _as_text(value).strip(), None


def _as_text(value: Any) -> str:
    return decode_text(value) if isinstance(value, bytes) else str(value)


def _key_text(value: Any) -> str | None:
    """A key cell as text; None for a missing one (null, NaN). Whole floats lose their ".0": pandas
    stores an integer key column with a missing value as float64."""
    if value is None or (isinstance(value, float) and value != value):
        return None
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return storable(_as_text(value))
