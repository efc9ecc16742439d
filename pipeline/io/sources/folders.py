"""Folders of image files (with sibling .txt/.json) -> sample records, one file at a time."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import fsspec
from fsspec.core import url_to_fs

from pipeline.io.retry import retrying
from pipeline.io.sources.records import _hidden, _image_extension, _over_limit, sample_record
from pipeline.text import decode_text, storable


def read_image_file(url: str, key: str, source: str, meta: str | None = None) -> dict:
    """The record of one image file named by path or URL (by a caption file), with the folder reader's
    checks: read_error when it cannot be read, unsupported when it is no regular file (a FIFO would be
    read forever), too_large over MAX_IMAGE_BYTES (never read)."""
    try:
        fs, path = url_to_fs(url)
        info = fs.info(path)
        kind = _file_type(fs, info)
        if kind == "file" and not (too_large := _over_limit(url, info.get("size") or 0, image=True)):
            return sample_record(key, source, image=_cat(fs, path), meta=meta)
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


def read_folder(url: str) -> Iterator[dict]:
    fs, root = url_to_fs(url)
    root = root.rstrip("/")
    # the one listing; everything below streams file by file
    listing = retrying(lambda: fs.find(root, detail=True), f"listing {url}")
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
            image = _cat(fs, path)
            text = None if text_path is None else decode_text(_cat(fs, text_path)).strip()
            meta = None if meta_path is None else decode_text(_cat(fs, meta_path))
        except OSError as exc:
            yield sample_record(key, url, status="read_error", error=f"cannot read {path}: {exc}")
            continue
        yield sample_record(key, url, image=image, original_text=text, meta=meta)


def _cat(fs: fsspec.AbstractFileSystem, path: str) -> bytes:
    """A file's bytes, transient storage errors retried."""
    return retrying(functools.partial(fs.cat_file, path), f"reading {path}")
