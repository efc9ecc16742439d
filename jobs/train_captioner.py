"""Train a captioner and write a model bundle, on Ray Train (pipeline/training/trainer.py): `--num-workers N`
DDP workers, checkpoints under --out/checkpoints that a restarted worker group or a rerun resumes from. Runs as plain
`python` (a local Ray starts) or with `ray job submit` on a cluster (--out then on storage every node reaches).

The embedded demo model (reproduces pipeline/assets/demo_bundle, docs/demo-model.md):
  python jobs/make_demo_corpus.py --out data/demo --seed 0 --train 80000 --val 1000 --test 2000
  python jobs/train_captioner.py --data 'data/demo/train/*.tar' --out runs/v9 --clip-image-size 48 \
      --clip-stride 16 --clip-width 24 --clip-epochs 4 --caption-epochs 24 --first-reference-prob 0.5 \
      --save-fp16 --seed 0

Real models and data:
  python jobs/train_captioner.py --data 'coco_tr/{00000..00099}.tar' --clip ViT-B-32:openai \
      --scorer xlm-roberta-base-ViT-B-32:laion5b_s13b_b90k --lm redrussianarmy/gpt2-turkish-cased --out runs/coco-tr
  python jobs/train_captioner.py --embeddings-from out --clip bundles/demo --out runs/next
A student on labelled images and the pseudo-labels an output kept (its filtered/ part), not encoded again:
  python jobs/train_captioner.py --data 'labelled/*.tar' --embeddings-from out --clip bundles/demo --out runs/student
ClipCap's recipe, the images encoded once (caption_shards.py --model ViT-B-32:openai --embed-only ... --output
out/coco-emb), then every COCO reference joined to the stored embeddings by key:
  python jobs/train_captioner.py --embeddings-from out/coco-emb/captions --clip ViT-B-32:openai \
      --captions coco/annotations/captions_train2014_tr.json --lm redrussianarmy/gpt2-turkish-cased --out runs/coco-tr
A Turkish scorer for a bundle whose encoder's text tower reads English (locked-image tuning from the Turkish GPT-2):
  python jobs/train_captioner.py --data 'coco_tr/{00000..00099}.tar' --clip runs/coco-tr/bundle --train-scorer \
      --scorer-text-tower redrussianarmy/gpt2-turkish-cased --caption-epochs 0 --out runs/coco-tr-lit
"""

from __future__ import annotations

import logging
import sys
from dataclasses import replace

import _bootstrap  # noqa: F401
import click

from pipeline.cli import OneLineErrors, language_options
from pipeline.config import DTYPES
from pipeline.io.sources import InputError
from pipeline.models.errors import ModelLoadError
from pipeline.run.errors import UsageError
from pipeline.text import describe_error
from pipeline.training.config import TrainConfig
from pipeline.training.trainer import Scaling, TrainingFailed, train


@click.command(cls=OneLineErrors)
@click.option("--data", "--captions", "data", multiple=True,
              help="Images + Turkish captions: WebDataset/Parquet/folder, or a caption file (COCO captions JSON, "
              "Karpathy split JSON, JSON Lines). Repeatable.")
@click.option("--image-root", default=None,
              help="Folder of the images a caption file names by relative path (default: the file's folder).")
@click.option("--embeddings-from", multiple=True,
              help="This project's output (its folder: the kept rows of filtered/; or captions/, filtered/, Parquet "
                   "files): train on its stored image embeddings (not read again) and their --text-column, or the "
                   "captions of --data caption files joined by key; --data images train alongside, encoded with "
                   "--clip. Repeatable.")
@click.option("--text-column", type=click.Choice(["caption", "original_text"]), default="caption", show_default=True,
              help="The --embeddings-from column to train on: the generated captions, or the text that came with "
                   "each image.")
@click.option("--clip", default=None, help="open_clip ARCH[:WEIGHTS], a transformers CLIP (hub name or folder) or a "
              "bundle dir; omitted: train a small CLIP.")
@click.option("--scorer", default=None,
              help="The CLIP that scores captions: open_clip ARCH[:WEIGHTS] (a multilingual one: "
              "xlm-roberta-base-ViT-B-32:laion5b_s13b_b90k), an open_clip folder or a transformers CLIP; "
              "omitted: the encoder.")
@click.option("--lm", default=None, help="Hugging Face causal LM name or dir; omitted: a GPT-2 from config, with a "
              "BPE tokenizer trained on the captions.")
@click.option("--lm-width", type=click.IntRange(min=8), default=None,
              help="That GPT-2's width (default: 192; GPT-2 small: 768).")
@click.option("--lm-layers", type=click.IntRange(min=1), default=None, help="Its layers (default: 3; GPT-2 small: 12).")
@click.option("--lm-heads", type=click.IntRange(min=1), default=None, help="Its heads (default: 4; GPT-2 small: 12).")
@click.option("--lm-positions", type=click.IntRange(min=16), default=None,
              help="Its positions, the prefix's included (default: 96).")
@click.option("--vocab-size", type=click.IntRange(min=300), default=None,
              help="Its tokenizer's vocabulary, trained on the captions (default: 1024; GPT-2: 50257).")
@click.option("--mapper", type=click.Choice(["mlp", "transformer"]), default="mlp", show_default=True)
@click.option("--freeze-lm", is_flag=True, help="Train the mapper only (ClipCap's transformer-mapper variant).")
@click.option("--prefix-length", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--clip-epochs", type=click.IntRange(min=0), default=None)
@click.option("--caption-epochs", type=click.IntRange(min=0), default=None)
@click.option("--batch-size", type=click.IntRange(min=2), default=None)
@click.option("--micro-batch-size", type=click.IntRange(min=1), default=None,
              help="Gradient accumulation: compute each captioner batch in pieces of this many (the same update in "
                   "less memory). The contrastive stages take each batch whole: its other captions are the "
                   "negatives.")
@click.option("--clip-lr", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Stage 1's peak learning rate (default: 2e-3).")
@click.option("--caption-lr", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Stage 2's peak learning rate (default: 1e-3 from scratch, ClipCap's 2e-5 with --lm).")
@click.option("--clip-image-size", type=click.IntRange(min=32), default=None,
              help="Input size of the small CLIP trained when --clip is omitted (default: 64).")
@click.option("--clip-stride", type=click.Choice(["32", "16"]), default=None,
              help="Its ResNet tower's stride; 16 drops the stem's average pool (48 px in: a 3x3 last grid).")
@click.option("--clip-width", type=click.IntRange(min=8), default=None, help="Its ResNet tower's width (default: 32).")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="Use only the first N captioned images of --data.")
@click.option("--shuffle-buffer-mb", type=click.IntRange(min=1), default=None,
              help="The examples are read once into a store on local disk (under --out, or the worker's temporary "
                   "folder) and each epoch streams them through a shuffle buffer of this size: memory does not grow "
                   "with the data (default: 256).")
@click.option("--first-reference-prob", type=click.FloatRange(0, 1), default=None,
              help="Stage 2 trains on each image's first reference with this probability (default: uniform).")
@click.option("--train-scorer", "scorer_training", is_flag=True,
              help="Also train a text tower against the frozen encoder (locked-image tuning) on the captions, as the "
                   "bundle's scorer: a CLIP score that reads their language. With a bundle --clip and "
                   "--caption-epochs 0, the bundle's captioner is kept.")
@click.option("--scorer-text-tower", default=None,
              help="The Hugging Face model that text tower starts from (hub name or folder): an encoder (BERT, "
                   "XLM-R) or a causal LM (redrussianarmy/gpt2-turkish-cased), pooled and projected; omitted: a "
                   "small transformer from config.")
@click.option("--scorer-epochs", type=click.IntRange(min=1), default=None, help="Its epochs (default: 10).")
@click.option("--scorer-lr", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Its peak learning rate (default: 1e-3 from config, 1e-4 from --scorer-text-tower).")
@click.option("--save-fp16", is_flag=True, help="Store the bundle's weights as fp16 (half the size).")
@click.option("--device", default="auto", show_default=True,
              help="auto (the GPU where there is one), cpu, cuda or cuda:N.")
@click.option("--precision", type=click.Choice(DTYPES), default="auto", show_default=True,
              help="Autocast type: auto is bf16 on GPUs that have it natively (else fp16, with loss scaling) and on "
                   "CPUs with AVX-512, fp32 elsewhere.")
@click.option("--num-workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Ray Train workers (DDP): each computes its share of every batch.")
@click.option("--gpus-per-worker", type=click.FloatRange(min=0), default=None,
              help="GPUs of each worker (default: 1 where the Ray cluster has GPUs and --device allows, else 0).")
@click.option("--max-failures", type=click.IntRange(min=0), default=3, show_default=True,
              help="Restarts of the workers from the last checkpoint (a lost worker or node) before the run fails.")
@click.option("--seed", type=int, default=0, show_default=True)
@language_options
@click.option("--out", required=True, help="Run directory: checkpoints/, bundle/, train_summary.json.")
def main(**options) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    data, embeddings_from = options.pop("data"), options.pop("embeddings_from")
    if not data and not embeddings_from:
        raise click.UsageError("give --data or --embeddings-from")
    caption_language, scorer_languages, scorer = (options.pop(name) for name in
                                                  ("caption_language", "scorer_languages", "scorer"))
    batch_size = options.pop("batch_size")
    num_workers, gpus_per_worker, max_failures = (options.pop(name) for name in
                                                  ("num_workers", "gpus_per_worker", "max_failures"))
    if batch_size is not None and batch_size % num_workers:
        raise click.UsageError(f"--batch-size {batch_size} does not split among {num_workers} workers: give a "
                               "multiple of --num-workers")
    # options named after TrainConfig's fields, and those that set one of another name (given: not None)
    renamed = {"scorer_training": "train_scorer", "micro_batch_size": "caption_micro_batch_size"}
    lm_arch = {name: options.pop(f"lm_{option}") for name, option in
               (("n_embd", "width"), ("n_layer", "layers"), ("n_head", "heads"), ("n_positions", "positions"))}
    if options["lm"] and any(value is not None for value in lm_arch.values()):
        raise click.UsageError("--lm-width/--lm-layers/--lm-heads/--lm-positions size a GPT-2 built from config: "
                               "not with --lm, whose model has its own size")
    stride = options.pop("clip_stride")
    arch = {"image_size": options.pop("clip_image_size"), "vision_width": options.pop("clip_width"),
            "vision_stride": stride and int(stride)}
    settings = {renamed.get(name, name): value for name, value in options.items()} | {
        "clip_batch_size": batch_size, "caption_batch_size": batch_size}
    config = TrainConfig(data=tuple(data), embeddings_from=tuple(embeddings_from),
                         **{name: value for name, value in settings.items() if value is not None})
    config = replace(config, clip_arch=replace(config.clip_arch, **{k: v for k, v in arch.items() if v is not None}),
                     lm_arch=replace(config.lm_arch, **{k: v for k, v in lm_arch.items() if v is not None}))
    try:
        summary = train(config, caption_language=caption_language[0], scorer_languages=scorer_languages,
                        scorer=scorer, scaling=Scaling(num_workers, gpus_per_worker, max_failures=max_failures))
    except (ModelLoadError, InputError, UsageError, ValueError, TrainingFailed) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except OSError as exc:  # --out a file, or not writable
        click.echo(f"error: cannot write --out {config.out}: {describe_error(exc)}", err=True)
        sys.exit(2)
    click.echo(f"trained on {summary['examples']} examples in {summary['train_s']}s -> {summary['bundle']}")


if __name__ == "__main__":
    main()
