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
