"""A CLIP text tower made from a Hugging Face transformers model: an encoder (BERT, XLM-R) or a causal LM (the
Turkish GPT-2), its hidden states pooled over each text and projected to the image embeddings' width.

What a locked-image scorer (LiT) starts from where the captions' language has a pretrained language model but no
CLIP: only this tower learns, against a frozen image tower that `TextTowerClip` borrows.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, PretrainedConfig

from pipeline.models.errors import ModelLoadError
from pipeline.models.weights import building_for, load_failure

# ids past a text's end: no vocabulary id, so that padding stays padding where a tokenizer pads with its eos (GPT-2)
PADDING = -1
MEAN, LAST = "mean", "last"  # poolings: every token of a bidirectional encoder; the last token of a causal LM
MAX_CONTEXT = 77  # tokens per text at most, as CLIP's: captions and alt texts are short


class PretrainedTextTower(nn.Module):
    """A transformers model's hidden states, pooled over each text (`MEAN` or `LAST`) and projected to
    `output_dim` by a linear map. Takes ids padded with PADDING."""

    def __init__(self, backbone: nn.Module, output_dim: int, pooling: str):
        super().__init__()
        if pooling not in (MEAN, LAST):
            raise ValueError(f"pooling {pooling!r} (expected {MEAN!r} or {LAST!r})")
        self.backbone = backbone
        self.pooling = pooling
        self.output_dim = output_dim
        self.proj = nn.Linear(backbone.config.hidden_size, output_dim, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = ids != PADDING
        hidden = self.backbone(input_ids=ids.clamp(min=0), attention_mask=mask.long()).last_hidden_state
        if self.pooling == LAST:  # the only position of a causal LM that has read the whole text
            pooled = hidden[torch.arange(len(ids), device=ids.device), mask.sum(dim=1) - 1]
        else:
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1)
        return self.proj(pooled)


class PretrainedTextTokenizer:
    """A transformers tokenizer as the tower reads it: its own special tokens, an eos appended for a causal tower
    (pooled there, as CLIP pools at its end-of-text token), at most `context_length` ids, padded with PADDING to
    the batch's longest text."""

    def __init__(self, tokenizer, context_length: int, append_eos: bool):
        if append_eos and tokenizer.eos_token_id is None:
            raise ModelLoadError(f"tokenizer {tokenizer.name_or_path!r} has no end-of-text token to pool at")
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.append_eos = append_eos

    def __call__(self, texts: list[str]) -> torch.Tensor:
        eos = self.tokenizer.eos_token_id
        room = self.context_length - self.append_eos
        encoded = [ids[:room] for ids in self.tokenizer(texts, add_special_tokens=True)["input_ids"]]
        if self.append_eos:
            encoded = [[*ids, eos] for ids in encoded]
        out = torch.full((len(texts), max([1, *map(len, encoded)])), PADDING, dtype=torch.long)
        for row, ids in enumerate(encoded):
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out


class TextTowerClip(nn.Module):
    """open_clip's CLIP interface (visual, encode_image, encode_text, logit_scale) around a PretrainedTextTower and
    an image tower set from outside (`pipeline.models.clip.lock_image_tower`)."""

    def __init__(self, text: PretrainedTextTower):
        super().__init__()
        self.text = text
        self.visual: nn.Module | None = None
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature

    def encode_image(self, pixels: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        if self.visual is None:
            raise RuntimeError("a text tower scores against an image tower it borrows: none is set")
        features = self.visual(pixels)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, ids: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.text(ids)
        return F.normalize(features, dim=-1) if normalize else features


def create_text_tower(model: str | Path, output_dim: int, pooling: str | None = None,
                      context_length: int | None = None, pretrained: bool = True,
                      ) -> tuple[TextTowerClip, PretrainedTextTokenizer]:
    """The tower of a Hugging Face model (hub name, or a folder with its config.json and tokenizer): its weights
    where `pretrained`, else random ones of its config (a bundle's weights follow). `pooling` None: LAST for a
    model that attends causally, else MEAN; `context_length` None: MAX_CONTEXT, or the model's positions."""
    config = read_text_tower_config(model)
    local = Path(model).is_dir()
    try:
        if pretrained:
            backbone = AutoModel.from_pretrained(model, local_files_only=local, dtype=torch.float32)
        else:
            with building_for(weights=True):
                backbone = AutoModel.from_config(config)
        tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=local)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"cannot load text tower {str(model)!r}: {load_failure(exc)}") from None
    if getattr(config, "is_encoder_decoder", False):  # mT5 and the like: the encoder reads, the decoder writes
        backbone = backbone.get_encoder()
    backbone.eval()
    pooling = pooling or (LAST if attends_causally(backbone) else MEAN)
    reader = PretrainedTextTokenizer(tokenizer, context_length or _context_length(config, tokenizer),
                                     append_eos=pooling == LAST)
    return TextTowerClip(PretrainedTextTower(backbone, output_dim, pooling)), reader


def read_text_tower_config(model: str | Path) -> PretrainedConfig:
    """The model's config: a ModelLoadError, before any weights are read, where it names no transformers model."""
    try:
        return AutoConfig.from_pretrained(model, local_files_only=Path(model).is_dir())
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"cannot load text tower {str(model)!r}: {load_failure(exc)}") from None


@torch.no_grad()
def attends_causally(backbone: nn.Module) -> bool:
    """Whether a position's hidden state ignores the tokens after it: two texts that differ only in their last
    token then agree on every position before it."""
    vocab = backbone.config.vocab_size
    ids = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 5]]) % vocab
    hidden = backbone(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    return torch.allclose(hidden[0, :3], hidden[1, :3], atol=1e-5)


def save_text_tower_files(clip: TextTowerClip, tokenizer: PretrainedTextTokenizer, folder: Path) -> None:
    """The tower's config.json and tokenizer files (its weights go with the scorer's)."""
    clip.text.backbone.config.save_pretrained(folder)
    tokenizer.tokenizer.save_pretrained(folder)


def _context_length(config: PretrainedConfig, tokenizer) -> int:
    """MAX_CONTEXT, or fewer where the model has fewer positions (RoBERTa's start after its pad id)."""
    limits = [MAX_CONTEXT, getattr(tokenizer, "model_max_length", MAX_CONTEXT)]
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int):
        limits.append(positions - (2 if config.model_type in ("roberta", "xlm-roberta", "camembert") else 0))
    return int(min(limits))
