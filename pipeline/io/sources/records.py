"""The sample record every reader yields, the shard it comes from, and the rules shared by the readers:
keys and suffixes, size limits, the text a sample carries."""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from typing import Any

from pipeline.io.retry import TransientIOError, is_transient
from pipeline.text import decode_text, one_line, storable

WEBDATASET, PARQUET, FOLDER = "webdataset", "parquet", "folder"


# Lower-case extensions taken as images; when one key has several (KEY.jpg and KEY.png) the first in
# this order wins, so the choice does not depend on member order inside the tar. HEIC/HEIF (iPhone photos)
# cannot be decoded, but they are samples: each becomes a row saying so rather than vanishing from a folder.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "avif", "gif", "bmp", "tif", "tiff", "ppm", "pgm", "pbm", "pnm",
                    "heic", "heif")


# Files above these sizes are never read, so a hostile multi-gigabyte member cannot fill a reader's memory:
# an uncompressed 100 MP RGB image (ImageSpec's pixel limit) is 300 MB; LAION's json is a few KB.
MAX_IMAGE_BYTES = 320 << 20


MAX_TEXT_BYTES = 4 << 20


# Same rule as webdataset 1.0.2 `tariterators.base_plus_ext`: the key is the member path up to the
# first dot of its basename (directory prefix kept), the suffix is everything after that dot.
_KEY_RULE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


_IMAGE_RANK = {ext: rank for rank, ext in enumerate(IMAGE_EXTENSIONS)}


_NO_IMAGE_RANK = 2 * len(IMAGE_EXTENSIONS)  # worse than any plain (KEY.jpg) or dotted (KEY.x.jpg) image suffix


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


def raise_if_transient(exc: BaseException, url: str) -> None:
    """A read that failed for a reason that may pass is not damage: stop reading the shard (read_samples tries
    it again) instead of recording it as unreadable or truncated."""
    if is_transient(exc):
        raise TransientIOError(f"reading {url}: {type(exc).__name__}: {exc}") from exc


def sample_record(key: str, source: str, image: bytes | None = None, original_text: str | None = None,
                  meta: str | None = None, status: str = "ok", error: str | None = None) -> dict:
    """A record of the shape the module docstring gives."""
    return {"key": key, "source": source, "image": image, "original_text": original_text, "meta": meta,
            "status": status, "error": None if error is None else one_line(error)}


def _shard_error(url: str, status: str, error: str) -> dict:
    return sample_record(f"{url}#{status}", url, status=status, error=error)


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


def _over_limit(name: str, size: int, image: bool) -> str | None:
    limit = MAX_IMAGE_BYTES if image else MAX_TEXT_BYTES
    return f"{name} is {size:,} bytes, over the limit of {limit:,}; not read" if size > limit else None


def _image_extension(name: str) -> str | None:
    extension = name.rsplit(".", 1)[-1].lower() if "." in name else ""
    return extension if extension in _IMAGE_RANK else None


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
