"""Write the synthetic Turkish demo corpus (see pipeline/demo/), deterministic by seed.

  python jobs/make_demo_corpus.py --out data/demo --seed 0 --train 20000 --val 1000 --test 1000
  python jobs/make_demo_corpus.py --out data/demo-big --size 640x480 --formats webdataset

Writes DIR/{train,val,test}/shard-NNNNN.{tar,parquet} and DIR/manifest.json (sha256 per file).
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import _bootstrap  # noqa: F401
import click

from pipeline.cli import OneLineErrors
from pipeline.demo.corpus import FORMATS, write_corpus

_SIZE = re.compile(r"(\d+)x(\d+)")
MIN_SIDE, MAX_SIDE = 16, 4096


def _parse_size(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, int]:
    match = _SIZE.fullmatch(value.strip().lower())
    if not match or not all(MIN_SIDE <= int(side) <= MAX_SIDE for side in match.groups()):
        raise click.BadParameter(f"expected WIDTHxHEIGHT with sides {MIN_SIDE}..{MAX_SIDE}, e.g. 64x64; got {value!r}")
    return int(match.group(1)), int(match.group(2))


def _parse_formats(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, ...]:
    formats = tuple(dict.fromkeys(f.strip() for f in value.split(",") if f.strip()))
    if not formats or not set(formats) <= set(FORMATS):
        raise click.BadParameter(f"expected a comma-separated subset of {','.join(FORMATS)}; got {value!r}")
    return formats


@click.command(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Output directory.")
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, byte-identical files.")
@click.option("--train", type=click.IntRange(min=0), default=1000, show_default=True, help="Training samples.")
@click.option("--val", type=click.IntRange(min=0), default=100, show_default=True, help="Validation samples.")
@click.option("--test", type=click.IntRange(min=0), default=100, show_default=True, help="Test samples.")
@click.option("--size", default="64x64", show_default=True, callback=_parse_size, metavar="WxH",
              help="Image size, width x height in pixels.")
@click.option("--shard-size", type=click.IntRange(min=1), default=10000, show_default=True,
              help="Samples per shard file.")
@click.option("--formats", default=",".join(FORMATS), show_default=True, callback=_parse_formats, metavar="LIST",
              help="Comma-separated: webdataset (img2dataset-style .tar) and/or parquet.")
@click.option("--workers", type=click.IntRange(min=1), default=len(os.sched_getaffinity(0)), show_default="CPUs",
              help="Processes drawing shards side by side (same files for any number).")
def main(out: Path, seed: int, train: int, val: int, test: int, size: tuple[int, int], shard_size: int,
         formats: tuple[str, ...], workers: int) -> None:
    """Generate the train/val/test splits of the demo corpus."""
    start = time.perf_counter()
    try:
        manifest = write_corpus(out, seed, {"train": train, "val": val, "test": test}, size=size,
                                shard_size=shard_size, formats=formats, progress=True,
                                workers=workers)
    except OSError as exc:
        raise click.ClickException(f"cannot write {out}: {exc}") from None
    click.echo(f"wrote {train + val + test} samples (train {train}, val {val}, test {test}) at {size[0]}x{size[1]}, "
               f"seed {seed}, in {len(manifest['files'])} files -> {out} ({time.perf_counter() - start:.1f}s)")


if __name__ == "__main__":
    main()
