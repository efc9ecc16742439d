"""The rows and images a report shows: a seeded sample of kept, dropped and failed rows read from captions/,
the score columns for the histogram, and thumbnails of the sampled rows re-read from the inputs (only the shards
they came from, each only until its sampled keys are found; inputs that are gone give a placeholder)."""

from __future__ import annotations

import base64
import io
import posixpath
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from pipeline.io.images import ImageError, ImageSpec, decode_image
from pipeline.io.sinks import CAPTIONS, OutputDir, read_part
from pipeline.io.sources import FOLDER, InputError, Shard, expand_inputs, read_samples
from pipeline.text import one_line

THUMBNAIL = ImageSpec(size=128)
KEPT, DROPPED, FAILED = "kept", "dropped", "failed"
SECTIONS = {
    KEPT: ("Kept", "Rows in filtered/: the pseudo-label dataset."),
    DROPPED: ("Dropped by the filter", "Captioned rows whose CLIP score did not pass the filter."),
    FAILED: ("Failed", "Rows that could not be captioned, with their error."),
}
_COLUMNS = ["key", "source", "status", "error", "width", "height", "caption", "clip_score", "candidates", "keep",
            "original_text", "original_clip_score"]


class ReportError(ValueError):
    """The output cannot be reported on (no finished run there); the message is one line."""


@dataclass
class Sample:
    """The rows of one gallery section with the smallest random priorities seen so far."""

    size: int
    rows: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    total: int = 0

    def offer(self, table: pa.Table, priorities: np.ndarray) -> None:
        self.total += table.num_rows
        if not table.num_rows or not self.size:
            return
        best = np.argsort(priorities, kind="stable")[: self.size]
        merged = self.rows + list(zip(priorities[best].tolist(), table.take(best).to_pylist(), strict=True))
        self.rows = sorted(merged, key=lambda item: item[0])[: self.size]


@dataclass
class Thumbnails:
    """Data URIs of the sampled images; for the others, why there is none."""

    uris: dict[str, str] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)




def scan_captions(output: OutputDir, samples: int, seed: int) -> tuple[dict[str, Sample], np.ndarray, np.ndarray]:
    """One pass over captions/: a seeded sample per section, and the scores of ok and of kept rows.
    Memory stays at one part plus the samples; the embeddings are never read."""
    rng = np.random.default_rng(seed)
    sections = {name: Sample(samples) for name in SECTIONS}
    scores: list[np.ndarray] = []
    kept_scores: list[np.ndarray] = []
    for path in output.parts(CAPTIONS):  # sorted, so the same output draws the same rows
        try:
            with output.fs.open(path, "rb") as handle:
                table = read_part(handle, _COLUMNS)
        except pa.ArrowException as exc:  # a damaged part: jobs/verify_output.py tells what else is wrong
            raise ReportError(f"{path} is unreadable ({one_line(exc)}); check the output with "
                              "jobs/verify_output.py") from None
        priorities = rng.random(table.num_rows)
        ok = pc.equal(table.column("status"), "ok")
        kept = pc.fill_null(table.column("keep"), False)
        masks = {KEPT: kept, DROPPED: pc.and_(ok, pc.invert(kept)), FAILED: pc.invert(ok)}
        for name, mask in masks.items():
            sections[name].offer(table.filter(mask), priorities[mask.to_numpy(zero_copy_only=False)])
        scores.append(_finite(table.filter(ok).column("clip_score")))
        kept_scores.append(_finite(table.filter(kept).column("clip_score")))
    empty = np.zeros(0)
    return sections, np.concatenate(scores) if scores else empty, np.concatenate(kept_scores) if kept_scores else empty


def _finite(column: pa.ChunkedArray) -> np.ndarray:
    values = column.to_numpy(zero_copy_only=False).astype(np.float64)
    return values[np.isfinite(values)]


def read_thumbnails(rows: list[dict[str, Any]], specs: list[str], image_column: str | None,
                     key_column: str) -> Thumbnails:
    """Find the rows' images in the inputs. A shard is read only when it is a row's `source`, matched
    by URL, else by file name (for inputs that were moved), and only until its wanted keys are found."""
    result = Thumbnails()
    if not rows:
        return result
    by_url: dict[str, set[str]] = {}
    for row in rows:
        by_url.setdefault(row["source"], set()).add(row["key"])
    by_name: dict[str, set[str]] = {}
    for url, keys in by_url.items():
        by_name.setdefault(posixpath.basename(url.rstrip("/")), set()).update(keys)
    remaining = {row["key"] for row in rows}
    for shard in _shards(specs, result.notes):
        wanted = by_url.get(shard.url) or by_name.get(posixpath.basename(shard.url.rstrip("/")), set())
        wanted = wanted & remaining
        if not wanted:
            continue
        for key, data in _images(shard, wanted, image_column, key_column):
            remaining.discard(key)
            if data is None:
                result.missing[key] = "no image bytes in the input"
                continue
            try:
                result.uris[key] = _thumbnail_uri(data)
            except ImageError as exc:
                # the status only: Pillow's messages name memory addresses, and the row shows its own error
                result.missing[key] = f"cannot show the image ({exc.status})"
        if not remaining:
            break
    for key in remaining:
        result.missing[key] = "image not found in the inputs"
    if remaining:
        result.notes.append(f"{len(remaining)} of {len(rows)} sampled images were not found in the inputs.")
    return result


def _shards(specs: list[str], notes: list[str]) -> Iterable[Shard]:
    """Each spec expanded on its own, so one input that is gone does not hide the others."""
    for spec in specs:
        try:
            yield from expand_inputs([spec])
        except InputError as exc:
            notes.append(f"Input not readable here ({exc}); pass --input to say where it is now.")


def _images(shard: Shard, wanted: set[str], image_column: str | None,
            key_column: str) -> Iterable[tuple[str, bytes | None]]:
    """(key, image bytes or None) for the wanted keys of one shard, stopping once all are found."""
    left = set(wanted)
    if shard.kind == FOLDER:
        # A folder's key is the file's relative path: read those files instead of walking the folder.
        fs, root = fsspec.core.url_to_fs(shard.url)
        for key in sorted(left):
            try:
                yield key, fs.cat_file(posixpath.join(root, key))
            except OSError:
                continue
        return
    for record in read_samples(shard, image_column, key_column):  # never raises on bad data
        if record["key"] in left:
            left.discard(record["key"])
            yield record["key"], record["image"]
            if not left:
                return


def _thumbnail_uri(data: bytes) -> str:
    """A JPEG data URI of the encoder's own view: the same safe decoder and center crop, at 128 px."""
    pixels = decode_image(data, THUMBNAIL).pixels
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


