"""One batch through the three models: encode -> prefix -> decode -> score -> best of N.

Plain PyTorch: the Ray model stage and the benchmarks' bare loop both call `caption_batch`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import GenerationSettings
from pipeline.generation.generate import decode_texts, generate
from pipeline.generation.methods import METHODS
from pipeline.generation.sampling import seeds_for
from pipeline.models.bundle import Bundle


@dataclass
class CaptionedBatch:
    captions: list[str | None]         # None: embeddings only (no settings)
    clip_scores: np.ndarray            # float32 (B,): raw cosine of the chosen caption, NaN: none
    image_embeddings: np.ndarray       # float32 (B, D): L2-normalized encoder embeddings
    candidates: list[list[tuple[str, float]]]  # every candidate with its score, best first
    original_scores: np.ndarray | None = None  # float32 (B,): the scorer's cosine of each original text, NaN: none


@torch.inference_mode()
def caption_batch(bundle: Bundle, pixels: torch.Tensor, settings: GenerationSettings | None,
                  scorer_pixels: torch.Tensor | None = None, keys: Sequence[str] | None = None,
                  original_texts: Sequence[str | None] | None = None) -> CaptionedBatch:
    """uint8 (B, H, W, 3) images at the encoder's input size -> captions, scores and embeddings; `settings` None:
    embeddings (and the original texts' scores) only, no caption decoded, each caption None and its score NaN.

    `scorer_pixels` are the same images at the scorer's input size, needed only when the scorer is
    a different model with a different input size. `keys`: the samples' keys, which seed sampling's
    draws, so an image's captions do not depend on the batch it is in. `original_texts`: the text that
    came with each image (alt text, a dataset's caption, or None), scored by the same scorer.
    """
    features = bundle.encoder.encode_images(pixels, normalize=False)
    embeddings = F.normalize(features, dim=-1)
    scorer_embeddings = None
    if settings is not None or any(original_texts or ()):  # else no text to score: no second image forward
        if bundle.scorer.shares_image_tower(bundle.encoder):
            scorer_embeddings = embeddings
        else:
            scorer_embeddings = bundle.scorer.encode_images(pixels if scorer_pixels is None else scorer_pixels)
    original_scores = None
    if original_texts is not None:
        original_scores = np.full(len(pixels), np.nan, dtype=np.float32)
        given = [i for i, text in enumerate(original_texts) if text]
        if given:
            originals = bundle.scorer.encode_texts([original_texts[i] for i in given])
            at = torch.tensor(given, device=scorer_embeddings.device)
            original_scores[given] = (scorer_embeddings[at] * originals).sum(-1).cpu().numpy()
    image_embeddings = embeddings.cpu().numpy().astype(np.float32)
    if settings is None:
        return CaptionedBatch(captions=[None] * len(pixels), clip_scores=np.full(len(pixels), np.nan, np.float32),
                              image_embeddings=image_embeddings, candidates=[[] for _ in range(len(pixels))],
                              original_scores=original_scores)
    draws = "seed" in METHODS[settings.method].settings  # a method that draws: seeded per image, by its key
    sample_seeds = seeds_for(settings.seed, keys) if keys is not None and draws else None
    token_lists = generate(bundle.captioner, bundle.captioner.prefix(features), settings, sample_seeds)
    per_image = [len(candidates) for candidates in token_lists]
    texts = decode_texts(bundle.captioner, [tokens for candidates in token_lists for tokens in candidates])
    text_embeddings = bundle.scorer.encode_texts(texts)
    owner = torch.repeat_interleave(torch.arange(len(per_image)), torch.tensor(per_image))
    scores = (scorer_embeddings[owner.to(scorer_embeddings.device)] * text_embeddings).sum(-1).cpu().numpy()
    captions, best_scores, candidates = [], [], []
    start = 0
    for count in per_image:
        pairs = sorted(zip(texts[start:start + count], scores[start:start + count].tolist(), strict=True),
                       key=lambda pair: -pair[1])
        captions.append(pairs[0][0])
        best_scores.append(pairs[0][1])
        candidates.append(pairs)
        start += count
    return CaptionedBatch(captions=captions, clip_scores=np.asarray(best_scores, dtype=np.float32),
                          image_embeddings=image_embeddings, candidates=candidates,
                          original_scores=original_scores)
