"""One self-contained HTML page that shows a finished run: sampled kept / dropped / failed rows with
their thumbnails and Turkish captions, a CLIP-score histogram with the filter thresholds, counts,
timings, configuration and model identity.

The output holds no images, so the sampled rows' image bytes are re-read from the inputs, only from
the shards the rows came from, and each shard only until its sampled keys are found. Inputs that are
gone or moved give a placeholder, never an error. Everything is inline (data: URIs, SVG, CSS): the
page needs no network and no JavaScript.
"""

from __future__ import annotations

import base64
import html
import io
import math
import posixpath
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from pipeline.io.images import ImageError, ImageSpec, decode_image
from pipeline.io.sinks import CAPTIONS, RUN_JSON, TMP_PREFIX, OutputDir, read_part
from pipeline.io.sources import FOLDER, InputError, Shard, expand_inputs, read_samples
from pipeline.text import one_line

THUMBNAIL = ImageSpec(size=128)
HISTOGRAM_BINS = 30
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
class _Sample:
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
class _Thumbnails:
    """Data URIs of the sampled images; for the others, why there is none."""

    uris: dict[str, str] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def build_report(output_url: str, inputs: list[str] | None = None, samples: int = 24, seed: int = 0) -> str:
    """The HTML report of the finished run in `output_url`. `inputs` (default: the run's own `--input`
    specs) is where the images are read back from; `samples` rows are shown per gallery section,
    drawn with `seed`, so the same output gives the same page."""
    output = OutputDir(output_url)
    try:
        summary = output.read_json(RUN_JSON)
    except ValueError as exc:  # json's decode errors are ValueErrors
        raise ReportError(f"{output_url}/{RUN_JSON} is unreadable: {one_line(exc)}") from None
    if not isinstance(summary, dict):
        raise ReportError(f"no {RUN_JSON} in {output_url}: not the output of a finished run")
    config = summary.get("config", {})
    sections, scores, kept_scores = _scan_captions(output, samples, seed)
    shown = [row for sample in sections.values() for _, row in sample.rows]
    specs = list(inputs) if inputs else list(config.get("inputs", []))
    thumbnails = _read_thumbnails(shown, specs, config.get("image_column"), config.get("key_column", "key"))
    thresholds: list[tuple[str, float]] = []
    min_score = (config.get("filter") or {}).get("min_clip_score")
    if min_score is not None:
        thresholds.append((MIN_SCORE, float(min_score)))
    cutoff = (summary.get("counts") or {}).get("top_fraction_cutoff_score")
    if cutoff is not None:
        thresholds.append((CUTOFF, float(cutoff)))
    body = [
        _header(output_url, summary),
        *(f'<p class="notice">{_esc(warning)}</p>' for warning in summary.get("warnings") or []),
        _stats(summary),
        _panel("CLIP score", _histogram_svg(scores, kept_scores, thresholds) + _legend(thresholds)),
        _panel("Rows by status", _status_table(summary)),
        *(f'<p class="notice">{_esc(note)}</p>' for note in thumbnails.notes),
        *(_gallery(name, sections[name], thumbnails) for name in SECTIONS),
        _panel("Timings", _table(_flatten(summary.get("timings", {})))),
        _panel("Configuration", _table(_flatten(config))),
        _panel("Model", _table(_flatten(summary.get("model", {})))),
        _panel("Packages", _table(_flatten(summary.get("packages", {})))),
        f"<footer>{len(shown)} rows sampled with seed {seed}, up to {samples} per section.</footer>",
    ]
    title = f"Captioning report: {(summary.get('model') or {}).get('name', '')} {output_url}"
    return (f'<!doctype html>\n<html lang="tr">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{_esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n<main>\n"
            + "\n".join(body) + "\n</main>\n</body>\n</html>\n")


def write_report(text: str, url: str) -> None:
    """Write `text` to `url` (local path or fsspec URL) atomically: a reader sees the old page or the new."""
    fs, path = fsspec.core.url_to_fs(url)
    folder = posixpath.dirname(path)
    if folder:
        fs.makedirs(folder, exist_ok=True)
    # named as the run's own temporaries: a killed report is cleaned up by the next run, and verify sees it
    temporary = posixpath.join(folder, f"{TMP_PREFIX}{uuid.uuid4().hex}-{posixpath.basename(path)}")
    try:
        with fs.open(temporary, "wb") as handle:
            handle.write(text.encode("utf-8"))
        fs.mv(temporary, path)
    finally:
        if fs.exists(temporary):
            fs.rm(temporary)


# --------------------------------------------------------------------------------------------------
# data


def _scan_captions(output: OutputDir, samples: int, seed: int) -> tuple[dict[str, _Sample], np.ndarray, np.ndarray]:
    """One pass over captions/: a seeded sample per section, and the scores of ok and of kept rows.
    Memory stays at one part plus the samples; the embeddings are never read."""
    rng = np.random.default_rng(seed)
    sections = {name: _Sample(samples) for name in SECTIONS}
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


def _read_thumbnails(rows: list[dict[str, Any]], specs: list[str], image_column: str | None,
                     key_column: str) -> _Thumbnails:
    """Find the rows' images in the inputs. A shard is read only when it is a row's `source`, matched
    by URL, else by file name (for inputs that were moved), and only until its wanted keys are found."""
    result = _Thumbnails()
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


# --------------------------------------------------------------------------------------------------
# HTML


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _number(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return _esc(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.{digits}f}"


def _panel(title: str, content: str, note: str = "") -> str:
    note_html = f'<p class="note">{_esc(note)}</p>' if note else ""
    return f"<section><h2>{_esc(title)}</h2>{note_html}{content}</section>"


def _header(output_url: str, summary: dict[str, Any]) -> str:
    model = summary.get("model") or {}
    timings = summary.get("timings") or {}
    sha = str(model.get("sha256") or "")[:12]
    return (f'<header><h1>Captioning report</h1><p class="sub"><code>{_esc(output_url)}</code> · model '
            f'<b>{_esc(model.get("name", "?"))}</b> <code>{_esc(sha)}</code> · finished '
            f'{_esc(timings.get("finished", "?"))}</p></header>')


def _stats(summary: dict[str, Any]) -> str:
    counts = summary.get("counts") or {}
    timings = summary.get("timings") or {}
    rows = counts.get("rows") or 0
    ok = (counts.get("by_status") or {}).get("ok", 0)
    kept = counts.get("kept") or 0
    share = f"{100 * kept / rows:.1f}% of rows" if rows else ""
    wall = timings.get("wall_s")
    resumed = summary.get("resumed_rows") or 0
    # run.json times the attempt that finished the run; rows staged by earlier attempts are not in them
    attempt = " (last attempt)" if resumed else ""
    items = [
        ("Rows", _number(rows), f"{_number(resumed)} resumed"),
        ("Embedded" if (summary.get("config") or {}).get("embed_only") else "Captioned", _number(ok),
         f"{_number(rows - ok)} failed"),
        ("Kept", _number(kept), share),
        ("Images / s", _number(timings.get("images_per_s"), 2), f"model stage{attempt}"),
        (f"Wall time{attempt}", f"{_number(wall, 1)} s" if wall is not None else "–",
         f"model stage {_number(timings.get('model_stage_s'), 1)} s"),
    ]
    cards = "".join(f'<div class="stat"><div class="label">{_esc(label)}</div><div class="value">{value}</div>'
                    f'<div class="detail">{_esc(detail)}</div></div>' for label, value, detail in items)
    return f'<section class="stats">{cards}</section>'


def _status_table(summary: dict[str, Any]) -> str:
    counts = summary.get("counts") or {}
    rows = counts.get("rows") or 0
    by_status = sorted((counts.get("by_status") or {}).items(), key=lambda item: (item[0] != "ok", -item[1]))
    lines = "".join(f'<tr><td><span class="badge {"ok" if status == "ok" else "bad"}">{_esc(status)}</span></td>'
                    f'<td class="num">{_number(n)}</td><td class="num">{100 * n / rows if rows else 0:.1f}%</td></tr>'
                    for status, n in by_status)
    return f'<table class="status"><tr><th>status</th><th class="num">rows</th><th class="num">share</th></tr>' \
           f"{lines}</table>"


def _flatten(data: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Nested JSON -> (dotted.key, leaf) rows, so any configuration renders as one table."""
    if isinstance(data, dict) and data:
        return [row for key, value in data.items() for row in _flatten(value, f"{prefix}.{key}" if prefix else key)]
    return [(prefix, data)]


def _table(rows: list[tuple[str, Any]]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, list):
            return "<br>".join(_esc(item) for item in value) or "[]"
        return _number(value) if isinstance(value, int | float) and not isinstance(value, bool) else \
            "–" if value is None else _esc(value)

    lines = "".join(f"<tr><th>{_esc(key)}</th><td>{cell(value)}</td></tr>" for key, value in rows)
    return f'<table class="kv">{lines}</table>'


def _gallery(name: str, sample: _Sample, thumbnails: _Thumbnails) -> str:
    title, note = SECTIONS[name]
    rows = [row for _, row in sample.rows]
    if name == FAILED:
        rows.sort(key=lambda row: (row["status"], row["key"]))
    else:  # best first: the last cards of "kept" and the first of "dropped" show where the filter cut
        rows.sort(key=lambda row: (-(row["clip_score"] if row["clip_score"] is not None else -math.inf), row["key"]))
    heading = f"{title} · {len(rows)} of {sample.total:,} shown"
    if not rows:
        return _panel(heading, '<p class="empty">No rows.</p>', note)
    cards = "".join(_card(row, thumbnails) for row in rows)
    return _panel(heading, f'<div class="gallery" data-section="{name}">{cards}</div>', note)


def _card(row: dict[str, Any], thumbnails: _Thumbnails) -> str:
    key = row["key"]
    uri = thumbnails.uris.get(key)
    if uri is not None:
        image = f'<img src="{uri}" width="128" height="128" alt="{_esc(row["caption"] or key)}">'
    else:
        image = f'<div class="placeholder">{_esc(thumbnails.missing.get(key, "no image"))}</div>'
    ok = row["status"] == "ok"
    badges = f'<span class="badge {"ok" if ok else "bad"}">{_esc(row["status"])}</span>'
    if row["clip_score"] is not None:
        badges += f' <span class="score">CLIP {row["clip_score"]:.3f}</span>'
    if row["width"] is not None:
        badges += f' <span class="size">{row["width"]}×{row["height"]}</span>'
    text = f'<p class="caption">{_esc(row["caption"])}</p>' if row["caption"] is not None else ""
    if not ok:
        text += f'<p class="error">{_esc(row["error"] or row["status"])}</p>'
    if row["original_text"]:
        score = row["original_clip_score"]
        scored = f' <span class="score">CLIP {score:.3f}</span>' if score is not None else ""
        text += (f'<p class="original" title="text that came with the sample">{_esc(row["original_text"])}'
                 f'{scored}</p>')
    candidates = row["candidates"] or []
    if len(candidates) > 1:
        items = "".join(f"<li>{_esc(c['caption'])} <span class=\"score\">{_number(c['clip_score'])}</span></li>"
                        for c in candidates)
        text += f"<details><summary>{len(candidates)} candidates</summary><ol>{items}</ol></details>"
    return (f'<figure class="card">{image}<figcaption>{text}<div class="meta">{badges}</div>'
            f'<div class="key" title="{_esc(row["source"])}">{_esc(key)}</div></figcaption></figure>')


# Histogram geometry (SVG user units).
_W, _H = 960, 250
_LEFT, _RIGHT, _TOP, _BOTTOM = 48, 16, 40, 30
_TICK_STEPS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.25, 0.5)
MIN_SCORE, CUTOFF = "min-clip-score", "top-fraction cutoff"
_THRESHOLD_COLORS = {MIN_SCORE: "#c62828", CUTOFF: "#ef6c00"}


def _histogram_svg(scores: np.ndarray, kept_scores: np.ndarray, thresholds: list[tuple[str, float]]) -> str:
    """Bars of all captioned rows per bin, their kept part drawn inside, one line per threshold.
    The range covers the scores and the thresholds, rounded out to 0.01, so every line is on the plot."""
    if not len(scores):
        return '<p class="empty">No captioned rows: nothing to plot.</p>'
    values = np.concatenate([scores, [score for _, score in thresholds]])
    lo, hi = math.floor(values.min() * 100) / 100, math.ceil(values.max() * 100) / 100
    if hi - lo < 0.01:
        lo, hi = lo - 0.01, hi + 0.01
    edges = np.linspace(lo, hi, HISTOGRAM_BINS + 1)
    counts = np.histogram(scores, edges)[0]
    kept = np.histogram(kept_scores, edges)[0]
    width, height = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM
    peak = max(int(counts.max()), 1)

    def x(value: float) -> float:
        return round(_LEFT + (value - lo) / (hi - lo) * width, 2)

    def y(count: int) -> float:
        return round(_TOP + height - count / peak * height, 2)

    parts = [f'<svg class="histogram" viewBox="0 0 {_W} {_H}" width="{_W}" height="{_H}" role="img" '
             f'aria-label="histogram of CLIP scores" xmlns="http://www.w3.org/2000/svg" '
             f'data-lo="{lo}" data-hi="{hi}" data-bins="{HISTOGRAM_BINS}">']
    for tick in (0, peak // 2, peak) if peak > 1 else (0, peak):
        parts.append(f'<line class="grid" x1="{_LEFT}" x2="{_W - _RIGHT}" y1="{y(tick)}" y2="{y(tick)}"/>'
                     f'<text class="axis" x="{_LEFT - 6}" y="{y(tick) + 4}" text-anchor="end">{tick}</text>')
    bar = width / HISTOGRAM_BINS
    for i, (count, kept_count) in enumerate(zip(counts.tolist(), kept.tolist(), strict=True)):
        left = round(_LEFT + i * bar, 2)
        label = f"{edges[i]:.3f} – {edges[i + 1]:.3f}: {count} rows, {kept_count} kept"
        parts.append(f'<g><title>{label}</title>'
                     f'<rect class="bar" x="{left}" y="{y(count)}" width="{round(bar, 2)}" '
                     f'height="{round(count / peak * height, 2)}" data-lo="{edges[i]}" data-hi="{edges[i + 1]}" '
                     f'data-count="{count}"/>'
                     f'<rect class="kept" x="{left}" y="{y(kept_count)}" width="{round(bar, 2)}" '
                     f'height="{round(kept_count / peak * height, 2)}" data-count="{kept_count}"/></g>')
    step = next((s for s in _TICK_STEPS if (hi - lo) / s <= 8), 1.0)
    for value in np.arange(math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9) + 1) * step:
        parts.append(f'<text class="axis" x="{x(value)}" y="{_H - _BOTTOM + 18}" text-anchor="middle">'
                     f"{value:.2f}</text>")
    parts.append(f'<line class="axisline" x1="{_LEFT}" x2="{_W - _RIGHT}" y1="{_TOP + height}" y2="{_TOP + height}"/>')
    for row, (name, score) in enumerate(thresholds):
        at, color = x(score), _THRESHOLD_COLORS[name]
        anchor = "end" if at > _LEFT + width / 2 else "start"
        shift = -4 if anchor == "end" else 4
        parts.append(f'<line class="threshold" x1="{at}" x2="{at}" y1="{_TOP - 4 - 16 * (1 - row)}" '
                     f'y2="{_TOP + height}" stroke="{color}" data-name="{_esc(name)}" data-score="{score}"/>'
                     f'<text class="label" x="{at + shift}" y="{_TOP - 8 - 16 * (1 - row)}" fill="{color}" '
                     f'text-anchor="{anchor}">{_esc(name)} {score:.3f}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _legend(thresholds: list[tuple[str, float]]) -> str:
    items = ['<span><i class="swatch kept"></i>kept</span>', '<span><i class="swatch bar"></i>dropped</span>']
    items += [f'<span><i class="swatch line" style="border-color:{_THRESHOLD_COLORS[name]}"></i>{_esc(name)} '
              f"{score:.3f}</span>" for name, score in thresholds]
    if not thresholds:
        items.append("<span>no filter threshold: every captioned row is kept</span>")
    return f'<div class="legend">{"".join(items)}</div>'


_CSS = """
:root { --fg: #1d2330; --muted: #5f6b7a; --line: #e3e7ed; --bg: #f4f6f9; --ok: #2e7d32; --bad: #c62828; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--fg);
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", "Noto Sans", "DejaVu Sans", sans-serif; }
main { max-width: 1140px; margin: 0 auto; padding: 24px 20px 40px; }
header h1 { margin: 0 0 4px; font-size: 24px; }
.sub { margin: 0 0 18px; color: var(--muted); }
code { font: 12px/1.4 ui-monospace, "DejaVu Sans Mono", monospace; background: #e9edf2; padding: 1px 4px;
  border-radius: 4px; }
section { background: #fff; border: 1px solid var(--line); border-radius: 10px; padding: 16px 18px; margin: 0 0 16px; }
h2 { margin: 0 0 10px; font-size: 17px; }
.note { margin: -6px 0 12px; color: var(--muted); }
.stats { display: grid; grid-template-columns: repeat(auto-fit, minmax(170px, 1fr)); gap: 12px;
  background: none; border: 0; padding: 0; }
.stat { background: #fff; border: 1px solid var(--line); border-radius: 10px; padding: 12px 14px; }
.stat .label { color: var(--muted); font-size: 12px; letter-spacing: .02em; }
.stat .value { font-size: 26px; font-weight: 600; }
.stat .detail { color: var(--muted); font-size: 12px; }
.histogram { display: block; width: 100%; height: auto; }
.histogram .bar { fill: #b8c2cf; }
.histogram .kept { fill: var(--ok); }
.histogram .grid { stroke: #edf0f4; }
.histogram .axisline { stroke: #8a96a6; }
.histogram .axis { fill: var(--muted); font-size: 11px; }
.histogram .threshold { stroke-width: 2; stroke-dasharray: 5 3; }
.histogram .label { font-size: 12px; font-weight: 600; }
.legend { display: flex; flex-wrap: wrap; gap: 18px; color: var(--muted); margin-top: 6px; }
.swatch { display: inline-block; width: 12px; height: 12px; margin-right: 6px; vertical-align: -1px;
  border-radius: 2px; }
.swatch.kept { background: var(--ok); }
.swatch.bar { background: #b8c2cf; }
.swatch.line { width: 16px; height: 0; border-top: 2px dashed; border-radius: 0; vertical-align: 3px; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: 5px 8px; border-bottom: 1px solid var(--line); vertical-align: top; }
.status { width: auto; min-width: 320px; }
.num { text-align: right; font-variant-numeric: tabular-nums; }
.kv th { width: 34%; font: 12px/1.5 ui-monospace, "DejaVu Sans Mono", monospace; color: var(--muted);
  font-weight: normal; }
.kv td { word-break: break-all; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(300px, 1fr)); gap: 12px; }
.card { margin: 0; display: flex; gap: 10px; border: 1px solid var(--line); border-radius: 8px; padding: 8px;
  min-width: 0; }
.card img, .placeholder { flex: none; width: 128px; height: 128px; border-radius: 6px; background: #eef1f5; }
.placeholder { display: flex; align-items: center; justify-content: center; text-align: center; padding: 8px;
  color: var(--muted); font-size: 11px; border: 1px dashed #c5ccd6; overflow: hidden; }
figcaption { min-width: 0; display: flex; flex-direction: column; gap: 4px; }
.caption { margin: 0; font-size: 15px; font-weight: 500; }
.error { margin: 0; color: var(--bad); font-size: 12px; word-break: break-word; }
.original { margin: 0; color: var(--muted); font-size: 12px; font-style: italic; }
.meta { margin-top: auto; font-size: 12px; display: flex; flex-wrap: wrap; gap: 4px 8px; }
.meta span { white-space: nowrap; }
.badge { display: inline-block; padding: 0 6px; border-radius: 9px; font-size: 11px; font-weight: 600; color: #fff; }
.badge.ok { background: var(--ok); }
.badge.bad { background: var(--bad); }
.score { font-variant-numeric: tabular-nums; font-weight: 600; }
.size { color: var(--muted); }
.key { font: 11px/1.3 ui-monospace, "DejaVu Sans Mono", monospace; color: var(--muted); overflow: hidden;
  text-overflow: ellipsis; white-space: nowrap; }
details { font-size: 12px; }
details ol { margin: 4px 0 0; padding-left: 18px; }
.notice { background: #fff8e1; border: 1px solid #f3d98b; border-radius: 8px; padding: 8px 12px; margin: 0 0 16px; }
.empty { color: var(--muted); margin: 0; }
footer { color: var(--muted); font-size: 12px; }
"""
