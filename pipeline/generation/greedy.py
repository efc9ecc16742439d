"""Greedy decoding: the most likely token at every step, one caption per image."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pipeline.config import GenerationSettings
from pipeline.generation.kv_cache import decode_rows
from pipeline.models.captioner import PrefixCaptioner


def generate(captioner: PrefixCaptioner, prefix: torch.Tensor, settings: GenerationSettings,
             sample_seeds: Sequence[int] | None = None) -> list[list[list[int]]]:
    return [[row] for row in decode_rows(captioner, prefix, settings.max_new_tokens, captioner.stop_token_ids(),
                                         _choose)]


def _choose(logits: torch.Tensor, rows: torch.Tensor, step: int) -> torch.Tensor:
    # In the model's own dtype: float32 copies of bf16 logits hold the same values, and making them took
    # 12 ms a step at batch 256 here. max's indices are argmax's (the first maximum on ties), ~4x faster.
    return logits.max(dim=-1).indices
