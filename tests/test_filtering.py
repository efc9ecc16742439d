"""The row filter: exact top fractions of the run or of each cluster of image embeddings."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pipeline.run.filtering import FilterSettings, TopFraction, fit_clusters, keep_mask, nearest_cluster
from pipeline.run.selection import count_through, find_cutoffs, ranking, sample_windows


def _two_kinds(rows_per_kind: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Embeddings of two kinds of image far apart; the first kind's captions score higher throughout."""
    rng = np.random.default_rng(seed)
    centres = np.eye(8, dtype=np.float32)[:2] * 5
    embeddings = np.concatenate([centre + rng.normal(0, 0.3, (rows_per_kind, 8)) for centre in centres])
    scores = np.concatenate([rng.uniform(0.6, 0.9, rows_per_kind), rng.uniform(0.1, 0.5, rows_per_kind)])
    keys = [f"k{i:03d}" for i in range(2 * rows_per_kind)]
    return embeddings.astype(np.float32), scores, keys


def top_fraction(settings: FilterSettings, scores: np.ndarray, keys: list[str],
                 embeddings: np.ndarray) -> TopFraction:
    """The cutoffs of rows held in one table, clusters fitted on all of them (the commit's path over one part)."""
    centroids = None if settings.clusters is None else fit_clusters(embeddings, settings.clusters)
    clusters = np.zeros(len(keys), np.int32) if centroids is None else nearest_cluster(embeddings, centroids)
    table = ranking(clusters, scores, pa.array(keys))
    counts = np.bincount(clusters, minlength=1 if centroids is None else len(centroids)).tolist()
    cutoffs = find_cutoffs(settings.keep_top_fraction, counts,
                           lambda windows, strides: [sample_windows(table, windows, strides)],
                           lambda windows, pivots: count_through(table, windows, pivots))
    return TopFraction(cutoffs, centroids)


def test_a_global_fraction_keeps_the_easy_kind_and_clusters_keep_each_kind_in_proportion():
    embeddings, scores, keys = _two_kinds()
    statuses = ["ok"] * len(keys)
    everything = FilterSettings(keep_top_fraction=0.5)
    top = top_fraction(everything, scores, keys, embeddings)
    kept = keep_mask(everything, top, statuses, scores, keys)
    assert kept[:40].all() and not kept[40:].any()

    per_cluster = FilterSettings(keep_top_fraction=0.5, clusters=2)
    top = top_fraction(per_cluster, scores, keys, embeddings)
    kept = keep_mask(per_cluster, top, statuses, scores, keys, embeddings)
    assert kept[:40].sum() == 20 == kept[40:].sum()
    for kind in (slice(0, 40), slice(40, 80)):  # within its cluster, each row kept outscores each dropped
        assert scores[kind][kept[kind]].min() > scores[kind][~kept[kind]].max()
    assert top.to_json()["top_fraction_cutoff_score"] is None
    assert len(top.to_json()["top_fraction_cutoff_scores_by_cluster"]) == 2


def test_k_means_finds_separated_groups_and_fits_fewer_rows_than_clusters():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 16))
    labels = np.repeat(np.arange(4), 25)
    points = centres[labels] + rng.normal(0, 0.05, (100, 16))
    found = nearest_cluster(points, fit_clusters(points, 4))
    assert all(len(set(found[labels == group])) == 1 for group in range(4))  # each group one cluster
    assert len(set(found)) == 4
    assert fit_clusters(points[:3], 8).shape == (3, 16)


def test_failed_rows_and_the_score_floor_still_apply_within_clusters():
    embeddings, scores, keys = _two_kinds(rows_per_kind=10)
    settings = FilterSettings(min_clip_score=0.3, keep_top_fraction=1.0, clusters=2)
    statuses = ["ok"] * 19 + ["decode_error"]
    top = top_fraction(settings, scores[:19], keys[:19], embeddings[:19])
    kept = keep_mask(settings, top, statuses, scores, keys, embeddings)
    np.testing.assert_array_equal(kept, np.append(scores[:19] >= 0.3, False))


def test_clusters_need_a_fraction_to_keep_per_cluster():
    with pytest.raises(ValueError, match="--filter-clusters"):
        FilterSettings(clusters=8)
    with pytest.raises(ValueError, match="at least 2"):
        FilterSettings(keep_top_fraction=0.5, clusters=1)
    assert "clusters" not in FilterSettings(keep_top_fraction=0.5).to_json()  # older runs' records still match
