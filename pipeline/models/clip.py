"""CLIP image encoder and scorer as one module: an open_clip CLIP (or a model converted to one) with its
tokenizer and preprocessing. How one is built from a spec: `pipeline.models.clip_factory`.

Preprocessing is split where it is cheapest: resize + center crop to uint8 happen on CPU workers
(`pipeline.io.images`), normalization with the model's own mean/std happens here, on the model's device.
"""

from __future__ import annotations

from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import QuickGELU, text_global_pool
from torch import nn

from pipeline.io.images import ImageSpec
from pipeline.models.errors import ModelLoadError
from pipeline.models.text_tokenizers import TextTokenizer

# ViT-B/32 on this project's 2-core Zen 4 in bf16: 9 ms per image in passes of 32-64 images, 13-15 ms in
# passes of 128-256 (docs/benchmarks.md)
CPU_CHUNK = 64


def uses_quick_gelu(clip: nn.Module) -> bool:
    return any(isinstance(module, QuickGELU) for module in clip.modules())


class ClipModel(nn.Module):
    """An open_clip CLIP with its tokenizer and preprocessing; returns L2-normalized float32 embeddings."""

    def __init__(self, clip: nn.Module, tokenizer: TextTokenizer, image_spec: ImageSpec,
                 mean: tuple[float, ...], std: tuple[float, ...], open_clip_config: dict[str, Any] | None = None):
        super().__init__()
        self.clip = clip.eval()
        self.tokenizer = tokenizer
        self.image_spec = image_spec
        # open_clip_config.json content for models a bundle stores as an open_clip folder (local-dir, transformers,
        # Hugging Face text towers), as open_clip built the model: `save_open_clip_folder` makes it portable
        self.open_clip_config = open_clip_config
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1) * 255, persistent=False)

    @property
    def embed_dim(self) -> int:
        text_tower = getattr(self.clip, "text", None)  # CustomTextCLIP keeps its text tower as one module
        if text_tower is not None:
            return int(text_tower.output_dim)
        return int(self.clip.text_projection.shape[-1])

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def shares_image_tower(self, other: ClipModel) -> bool:
        """Whether this model's image embeddings are `other`'s: the same model, or a text tower trained against
        `other`'s frozen image tower (`lock_image_tower`), so one image forward serves both."""
        return self is other or (self.clip.visual is other.clip.visual and self.image_spec == other.image_spec
                                 and torch.equal(self.pixel_mean, other.pixel_mean)
                                 and torch.equal(self.pixel_std, other.pixel_std))

    def normalize_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) -> normalized (B, 3, H, W) in the model's dtype, on its device."""
        dtype = self.clip.logit_scale.dtype
        pixels = pixels.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
        return ((pixels - self.pixel_mean) / self.pixel_std).to(dtype)

    def encode_images(self, pixels: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """uint8 (B, H, W, 3) images, already resized/cropped to `image_spec.size`; `normalize=False` gives
        the features before L2 normalization (what the original ClipCap's mappers take)."""
        features = self._in_chunks(pixels, lambda chunk: self.clip.encode_image(self.normalize_pixels(chunk)).float())
        return F.normalize(features, dim=-1) if normalize else features

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        # shortest first, so that each chunk is trimmed to a length close to all of its texts'
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        encoded = self._in_chunks([texts[i] for i in order], lambda chunk: F.normalize(
            encode_text_trimmed(self.clip, self.tokenizer(chunk).to(self.device)).float(), dim=-1))
        return encoded[torch.argsort(torch.tensor(order, device=encoded.device))]

    def _in_chunks(self, items: torch.Tensor | list[str], encode) -> torch.Tensor:
        """On CPU, at most CPU_CHUNK items per forward pass: a tower's cost per item rises once a pass's
        activations outgrow the CPU caches, while the decoder gains from every extra row of a batch."""
        if self.device.type != "cpu" or len(items) <= CPU_CHUNK:
            return encode(items)
        return torch.cat([encode(items[start:start + CPU_CHUNK]) for start in range(0, len(items), CPU_CHUNK)])


LOCKED_PREFIX = "visual."  # the keys of the image tower a locked-image scorer borrows
# The vision config a locked-image scorer is built with before it takes its encoder's image tower: the
# smallest ViT open_clip builds, so that building one never allocates an image tower it throws away.
LOCKED_VISION_PLACEHOLDER = {"image_size": 32, "patch_size": 32, "width": 64, "layers": 1, "head_width": 64}


def lock_image_tower(scorer: ClipModel, encoder: ClipModel) -> ClipModel:
    """`scorer` with `encoder`'s image tower and preprocessing in place of its own (locked-image tuning, LiT:
    a text tower trained against a frozen image tower). The tower is shared, not copied."""
    if scorer.embed_dim != encoder.embed_dim:
        raise ModelLoadError(f"a text tower of {scorer.embed_dim}-d embeddings cannot score against an image "
                             f"tower of {encoder.embed_dim}-d ones")
    scorer.clip.visual = encoder.clip.visual
    scorer.image_spec = encoder.image_spec
    scorer.pixel_mean, scorer.pixel_std = encoder.pixel_mean, encoder.pixel_std
    return scorer


def encode_text_trimmed(clip: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's `CLIP.encode_text` on the tokens up to the batch's last pooled position. A causal text
    tower's pooled output never sees the padding after it, and padding ~20-token captions to 77 made the
    scorer 18% of the model stage for 2.5% of its FLOPs (docs/benchmarks.md). Other towers run whole."""
    pool = getattr(clip, "text_pool_type", None)
    if not isinstance(clip, open_clip.CLIP) or clip.attn_mask is None or pool not in ("argmax", "eos"):
        return clip.encode_text(tokens)
    eos_id = getattr(clip, "text_eos_id", None)
    pooled_at = tokens.argmax(dim=-1) if pool == "argmax" else (tokens == eos_id).int().argmax(dim=-1)
    length = int(pooled_at.max()) + 1
    tokens = tokens[:, :length]
    cast_dtype = clip.transformer.get_cast_dtype()
    x = clip.token_embedding(tokens).to(cast_dtype) + clip.positional_embedding[:length].to(cast_dtype)
    x = clip.ln_final(clip.transformer(x, attn_mask=clip.attn_mask[:length, :length]))
    x = text_global_pool(x, tokens, pool, eos_token_id=eos_id)
    projection = clip.text_projection
    if projection is None:
        return x
    return projection(x) if isinstance(projection, nn.Linear) else x @ projection
