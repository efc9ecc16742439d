"""Import an original ClipCap checkpoint (.pt) into a model bundle.

  python jobs/import_clipcap.py coco_weights.pt --lm gpt2 --clip ViT-B-32:openai \
      --mapper mlp --prefix-length 10 --caption-language en --out bundles/clipcap-coco
"""

from __future__ import annotations

import sys
from pathlib import Path

import _bootstrap  # noqa: F401
import click

from pipeline.cli import OneLineErrors, language_options
from pipeline.models.clipcap_import import import_clipcap
from pipeline.models.errors import ModelLoadError


@click.command(cls=OneLineErrors)
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--lm", required=True, help="Hugging Face causal LM: hub name or local directory.")
@click.option("--clip", required=True,
              help="open_clip ARCH[:WEIGHTS] (e.g. ViT-B-32:openai) or a transformers CLIP (hub name or folder).")
@click.option("--mapper", type=click.Choice(["mlp", "transformer"]), required=True)
@click.option("--prefix-length", type=click.IntRange(min=1), required=True)
@click.option("--clip-length", type=click.IntRange(min=1), default=None,
              help="Transformer mapper only; read from the checkpoint when omitted.")
@click.option("--num-layers", type=click.IntRange(min=1), default=None,
              help="Transformer mapper only; read from the checkpoint when omitted.")
@click.option("--normalize-prefix", is_flag=True,
              help="The checkpoint was trained with --normalize_prefix; else its mapper gets CLIP's raw features.")
@click.option("--scorer", default=None,
              help="The CLIP that scores captions: open_clip ARCH[:WEIGHTS] (a multilingual one: "
                   "xlm-roberta-base-ViT-B-32:laion5b_s13b_b90k), an open_clip folder or a transformers CLIP; "
                   "default: the encoder.")
@language_options
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Bundle directory to write.")
def main(checkpoint: Path, lm: str, clip: str, mapper: str, prefix_length: int, clip_length: int | None,
         num_layers: int | None, normalize_prefix: bool, scorer: str | None,
         caption_language: tuple[str], scorer_languages: tuple[str, ...] | None, out: Path) -> None:
    try:
        manifest = import_clipcap(checkpoint, lm=lm, clip=clip, mapper=mapper, prefix_length=prefix_length,
                                  out=out, clip_length=clip_length, num_layers=num_layers,
                                  normalize_prefix=normalize_prefix, scorer=scorer,
                                  caption_language=caption_language[0],
                                  scorer_languages=scorer_languages)
    except ModelLoadError as exc:
        click.echo(f"error: {exc}", err=True)  # as every job: one line, exit status 2
        sys.exit(2)
    click.echo(f"wrote bundle {out} ({mapper} mapper, prefix {prefix_length}, sha256 {manifest['sha256'][:12]})")


if __name__ == "__main__":
    main()
