"""The commit over Ray tasks against a commit of every row in one process, written here the plain way; and the
search for the top-fraction cutoff against a sort of every row."""

from __future__ import annotations

import functools
import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from conftest import read_parts

import pipeline.run.commit as commit
import pipeline.run.selection as selection
from pipeline.config import RunConfig
from pipeline.io.sinks import STAGING, OutputDir, by_shard, part_name
from pipeline.quality.staged_rows import METADATA, StagedRows, write_staged
from pipeline.run.filtering import FilterSettings, TopFraction, fit_clusters, keep_mask, nearest_cluster
from pipeline.run.selection import add_counts, count_through, find_cutoffs, ranking, sample_windows
from schemas.captions import embedding_matrix


def _cutoff_by_sorting(fraction: float, scores: list[float], keys: list[str]) -> tuple[float, str]:
    order = sorted(zip(scores, keys, strict=True), key=lambda row: (-row[0], row[1]))
    return order[max(1, round(fraction * len(order))) - 1]


@pytest.mark.parametrize("fraction", [0.001, 0.3, 0.5, 1.0])
def test_the_cutoff_found_by_narrowing_windows_is_the_cutoff_of_a_full_sort(monkeypatch, fraction):
    monkeypatch.setattr(selection, "GATHER_ROWS", 50)  # several narrowings on a few thousand rows
    monkeypatch.setattr(selection, "PIVOTS", 8)
    rng = np.random.default_rng(1)
    rows = 6000
    scores = np.round(rng.normal(0.3, 0.05, rows), 2)  # two decimals: many ties, broken by key
    scores[rng.random(rows) < 0.01] = np.nan  # a missing score ranks last
    keys = [f"k{i:05d}" for i in rng.permutation(rows)]
    clusters = rng.integers(0, 3, rows).astype(np.int32)
    split = np.sort(rng.choice(np.arange(1, rows), 4, replace=False))
    tables = [ranking(clusters[a:b], scores[a:b], pa.array(keys[a:b]))
              for a, b in zip([0, *split], [*split, rows], strict=True)]
    calls = []

    def sample(windows, strides):
        calls.append(strides)
        return [sample_windows(table, windows, strides) for table in tables]

    cutoffs = find_cutoffs(fraction, np.bincount(clusters, minlength=4).tolist(), sample,
                           lambda windows, pivots: functools.reduce(
                               add_counts, [count_through(table, windows, pivots) for table in tables], None))
    for cluster in range(3):
        rows_of = np.flatnonzero(clusters == cluster)
        expected = _cutoff_by_sorting(fraction, [float(np.nan_to_num(scores[i], nan=-np.inf)) for i in rows_of],
                                      [keys[i] for i in rows_of])
        assert (cutoffs[cluster].score, cutoffs[cluster].key) == expected
    assert cutoffs[3] is None  # a cluster without rows
    assert min(calls[0].values()) > 1 == max(calls[-1].values())  # it narrowed the windows, then gathered


def _commit_in_one_process(staged: pa.Table, shard_order: list[str], settings: FilterSettings) -> dict[str, tuple]:
    """key -> (status, keep) of every sample, from every staged row (in part-listing order) at once."""
    rank = {url: i for i, url in enumerate(shard_order)}
    first_rows, seen = [], set()
    for row, sample in enumerate(zip(staged.column("source").to_pylist(), staged.column("index").to_pylist(),
                                     strict=True)):
        if sample not in seen:
            seen.add(sample)
            first_rows.append(row)
    table = staged.take(first_rows)
    keys, sources = table.column("key").to_pylist(), table.column("source").to_pylist()
    indices, statuses = table.column("index").to_pylist(), table.column("status").to_pylist()
    owner: dict[str, tuple] = {}
    for key, source, index in zip(keys, sources, indices, strict=True):
        owner[key] = min(owner.get(key, (len(rank) + 1,)), (rank[source], index, source))
    renamed = [owner[key][1:] != (index, source) for key, source, index in zip(keys, sources, indices, strict=True)]
    statuses = ["duplicate_key" if was and status == "ok" else status for was, status in zip(renamed, statuses,
                                                                                             strict=True)]
    keys = [f"{key}@{source}#{index}" if was else key
            for key, source, index, was in zip(keys, sources, indices, renamed, strict=True)]
    scores = np.nan_to_num(table.column("clip_score").to_numpy(zero_copy_only=False).astype(np.float64),
                           nan=-np.inf)
    embeddings = embedding_matrix(table)
    ranked = [i for i, status in enumerate(statuses) if status == "ok"]
    top = None
    if settings.keep_top_fraction is not None:
        clusters = np.zeros(len(keys), dtype=np.int64)
        centroids = None
        if settings.clusters is not None:
            digest = {i: hashlib.blake2b(keys[i].encode(), digest_size=8).digest() for i in ranked}
            sample = sorted(ranked, key=digest.__getitem__)[:commit.CLUSTER_SAMPLE]
            centroids = fit_clusters(embeddings[sample], settings.clusters)
            clusters = nearest_cluster(embeddings, centroids)
        cutoffs = []
        for cluster in range(1 if centroids is None else len(centroids)):
            members = [i for i in ranked if clusters[i] == cluster]
            cutoff = _cutoff_by_sorting(settings.keep_top_fraction, [scores[i] for i in members],
                                        [keys[i] for i in members]) if members else None
            cutoffs.append(cutoff and selection.Cutoff(*cutoff))
        top = TopFraction(tuple(cutoffs), centroids)
    keep = keep_mask(settings, top, statuses, scores, keys, embeddings)
    return {key: (status, bool(kept)) for key, status, kept in zip(keys, statuses, keep, strict=True)}


@pytest.mark.parametrize("settings", [FilterSettings(keep_top_fraction=0.4),
                                      FilterSettings(min_clip_score=0.28, keep_top_fraction=0.5, clusters=3),
                                      FilterSettings(min_clip_score=0.3)])
def test_the_commit_over_tasks_writes_what_a_commit_of_every_row_in_one_process_writes(
        ray_local, tmp_path, monkeypatch, settings):
    monkeypatch.setattr(commit, "GROUP_ROWS", 700)  # several groups of parts and several key ranges
    monkeypatch.setattr(commit, "RANGE_ROWS", 1500)
    monkeypatch.setattr(selection, "GATHER_ROWS", 40)
    monkeypatch.setattr(selection, "PIVOTS", 8)
    spec = StagedRows(rows=3000, rows_per_part=128, embedding_dim=8, failed=0.05, shared_keys=0.03, retried=0.3,
                      shard_samples=700)
    out = OutputDir(str(tmp_path / "out"))
    written = write_staged(out.url, spec)
    staged = pa.concat_tables(out.read_table(path) for path in out.parts(STAGING))
    assert written > spec.rows and len(set(staged.column("key").to_pylist())) < spec.rows  # copies, shared keys
    expected = _commit_in_one_process(staged, spec.shards(), settings)

    config = RunConfig(inputs=("unused",), output=out.url, filter=settings)
    counts = commit.finalize(out, config, spec.shards(), spec.embedding_dim, METADATA, set())
    captions = read_parts(tmp_path / "out" / "captions")
    assert captions.num_rows == spec.rows == len(expected)  # every sample once
    assert {key: (status, keep) for key, status, keep in zip(
        *(captions.column(c).to_pylist() for c in ("key", "status", "keep")), strict=True)} == expected
    kept = read_parts(tmp_path / "out" / "filtered")
    assert sorted(kept.column("key").to_pylist()) == sorted(k for k, (_, keep) in expected.items() if keep)
    assert counts["kept"] == kept.num_rows > 0 and counts["rows"] == spec.rows
    assert counts["by_status"]["duplicate_key"] == sum(status == "duplicate_key" for status, _ in expected.values())
    renamed = captions.filter(pc.equal(captions.column("status"), "duplicate_key"))
    assert renamed.num_rows and all("@s3://corpus/" in key for key in renamed.column("key").to_pylist())
    captioned = staged.filter(pc.equal(staged.column("status"), "ok")).group_by(["source", "index"]).aggregate([])
    assert sum(counts["rows_by_node"].values()) == captioned.num_rows  # the model's work, renamed rows too


def test_clusters_and_cutoffs_depend_on_the_samples_not_on_how_the_run_cut_them_into_parts(ray_local, tmp_path,
                                                                                           monkeypatch):
    monkeypatch.setattr(commit, "GROUP_ROWS", 500)
    monkeypatch.setattr(commit, "CLUSTER_SAMPLE", 300)  # fitted on a sample of the rows, chosen by key
    spec = StagedRows(rows=1200, rows_per_part=100, embedding_dim=8, retried=0.0, shard_samples=500)
    settings = FilterSettings(keep_top_fraction=0.3, clusters=4)
    config = RunConfig(inputs=("unused",), output=str(tmp_path), filter=settings)
    results = []
    for name, rows_per_part in (("in-order", 100), ("shuffled", 77)):
        out = OutputDir(str(tmp_path / name))
        rows = pa.concat_tables(table for number in range(spec.parts()) for table in spec.part(number))
        if rows_per_part != spec.rows_per_part:
            rows = rows.take(np.random.default_rng(0).permutation(rows.num_rows))
        for start in range(0, rows.num_rows, rows_per_part):
            part = rows.slice(start, rows_per_part)
            for source, piece in by_shard(part):
                out.write_parquet(piece, STAGING, part_name(source, piece.column("index").to_pylist()))
        counts = commit.finalize(out, config, spec.shards(), spec.embedding_dim, METADATA, set())
        captions = read_parts(tmp_path / name / "captions").sort_by("key")
        results.append((counts["top_fraction_cutoff_scores_by_cluster"], captions.column("keep").to_pylist()))
    assert results[0] == results[1] and len(results[0][0]) == 4 and any(results[0][1])
