"""Caption image shards into a filtered Turkish pseudo-label dataset (docs/running.md; its output:
docs/output-format.md).

  python jobs/caption_shards.py --input 'shards/{00000..00009}.tar' --output out/
  ray job submit --working-dir . -- python jobs/caption_shards.py --input ... --output ...
"""

from __future__ import annotations

import logging
import sys

import _bootstrap  # noqa: F401
import click

from pipeline.cli import OneLineErrors
from pipeline.config import DTYPES, ActorRange, GenerationSettings, RunConfig
from pipeline.generation.methods import METHODS
from pipeline.io.sources import InputError
from pipeline.models.errors import ModelLoadError
from pipeline.run.filtering import FilterSettings


@click.command(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--input", "inputs", multiple=True, required=True,
              help="Shard path, glob, brace range or fsspec URL (.tar, .parquet, or a directory). Repeatable.")
@click.option("--output", required=True, help="Output directory (local path or fsspec URL).")
@click.option("--model", default="demo", show_default=True,
              help="'demo' or a model bundle directory; with --embed-only also a CLIP alone: open_clip ARCH:WEIGHTS "
                   "(ViT-B-32:openai), an open_clip folder or a transformers CLIP.")
@click.option("--image-column", default=None, help="Parquet image column (default: jpg, then image).")
@click.option("--key-column", default="key", show_default=True,
              help="Parquet key column (the default is used where present; a name you give must exist).")
@click.option("--min-clip-score", type=float, default=None, help="Keep rows with clip_score >= this.")
@click.option("--keep-top-fraction", type=float, default=None,
              help="Keep this fraction of the run's best clip_scores (global quantile).")
@click.option("--filter-clusters", type=click.IntRange(min=2), default=None,
              help="Keep --keep-top-fraction within each of this many k-means clusters of image_embedding, so "
                   "that images whose captions score low even when right keep their share.")
@click.option("--decode", "method", type=click.Choice(tuple(METHODS)), default="greedy", show_default=True)
@click.option("--num-candidates", type=click.IntRange(min=1), default=1, show_default=True,
              help="Best-of-N: candidates per image, reranked by CLIP score.")
@click.option("--beam-width", type=click.IntRange(min=1), default=None,
              help="Beam search width (default: max(num-candidates, 3)).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True)
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=0.9, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Images per model batch, at most (a small local input on CPU actors is cut into equal "
                   "batches, as many for each actor); decoding gains from every extra row (docs/benchmarks.md).")
@click.option("--actors", default="auto", show_default=True,
              help="Model actors: N, MIN-MAX to autoscale, or auto: as many as the nodes up now hold.")
@click.option("--gpus-per-actor", type=click.FloatRange(0, 1), default=None,
              help="GPUs per model actor: 1, or a share such as 0.5 (default: 1 when the cluster has GPUs, "
                   "else 0).")
@click.option("--dtype", type=click.Choice(DTYPES), default="auto", show_default=True)
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Caption only the first N samples.")
@click.option("--rows-per-file", type=click.IntRange(min=1), default=4096, show_default=True,
              help="Rows per Parquet part file.")
@click.option("--write-webdataset", is_flag=True,
              help="Also write the filtered set with its images as WebDataset tars (OUTPUT/filtered_wds/).")
@click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed.")
@click.option("--allow-foreign-scorer", is_flag=True,
              help="Let --min-clip-score / --keep-top-fraction filter by a scorer whose text tower was not "
                   "trained on the captions' language (bundle.json 'languages'), which is refused otherwise.")
@click.option("--embed-only", is_flag=True,
              help="Write image_embedding (and original_clip_score) for every sample, no caption: the encoder's "
                   "speed, for training from embeddings or a search index.")
@click.option("--overwrite", is_flag=True, help="Replace an output holding a run with another configuration "
              "(a finished run whose filter alone changed is re-filtered from its stored scores, no model run).")
def main(inputs, output, model, image_column, key_column, min_clip_score, keep_top_fraction, filter_clusters, method,
         num_candidates, beam_width, max_new_tokens, temperature, top_p, batch_size, actors, gpus_per_actor,
         dtype, limit, rows_per_file, write_webdataset, seed, allow_foreign_scorer, embed_only, overwrite) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        decode = GenerationSettings(method=method, num_candidates=num_candidates, max_new_tokens=max_new_tokens,
                                    beam_width=beam_width or max(num_candidates, 3), temperature=temperature,
                                    top_p=top_p if method == "sample" else 1.0, seed=seed)
        config = RunConfig(inputs=tuple(inputs), output=output, model=model, image_column=image_column,
                           key_column=key_column,
                           filter=FilterSettings(min_clip_score=min_clip_score, keep_top_fraction=keep_top_fraction,
                                                 clusters=filter_clusters),
                           decode=decode, batch_size=batch_size, actors=ActorRange.parse(actors),
                           gpus_per_actor=gpus_per_actor, dtype=dtype, limit=limit, rows_per_file=rows_per_file,
                           write_webdataset=write_webdataset, overwrite=overwrite,
                           allow_foreign_scorer=allow_foreign_scorer, embed_only=embed_only)
    except ValueError as exc:  # settings that cannot work together
        raise click.UsageError(str(exc)) from None
    # Ray and the pipeline load only once the usage is known to be sound
    from pipeline.io.retry import TransientIOError
    from pipeline.run.chain import run
    from pipeline.run.errors import ActorStartFailed, StagingNotListed, UsageError

    try:
        summary = run(config)
    except (UsageError, InputError, ModelLoadError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except (ActorStartFailed, StagingNotListed, TransientIOError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    counts, timings = summary["counts"], summary["timings"]
    failed = counts["rows"] - counts["by_status"].get("ok", 0)
    rate = timings.get("images_per_s")
    captioned = (f"{'embedded' if embed_only else 'captioned'} {counts['rows']} rows ({failed} failed) in "
                 f"{timings['wall_s']:.1f}s, "
                 f"{rate if rate is not None else 'n/a'} images/s")
    if "refilter_s" in timings:  # the wall time and rate are those of the run that captioned them
        click.echo(f"re-filtered {counts['rows']} rows from their stored scores in {timings['refilter_s']:.1f}s, "
                   f"no model run ({counts['kept']} kept) -> {output}; {captioned} earlier")
    else:
        click.echo(f"{captioned}, {counts['kept']} kept -> {output}")
    if "webdataset" in summary:
        webdataset = summary["webdataset"]
        click.echo(f"webdataset: {webdataset['samples']} samples in {webdataset['tars']} tars -> "
                   f"{output.rstrip('/')}/{webdataset['folder']}")


if __name__ == "__main__":
    main()
