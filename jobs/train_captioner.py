"""Train a captioner and write a model bundle.

The embedded demo model (reproduces pipeline/assets/demo_bundle, README "The embedded demo model"):
  python jobs/make_demo_corpus.py --out data/demo --seed 0 --train 80000 --val 1000 --test 2000
  python jobs/train_captioner.py --data 'data/demo/train/*.tar' --out runs/v9 --clip-image-size 48 \
      --clip-stride 16 --clip-width 24 --clip-epochs 4 --caption-epochs 24 --first-reference-prob 0.5 \
      --save-fp16 --seed 0

Real models and data:
  python jobs/train_captioner.py --data 'coco_tr/{00000..00099}.tar' --clip ViT-B-32:openai \
      --scorer xlm-roberta-base-ViT-B-32:laion5b_s13b_b90k --lm redrussianarmy/gpt2-turkish-cased --out runs/coco-tr
  python jobs/train_captioner.py --embeddings-from out/filtered --clip bundles/demo --out runs/next
ClipCap's recipe, the images encoded once (caption_shards.py --model ViT-B-32:openai --embed-only ... --output
out/coco-emb), then every COCO reference joined to the stored embeddings by key:
  python jobs/train_captioner.py --embeddings-from out/coco-emb/captions --clip ViT-B-32:openai \
      --captions coco/annotations/captions_train2014_tr.json --lm redrussianarmy/gpt2-turkish-cased --out runs/coco-tr
A Turkish scorer for a bundle whose encoder's text tower reads English (locked-image tuning from the Turkish GPT-2):
  python jobs/train_captioner.py --data 'coco_tr/{00000..00099}.tar' --clip runs/coco-tr/bundle --train-scorer \
      --scorer-text-tower redrussianarmy/gpt2-turkish-cased --caption-epochs 0 --out runs/coco-tr-lit
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

import _bootstrap  # noqa: F401
import click
import torch

from pipeline.caption_files import is_caption_file
from pipeline.cli import OneLineErrors, language_options
from pipeline.config import DTYPES, differing_keys
from pipeline.images import ImageSpec
from pipeline.models.bundle import BUNDLE_FILE, load_bundle, save_bundle
from pipeline.models.clip import ClipSpec, load_pretrained_clip
from pipeline.models.errors import ModelLoadError
from pipeline.models.languages import PROJECT_LANGUAGE
from pipeline.models.text_tower import read_text_tower_config
from pipeline.sources import InputError
from pipeline.text import describe_error
from pipeline.training import (
    Checkpoints,
    Compute,
    TrainConfig,
    build_captioner,
    build_custom_clip,
    build_locked_scorer,
    check_caption_room,
    embed_images,
    load_embedding_examples,
    load_examples,
    seed_everything,
    train_captioner,
    train_clip,
    train_scorer,
    train_tokenizer,
    write_summary,
)

log = logging.getLogger("train_captioner")
RESUMABLE_SETTINGS = ("out", "clip_epochs", "caption_epochs", "scorer_epochs")  # more epochs resume a run


def _encoder(config: TrainConfig):
    """A pretrained encoder: a bundle directory's encoder, an open_clip ARCH[:WEIGHTS], or a transformers CLIP.
    Returns the model, its spec and, from a bundle, the bundle.json entry that identifies it and the bundle's
    captioner (else None twice)."""
    if config.clip and (Path(config.clip) / BUNDLE_FILE).is_file():
        bundle = load_bundle(config.clip)
        spec = ClipSpec(**{k: v for k, v in bundle.manifest["encoder"].items() if k in ClipSpec.__dataclass_fields__})
        if spec.weights and (Path(config.clip) / spec.weights).is_file():
            # a file of that bundle (an imported ClipCap's encoder.safetensors): the new bundle copies it in
            spec = replace(spec, weights=str(Path(config.clip) / spec.weights))
        return bundle.encoder, spec, bundle.manifest["encoder"], bundle.captioner
    return (*load_pretrained_clip(config.clip, "--clip", "encoder"), None, None)


def _check_embeddings_encoder(config: TrainConfig, examples, metadata: dict, clip, identity: dict | None) -> None:
    """The stored embeddings must come from the encoder the new bundle ships, or its captions are noise.
    `identity`: the encoder's bundle.json entry, where --clip is a bundle."""
    width = examples.embeddings.shape[1]
    if width != clip.embed_dim:
        raise ValueError(f"--embeddings-from holds {width}-d embeddings, but --clip {config.clip} makes "
                         f"{clip.embed_dim}-d ones: give the encoder that made them")
    made_by = metadata.get("encoder")
    if made_by and identity is not None and identity != made_by:
        raise ValueError(f"--embeddings-from was made by the encoder of model {metadata.get('model')!r}, "
                         f"not by the one of --clip {config.clip}: give the bundle that made them")


def _claim_run_directory(out: Path, config: TrainConfig) -> None:
    """A rerun resumes from the checkpoints only under the same settings (more epochs excepted): the
    checkpoints of other data or models would be resumed silently, against a tokenizer trained anew. A run
    that stopped before its first checkpoint (a typo in --data) binds nothing."""
    settings = json.loads(json.dumps({k: v for k, v in config.to_json().items() if k not in RESUMABLE_SETTINGS}))
    recorded_file = out / "work" / "settings.json"
    if recorded_file.is_file():
        recorded = json.loads(recorded_file.read_text(encoding="utf-8"))
        changed = differing_keys(settings, recorded)
        if changed and any((out / "checkpoints").glob("*")):  # a run that saved nothing binds nothing
            raise ValueError(f"{out} holds a training run with other settings ({', '.join(changed)}); "
                             "use another --out (only more epochs resume a run)")
    recorded_file.parent.mkdir(parents=True, exist_ok=True)
    recorded_file.write_text(json.dumps(settings, indent=2, ensure_ascii=False), encoding="utf-8")


def train(config: TrainConfig, caption_language: str = PROJECT_LANGUAGE,
          scorer_languages: tuple[str, ...] | None = None, scorer: str | None = None) -> dict:
    """Train and write the bundle; `scorer` names the CLIP that scores its captions (default: the encoder),
    which training does not use: it is only stored in the bundle."""
    started = time.time()
    seed_everything(config.seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    compute = Compute.of(config)
    log.info("training on %s in %s", compute.device, str(compute.dtype).removeprefix("torch."))
    out = Path(config.out)
    work = out / "work"
    if config.lm is None:  # the small GPT-2's positions are known now, before the CLIP stage
        check_caption_room(config.lm_arch.n_positions - config.prefix_length, config.prefix_length)
    if scorer and config.train_scorer:
        raise ValueError("give --scorer or --train-scorer, not both: each makes the bundle's scorer")
    if config.scorer_text_tower and not config.train_scorer:
        raise ValueError("--scorer-text-tower is what --train-scorer starts from: give both")
    if config.scorer_text_tower:
        read_text_tower_config(config.scorer_text_tower)  # a typo stops the run now, not after the images
    # loaded before any training: a --scorer that does not load stops the run now, not after hours
    scorer_model, scorer_spec = load_pretrained_clip(scorer, "--scorer", "scorer") if scorer else (None, None)
    _claim_run_directory(out, config)
    checkpoints = Checkpoints(out / "checkpoints")
    summary: dict = {}
    if config.embeddings_from:
        if not config.clip:
            raise click.UsageError("--embeddings-from needs --clip: the encoder that made those embeddings")
        examples, metadata = load_embedding_examples(list(config.embeddings_from), config.text_column, config.data)
        clip, spec, identity, bundle_captioner = _encoder(config)
        _check_embeddings_encoder(config, examples, metadata, clip, identity)
    elif config.clip:
        clip, spec, _, bundle_captioner = _encoder(config)
        # a pretrained encoder stays frozen: each image is encoded as it is read, and only its embedding kept
        examples = load_examples(list(config.data), clip.image_spec, config.limit, image_root=config.image_root,
                                 encode=lambda pixels: embed_images(clip, pixels, compute))
    else:
        bundle_captioner = None
        image_spec = ImageSpec(size=config.clip_arch.image_size)
        examples = load_examples(list(config.data), image_spec, config.limit, image_root=config.image_root)
    log.info("%d training examples", len(examples.captions))

    # the small CLIP's text tower and a GPT-2 from scratch share one tokenizer trained on the captions
    tokenizer = None
    if config.lm is None or not config.clip or (config.train_scorer and not config.scorer_text_tower):
        tokenizer = train_tokenizer(examples.captions, config.vocab_size, work)
    if not config.clip:
        clip, spec = build_custom_clip(config.clip_arch, work / "text_tokenizer.json")
        summary["clip_losses"] = train_clip(clip, examples, config, checkpoints)
    if examples.embeddings is None:
        examples.embeddings = embed_images(clip, examples.pixels, compute)
        examples.pixels = None
    if config.train_scorer:
        scorer_model, scorer_spec = build_locked_scorer(clip, config.clip_arch, work / "text_tokenizer.json",
                                                        config.scorer_text_tower)
        summary["scorer_losses"] = train_scorer(scorer_model, examples, config, checkpoints)
        scorer_model = scorer_model.cpu().float()
    if config.caption_epochs == 0 and bundle_captioner is not None:
        captioner = bundle_captioner  # a new scorer for a bundle's captioner, which stays as it is
    else:
        captioner = build_captioner(config, clip.embed_dim, None if config.lm else tokenizer)
        summary["caption_losses"] = train_captioner(captioner, examples, config, checkpoints)
    manifest = save_bundle(out / "bundle", clip.cpu().float(), spec, captioner.cpu().float(), scorer=scorer_model,
                           scorer_spec=scorer_spec, name=out.name,
                           dtype=torch.float16 if config.save_fp16 else torch.float32,
                           caption_language=caption_language, scorer_languages=scorer_languages)
    summary.update({"examples": len(examples.captions), "bundle": str(out / "bundle"),
                    "languages": manifest["languages"],
                    "bundle_sha256": manifest["sha256"], "train_s": round(time.time() - started, 1)})
    write_summary(out / "train_summary.json", config, summary)
    return summary


@click.command(cls=OneLineErrors)
@click.option("--data", "--captions", "data", multiple=True,
              help="Images + Turkish captions: WebDataset/Parquet/folder, or a caption file (COCO captions JSON, "
              "Karpathy split JSON, JSON Lines). Repeatable.")
@click.option("--image-root", default=None,
              help="Folder of the images a caption file names by relative path (default: the file's folder).")
@click.option("--embeddings-from", multiple=True,
              help="This project's output dir(s): train on its stored image embeddings (no image is read) and their "
                   "--text-column, or the captions of --data caption files joined by key. Repeatable.")
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
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use only the first N examples.")
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
@click.option("--seed", type=int, default=0, show_default=True)
@language_options
@click.option("--out", required=True, help="Run directory: checkpoints/, bundle/, train_summary.json.")
def main(**options) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    data, embeddings_from = options.pop("data"), options.pop("embeddings_from")
    if not data and not embeddings_from:
        raise click.UsageError("give --data or --embeddings-from")
    if embeddings_from and not all(is_caption_file(spec) for spec in data):
        raise click.UsageError("with --embeddings-from, --data takes caption files only (their captions are joined to "
                               "the stored embeddings by key): no image is read")
    caption_language, scorer_languages, scorer = (options.pop(name) for name in
                                                  ("caption_language", "scorer_languages", "scorer"))
    batch_size = options.pop("batch_size")
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
                        scorer=scorer)
    except (ModelLoadError, InputError, ValueError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except OSError as exc:  # --out a file, or not writable
        click.echo(f"error: cannot write --out {config.out}: {describe_error(exc)}", err=True)
        sys.exit(2)
    click.echo(f"trained on {summary['examples']} examples in {summary['train_s']}s -> {summary['bundle']}")


if __name__ == "__main__":
    main()
