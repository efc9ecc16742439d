"""One self-contained HTML page that shows a finished run: sampled kept / dropped / failed rows with
their thumbnails and Turkish captions, a CLIP-score histogram with the filter thresholds, counts,
timings, configuration and model identity.

The output holds no images, so the sampled rows' image bytes are re-read from the inputs, only from
the shards the rows came from, and each shard only until its sampled keys are found. Inputs that are
gone or moved give a placeholder, never an error. Everything is inline (data: URIs, SVG, CSS): the
page needs no network and no JavaScript.
"""

from __future__ import annotations

import posixpath
import uuid

import fsspec

from pipeline.io.sinks import RUN_JSON, TMP_PREFIX, OutputDir
from pipeline.quality.report.page import (
    CSS,
    CUTOFF,
    HISTOGRAM_BINS,
    MIN_SCORE,
    esc,
    flatten,
    gallery,
    header,
    histogram_svg,
    legend,
    panel,
    stats,
    status_table,
    table,
)
from pipeline.quality.report.samples import SECTIONS, ReportError, read_thumbnails, scan_captions
from pipeline.text import one_line

__all__ = ["HISTOGRAM_BINS", "ReportError", "build_report", "write_report"]


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
    sections, scores, kept_scores = scan_captions(output, samples, seed)
    shown = [row for sample in sections.values() for _, row in sample.rows]
    specs = list(inputs) if inputs else list(config.get("inputs", []))
    thumbnails = read_thumbnails(shown, specs, config.get("image_column"), config.get("key_column", "key"))
    thresholds: list[tuple[str, float]] = []
    min_score = (config.get("filter") or {}).get("min_clip_score")
    if min_score is not None:
        thresholds.append((MIN_SCORE, float(min_score)))
    cutoff = (summary.get("counts") or {}).get("top_fraction_cutoff_score")
    if cutoff is not None:
        thresholds.append((CUTOFF, float(cutoff)))
    body = [
        header(output_url, summary),
        *(f'<p class="notice">{esc(warning)}</p>' for warning in summary.get("warnings") or []),
        stats(summary),
        panel("CLIP score", histogram_svg(scores, kept_scores, thresholds) + legend(thresholds)),
        panel("Rows by status", status_table(summary)),
        *(f'<p class="notice">{esc(note)}</p>' for note in thumbnails.notes),
        *(gallery(name, sections[name], thumbnails) for name in SECTIONS),
        panel("Timings", table(flatten(summary.get("timings", {})))),
        panel("Configuration", table(flatten(config))),
        panel("Model", table(flatten(summary.get("model", {})))),
        panel("Packages", table(flatten(summary.get("packages", {})))),
        f"<footer>{len(shown)} rows sampled with seed {seed}, up to {samples} per section.</footer>",
    ]
    title = f"Captioning report: {(summary.get('model') or {}).get('name', '')} {output_url}"
    return (f'<!doctype html>\n<html lang="tr">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{esc(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n"
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


