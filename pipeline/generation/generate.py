"""Caption generation from prefix embeddings: each decoding method is a module of this package with a
`generate(captioner, prefix, settings, sample_seeds)` (see `pipeline.generation.methods`); `decode_texts` turns
their token ids into clean Turkish text.

All methods stop a row at any of the captioner's stop ids (the LM's eos, and ClipCap's '.'), keep the stop token
when it is text ('.') and drop it when it is the eos, and return token id lists.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Sequence

import torch

from pipeline.config import GenerationSettings
from pipeline.generation.methods import METHODS
from pipeline.models.captioner import PrefixCaptioner
from pipeline.text import clean_caption


@torch.inference_mode()
def generate(captioner: PrefixCaptioner, prefix: torch.Tensor, settings: GenerationSettings,
             sample_seeds: Sequence[int] | None = None) -> list[list[list[int]]]:
    """(B, L, E) prefixes -> for each image, its candidates' token ids (best first for beam). `sample_seeds`: one
    per image, for the methods that draw (`pipeline.generation.sampling.seeds_for`)."""
    method = importlib.import_module(METHODS[settings.method].module)
    return method.generate(captioner, prefix, settings, sample_seeds)


def decode_texts(captioner: PrefixCaptioner, token_lists: list[list[int]]) -> list[str]:
    texts = captioner.tokenizer.batch_decode(token_lists, skip_special_tokens=True,
                                             clean_up_tokenization_spaces=False)
    return [clean_caption(_NOT_TEXT.sub("", text)) for text in texts]


# Bytes of a byte-level BPE that form no UTF-8 letter decode as U+FFFD: a two-byte letter (ş, ğ) cut at
# max_new_tokens, or any byte sampled at a high temperature; control characters are no caption text either.
_NOT_TEXT = re.compile("[\ufffd\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
