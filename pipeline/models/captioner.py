"""ClipCap prefix captioner (arXiv 2111.09734): a mapper turns a CLIP embedding into a prefix of
language-model input embeddings, and a Hugging Face causal LM (GPT-2 family) writes the caption.

Module names follow the reference implementation (rmokady/CLIP_prefix_caption) so that its
checkpoints load by stripping the `clip_project.` / `gpt.` prefixes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.activations import GELUTanh, NewGELUActivation

MAPPERS = ("mlp", "transformer")


@dataclass
class CaptionerConfig:
    """Mapper shape and decoding defaults; stored in bundle.json."""

    mapper: str = "mlp"
    prefix_length: int = 10
    prefix_dim: int = 512          # CLIP embedding width
    clip_length: int = 10          # transformer mapper: tokens the CLIP embedding is projected to
    num_layers: int = 8            # transformer mapper depth
    # the mapper takes the CLIP image features as the encoder returns them, not L2-normalized: the original
    # ClipCap trained its mappers so (its --normalize_prefix off); this project's captioners take unit vectors
    raw_prefix: bool = False
    stop_token: str = "."          # ClipCap stops at '.', as well as at the LM's eos

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class MLPMapper(nn.Module):
    """prefix_dim -> (L*E)/2 -> L*E with Tanh between: 512 -> 3840 -> 7680 for CLIP B/32 + GPT-2."""

    def __init__(self, prefix_dim: int, embed_dim: int, prefix_length: int):
        super().__init__()
        self.prefix_length = prefix_length
        hidden = embed_dim * prefix_length // 2
        self.model = nn.Sequential(
            nn.Linear(prefix_dim, hidden), nn.Tanh(), nn.Linear(hidden, embed_dim * prefix_length)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).view(x.shape[0], self.prefix_length, -1)


class _Attention(nn.Module):
    """ClipCap's multi-head attention: queries from x, keys and values from one fused projection of y."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.to_queries = nn.Linear(dim, dim, bias=False)
        self.to_keys_values = nn.Linear(dim, dim * 2, bias=False)
        self.project = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        heads = self.num_heads
        queries = self.to_queries(x).view(b, n, heads, c // heads).transpose(1, 2)
        keys, values = self.to_keys_values(x).view(b, n, 2, heads, c // heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(queries, keys, values)
        return self.project(out.transpose(1, 2).reshape(b, n, c))


class _MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


class _Layer(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = _MLP(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _Transformer(nn.Module):
    def __init__(self, dim: int, num_heads: int, num_layers: int, mlp_ratio: float = 2.0):
        super().__init__()
        self.layers = nn.ModuleList(_Layer(dim, num_heads, mlp_ratio) for _ in range(num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class TransformerMapper(nn.Module):
    """ClipCap's transformer mapper: the CLIP embedding becomes `clip_length` tokens, learned prefix
    constants are appended, self-attention mixes them, and the constants' outputs are the prefix."""

    def __init__(self, prefix_dim: int, embed_dim: int, prefix_length: int, clip_length: int,
                 num_layers: int = 8, num_heads: int = 8):
        super().__init__()
        self.clip_length = clip_length
        self.transformer = _Transformer(embed_dim, num_heads, num_layers)
        self.linear = nn.Linear(prefix_dim, clip_length * embed_dim)
        self.prefix_const = nn.Parameter(torch.randn(prefix_length, embed_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x).view(x.shape[0], self.clip_length, -1)
        constants = self.prefix_const.unsqueeze(0).expand(x.shape[0], -1, -1)
        return self.transformer(torch.cat((x, constants), dim=1))[:, self.clip_length:]


def build_mapper(config: CaptionerConfig, embed_dim: int) -> nn.Module:
    if config.mapper == "mlp":
        return MLPMapper(config.prefix_dim, embed_dim, config.prefix_length)
    if config.mapper == "transformer":
        return TransformerMapper(config.prefix_dim, embed_dim, config.prefix_length, config.clip_length,
                                 config.num_layers)
    raise ValueError(f"unknown mapper {config.mapper!r} (expected one of {', '.join(MAPPERS)})")


def _fuse_activations(lm: PreTrainedModel) -> PreTrainedModel:
    """GPT-2's `gelu_new` is the tanh-approximate GELU written as six tensor ops; PyTorch computes the same
    function in one kernel (12% of a bf16 greedy decode here went to those ops). Weights are untouched."""
    for parent in lm.modules():
        for name, child in parent.named_children():
            if type(child) is NewGELUActivation:
                setattr(parent, name, GELUTanh())
    return lm


class PrefixCaptioner(nn.Module):
    """Mapper + causal LM + its tokenizer. Decoding lives in `pipeline.generation.generate`."""

    def __init__(self, config: CaptionerConfig, lm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase):
        super().__init__()
        self.config = config
        self.lm = _fuse_activations(lm).eval()
        self.tokenizer = tokenizer
        self.mapper = build_mapper(config, self.embed_dim)

    @property
    def embed_dim(self) -> int:
        return int(self.lm.get_input_embeddings().weight.shape[1])

    def prefix(self, image_features: torch.Tensor) -> torch.Tensor:
        """(B, prefix_dim) CLIP image features, L2-normalized or not -> (B, prefix_length, E) LM input
        embeddings. The mapper sees them normalized, unless it was trained on raw features (`raw_prefix`)."""
        x = image_features if self.config.raw_prefix else F.normalize(image_features, dim=-1)
        return self.mapper(x.to(self.lm.get_input_embeddings().weight.dtype))

    def max_caption_tokens(self) -> int | None:
        """Positions the LM has left after the prefix; None where its config names no limit."""
        limit = getattr(self.lm.config, "n_positions", None) or getattr(self.lm.config, "max_position_embeddings", None)
        return None if limit is None else int(limit) - self.config.prefix_length

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.lm.get_input_embeddings()(tokens)

    def forward(self, image_embeddings: torch.Tensor, tokens: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits over prefix + caption positions, (B, L + T, V), as ClipCap's training forward."""
        prefix = self.prefix(image_embeddings)
        embeds = torch.cat((prefix, self.embed_tokens(tokens)), dim=1)
        if attention_mask is not None:
            ones = attention_mask.new_ones(attention_mask.shape[0], prefix.shape[1])
            attention_mask = torch.cat((ones, attention_mask), dim=1)
        return self.lm(inputs_embeds=embeds, attention_mask=attention_mask).logits

    def caption_loss(self, image_embeddings: torch.Tensor, tokens: torch.Tensor,
                     caption_mask: torch.Tensor) -> torch.Tensor:
        """Next-token cross-entropy on the caption tokens only (`caption_mask` 1), never on the prefix or the
        padding (0). The tokens are right-padded, so under causal attention no caption token sees a pad: the
        LM runs without a mask (the same logits there; the mask cost a tenth of a CPU training step)."""
        logits = self(image_embeddings, tokens)
        # position L-1+t predicts caption token t
        predictions = logits[:, self.config.prefix_length - 1 : -1]
        targets = tokens.masked_fill(caption_mask == 0, -100)
        return F.cross_entropy(predictions.reshape(-1, predictions.shape[-1]).float(), targets.reshape(-1),
                               ignore_index=-100)

    def stop_token_ids(self) -> list[int]:
        """Ids that end a caption: the LM's eos and the first id of the stop token (as ClipCap does)."""
        ids = []
        if self.tokenizer.eos_token_id is not None:
            ids.append(int(self.tokenizer.eos_token_id))
        if self.config.stop_token:
            encoded = self.tokenizer.encode(self.config.stop_token, add_special_tokens=False)
            if encoded:
                ids.append(int(encoded[0]))
        return sorted(set(ids))
