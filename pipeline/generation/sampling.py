"""Sampling: `num_candidates` captions per image drawn with temperature, top-k and top-p. Each image and candidate
draws from its own counter-based random stream seeded by the run's seed and the image's key, so an image gets the
same draws in any batch it is captioned in."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch

from pipeline.config import GenerationSettings
from pipeline.generation.kv_cache import decode_rows
from pipeline.models.captioner import PrefixCaptioner


def generate(captioner: PrefixCaptioner, prefix: torch.Tensor, settings: GenerationSettings,
             sample_seeds: Sequence[int] | None = None) -> list[list[list[int]]]:
    """`sample_seeds`: one per image (`seeds_for`); default: the settings' seed and the image's place in the batch."""
    batch, n = prefix.shape[0], settings.num_candidates
    seeds = seeds_for(settings.seed, [str(i) for i in range(batch)]) if sample_seeds is None else sample_seeds
    if len(seeds) != batch:
        raise ValueError(f"{len(seeds)} sample seeds for {batch} images")
    uniforms = _uniforms(_streams(seeds, n), settings.max_new_tokens)
    choose = _sampler(settings, torch.from_numpy(uniforms).to(prefix.device))  # one copy, not one a step
    rows = decode_rows(captioner, prefix.repeat_interleave(n, dim=0), settings.max_new_tokens,
                       captioner.stop_token_ids(), choose)
    return [rows[i * n:(i + 1) * n] for i in range(batch)]


def seeds_for(seed: int, keys: Sequence[str]) -> list[int]:
    """One 64-bit sampling seed per sample, from the run's seed and the sample's key."""
    return [int.from_bytes(hashlib.blake2b(f"{seed}\0{key}".encode("utf-8", "surrogatepass"),
                                           digest_size=8).digest(), "little") for key in keys]


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(state: np.ndarray) -> np.ndarray:
    """SplitMix64's output function: a counter-based generator, so draw number t of a stream is
    computed directly (no generator object per stream, no state carried between steps)."""
    with np.errstate(over="ignore"):
        state = (state ^ (state >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        state = (state ^ (state >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return state ^ (state >> np.uint64(31))


def _streams(seeds: Sequence[int], candidates: int) -> np.ndarray:
    """(B * candidates,) stream keys, image-major as the rows `generate` decodes."""
    with np.errstate(over="ignore"):
        per_image = np.asarray(seeds, dtype=np.uint64)[:, None]
        return _splitmix64(per_image + _GOLDEN * np.arange(1, candidates + 1, dtype=np.uint64)).reshape(-1)


def _uniforms(streams: np.ndarray, steps: int) -> np.ndarray:
    """(streams, steps) draws, row r's draw t uniform in [0, 1) on a 2^-24 grid (exact in float32)."""
    with np.errstate(over="ignore"):
        counters = streams[:, None] + _GOLDEN * np.arange(1, steps + 1, dtype=np.uint64)
        bits = _splitmix64(counters) >> np.uint64(40)
    return bits.astype(np.float32) * np.float32(2.0**-24)


def _sampler(settings: GenerationSettings, uniforms: torch.Tensor):
    """`uniforms`: (rows, steps) draws on the logits' device (see `_uniforms`); `rows` are the live rows'
    indices into them, on that device too, so that choosing needs nothing from the host."""
    def choose(logits: torch.Tensor, rows: torch.Tensor, step: int) -> torch.Tensor:
        logits = logits.float() / settings.temperature
        if settings.top_k:
            kth = logits.topk(min(settings.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if settings.top_p < 1:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
            # drop a token once the mass before it already reaches top_p (the first token always stays)
            drop_sorted = cumulative - sorted_logits.softmax(dim=-1) >= settings.top_p
            logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
        # inverse-CDF sampling: each row's own uniform picks the first token whose cumulative mass exceeds it
        cdf = logits.softmax(dim=-1).cumsum(dim=-1)
        picks = torch.searchsorted(cdf, (uniforms[rows, step] * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
        # rounding may put the threshold at the total: the last token of positive mass, never a masked one
        return torch.minimum(picks, cdf.argmax(dim=-1))

    return choose
