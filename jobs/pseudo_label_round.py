"""The pseudo-label round (pipeline/training/pseudo_labels.py): a teacher trained on a labelled set captions a pool of
images (best of 8 samples by CLIP score), the filter keeps the best captions, and a student trained on the
labelled set plus the kept pseudo-labels is compared with its teacher on a test set, for every seed. Rerun the
same command to resume; `--rounds 2` makes each student the teacher of a second round.

  python jobs/make_demo_corpus.py --out data/round/labelled --seed 11 --train 1000 --val 0 --test 0
  python jobs/make_demo_corpus.py --out data/round/pool --seed 12 --train 20000 --val 0 --test 0
  python jobs/make_demo_corpus.py --out data/round/test --seed 13 --train 0 --val 0 --test 1000
  python jobs/pseudo_label_round.py --labelled 'data/round/labelled/train/*.tar' \\
      --pool 'data/round/pool/train/*.tar' --test 'data/round/test/test/*.tar' --out runs/round

OUT/results.md, results.json and results.svg hold the table: every figure's mean and standard deviation over the
seeds, for the teacher and each round's student.
"""

from __future__ import annotations

import logging
import sys

import _bootstrap  # noqa: F401
import click

from pipeline.cli import OneLineErrors
from pipeline.config import GenerationSettings
from pipeline.generation.methods import METHODS
from pipeline.io.sources import InputError
from pipeline.models.errors import ModelLoadError
from pipeline.run.filtering import FilterSettings


def _seeds(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(seed) for seed in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r}: comma-separated integers, such as 0,1,2") from None
    if len(set(seeds)) != len(seeds):
        raise click.BadParameter(f"{value!r} names a seed twice")
    return seeds


def _filter_spec(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> tuple[FilterSettings, ...]:
    names = {"top": "keep_top_fraction", "clusters": "clusters", "min": "min_clip_score"}
    filters = []
    for value in values:
        settings: dict[str, float | int] = {}
        for item in [] if value.strip() == "none" else value.split(","):
            name, _, number = item.partition("=")
            try:
                settings[names[name.strip()]] = int(number) if name.strip() == "clusters" else float(number)
            except (KeyError, ValueError):
                raise click.BadParameter(f"{value!r}: 'none', or top=F, clusters=K, min=S joined by commas") from None
        try:
            filters.append(FilterSettings(**settings))
        except ValueError as exc:
            raise click.BadParameter(f"{value!r}: {exc}") from None
    return tuple(filters)


@click.command(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--labelled", multiple=True, required=True,
              help="Images + captions the teacher learns from, and the students too (as train_captioner's --data).")
@click.option("--pool", multiple=True, required=True, help="Images the teacher captions (as caption_shards' --input).")
@click.option("--test", multiple=True, required=True, help="Images + captions to evaluate on (as evaluate's --data).")
@click.option("--clip", default="demo", show_default=True,
              help="The bundle whose frozen encoder (and scorer) every model shares; 'demo': the embedded one.")
@click.option("--seeds", default="0,1,2", show_default=True, callback=_seeds, help="One round per seed.")
@click.option("--rounds", type=click.IntRange(min=1), default=1, show_default=True,
              help="2 or more: each student becomes the next round's teacher.")
@click.option("--teacher-epochs", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--student-epochs", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=2), default=128, show_default=True)
@click.option("--decode", "method", type=click.Choice(tuple(METHODS)), default="sample", show_default=True,
              help="How the teacher captions the pool.")
@click.option("--num-candidates", type=click.IntRange(min=1), default=8, show_default=True,
              help="Candidates per pool image, the best by CLIP score kept.")
@click.option("--keep-top-fraction", type=click.FloatRange(0, 1, min_open=True), default=0.5, show_default=True,
              help="The fraction of the pool's best-scored captions kept as pseudo-labels.")
@click.option("--min-clip-score", type=click.FloatRange(-1, 1), default=None,
              help="Keep pseudo-labels scoring at least this.")
@click.option("--filter-clusters", type=click.IntRange(min=2), default=None,
              help="Keep --keep-top-fraction within each of this many clusters of image embeddings.")
@click.option("--compare-filter", "compare", multiple=True, callback=_filter_spec,
              help="Also train each round's student on the same candidates kept by this filter, for the same "
                   "number of steps: 'none', or comma-separated top=F, clusters=K, min=S (e.g. top=0.5,clusters=64). "
                   "Repeatable.")
@click.option("--pool-limit", type=click.IntRange(min=1), default=None, help="Caption only the first N pool images.")
@click.option("--test-limit", type=click.IntRange(min=1), default=None, help="Evaluate on the first N test images.")
@click.option("--num-workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Ray Train workers of each training run.")
@click.option("--out", required=True, help="The round's folder (rerun the same command to resume).")
def main(labelled: tuple[str, ...], pool: tuple[str, ...], test: tuple[str, ...], clip: str, seeds: tuple[int, ...],
         rounds: int, teacher_epochs: int, student_epochs: int, batch_size: int, method: str, num_candidates: int,
         keep_top_fraction: float, min_clip_score: float | None, filter_clusters: int | None,
         compare: tuple[FilterSettings, ...], pool_limit: int | None, test_limit: int | None, num_workers: int,
         out: str) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from pipeline.training.pseudo_labels import RoundConfig, format_markdown, run_rounds
    from pipeline.training.trainer import TrainingFailed

    if batch_size % num_workers:
        raise click.UsageError(f"--batch-size {batch_size} does not split among {num_workers} workers")
    try:
        decode = GenerationSettings(method=method, num_candidates=num_candidates,
                                    top_p=0.9 if method == "sample" else 1.0)
        config = RoundConfig(out=out, labelled=labelled, pool=pool, test=test, clip=clip, seeds=seeds, rounds=rounds,
                             teacher_epochs=teacher_epochs, student_epochs=student_epochs, batch_size=batch_size,
                             decode=decode, filter=FilterSettings(min_clip_score, keep_top_fraction, filter_clusters),
                             compare=compare,
                             pool_limit=pool_limit, test_limit=test_limit, num_workers=num_workers)
        results = run_rounds(config)
    except (ModelLoadError, InputError, ValueError, TrainingFailed) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    click.echo(format_markdown(results), nl=False)
    click.echo(f"-> {out}/results.md, results.json, results.svg")


if __name__ == "__main__":
    main()
