"""Parquet files of image bytes (img2dataset, Hugging Face datasets, LAION) -> sample records, a batch of
rows at a time."""

from __future__ import annotations

import contextlib
import posixpath
from collections.abc import Iterator
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.io.sources.records import (
    InputError,
    Shard,
    _key_text,
    _shard_error,
    _text_cell,
    raise_if_transient,
    sample_record,
)

# jpg: img2dataset; image: Hugging Face datasets; png/webp: img2dataset with another --encode_format.
DEFAULT_IMAGE_COLUMNS = ("jpg", "image", "png", "webp", "jpeg")


DEFAULT_KEY_COLUMN = "key"


HF_KEY_COLUMN = "__key__"  # Hugging Face datasets' webdataset loader keeps each sample's key there


# Matched in any case (LAION's parquet says TEXT); a list of strings (Hugging Face datasets' "captions",
# "sentences") gives every caption as a reference, as KEY.json's "captions" does, and its first as the text.
TEXT_COLUMNS = ("caption", "text", "captions", "sentences", "txt")  # txt: a KEY.txt loaded by datasets


DOWNLOAD_ERROR_COLUMN = "error_message"  # img2dataset's reason for a failed download, quoted in no_image rows


# Rows are images (10 KB - 1 MB each): small batches keep the reader's memory flat.
PARQUET_BATCH_ROWS = 64


def read_parquet(shard: Shard, image_column: str | None, key_column: str) -> Iterator[dict]:
    url = shard.url
    with contextlib.ExitStack() as stack:
        try:
            parquet = pq.ParquetFile(stack.enter_context(fsspec.open(url, "rb")))
        except (OSError, pa.ArrowException) as exc:
            raise_if_transient(exc, url)
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
        raise_if_transient(exc, url)
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
