"""Which captioned rows make the pseudo-label set: an absolute CLIP-score floor and/or the global
top fraction of the run's scores. The fraction is exact: rows are ranked by (score, then key) over
every ok row of the run, so it needs the whole run, and it reads only the stored scores and keys,
never re-running a model."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class FilterSettings:
    min_clip_score: float | None = None
    keep_top_fraction: float | None = None

    def __post_init__(self) -> None:
        if self.min_clip_score is not None and not -1 <= self.min_clip_score <= 1:
            raise ValueError(f"--min-clip-score must lie in [-1, 1], got {self.min_clip_score}")
        if self.keep_top_fraction is not None and not 0 < self.keep_top_fraction <= 1:
            raise ValueError(f"--keep-top-fraction must lie in (0, 1], got {self.keep_top_fraction}")

    @property
    def filters(self) -> bool:
        """Whether any row is filtered by its score (else every ok row is kept)."""
        return self.min_clip_score is not None or self.keep_top_fraction is not None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Cutoff:
    """The last row kept by --keep-top-fraction in the ranking (score descending, key ascending)."""

    score: float
    key: str


def top_fraction_cutoff(fraction: float | None, scores: np.ndarray, keys: list[str]) -> Cutoff | None:
    """Given the scores and keys of all ok rows of a run, where the top `fraction` ends."""
    if fraction is None or not len(keys):
        return None
    keep = max(1, round(fraction * len(keys)))
    order = sorted(range(len(keys)), key=lambda i: (-float(scores[i]), keys[i]))
    last = order[keep - 1]
    return Cutoff(float(scores[last]), keys[last])


def keep_mask(settings: FilterSettings, cutoff: Cutoff | None, statuses: list[str], scores: np.ndarray,
              keys: list[str]) -> np.ndarray:
    """Rows that pass: status ok, clip_score >= the floor, and ranked within the top fraction."""
    keep = np.array([status == "ok" for status in statuses], dtype=bool)
    values = np.nan_to_num(scores.astype(np.float64), nan=-np.inf)
    if settings.min_clip_score is not None:
        keep &= values >= settings.min_clip_score
    if cutoff is not None:
        at_cutoff = (values == cutoff.score) & (np.array(keys, dtype=object) <= cutoff.key)
        keep &= (values > cutoff.score) | at_cutoff
    return keep
