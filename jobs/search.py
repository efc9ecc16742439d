"""Find an output's images by a Turkish text query, through the image_embedding column.

  python jobs/search.py OUT "kırmızı bir kalp" [--top 10] [--model BUNDLE] [--filtered]

The query is embedded by the bundle's scorer text tower (default: the bundle that made the output, from
run.json), which must share the encoder's image tower. Prints rank, score, key, caption and source.
"""

from __future__ import annotations

import sys
from pathlib import Path

import _bootstrap  # noqa: F401
import click

from pipeline.cli import OneLineErrors
from pipeline.config import DEMO_BUNDLE, DEMO_MODEL
from pipeline.io.sinks import CAPTIONS, FILTERED, RUN_JSON, OutputDir
from pipeline.models.errors import ModelLoadError


@click.command(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("output")
@click.argument("query")
@click.option("--top", type=click.IntRange(min=1), default=10, show_default=True, help="How many images.")
@click.option("--model", default=None, help="Bundle directory or 'demo' (default: the run's own, from run.json).")
@click.option("--filtered", is_flag=True, help="Search the filtered set only (default: every captioned row).")
def main(output: str, query: str, top: int, model: str | None, filtered: bool) -> None:
    from pipeline.models.bundle import load_bundle
    from pipeline.quality.search import SearchError, search

    try:
        model = model or ((OutputDir(output).read_json(RUN_JSON) or {}).get("config") or {}).get("model")
        if not model:
            raise SearchError(f"no {RUN_JSON} in {output} names the bundle that made it: give --model")
        bundle = load_bundle(DEMO_BUNDLE if model == DEMO_MODEL else Path(model))
        hits = search(output, bundle, query, top, FILTERED if filtered else CAPTIONS)
    except (SearchError, ModelLoadError, OSError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    for rank, hit in enumerate(hits, 1):
        click.echo(f"{rank:>3}  {hit.score:.3f}  {hit.key}  {hit.caption}  ({hit.source})")


if __name__ == "__main__":
    main()
