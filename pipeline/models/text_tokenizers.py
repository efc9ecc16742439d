"""Tokenizers the project trains itself (demo world) and the CLIP text-tower tokenizer wrapper."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<pad>"
EOS_TOKEN = "<|endoftext|>"


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 2000) -> PreTrainedTokenizerFast:
    """A GPT-2 style byte-level BPE trained on `texts`; pad id 0, eos id 1 (also used as bos)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return _wrapped(tokenizer)


def load_bpe_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """A tokenizer of `train_bpe_tokenizer` saved as a tokenizers JSON file."""
    return _wrapped(Tokenizer.from_file(str(path)))


def _wrapped(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=PAD_TOKEN, eos_token=EOS_TOKEN,
                                   bos_token=EOS_TOKEN)


class ClipTextTokenizer:
    """Turns texts into the fixed-length id tensors an open_clip text tower takes.

    Layout: text ids, then eos, then pad (id 0) up to `context_length`; the tower pools at eos
    (`pool_type='eos'`), so a truncated text keeps its eos as the last position.
    """

    def __init__(self, tokenizer: Tokenizer, context_length: int):
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.eos_id = tokenizer.token_to_id(EOS_TOKEN)
        self.pad_id = tokenizer.token_to_id(PAD_TOKEN)
        if self.eos_id is None or self.pad_id != 0:
            raise ValueError(f"a CLIP text tokenizer needs {PAD_TOKEN!r} as id 0 and {EOS_TOKEN!r}")

    @classmethod
    def from_file(cls, path: str | Path, context_length: int) -> ClipTextTokenizer:
        return cls(Tokenizer.from_file(str(path)), context_length)

    def __call__(self, texts: list[str]) -> torch.Tensor:
        out = torch.full((len(texts), self.context_length), self.pad_id, dtype=torch.long)
        for row, encoding in enumerate(self.tokenizer.encode_batch(texts, add_special_tokens=False)):
            ids = [*encoding.ids[: self.context_length - 1], self.eos_id]
            out[row, : len(ids)] = torch.tensor(ids)
        return out


TextTokenizer = Callable[[list[str]], torch.Tensor]
