"""Stage 1: a small CLIP fitted contrastively (matched image/caption pairs pulled together), and a scorer's text
tower fitted against a frozen image tower, with word-swapped captions as hard negatives."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.models.clip import LOCKED_VISION_PLACEHOLDER, ClipModel, encode_text_trimmed, lock_image_tower
from pipeline.models.clip_factory import CUSTOM, TEXT_TOWER, ClipSpec, create_clip
from pipeline.models.text_tokenizers import ClipTextTokenizer
from pipeline.training.checkpoints import Checkpoints
from pipeline.training.compute import Compute, cosine_lr, optimizer_step
from pipeline.training.config import ClipArch, TrainConfig
from pipeline.training.examples import ExampleStore
from pipeline.training.parallel import ONE_PROCESS, Parallel

log = logging.getLogger(__name__)


def build_custom_clip(arch: ClipArch, text_tokenizer_file: Path) -> tuple[ClipModel, ClipSpec]:
    tokenizer = ClipTextTokenizer.from_file(text_tokenizer_file, arch.context_length)
    config = arch.open_clip_config(tokenizer.tokenizer.get_vocab_size(), tokenizer.eos_id)
    spec = ClipSpec(arch=CUSTOM, config=config, tokenizer=text_tokenizer_file.name)
    return create_clip(spec, text_tokenizer_file.parent), spec


def contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor, negative_features: torch.Tensor | None,
                     logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric InfoNCE; hard negative captions, when given, join the texts each image is
    contrasted with (as in NegCLIP), which teaches the embedding the details a swap changes."""
    texts = text_features if negative_features is None else torch.cat((text_features, negative_features))
    labels = torch.arange(len(image_features), device=image_features.device)
    image_to_text = F.cross_entropy(logit_scale * image_features @ texts.T, labels)
    text_to_image = F.cross_entropy(logit_scale * text_features @ image_features.T, labels)
    return (image_to_text + text_to_image) / 2


def train_clip(clip: ClipModel, examples: ExampleStore, config: TrainConfig, checkpoints: Checkpoints,
               progress: Callable[..., Any] = tqdm, parallel: Parallel = ONE_PROCESS) -> list[float | None]:
    """Stage 1: contrastive training over (image, one random reference caption) pairs, plus one hard
    negative caption per image when the data provides them. `examples`: a store of pixels."""
    model = clip.clip.train()

    def images(pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(model.encode_image(clip.normalize_pixels(pixels)), dim=-1).float()

    return _train_contrastive("clip", clip, examples, config, checkpoints, progress, parallel,
                              epochs=config.clip_epochs, lr=config.clip_lr, batch_size=config.clip_batch_size,
                              seed_offset=0, images=images)


class _ContrastiveFeatures(torch.nn.Module):
    """A batch's image features (`images` of its examples' values), text features and logit scale: the forward
    DDP wraps."""

    def __init__(self, model: torch.nn.Module, images: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.model = model
        self.images = images

    def forward(self, values: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # cut to the batch's longest caption (on the demo corpus 25 of 32 positions, 2.5% of a step)
        return (self.images(values), F.normalize(encode_text_trimmed(self.model, tokens), dim=-1).float(),
                self.model.logit_scale.exp().clamp(max=100))


def _train_contrastive(stage: str, clip: ClipModel, examples: ExampleStore, config: TrainConfig,
                       checkpoints: Checkpoints, progress: Callable[..., Any], parallel: Parallel, epochs: int,
                       lr: float, batch_size: int, seed_offset: int, images: Callable[[torch.Tensor], torch.Tensor],
                       make_negatives: Callable[[list[str], random.Random], list[str]] | None = None,
                       ) -> list[float | None]:
    """The epochs of a contrastive stage: each image's features (`images`) against one random reference
    caption, the batch's other captions and one hard negative per image, the data's own or, for data
    without, what `make_negatives` makes of the drawn captions (none without it); at `lr` on a warmup +
    cosine schedule, checkpointed per epoch under `stage`. Only the parameters that require grad learn.
    Across processes, each computes its share of a batch's rows and the loss takes every share's features."""
    model = clip.clip
    compute = Compute.of(config)
    model.to(compute.device)
    if parallel.world_size > 1 and compute.device.type == "cuda":
        # a ResNet tower's batch statistics over the global batch, as one process has them (not on CPUs:
        # SyncBatchNorm runs on GPUs only, so CPU processes normalise over their share)
        torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    # a pretrained text tower may hold parameters its pooling never uses (a BERT pooler)
    features = parallel.wrap(_ContrastiveFeatures(model, images), find_unused_parameters=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.1,
                                  fused=True)
    scaler = compute.scaler()
    losses = checkpoints.resume(stage, {stage: model}, optimizer)
    batch_size = parallel.usable_batch(min(batch_size, examples.count))
    steps_per_epoch = max(1, examples.count // batch_size)
    total = steps_per_epoch * epochs
    rng = random.Random()
    for epoch in range(len(losses), epochs):
        seed = config.seed * 1000 + epoch + seed_offset
        rng.seed(seed)
        batches = examples.batches(batch_size, seed, config.shuffle_buffer_bytes)
        bar = progress(batches, total=steps_per_epoch, desc=f"{stage} epoch {epoch + 1}", leave=False)
        epoch_losses = []
        for step, batch in enumerate(bar):
            cosine_lr(optimizer, lr, epoch * steps_per_epoch + step, total, steps_per_epoch)
            texts = [rng.choice(references) for references in batch.references]
            if examples.has_negatives:
                hard = [rng.choice(negatives) for negatives in batch.negatives]
            else:
                hard = make_negatives(texts, rng) if make_negatives else []
            mine = parallel.share(list(range(len(batch))))
            local_texts = [texts[i] for i in mine] + ([hard[i] for i in mine] if hard else [])
            with compute.autocast():
                tokens = clip.tokenizer(local_texts).to(compute.device, non_blocking=True)
                image_features, text_features, logit_scale = features(torch.from_numpy(batch.values[mine]), tokens)
                batch_loss = contrastive_loss(parallel.gather(image_features),
                                              parallel.gather(text_features[:len(mine)]),
                                              parallel.gather(text_features[len(mine):]) if hard else None,
                                              logit_scale)
            loss = optimizer_step([batch_loss], optimizer, scaler)  # in-batch negatives: the whole batch in one piece
            epoch_losses.append(loss)
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        losses.append(parallel.mean(float(np.mean(epoch_losses))))
        if parallel.is_main:
            log.info("%s epoch %d/%d loss %.4f", stage, epoch + 1, epochs, losses[-1])
        checkpoints.save(stage, epoch + 1, {stage: model}, optimizer, losses)
    model.eval()
    return losses


def build_locked_scorer(encoder: ClipModel, arch: ClipArch, text_tokenizer_file: Path,
                        text_tower: str | None = None) -> tuple[ClipModel, ClipSpec]:
    """A new text tower that scores against `encoder`'s image tower, which it shares and never trains (LiT, Zhai
    et al. 2022): the Hugging Face model `text_tower` (hub name or folder, an encoder or a causal LM) pooled and
    projected, else `arch`'s text transformer over the captions' tokenizer."""
    if text_tower:
        spec = ClipSpec(arch=CUSTOM, config={"embed_dim": encoder.embed_dim, TEXT_TOWER: {"model": text_tower}},
                        image_tower="encoder")
        scorer = create_clip(spec)
        # what was chosen for this model, so that the bundle reads texts as training did
        spec.config[TEXT_TOWER] |= {"pooling": scorer.clip.text.pooling,
                                    "context_length": scorer.tokenizer.context_length}
        log.info("scorer text tower from %s: %s-pooled, projected to %d", text_tower, scorer.clip.text.pooling,
                 encoder.embed_dim)
        return lock_image_tower(scorer, encoder), spec
    tokenizer = ClipTextTokenizer.from_file(text_tokenizer_file, arch.context_length)
    text_cfg = arch.open_clip_config(tokenizer.tokenizer.get_vocab_size(), tokenizer.eos_id)["text_cfg"]
    config = {"embed_dim": encoder.embed_dim, "vision_cfg": dict(LOCKED_VISION_PLACEHOLDER), "text_cfg": text_cfg}
    spec = ClipSpec(arch=CUSTOM, config=config, tokenizer=text_tokenizer_file.name, image_tower="encoder")
    return lock_image_tower(create_clip(spec, text_tokenizer_file.parent), encoder), spec


_PUNCTUATION = ".,;:!?\"'()"  # stripped from a word's ends before it is swapped


def word_swap_negative(text: str, vocabulary: list[str], rng: random.Random) -> str:
    """`text` with one of its words replaced by another word of the captions: a hard negative for data that
    brings none (a colour, shape or count word swapped is a caption that is wrong in one detail)."""
    words = text.split(" ")
    positions = [i for i, word in enumerate(words) if word.strip(_PUNCTUATION)]
    if not positions or len(vocabulary) < 2:
        return text
    i = rng.choice(positions)
    core = words[i].strip(_PUNCTUATION)
    other = rng.choice(vocabulary)
    while other == core:
        other = rng.choice(vocabulary)
    words[i] = words[i].replace(core, other, 1)
    return " ".join(words)


def train_scorer(scorer: ClipModel, examples: ExampleStore, config: TrainConfig, checkpoints: Checkpoints,
                 progress: Callable[..., Any] = tqdm, parallel: Parallel = ONE_PROCESS) -> list[float | None]:
    """Locked-image tuning: only the text tower (and the temperature) learn, contrasting each image's frozen
    embedding with one of its captions against the batch's other captions and one hard negative per image
    (the data's own, else `word_swap_negative`). `examples`: a store of embeddings. Returns the mean loss of every
    epoch."""
    scorer.clip.train()
    scorer.clip.visual.requires_grad_(False)
    scorer.clip.visual.eval()
    vocabulary = sorted({word.strip(_PUNCTUATION) for references in examples.captions() for text in references
                         for word in text.split(" ")} - {""})
    device = Compute.of(config).device
    return _train_contrastive("scorer", scorer, examples, config, checkpoints, progress, parallel,
                              epochs=config.scorer_epochs, lr=config.scorer_peak_lr(),
                              batch_size=config.clip_batch_size,
                              seed_offset=2, images=lambda embeddings: embeddings.to(device),
                              make_negatives=lambda texts, rng: [word_swap_negative(text, vocabulary, rng)
                                                                 for text in texts])
