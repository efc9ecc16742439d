"""Stage 2: the ClipCap mapper (and the language model, unless frozen) fitted on frozen image embeddings, the loss
on caption tokens only; and the BPE tokenizer the LM and a custom CLIP text tower share."""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm
from transformers import GPT2Config, GPT2LMHeadModel

from pipeline.models.captioner import CaptionerConfig, PrefixCaptioner
from pipeline.models.errors import ModelLoadError
from pipeline.models.text_tokenizers import load_bpe_tokenizer, train_bpe_tokenizer
from pipeline.training.checkpoints import Checkpoints
from pipeline.training.compute import Compute, cosine_lr, optimizer_step
from pipeline.training.config import TrainConfig
from pipeline.training.examples import ExampleStore
from pipeline.training.parallel import ONE_PROCESS, Parallel

log = logging.getLogger(__name__)

LENGTH_GROUP = 50  # caption batches sorted by length together
MIN_CAPTION_TOKENS = 8  # positions after the prefix that a caption needs at the least (its eos included)


def length_grouped(lengths: list[int], batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """Batches of similar lengths out of a random group of examples (a multiple of `batch_size` of them, a shorter
    last group losing its rest), in a random order, as transformers' LengthGroupedSampler: padding to each
    batch's longest caption then costs little (the demo's captions run 7-25 tokens: a third of a random batch
    was padding)."""
    order = torch.tensor(lengths).argsort(stable=True)
    batches = [order[start:start + batch_size].tolist()
               for start in range(0, len(lengths) - len(lengths) % batch_size, batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


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
            for rows in length_grouped([len(x) for x in ids], batch_size, generator):
                cosine_lr(optimizer, peak_lr, epoch * steps_per_epoch + len(epoch_losses), total, steps_per_epoch)
                parts = _caption_loss_parts(loss_of, captioner.tokenizer.eos_token_id, embeddings, ids, rows, micro,
                                            compute, parallel)
                loss = optimizer_step(parts, optimizer, scaler, clip_norm_of=trainable)
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
