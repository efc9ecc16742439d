"""Training: stage 1 fits a small CLIP contrastively, stage 2 freezes it and fits the ClipCap mapper
(and the language model, unless frozen) with the loss on caption tokens only.

The same code trains the embedded demo model on the synthetic corpus and real models on real data
(an open_clip name + weights instead of stage 1, a pretrained Hugging Face LM, a Turkish caption set,
or this project's own filtered output, whose stored embeddings skip the image encoder entirely).
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm import tqdm
from transformers import GPT2Config, GPT2LMHeadModel

from pipeline.models.captioner import CaptionerConfig, PrefixCaptioner
from pipeline.models.clip import (
    CUSTOM,
    LOCKED_VISION_PLACEHOLDER,
    TEXT_TOWER,
    ClipModel,
    ClipSpec,
    create_clip,
    encode_text_trimmed,
    lock_image_tower,
)
from pipeline.models.errors import ModelLoadError
from pipeline.models.text_tokenizers import ClipTextTokenizer, load_bpe_tokenizer, train_bpe_tokenizer
from pipeline.precision import resolve_dtype
from pipeline.training.checkpoints import Checkpoints
from pipeline.training.config import ClipArch, TrainConfig
from pipeline.training.examples import ExampleStore
from pipeline.training.parallel import ONE_PROCESS, Parallel

log = logging.getLogger(__name__)

LENGTH_GROUP = 50  # caption batches sorted by length together
MIN_CAPTION_TOKENS = 8  # positions after the prefix that a caption needs at the least (its eos included)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _length_grouped(lengths: list[int], batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """Batches of similar lengths out of a random group of examples (a multiple of `batch_size` of them, a shorter
    last group losing its rest), in a random order, as transformers' LengthGroupedSampler: padding to each
    batch's longest caption then costs little (the demo's captions run 7-25 tokens: a third of a random batch
    was padding)."""
    order = torch.tensor(lengths).argsort(stable=True)
    batches = [order[start:start + batch_size].tolist()
               for start in range(0, len(lengths) - len(lengths) % batch_size, batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


@dataclass(frozen=True)
class Compute:
    """Where training computes and in which float type: `dtype` is the autocast type (float32: no autocast);
    fp16 scales the loss so that small gradients do not underflow."""

    device: torch.device
    dtype: torch.dtype

    @classmethod
    def of(cls, config: TrainConfig) -> Compute:
        """ValueError (one line) for a device this machine does not have."""
        name = config.device
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            device = torch.device(name)
        except RuntimeError:
            raise ValueError(f"--device {config.device!r}: expected auto, cpu, cuda or cuda:N") from None
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"--device {config.device!r}: expected auto, cpu, cuda or cuda:N")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {config.device}: PyTorch sees no CUDA device (torch {torch.__version__}, "
                             f"built for CUDA {torch.version.cuda or 'none'})")
        return cls(device, resolve_dtype(config.precision, device))

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """Autocast in `dtype`. On a CPU, attention then takes SDPA's math kernel: the CPU flash-attention
        kernel's bf16 backward ran 7x slower than its fp32 one (82 ms against 11 ms a call on an AMX Xeon),
        which cost the CLIP step 40% of its time."""
        enabled = self.dtype != torch.float32
        with (torch.autocast(self.device.type, dtype=self.dtype, enabled=enabled),
              sdpa_kernel([SDPBackend.MATH]) if enabled and self.device.type == "cpu" else contextlib.nullcontext()):
            yield

    def scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)


def _step(losses: Iterable[torch.Tensor], optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
          clip_norm_of: list[torch.nn.Parameter] | None = None) -> float:
    """One update: the gradients of every loss `losses` yields (one batch's, or its micro-batches' parts of it,
    each freed after its backward), through the grad scaler, clipped to norm 1 where asked. Returns their sum."""
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for loss in losses:
        scaler.scale(loss).backward()
        total += loss.item()
    if clip_norm_of is not None:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(clip_norm_of, 1.0)
    scaler.step(optimizer)
    scaler.update()
    return total


def _cosine_lr(optimizer: torch.optim.Optimizer, base: float, step: int, total: int, steps_per_epoch: int) -> None:
    """Linear warmup over the first epoch, but at most a quarter of the run (a one-epoch run would
    otherwise only ramp up and end at the peak), then the cosine decay to zero."""
    warmup = min(steps_per_epoch, max(1, total // 4))
    lr = base * (step + 1) / warmup if step < warmup else base * 0.5 * (1 + math.cos(math.pi * step / total))
    for group in optimizer.param_groups:
        group["lr"] = lr


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
            _cosine_lr(optimizer, lr, epoch * steps_per_epoch + step, total, steps_per_epoch)
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
            loss = _step([batch_loss], optimizer, scaler)  # in-batch negatives: the whole batch in one piece
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


@torch.inference_mode()
def embed_images(clip: ClipModel, pixels: torch.Tensor, compute: Compute, batch_size: int = 256) -> torch.Tensor:
    """L2-normalized float32 embeddings of uint8 images, on the CPU, computed on `compute`'s device."""
    clip.to(compute.device)
    out = []
    for start in range(0, len(pixels), batch_size):
        with compute.autocast():
            out.append(clip.encode_images(pixels[start:start + batch_size]).float().cpu())
    return torch.cat(out)


def build_captioner(config: TrainConfig, prefix_dim: int, tokenizer) -> PrefixCaptioner:
    if config.lm:
        from pipeline.models.bundle import load_language_model

        lm, tokenizer = load_language_model(config.lm)
        if tokenizer.eos_token_id is None:
            raise ModelLoadError(f"--lm {config.lm}: its tokenizer has no end-of-sequence token, which training "
                                 "appends to every caption so that captions end")
    else:
        arch = config.lm_arch
        lm = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=arch.n_positions, n_embd=arch.n_embd,
                                        n_layer=arch.n_layer, n_head=arch.n_head, resid_pdrop=arch.dropout,
                                        embd_pdrop=arch.dropout, attn_pdrop=arch.dropout,
                                        activation_function=arch.activation, bos_token_id=tokenizer.eos_token_id,
                                        eos_token_id=tokenizer.eos_token_id))
    captioner_config = CaptionerConfig(mapper=config.mapper, prefix_length=config.prefix_length, prefix_dim=prefix_dim,
                                       clip_length=config.prefix_length)
    captioner = PrefixCaptioner(captioner_config, lm, tokenizer)
    room = captioner.max_caption_tokens()
    if room is not None:
        check_caption_room(room, config.prefix_length)
    return captioner


def check_caption_room(room: int, prefix_length: int) -> None:
    """ValueError when the `room` an LM has after a prefix cannot hold a caption."""
    if room < MIN_CAPTION_TOKENS:
        raise ValueError(f"a prefix of {prefix_length} leaves the language model {room} positions, too few for a "
                         "caption; use a shorter --prefix-length")


def _token_ids(tokenizer, texts: list[str], max_tokens: int) -> list[list[int]]:
    """Caption ids + eos, at most max_tokens each."""
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [[*ids[: max_tokens - 1], tokenizer.eos_token_id] for ids in encoded]


def _pad(pad_id: int, ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids; the mask marks the tokens the loss is taken on."""
    width = max(len(x) for x in ids)
    # padding is masked out of attention and loss, so any id does; eos is one the LM has, while a pad token
    # added to a hub tokenizer (without resizing the LM's embeddings) lies beyond them
    tokens = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, x in enumerate(ids):
        tokens[row, : len(x)] = torch.tensor(x)
        mask[row, : len(x)] = 1
    return tokens, mask


class CaptionLoss(torch.nn.Module):
    """The captioner's mean loss on a batch's caption tokens: the forward DDP wraps."""

    def __init__(self, captioner: PrefixCaptioner):
        super().__init__()
        self.captioner = captioner

    def forward(self, embeddings: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.captioner.caption_loss(embeddings, tokens, mask)


def train_captioner(captioner: PrefixCaptioner, examples: ExampleStore, config: TrainConfig, checkpoints: Checkpoints,
                    progress: Callable[..., Any] = tqdm, parallel: Parallel = ONE_PROCESS) -> list[float | None]:
    """Stage 2: next-token loss on caption tokens, the CLIP embedding (frozen) as the only input.
    Returns the mean loss of every epoch, those of a resumed checkpoint included."""
    if config.freeze_lm:
        captioner.lm.requires_grad_(False)
    compute = Compute.of(config)
    captioner.to(compute.device)
    trainable = [p for p in captioner.parameters() if p.requires_grad]
    peak_lr = config.caption_peak_lr()
    optimizer = torch.optim.AdamW(trainable, lr=peak_lr, weight_decay=0.01, fused=True)
    scaler = compute.scaler()
    modules = {"mapper": captioner.mapper} if config.freeze_lm else {"mapper": captioner.mapper, "lm": captioner.lm}
    losses = checkpoints.resume("captioner", modules, optimizer)
    loss_of = parallel.wrap(CaptionLoss(captioner))
    batch_size = parallel.usable_batch(min(config.caption_batch_size, examples.count))
    steps_per_epoch = max(1, examples.count // batch_size)
    total = steps_per_epoch * config.caption_epochs
    room = captioner.max_caption_tokens()
    max_tokens = 64 if room is None else room
    micro = config.caption_micro_batch_size or config.caption_batch_size
    generator = torch.Generator()
    rng = random.Random()
    for epoch in range(len(losses), config.caption_epochs):
        captioner.mapper.train()
        captioner.lm.train(not config.freeze_lm)
        seed = config.seed * 1000 + epoch + 1
        generator.manual_seed(seed)
        rng.seed(seed)
        bar = progress(total=steps_per_epoch, desc=f"caption epoch {epoch + 1}", leave=False)
        epoch_losses = []
        for group in examples.batches(batch_size * LENGTH_GROUP, seed, config.shuffle_buffer_bytes, keep_last=True):
            texts = [_pick_reference(references, config.first_reference_prob, rng) for references in group.references]
            ids = _token_ids(captioner.tokenizer, texts, max_tokens)
            embeddings = torch.from_numpy(group.values)
            for rows in _length_grouped([len(x) for x in ids], batch_size, generator):
                _cosine_lr(optimizer, peak_lr, epoch * steps_per_epoch + len(epoch_losses), total, steps_per_epoch)
                parts = _caption_loss_parts(loss_of, captioner.tokenizer.eos_token_id, embeddings, ids, rows, micro,
                                            compute, parallel)
                loss = _step(parts, optimizer, scaler, clip_norm_of=trainable)
                epoch_losses.append(loss)
                bar.update()
                bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        bar.close()
        losses.append(parallel.mean(float(np.mean(epoch_losses))))
        if parallel.is_main:
            log.info("caption epoch %d/%d loss %.4f", epoch + 1, config.caption_epochs, losses[-1])
        checkpoints.save("captioner", epoch + 1, modules, optimizer, losses)
    captioner.eval()
    return losses


def _caption_loss_parts(loss_of: torch.nn.Module, pad_id: int, embeddings: torch.Tensor, ids: list[list[int]],
                        rows: list[int], micro: int, compute: Compute, parallel: Parallel = ONE_PROCESS
                        ) -> Iterator[torch.Tensor]:
    """The mean token loss of the batch `rows` (`loss_of`: a CaptionLoss, maybe in DDP) in micro-batches of `micro`
    rows, each weighted by its share of the batch's tokens: their gradients add up to the whole batch's (gradient
    accumulation). Across processes, this process's share of the rows, weighted by the number of processes too,
    as DDP averages their gradients; only the last micro-batch's backward synchronises them."""
    total_tokens = sum(len(ids[i]) for i in rows)
    mine = parallel.share(rows)
    for start in range(0, len(mine), micro):
        part = mine[start:start + micro]
        tokens, mask = (t.to(compute.device, non_blocking=True) for t in _pad(pad_id, [ids[i] for i in part]))
        last = start + micro >= len(mine)
        with (contextlib.nullcontext() if last or parallel.world_size == 1 else loss_of.no_sync()), compute.autocast():
            loss = loss_of(embeddings[part].to(compute.device, non_blocking=True), tokens, mask)
        yield loss * (int(mask.sum()) * parallel.world_size / total_tokens)


def _pick_reference(references: list[str], first_prob: float | None, rng: random.Random) -> str:
    if first_prob is not None and (len(references) == 1 or rng.random() < first_prob):
        return references[0]
    return rng.choice(references if first_prob is None else references[1:])


def shared_tokenizer(captions: Iterable[list[str]], vocab_size: int, file: Path, parallel: Parallel = ONE_PROCESS):
    """The LM tokenizer, also used by the custom CLIP text tower: `file` (a tokenizers JSON) where a run being
    resumed saved it, else trained on the captions by the main process and given to every other."""
    if parallel.is_main and not file.is_file():
        file.parent.mkdir(parents=True, exist_ok=True)
        train_bpe_tokenizer((c for refs in captions for c in refs), vocab_size=vocab_size).backend_tokenizer.save(
            str(file))
    parallel.share_file(file)
    return load_bpe_tokenizer(file)
