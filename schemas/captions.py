"""The schema of captions/*.parquet and filtered/*.parquet (docs/output-format.md, "Columns")."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

CANDIDATE_TYPE = pa.struct([("caption", pa.string()), ("clip_score", pa.float32())])
METADATA_KEY = b"captioner"
NOT_NULL = ("key", "source", "status", "keep")


class SchemaError(ValueError):
    """A table does not match the output schema; the message names the column."""


def captions_schema(embedding_dim: int, metadata_json: str | None = None) -> pa.Schema:
    """The exact output schema; `metadata_json` goes into the schema metadata under 'captioner'."""
    fields = [
        pa.field("key", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("caption", pa.string()),
        pa.field("clip_score", pa.float32()),
        pa.field("image_embedding", pa.list_(pa.float16(), embedding_dim)),
        pa.field("candidates", pa.list_(CANDIDATE_TYPE)),
        pa.field("keep", pa.bool_(), nullable=False),
        pa.field("original_text", pa.string()),
        pa.field("original_clip_score", pa.float32()),
    ]
    metadata = {METADATA_KEY: metadata_json.encode()} if metadata_json else None
    return pa.schema(fields, metadata=metadata)


# Columns later versions added: parts written before them read as nulls there (a resumed or re-filtered run)
ADDED_COLUMNS = {"original_clip_score": pa.float32()}


def with_added_columns(table: pa.Table, names: list[str], added: dict[str, pa.DataType] = ADDED_COLUMNS,
                       ) -> pa.Table:
    """`table`'s columns `names`, in that order, those of `added` it lacks as nulls."""
    for name in names:
        if name not in table.column_names and name in added:
            table = table.append_column(name, pa.nulls(table.num_rows, added[name]))
    return table.select(names)


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` in `schema`'s column order and types, with the ADDED_COLUMNS it lacks as nulls."""
    return with_added_columns(table, schema.names).cast(schema)


def validate_table(table: pa.Table, embedding_dim: int, captioned: bool = True) -> None:
    """Raise SchemaError unless `table` has exactly the output columns, types and null rules. `captioned` False:
    an output of embeddings only (--embed-only), whose ok rows have neither caption nor clip_score."""
    expected = captions_schema(embedding_dim)
    if table.schema.names != expected.names:
        raise SchemaError(f"columns {table.schema.names} differ from {expected.names}")
    for field in expected:
        column = table.column(field.name)
        if column.type != field.type:
            raise SchemaError(f"column {field.name!r} has type {column.type}, expected {field.type}")
        if field.name in NOT_NULL and column.null_count:
            raise SchemaError(f"column {field.name!r} has {column.null_count} nulls")
    ok = pc.equal(table.column("status"), "ok")
    for name in ("caption", "clip_score", "image_embedding") if captioned else ("image_embedding",):
        missing = pc.sum(pc.and_(ok, pc.is_null(table.column(name)))).as_py() or 0
        if missing:
            raise SchemaError(f"{missing} rows with status 'ok' have no {name}")
    failed_with_caption = pc.and_(pc.invert(ok), pc.is_valid(table.column("caption")))
    if pc.sum(failed_with_caption).as_py():
        raise SchemaError("failed rows must have a null caption")
    if not captioned and (table.column("caption").null_count < table.num_rows
                          or table.column("clip_score").null_count < table.num_rows):
        raise SchemaError("an output of embeddings only has no caption and no clip_score")


def embedding_matrix(table: pa.Table) -> np.ndarray:
    """A table's image_embedding column as one float32 matrix; rows without one (failed samples) are zeros."""
    column = table.column("image_embedding").combine_chunks()
    width = column.type.list_size
    matrix = np.zeros((len(column), width), dtype=np.float32)
    valid = column.is_valid().to_numpy(zero_copy_only=False)
    matrix[valid] = column.filter(valid).flatten().to_numpy(zero_copy_only=False).reshape(-1, width)
    return matrix
