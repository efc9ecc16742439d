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

Formats: one module each (`webdataset`, `parquet`, `folders`), registered in READERS; `specs` expands
`--input` into shards, `records` holds what every reader shares."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterator

from pipeline.io.retry import ATTEMPTS, TransientIOError, backoff, is_transient
from pipeline.io.sources.folders import read_folder, read_image_file
from pipeline.io.sources.parquet import DEFAULT_KEY_COLUMN, read_parquet
from pipeline.io.sources.records import (
    FOLDER,
    PARQUET,
    WEBDATASET,
    InputError,
    Shard,
    record_metadata,
    reference_captions,
    sample_record,
    text_list,
)
from pipeline.io.sources.specs import expand_inputs
from pipeline.io.sources.webdataset import read_tar

log = logging.getLogger(__name__)

# shard kind -> reader(shard, image_column, key_column)
READERS: dict[str, Callable[[Shard, str | None, str], Iterator[dict]]] = {
    WEBDATASET: lambda shard, image_column, key_column: read_tar(shard.url),
    PARQUET: read_parquet,
    FOLDER: lambda shard, image_column, key_column: read_folder(shard.url),
}


def read_samples(shard: Shard, image_column: str | None = None, key_column: str = DEFAULT_KEY_COLUMN,
                 attempts: int = ATTEMPTS) -> Iterator[dict]:
    """Stream the sample records of one shard (schema in the module docstring). Memory stays bounded by
    one tar member, one Parquet row group, or one folder listing. A read that fails for a transient reason
    starts the shard again, skipping the records already yielded; past `attempts` it raises TransientIOError
    (the shard is then not finished: the next run reads it again)."""
    reader = READERS.get(shard.kind)
    if reader is None:
        raise ValueError(f"unknown shard kind {shard.kind!r}")
    yielded = 0
    for attempt in range(attempts):
        try:
            for record in itertools.islice(reader(shard, image_column, key_column), yielded, None):
                yield record
                yielded += 1
            return
        except Exception as exc:
            if not is_transient(exc):
                raise
            if attempt == attempts - 1:
                raise TransientIOError(f"reading {shard.url} failed {attempts} times, after {yielded} samples: "
                                       f"{exc}") from exc
            wait = backoff(attempt)
            log.warning("reading %s failed after %d samples (%s); reading it again in %.1f s", shard.url, yielded,
                        exc, wait)
            time.sleep(wait)


def count_samples(shards: list[Shard], at_most: int, image_column: str | None = None,
                  key_column: str = DEFAULT_KEY_COLUMN) -> int | None:
    """How many records `shards` hold, where they are all local and hold at most `at_most`: counted by reading
    them (a small local input, read twice, costs milliseconds more); None for remote shards or more records."""
    if any("://" in shard.url for shard in shards):
        return None
    count = 0
    try:
        for shard in shards:
            for _ in read_samples(shard, image_column, key_column, attempts=1):
                count += 1
                if count > at_most:
                    return None
    except Exception:  # the run's own read reports it; a count is only a hint
        return None
    return count


__all__ = ["FOLDER", "PARQUET", "READERS", "WEBDATASET", "InputError", "Shard", "count_samples", "expand_inputs",
           "read_image_file", "read_samples", "record_metadata", "reference_captions", "sample_record", "text_list"]
