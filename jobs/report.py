"""Write one self-contained HTML page that shows a finished captioning run.

  python jobs/report.py OUT [--input SPEC ...] [--samples 24] [--seed 0] [--out OUT/report.html]

The images are read back from the run's own inputs (or from --input, when they moved); the page
needs no network. Prints the report's path.
"""

from __future__ import annotations

import sys

import _bootstrap  # noqa: F401
import click

from pipeline.cli import OneLineErrors
from pipeline.io.sinks import REPORT
from pipeline.quality.report import ReportError, build_report, write_report


@click.command(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("output")
@click.option("--input", "inputs", multiple=True,
              help="Where the run's inputs are now (default: the run's own --input). Repeatable.")
@click.option("--samples", type=click.IntRange(min=0), default=24, show_default=True,
              help="Rows shown per gallery section (kept, dropped, failed).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the row sample.")
@click.option("--out", default=None, help="Report path or fsspec URL [default: OUTPUT/report.html].")
def main(output: str, inputs: tuple[str, ...], samples: int, seed: int, out: str | None) -> None:
    target = out or f"{output.rstrip('/')}/{REPORT}"
    try:
        write_report(build_report(output, list(inputs) or None, samples=samples, seed=seed), target)
    except (ReportError, OSError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    click.echo(target)


if __name__ == "__main__":
    main()
