"""Verify a caption_shards output directory: schema, unique keys, filtered/ vs captions/, completeness
against the inputs, no temporary files, run.json counts. Exit 0 when every check passes, 1 when one
fails, 2 on bad usage.

  python jobs/verify_output.py out/ --input 'shards/{00000..00009}.tar'
"""

from __future__ import annotations

import json
import sys

import _bootstrap  # noqa: F401
import click

from pipeline.cli import OneLineErrors
from pipeline.io.sources import InputError
from pipeline.quality.verify import VerifyUsageError, verify

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


@click.command(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("output", required=False)
@click.option("--input", "inputs", multiple=True,
              help="The run's --input specs; when given, captions/ must hold exactly their keys. Repeatable.")
@click.option("--image-column", default=None, help="Parquet image column of the inputs (default: jpg, then image).")
@click.option("--key-column", default="key", show_default=True, help="Parquet key column of the inputs.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
def main(output: str | None, inputs: tuple[str, ...], image_column: str | None, key_column: str,
         as_json: bool) -> int:
    """Verify OUTPUT, a caption_shards output directory (local path or fsspec URL)."""
    if output is None:
        raise click.UsageError("missing OUTPUT: the output directory to verify")
    try:
        report = verify(output, inputs or None, image_column=image_column, key_column=key_column)
    except (VerifyUsageError, InputError) as exc:
        raise click.UsageError(str(exc)) from None
    if as_json:
        click.echo(json.dumps(report.to_json(), ensure_ascii=False, indent=2))
    else:
        click.echo("\n".join(report.lines()))
    return EXIT_OK if report.ok else EXIT_FAILED


if __name__ == "__main__":
    try:
        # Not standalone: click would print a multi-line usage block; bad usage here is one line.
        sys.exit(main(standalone_mode=False))
    except click.ClickException as exc:
        click.echo(f"error: {exc.format_message()}", err=True)
        sys.exit(EXIT_USAGE)
