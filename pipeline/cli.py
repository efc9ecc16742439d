"""What every job's command line shares."""

from __future__ import annotations

import sys
from typing import Any

import click


class OneLineErrors(click.Command):
    """Reports a usage error as one `error: ...` line on stderr instead of click's usage block."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.pop("standalone_mode", None)
        try:
            return super().main(*args, standalone_mode=False, **kwargs)
        except click.ClickException as exc:
            click.echo(f"error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("error: aborted", err=True)
            sys.exit(1)


def _language_codes(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[str, ...] | None:
    """'tr' or 'tr,en' (ISO 639 codes; the scorer may read 'multilingual') as a tuple of codes."""
    from pipeline.models.languages import MULTILINGUAL, is_language_code

    if value is None:
        return None
    codes = tuple(code.strip().lower() for code in value.split(",") if code.strip())
    one = param.name == "caption_language"
    if not codes or (one and len(codes) > 1) or not all(
            is_language_code(code) or (code == MULTILINGUAL and not one) for code in codes):
        raise click.BadParameter(f"{value!r}: give an ISO 639 code such as tr" +
                                 ("" if one else f", several (tr,en), or {MULTILINGUAL}"))
    return codes


def language_options(command: Any) -> Any:
    """--caption-language and --scorer-languages of the jobs that write a bundle (bundle.json 'languages')."""
    command = click.option(
        "--scorer-languages", callback=_language_codes, default=None,
        help="Languages the scorer's text tower was trained on, comma-separated (tr, en, ...) or 'multilingual' "
             "(default: guessed: a CLIP trained here reads the captions' language, a multilingual open_clip "
             "model many, other pretrained CLIPs English).")(command)
    return click.option("--caption-language", callback=_language_codes, default="tr", show_default=True,
                        help="The language the captioner writes.")(command)
