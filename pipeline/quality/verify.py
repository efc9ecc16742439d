"""Check a finished output directory against the contract in docs/output-format.md ("Layout", "Columns").

`verify` reads every Parquet file of captions/ and filtered/ once (one file in memory at a time) and
keeps only the light columns the cross-checks need; with `inputs` it also streams the input shards
through `pipeline.io.sources.read_samples` and keeps their keys only. It never imports Ray or torch, so
it is cheap to call from tests and other jobs. Every check yields one `Check`; `VerifyReport.ok` is
true only when all of them passed.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.io.sinks import CAPTIONS, FILTERED, RUN_JSON, STAGING, TMP_PREFIX, OutputDir
from pipeline.io.sources import Shard, expand_inputs, read_samples
from pipeline.text import describe_error, one_line
from schemas.captions import METADATA_KEY, SchemaError, captions_schema, validate_table

# What the `captioner` metadata JSON must name (docs/output-format.md: identities, decoding, filter, version).
METADATA_FIELDS = ("encoder", "captioner", "scorer", "decoding", "filter", "version")
# pipeline.run.chain keeps every sample of a repeated key: the later ones get the key KEY@SOURCE#POSITION.
# Such keys are not among the keys the inputs yield, so they are not reported as unexpected; the
# per-source row counts still prove that no sample was lost or added.
# The columns kept from every file for the cross-checks: everything but the embeddings and candidates,
# which are large and already covered by the per-file schema check.
_LIGHT = pa.schema([("key", pa.string()), ("source", pa.string()), ("status", pa.string()), ("error", pa.string()),
                    ("width", pa.int32()), ("height", pa.int32()), ("caption", pa.string()),
                    ("clip_score", pa.float32()), ("keep", pa.bool_()), ("original_text", pa.string())])
_KEY_CHUNK = 65536  # input keys are gathered into Arrow arrays of this many, not one Python set


def _is_renamed(key: str, source: str, input_keys: pa.ChunkedArray) -> bool:
    """Whether `key` is KEY@SOURCE#POSITION for an input KEY of the row's own source."""
    base, marker, position = key.rpartition(f"@{source}#")
    return bool(marker) and position.isdigit() and pc.any(pc.equal(input_keys, base)).as_py()


class VerifyUsageError(ValueError):
    """The output to verify does not exist or is not a directory; the message is one line."""


@dataclass(frozen=True)
class Check:
    """One verified property: `ok`, and a one-line detail (counts on success, first offenders on failure)."""

    name: str
    ok: bool
    detail: str


@dataclass
class VerifyReport:
    """All checks run on one output directory."""

    output: str
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks)

    def __getitem__(self, name: str) -> Check:
        for check in self.checks:
            if check.name == name:
                return check
        raise KeyError(name)

    def lines(self) -> list[str]:
        """The printed report: one line per check, then a verdict."""
        lines = [f"{'PASS' if c.ok else 'FAIL'} {c.name}: {c.detail}" for c in self.checks]
        failed = [c.name for c in self.checks if not c.ok]
        verdict = f"FAILED: {', '.join(failed)}" if failed else f"OK: {len(self.checks)} checks passed"
        return [*lines, f"{verdict} ({self.output})"]

    def to_json(self) -> dict[str, Any]:
        return {"output": self.output, "ok": self.ok,
                "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in self.checks]}


def verify(output_url: str, inputs: Sequence[str] | None = None, image_column: str | None = None,
           key_column: str = "key", examples: int = 5) -> VerifyReport:
    """Verify the output directory at `output_url` (local path or fsspec URL).

    With `inputs` (the run's `--input` specs) the keys in captions/ must be exactly the keys the inputs
    yield. `examples` bounds how many offending keys or files a detail names. Raises VerifyUsageError
    for a missing output and `pipeline.io.sources.InputError` for bad `inputs`, before reading anything.
    """
    output = OutputDir(output_url)
    try:
        is_file = output.is_file()
    except Exception as exc:  # what a storage backend raises: no credentials, no permission
        raise VerifyUsageError(f"cannot access output {output_url}: {describe_error(exc)}") from None
    if is_file:
        raise VerifyUsageError(f"output {output_url} is a file, not an output directory")
    if not output.fs.exists(output.root):
        raise VerifyUsageError(f"output {output_url} does not exist")
    shards = expand_inputs(list(inputs), image_column=image_column, key_column=key_column) if inputs else None

    files = [path[len(output.root):].lstrip("/") for path in output.fs.find(output.root)]
    captions = _read_parts(output, CAPTIONS, files)
    filtered = _read_parts(output, FILTERED, files)
    run_json, run_json_error = _read_run_json(output)
    report = VerifyReport(output_url)
    report.checks.append(_check_layout(output, files, examples))
    report.checks.append(_check_readable(captions, filtered, examples))
    report.checks.append(_check_schema(captions, filtered, examples))
    report.checks.append(_check_metadata(captions, filtered, examples))
    report.checks.append(_check_unique(captions.rows, examples))
    report.checks.append(_check_filtered(captions.rows, filtered.rows, examples))
    if shards is not None:
        limit = ((run_json or {}).get("config") or {}).get("limit")
        report.checks.append(_check_complete(captions.rows, _input_keys(shards, image_column, key_column, limit),
                                             limit, examples))
    report.checks.append(_check_run_json(run_json, run_json_error, captions.rows, filtered.rows))
    return report


# --------------------------------------------------------------------------------------------------
# reading


@dataclass
class _Parts:
    """What one folder's Parquet files hold, as far as the checks need it."""

    files: int = 0
    unreadable: list[str] = field(default_factory=list)  # "name: reason"
    schema_errors: list[str] = field(default_factory=list)  # "name: reason"
    dims: Counter[int] = field(default_factory=Counter)  # embedding dimension -> files
    metadata: set[str] = field(default_factory=set)  # the distinct metadata JSON texts
    metadata_errors: list[str] = field(default_factory=list)
    excluded: int = 0  # readable files whose light columns could not be taken (see _check_schema)
    rows: pa.Table = field(default_factory=_LIGHT.empty_table)


def _read_parts(output: OutputDir, folder: str, files: list[str]) -> _Parts:
    parts = _Parts()
    tables = []
    for relative in sorted(files):
        folder_name, _, name = relative.partition("/")
        if folder_name != folder or "/" in name or not name.endswith(".parquet") or name.startswith(TMP_PREFIX):
            continue  # temporary and stray files are the layout check's business
        parts.files += 1
        try:
            with output.fs.open(output.path(relative), "rb") as handle:
                # No reader threads: pyarrow's thread pool can abort the interpreter at exit after
                # reading from a Python file object (apache/arrow#34314, #50482).
                table = pq.read_table(handle, use_threads=False)
        except (OSError, pa.ArrowException) as exc:
            parts.unreadable.append(f"{relative}: {one_line(exc)}")
            continue
        _inspect_schema(parts, relative, table)
        try:
            tables.append(table.select(_LIGHT.names).cast(_LIGHT))
        except (KeyError, pa.ArrowException):
            parts.excluded += 1
    if tables:
        parts.rows = pa.concat_tables(tables)
    return parts


def _inspect_schema(parts: _Parts, relative: str, table: pa.Table) -> None:
    embedding = table.schema.field("image_embedding").type if "image_embedding" in table.schema.names else None
    if embedding is None or not pa.types.is_fixed_size_list(embedding):
        parts.schema_errors.append(f"{relative}: image_embedding has type {embedding}, expected a fixed-size list")
    else:
        dim = embedding.list_size
        parts.dims[dim] += 1
        try:
            validate_table(table, dim, captioned=_captioned(table))
            expected = captions_schema(dim)
            if not table.schema.remove_metadata().equals(expected):
                # validate_table compares types and nulls; this adds the declared nullability.
                differing = [f.name for f, e in zip(table.schema, expected, strict=True) if f.nullable != e.nullable]
                raise SchemaError(f"nullability of {differing} differs from the output schema")
        except SchemaError as exc:
            parts.schema_errors.append(f"{relative}: {exc}")
    text = (table.schema.metadata or {}).get(METADATA_KEY)
    if text is None:
        parts.metadata_errors.append(f"{relative}: no 'captioner' schema metadata")
        return
    try:
        entry = json.loads(text)
    except ValueError:
        parts.metadata_errors.append(f"{relative}: 'captioner' metadata is not JSON")
        return
    missing = [name for name in METADATA_FIELDS if not isinstance(entry, dict) or name not in entry]
    if missing:
        parts.metadata_errors.append(f"{relative}: 'captioner' metadata lacks {', '.join(missing)}")
    parts.metadata.add(text.decode("utf-8", "replace"))


def _captioned(table: pa.Table) -> bool:
    """False for a part of an --embed-only run: its 'captioner' metadata records no decoding."""
    try:
        entry = json.loads((table.schema.metadata or {}).get(METADATA_KEY, b"{}"))
    except ValueError:
        return True  # reported with the metadata
    return not (isinstance(entry, dict) and "decoding" in entry and entry["decoding"] is None)


def _read_run_json(output: OutputDir) -> tuple[dict[str, Any] | None, str | None]:
    try:
        data = output.read_json(RUN_JSON)
    except (OSError, ValueError) as exc:
        return None, f"{RUN_JSON} is unreadable: {one_line(exc)}"
    if data is None:
        return None, f"no {RUN_JSON}: the run has not finished"
    if not isinstance(data, dict):
        return None, f"{RUN_JSON} is not a JSON object"
    return data, None


def _input_keys(shards: Iterable[Shard], image_column: str | None, key_column: str,
                limit: int | None = None) -> pa.Table:
    """(key, source) of the records the inputs yield, in input order, streamed (image bytes are dropped at
    once); with `limit`, the first `limit`: the samples a --limit run captions."""
    chunks: list[pa.Table] = []
    keys: list[str] = []
    sources: list[str] = []
    records = (record for shard in shards
               for record in read_samples(shard, image_column=image_column, key_column=key_column))
    for record in itertools.islice(records, limit):
        keys.append(record["key"])
        sources.append(record["source"])
        if len(keys) >= _KEY_CHUNK:
            chunks.append(pa.table({"key": pa.array(keys, pa.string()), "source": pa.array(sources, pa.string())}))
            keys, sources = [], []
    chunks.append(pa.table({"key": pa.array(keys, pa.string()), "source": pa.array(sources, pa.string())}))
    return pa.concat_tables(chunks)


# --------------------------------------------------------------------------------------------------
# checks


def _check_layout(output: OutputDir, files: list[str], examples: int) -> Check:
    temporaries = [f for f in files if f.rsplit("/", 1)[-1].startswith(TMP_PREFIX)]
    # Anything else in captions/ or filtered/ breaks readers that load the folder as one dataset.
    stray = [f for f in files if f.split("/", 1)[0] in (CAPTIONS, FILTERED) and f not in temporaries
             and (f.count("/") != 1 or not f.endswith(".parquet"))]
    problems = []
    if temporaries:
        problems.append(f"{len(temporaries)} temporary files ({_first(temporaries, examples)})")
    if output.exists(STAGING):
        problems.append(f"leftover {STAGING}/" + ("" if output.exists(RUN_JSON) else " (the run has not finished)"))
    if stray:
        problems.append(f"{len(stray)} files that are not parts ({_first(stray, examples)})")
    if problems:
        return Check("layout", False, "; ".join(problems))
    return Check("layout", True, f"{len(files)} files, no temporary files, no {STAGING}/")


def _check_readable(captions: _Parts, filtered: _Parts, examples: int) -> Check:
    unreadable = captions.unreadable + filtered.unreadable
    if unreadable:
        return Check("readable", False, f"{len(unreadable)} unreadable Parquet files: {_first(unreadable, examples)}")
    return Check("readable", True, f"{captions.files} files in {CAPTIONS}/, {filtered.files} in {FILTERED}/")


def _check_schema(captions: _Parts, filtered: _Parts, examples: int) -> Check:
    errors = captions.schema_errors + filtered.schema_errors
    dims = captions.dims + filtered.dims
    if len(dims) > 1:
        errors.append(f"files disagree on the embedding dimension: {dict(sorted(dims.items()))} (dim: files)")
    excluded = captions.excluded + filtered.excluded
    if excluded:
        errors.append(f"{excluded} files lack the key/status columns and were left out of the other checks")
    if errors:
        return Check("schema", False, f"{len(errors)} problems: {_first(errors, examples)}")
    dim = next(iter(dims), None)
    return Check("schema", True, "exact output schema" + (f", embedding dim {dim}" if dim is not None else ""))


def _check_metadata(captions: _Parts, filtered: _Parts, examples: int) -> Check:
    errors = captions.metadata_errors + filtered.metadata_errors
    variants = captions.metadata | filtered.metadata
    if len(variants) > 1:
        errors.append(f"{len(variants)} different 'captioner' metadata entries across files (one run has one)")
    if errors:
        return Check("metadata", False, f"{len(errors)} problems: {_first(errors, examples)}")
    if not variants:
        return Check("metadata", True, "no files")
    entry = json.loads(next(iter(variants)))
    return Check("metadata", True, f"'captioner' JSON on every file (model {entry.get('model')!r}, "
                                   f"version {entry.get('version')})")


def _check_unique(rows: pa.Table, examples: int) -> Check:
    duplicates = _duplicates(rows.column("key"))
    if duplicates:
        return Check("unique_keys", False, f"{len(duplicates)} keys occur more than once in {CAPTIONS}/: "
                                           f"{_first(duplicates, examples)}")
    return Check("unique_keys", True, f"{rows.num_rows} rows, every key once")


def _check_filtered(captions: pa.Table, filtered: pa.Table, examples: int) -> Check:
    """filtered/ must be exactly the captions/ rows with keep=true, and those must all be 'ok'."""
    problems = []
    kept = captions.filter(pc.field("keep"))
    not_ok = kept.filter(pc.field("status") != "ok").column("key").to_pylist()
    if not_ok:
        problems.append(f"{len(not_ok)} rows kept without status 'ok' ({_first(not_ok, examples)})")
    duplicates = _duplicates(filtered.column("key"))
    if duplicates:
        problems.append(f"{len(duplicates)} keys repeated in {FILTERED}/ ({_first(duplicates, examples)})")
    extra = filtered.filter(pc.invert(pc.is_in(filtered.column("key"), value_set=kept.column("key"))))
    if extra.num_rows:
        problems.append(f"{extra.num_rows} rows not kept in {CAPTIONS}/ ({_first(extra.column('key'), examples)})")
    missing = kept.filter(pc.invert(pc.is_in(kept.column("key"), value_set=filtered.column("key"))))
    if missing.num_rows:
        problems.append(f"{missing.num_rows} kept rows missing ({_first(missing.column('key'), examples)})")
    if not problems:
        differing = _differing_rows(kept.sort_by("key"), filtered.sort_by("key"))
        if differing:
            problems.append(f"{len(differing)} rows differ from {CAPTIONS}/ ({_first(differing, examples)})")
    if problems:
        return Check("filtered", False, "; ".join(problems))
    return Check("filtered", True, f"{filtered.num_rows} rows = the rows of {CAPTIONS}/ with keep=true")


def _check_complete(rows: pa.Table, inputs: pa.Table, limit: int | None, examples: int) -> Check:
    """The captions' keys are the inputs' keys, and each input source has as many rows as it yields samples
    (the count catches a repeated key whose second sample was dropped: its key is still present)."""
    problems = []
    input_keys = pc.unique(inputs.column("key"))
    missing = input_keys.filter(pc.invert(pc.is_in(input_keys, value_set=rows.column("key"))))
    if len(missing):
        problems.append(f"{len(missing)} input keys missing ({_first(missing, examples)})")
    not_input = rows.filter(pc.invert(pc.is_in(rows.column("key"), value_set=inputs.column("key"))))
    unexpected = not_input.filter(pa.array([not _is_renamed(key, source, inputs.column("key"))
                                            for key, source in zip(not_input.column("key").to_pylist(),
                                                                   not_input.column("source").to_pylist(),
                                                                   strict=True)], pa.bool_()))
    if unexpected.num_rows:
        problems.append(f"{unexpected.num_rows} keys no input yields ({_first(unexpected.column('key'), examples)})")
    expected_counts = Counter(inputs.column("source").to_pylist())
    counts = Counter(rows.column("source").to_pylist())
    uneven = [f"{source}: {expected_counts[source]} samples, {counts[source]} rows"
              for source in sorted(expected_counts.keys() | counts.keys()) if expected_counts[source] != counts[source]]
    if uneven:
        problems.append(f"{len(uneven)} sources with a different row count ({_first(uneven, examples)})")
    if problems:
        note = f" (the run used --limit {limit})" if limit is not None else ""
        return Check("complete", False, "; ".join(problems) + note)
    return Check("complete", True, f"{inputs.num_rows} input samples from {len(expected_counts)} sources, "
                                   f"each once in {CAPTIONS}/")


def _check_run_json(run_json: dict[str, Any] | None, error: str | None, captions: pa.Table,
                    filtered: pa.Table) -> Check:
    if run_json is None:
        return Check("run_json", False, error or f"no {RUN_JSON}")
    counts = run_json.get("counts")
    if not isinstance(counts, dict):
        return Check("run_json", False, f"{RUN_JSON} has no counts")
    by_status = dict(sorted(Counter(captions.column("status").to_pylist()).items()))
    problems = []
    if counts.get("rows") != captions.num_rows:
        problems.append(f"counts.rows is {counts.get('rows')}, {CAPTIONS}/ has {captions.num_rows} rows")
    if counts.get("by_status") != by_status:
        problems.append(f"counts.by_status is {counts.get('by_status')}, {CAPTIONS}/ has {by_status}")
    if counts.get("kept") != filtered.num_rows:
        problems.append(f"counts.kept is {counts.get('kept')}, {FILTERED}/ has {filtered.num_rows} rows")
    if problems:
        return Check("run_json", False, "; ".join(problems))
    return Check("run_json", True, f"counts match: {captions.num_rows} rows, {filtered.num_rows} kept, {by_status}")


# --------------------------------------------------------------------------------------------------
# helpers


def _duplicates(keys: pa.ChunkedArray | pa.Array) -> list[str]:
    counts = pc.value_counts(keys)
    return counts.filter(pc.greater(counts.field("counts"), 1)).field("values").to_pylist()


def _differing_rows(left: pa.Table, right: pa.Table) -> list[str]:
    """Keys of rows that differ in any column, for two tables with the same keys in the same order."""
    differs = pa.array([False] * left.num_rows, pa.bool_())
    for name in left.column_names:
        a, b = left.column(name), right.column(name)
        same = pc.or_(pc.fill_null(pc.equal(a, b), False), pc.and_(pc.is_null(a), pc.is_null(b)))
        differs = pc.or_(differs, pc.invert(same))
    return left.filter(differs).column("key").to_pylist()


def _first(items: Sequence[Any] | pa.Array | pa.ChunkedArray, count: int) -> str:
    values = items.to_pylist() if isinstance(items, pa.Array | pa.ChunkedArray) else list(items)
    shown = ", ".join(str(value) for value in values[:count])
    return shown + (f", ... ({len(values)} in all)" if len(values) > count else "")


__all__ = ["Check", "VerifyReport", "VerifyUsageError", "verify"]
