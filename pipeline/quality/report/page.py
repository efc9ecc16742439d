"""The report's HTML: panels, tables, galleries of sampled rows, the CLIP-score histogram as inline SVG, the CSS.
Everything is inline (data: URIs, SVG, CSS): the page needs no network and no JavaScript."""

from __future__ import annotations

import html
import math
from typing import Any

import numpy as np

from pipeline.quality.report.samples import FAILED, SECTIONS, Sample, Thumbnails

HISTOGRAM_BINS = 30


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _number(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return esc(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.{digits}f}"


def panel(title: str, content: str, note: str = "") -> str:
    note_html = f'<p class="note">{esc(note)}</p>' if note else ""
    return f"<section><h2>{esc(title)}</h2>{note_html}{content}</section>"


def header(output_url: str, summary: dict[str, Any]) -> str:
    model = summary.get("model") or {}
    timings = summary.get("timings") or {}
    sha = str(model.get("sha256") or "")[:12]
    return (f'<header><h1>Captioning report</h1><p class="sub"><code>{esc(output_url)}</code> · model '
            f'<b>{esc(model.get("name", "?"))}</b> <code>{esc(sha)}</code> · finished '
            f'{esc(timings.get("finished", "?"))}</p></header>')


def stats(summary: dict[str, Any]) -> str:
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
    cards = "".join(f'<div class="stat"><div class="label">{esc(label)}</div><div class="value">{value}</div>'
                    f'<div class="detail">{esc(detail)}</div></div>' for label, value, detail in items)
    return f'<section class="stats">{cards}</section>'


def status_table(summary: dict[str, Any]) -> str:
    counts = summary.get("counts") or {}
    rows = counts.get("rows") or 0
    by_status = sorted((counts.get("by_status") or {}).items(), key=lambda item: (item[0] != "ok", -item[1]))
    lines = "".join(f'<tr><td><span class="badge {"ok" if status == "ok" else "bad"}">{esc(status)}</span></td>'
                    f'<td class="num">{_number(n)}</td><td class="num">{100 * n / rows if rows else 0:.1f}%</td></tr>'
                    for status, n in by_status)
    return f'<table class="status"><tr><th>status</th><th class="num">rows</th><th class="num">share</th></tr>' \
           f"{lines}</table>"


def flatten(data: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Nested JSON -> (dotted.key, leaf) rows, so any configuration renders as one table."""
    if isinstance(data, dict) and data:
        return [row for key, value in data.items() for row in flatten(value, f"{prefix}.{key}" if prefix else key)]
    return [(prefix, data)]


def table(rows: list[tuple[str, Any]]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, list):
            return "<br>".join(esc(item) for item in value) or "[]"
        return _number(value) if isinstance(value, int | float) and not isinstance(value, bool) else \
            "–" if value is None else esc(value)

    lines = "".join(f"<tr><th>{esc(key)}</th><td>{cell(value)}</td></tr>" for key, value in rows)
    return f'<table class="kv">{lines}</table>'


def gallery(name: str, sample: Sample, thumbnails: Thumbnails) -> str:
    title, note = SECTIONS[name]
    rows = [row for _, row in sample.rows]
    if name == FAILED:
        rows.sort(key=lambda row: (row["status"], row["key"]))
    else:  # best first: the last cards of "kept" and the first of "dropped" show where the filter cut
        rows.sort(key=lambda row: (-(row["clip_score"] if row["clip_score"] is not None else -math.inf), row["key"]))
    heading = f"{title} · {len(rows)} of {sample.total:,} shown"
    if not rows:
        return panel(heading, '<p class="empty">No rows.</p>', note)
    cards = "".join(_card(row, thumbnails) for row in rows)
    return panel(heading, f'<div class="gallery" data-section="{name}">{cards}</div>', note)


def _card(row: dict[str, Any], thumbnails: Thumbnails) -> str:
    key = row["key"]
    uri = thumbnails.uris.get(key)
    if uri is not None:
        image = f'<img src="{uri}" width="128" height="128" alt="{esc(row["caption"] or key)}">'
    else:
        image = f'<div class="placeholder">{esc(thumbnails.missing.get(key, "no image"))}</div>'
    ok = row["status"] == "ok"
    badges = f'<span class="badge {"ok" if ok else "bad"}">{esc(row["status"])}</span>'
    if row["clip_score"] is not None:
        badges += f' <span class="score">CLIP {row["clip_score"]:.3f}</span>'
    if row["width"] is not None:
        badges += f' <span class="size">{row["width"]}×{row["height"]}</span>'
    text = f'<p class="caption">{esc(row["caption"])}</p>' if row["caption"] is not None else ""
    if not ok:
        text += f'<p class="error">{esc(row["error"] or row["status"])}</p>'
    if row["original_text"]:
        score = row["original_clip_score"]
        scored = f' <span class="score">CLIP {score:.3f}</span>' if score is not None else ""
        text += (f'<p class="original" title="text that came with the sample">{esc(row["original_text"])}'
                 f'{scored}</p>')
    candidates = row["candidates"] or []
    if len(candidates) > 1:
        items = "".join(f"<li>{esc(c['caption'])} <span class=\"score\">{_number(c['clip_score'])}</span></li>"
                        for c in candidates)
        text += f"<details><summary>{len(candidates)} candidates</summary><ol>{items}</ol></details>"
    return (f'<figure class="card">{image}<figcaption>{text}<div class="meta">{badges}</div>'
            f'<div class="key" title="{esc(row["source"])}">{esc(key)}</div></figcaption></figure>')


# Histogram geometry (SVG user units).
_W, _H = 960, 250
_LEFT, _RIGHT, _TOP, _BOTTOM = 48, 16, 40, 30
_TICK_STEPS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.25, 0.5)
MIN_SCORE, CUTOFF = "min-clip-score", "top-fraction cutoff"
_THRESHOLD_COLORS = {MIN_SCORE: "#c62828", CUTOFF: "#ef6c00"}


def histogram_svg(scores: np.ndarray, kept_scores: np.ndarray, thresholds: list[tuple[str, float]]) -> str:
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
                     f'y2="{_TOP + height}" stroke="{color}" data-name="{esc(name)}" data-score="{score}"/>'
                     f'<text class="label" x="{at + shift}" y="{_TOP - 8 - 16 * (1 - row)}" fill="{color}" '
                     f'text-anchor="{anchor}">{esc(name)} {score:.3f}</text>')
    parts.append("</svg>")
    return "".join(parts)


def legend(thresholds: list[tuple[str, float]]) -> str:
    items = ['<span><i class="swatch kept"></i>kept</span>', '<span><i class="swatch bar"></i>dropped</span>']
    items += [f'<span><i class="swatch line" style="border-color:{_THRESHOLD_COLORS[name]}"></i>{esc(name)} '
              f"{score:.3f}</span>" for name, score in thresholds]
    if not thresholds:
        items.append("<span>no filter threshold: every captioned row is kept</span>")
    return f'<div class="legend">{"".join(items)}</div>'


CSS = """
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
