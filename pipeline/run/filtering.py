"""Which captioned rows make the pseudo-label set: an absolute CLIP-score floor and/or the top fraction of the
run's scores, over the whole run or within each cluster of image embeddings. The fraction is exact: rows are
ranked by (score, then key) over every ok row of the run (of its cluster), so it needs the whole run, and it reads
only the stored scores, keys and embeddings, never re-running a model (the commit finds the cutoffs: `selection`).

Clusters keep the images that are hard to caption: their best captions score lower than an easy image's even
when right, so a global fraction keeps mostly easy images, while a fraction per cluster of similar images keeps
each kind of image in proportion (DataComp's image-based filtering clusters CLIP image embeddings the same way).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

# k-means fits on at most this many rows (the first by a hash of their keys: the clusters depend on the rows
# alone, not on the order in which the run wrote them), then assigns every row
CLUSTER_SAMPLE = 65_536
CLUSTER_ITERATIONS = 25


@dataclass(frozen=True)
class FilterSettings:
    min_clip_score: float | None = None
    keep_top_fraction: float | None = None
    clusters: int | None = None  # the top fraction is kept within each of this many clusters of image_embedding

    def __post_init__(self) -> None:
        if self.min_clip_score is not None and not -1 <= self.min_clip_score <= 1:
            raise ValueError(f"--min-clip-score must lie in [-1, 1], got {self.min_clip_score}")
        if self.keep_top_fraction is not None and not 0 < self.keep_top_fraction <= 1:
            raise ValueError(f"--keep-top-fraction must lie in (0, 1], got {self.keep_top_fraction}")
        if self.clusters is not None and (self.clusters < 2 or self.keep_top_fraction is None):
            raise ValueError(f"--filter-clusters {self.clusters}: at least 2, and with --keep-top-fraction "
                             "(the fraction kept in each cluster)")

    @property
    def filters(self) -> bool:
        """Whether any row is filtered by its score (else every ok row is kept)."""
        return self.min_clip_score is not None or self.keep_top_fraction is not None

    def to_json(self) -> dict[str, Any]:
        """Clusters are recorded only when set, so that runs recorded before the option existed resume."""
        settings = asdict(self)
        if self.clusters is None:
            del settings["clusters"]
        return settings


@dataclass(frozen=True)
class Cutoff:
    """The last row kept by --keep-top-fraction in the ranking (score descending, key ascending)."""

    score: float
    key: str


def fit_clusters(embeddings: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """Spherical k-means (k-means++ start, cosine similarity) of L2-normalised embeddings: `count` unit
    centroids (fewer rows than clusters: one centroid per row)."""
    points = _normalised(embeddings)
    count = min(count, len(points))
    rng = np.random.default_rng(seed)
    centroids = [points[rng.integers(len(points))]]
    distance = 1 - points @ centroids[0]
    for _ in range(1, count):
        weights = np.clip(distance, 0, None)
        total = weights.sum()
        chosen = rng.choice(len(points), p=weights / total) if total > 0 else rng.integers(len(points))
        centroids.append(points[chosen])
        distance = np.minimum(distance, 1 - points @ points[chosen])
    centres = np.stack(centroids)
    for _ in range(CLUSTER_ITERATIONS):
        nearest = np.argmax(points @ centres.T, axis=1)
        sums = np.zeros_like(centres)
        np.add.at(sums, nearest, points)
        norms = np.linalg.norm(sums, axis=1, keepdims=True)
        moved = np.where(norms > 0, sums / np.maximum(norms, 1e-12), centres)  # an emptied cluster keeps its centre
        if np.array_equal(moved, centres):
            break
        centres = moved
    return centres.astype(np.float32)


def nearest_cluster(embeddings: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    return np.argmax(_normalised(embeddings) @ centroids.T, axis=1)


@dataclass(frozen=True)
class TopFraction:
    """Where the kept top fraction ends: one cutoff for the run, or one per cluster of `centroids`."""

    cutoffs: tuple[Cutoff | None, ...]  # None: a cluster without rows
    centroids: np.ndarray | None = None

    def admits(self, scores: np.ndarray, keys: Sequence[str], embeddings: np.ndarray | None) -> np.ndarray:
        """Rows ranked within the top fraction (of the run, or of their cluster)."""
        clusters = (np.zeros(len(keys), dtype=np.int64) if self.centroids is None
                    else nearest_cluster(embeddings, self.centroids))
        return np.array([_within(float(score), key, self.cutoffs[cluster])
                         for score, key, cluster in zip(scores, keys, clusters, strict=True)], dtype=bool)

    def to_json(self) -> dict[str, Any]:
        scores = [None if cutoff is None else cutoff.score for cutoff in self.cutoffs]
        if self.centroids is None:
            return {"top_fraction_cutoff_score": scores[0]}
        return {"top_fraction_cutoff_score": None, "top_fraction_cutoff_scores_by_cluster": scores}


def keep_mask(settings: FilterSettings, top: TopFraction | None, statuses: list[str], scores: np.ndarray,
              keys: list[str], embeddings: np.ndarray | None = None) -> np.ndarray:
    """Rows that pass: status ok, clip_score >= the floor, and ranked within the top fraction."""
    keep = np.array([status == "ok" for status in statuses], dtype=bool)
    values = np.nan_to_num(scores.astype(np.float64), nan=-np.inf)
    if settings.min_clip_score is not None:
        keep &= values >= settings.min_clip_score
    if top is not None and keep.any():
        rows = np.flatnonzero(keep)
        keep[rows] = top.admits(values[rows], [keys[i] for i in rows],
                                None if embeddings is None else embeddings[rows])
    return keep


def _within(score: float, key: str, cutoff: Cutoff | None) -> bool:
    return cutoff is not None and (score > cutoff.score or (score == cutoff.score and key <= cutoff.key))


def _normalised(embeddings: np.ndarray) -> np.ndarray:
    points = np.asarray(embeddings, dtype=np.float32)
    return points / np.maximum(np.linalg.norm(points, axis=1, keepdims=True), 1e-12)
