"""Evaluate a model bundle on a held-out split: caption metrics, demo-world object accuracy, CLIP-score filter.

  python jobs/evaluate.py --model bundles/demo --data 'data/demo/test/*.tar' [--limit 500] [--json eval.json]
  python jobs/evaluate.py --model runs/coco-tr/bundle --data coco/dataset_coco_tr.json --image-root coco

Runs in-process (no Ray), on the GPU when there is one, in float32.
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path
from typing import NoReturn

import _bootstrap  # noqa: F401
import click
import torch
from transformers.utils import logging as transformers_logging

from pipeline.cli import OneLineErrors
from pipeline.config import DEMO_BUNDLE, DEMO_MODEL, GenerationSettings
from pipeline.demo import DemoObjects
from pipeline.generation.methods import METHODS
from pipeline.io.caption_files import TEST_SPLITS, expand_labelled_inputs, read_labelled_inputs
from pipeline.io.sources import InputError
from pipeline.models.bundle import load_bundle
from pipeline.models.errors import ModelLoadError
from pipeline.quality.evaluation import EvaluationError, evaluate, format_table


@click.command(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", required=True, help="Model bundle directory, or 'demo' for the embedded bundle.")
@click.option("--data", "data", multiple=True, required=True,
              help="Shard path, glob, brace range or fsspec URL (as caption_shards --input), or a caption file "
              "(COCO captions JSON, Karpathy split JSON, JSON Lines). Repeatable.")
@click.option("--image-root", default=None,
              help="Folder of the images a caption file names by relative path (default: the file's folder).")
@click.option("--split", "splits", multiple=True, default=TEST_SPLITS, show_default=True,
              help="The split of a Karpathy split file to evaluate on. Repeatable.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Evaluate only the first N samples.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--decode", "method", type=click.Choice(tuple(METHODS)), default="greedy", show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of sampling, attribute swaps and the untrained baseline.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write every figure and the first examples here.")
def main(model: str, data: tuple[str, ...], image_root: str | None, splits: tuple[str, ...], limit: int | None,
         batch_size: int, method: str, max_new_tokens: int, seed: int, json_path: Path | None) -> None:
    """Caption a held-out split in-process and report caption metrics, object accuracy and filter figures."""
    # beam width and top-p as caption_shards uses them by default, so the figures describe that job's captions
    settings = GenerationSettings(method=method, max_new_tokens=max_new_tokens, beam_width=3,
                                  top_p=0.9 if method == "sample" else 1.0, seed=seed)
    transformers_logging.disable_progress_bar()  # its weight-loading bar would bury the report and error lines
    try:
        caption_files, shards = expand_labelled_inputs(list(data))
        bundle = load_bundle(DEMO_BUNDLE if model == DEMO_MODEL else Path(model))
    except (InputError, ModelLoadError) as exc:
        _fail(str(exc))
    try:
        bundle.facts().check_max_new_tokens(max_new_tokens)
    except ValueError as exc:
        _fail(str(exc))
    if json_path:
        try:  # before the long run, not after it
            json_path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            _fail(f"cannot write --json {json_path}: {exc}")
    bundle.to("cuda" if torch.cuda.is_available() else "cpu")
    samples = itertools.islice(read_labelled_inputs(caption_files, shards, image_root, splits), limit)
    try:
        report = evaluate(bundle, samples, settings, batch_size=batch_size, seed=seed, progress=True,
                          checker=DemoObjects())
    except EvaluationError as exc:
        _fail(str(exc))
    report["data"] = list(data)
    click.echo(format_table(report))
    if json_path:
        json_path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _fail(message: str) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


if __name__ == "__main__":
    main()
