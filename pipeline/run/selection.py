"""The exact top-fraction cutoff of rows spread over many tables, found without gathering them in one process.

Each table (a *ranking*) holds some rows as (cluster, score, key), sorted in ranking order within each cluster:
score descending (a missing score last), then key ascending. The cutoff of a cluster is its row of global rank
`max(1, round(fraction * rows))`: where a sort of all its rows at once would place it.

The search narrows a window of the ranking: a sample of the window's rows (every s-th row of each table) gives
pivots, the tables count their rows up to each pivot, and the window shrinks to the two pivots around the
target rank. Once a window holds few rows, its rows are gathered and the target is read off exactly. Every
step reads only what lies in the window, so the process that drives it holds a sample, never the rows.
Keys are unique among ranked rows (a key owned by two samples ranks only its first), so a (score, key) pair
names one row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.run.filtering import Cutoff

GATHER_ROWS = 4_096  # a window of at most this many rows (per cluster) is gathered
PIVOTS = 1_024  # pivots per narrowing: the window shrinks about this much each time

Row = tuple[float, str]  # (score, key)
Bound = Row | None  # None: the start (lower) or the end (upper) of the ranking
Window = tuple[Bound, Bound]  # rows strictly after the first bound and strictly before the second


def ranking(clusters: np.ndarray, scores: np.ndarray, keys: pa.Array) -> pa.Table:
    """Rows as a ranking table (a missing score ranks after every score)."""
    scores = np.where(np.isnan(scores), -np.inf, scores.astype(np.float64))
    table = pa.table({"cluster": pa.array(clusters, pa.int32()), "score": pa.array(scores, pa.float64()),
                      "key": keys})
    order = pc.sort_indices(table, sort_keys=[("cluster", "ascending"), ("score", "descending"),
                                              ("key", "ascending")])
    return table.take(order)


def cluster_counts(table: pa.Table, clusters: int) -> np.ndarray:
    return np.bincount(table.column("cluster").to_numpy(), minlength=clusters)


@dataclass(frozen=True)
class _Rows:
    """One cluster's rows of a ranking table, searchable by (score, key)."""

    scores: np.ndarray
    keys: pa.Array
    start: int
    end: int

    def _ranks_before(self, i: int, row: Row) -> bool:
        """Whether the row at position i ranks before `row`."""
        score = float(self.scores[i])
        return score > row[0] or (score == row[0] and self.keys[i].as_py() < row[1])

    def position(self, bound: Row, through: bool) -> int:
        """How many rows rank before `bound` (and `bound` itself when `through`)."""
        lo, hi = self.start, self.end
        while lo < hi:
            middle = (lo + hi) // 2
            before = self._ranks_before(middle, bound) or (
                through and self.scores[middle] == bound[0] and self.keys[middle].as_py() == bound[1])
            lo, hi = (middle + 1, hi) if before else (lo, middle)
        return lo

    def window(self, window: Window) -> tuple[int, int]:
        lower, upper = window
        return (self.start if lower is None else self.position(lower, through=True),
                self.end if upper is None else self.position(upper, through=False))

    def row(self, i: int) -> Row:
        return float(self.scores[i]), self.keys[i].as_py()


def _cluster_rows(table: pa.Table, cluster: int) -> _Rows:
    clusters = table.column("cluster").to_numpy()
    start, end = np.searchsorted(clusters, cluster, "left"), np.searchsorted(clusters, cluster, "right")
    return _Rows(table.column("score").to_numpy(), table.column("key").combine_chunks(), int(start), int(end))


def sample_windows(table: pa.Table, windows: dict[int, Window], strides: dict[int, int]) -> dict[int, list[Row]]:
    """Every `stride`-th row of each cluster's window (stride 1: all of them), in ranking order."""
    sampled = {}
    for cluster, window in windows.items():
        rows = _cluster_rows(table, cluster)
        first, end = rows.window(window)
        sampled[cluster] = [rows.row(i) for i in range(first, end, strides[cluster])]
    return sampled


def count_through(table: pa.Table, windows: dict[int, Window], pivots: dict[int, list[Row]],
                  ) -> dict[int, np.ndarray]:
    """For each cluster, how many rows of its window rank at or before each of its pivots."""
    counts = {}
    for cluster, window in windows.items():
        rows = _cluster_rows(table, cluster)
        first, _ = rows.window(window)
        counts[cluster] = np.array([rows.position(pivot, through=True) - first for pivot in pivots[cluster]],
                                   dtype=np.int64)
    return counts


def add_counts(total: dict[int, np.ndarray] | None, counts: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    return counts if total is None else {cluster: total[cluster] + counts[cluster] for cluster in total}


# What the search asks of every ranking table at once (e.g. Ray tasks, one per table, or a plain loop): the
# samples of each table, and the counts summed over the tables.
Sampler = Callable[[dict[int, Window], dict[int, int]], list[dict[int, list[Row]]]]
Counter = Callable[[dict[int, Window], dict[int, list[Row]]], dict[int, np.ndarray]]


def find_cutoffs(fraction: float, counts: Sequence[int], sample: Sampler, count: Counter) -> tuple[Cutoff | None, ...]:
    """The cutoff of each cluster, given how many rows it has in all tables together."""
    @dataclass
    class Search:
        target: int  # the cutoff's rank within the window (0-based)
        rows: int  # rows in the window
        window: Window = (None, None)

    searches = {cluster: Search(max(1, round(fraction * rows)) - 1, rows) for cluster, rows in enumerate(counts)
                if rows}
    found: dict[int, Cutoff] = {}
    while searches:
        strides = {c: 1 if s.rows <= GATHER_ROWS else -(-s.rows // PIVOTS) for c, s in searches.items()}
        samples = sample({c: s.window for c, s in searches.items()}, strides)
        merged = {c: sorted((row for table in samples for row in table[c]), key=lambda row: (-row[0], row[1]))
                  for c in searches}
        for cluster in [c for c in searches if strides[c] == 1]:
            found[cluster] = Cutoff(*merged[cluster][searches.pop(cluster).target])
        if not searches:
            break
        through = count({c: s.window for c, s in searches.items()}, {c: merged[c] for c in searches})
        for cluster, search in list(searches.items()):
            pivots = merged[cluster]
            totals = through[cluster]
            j = int(np.searchsorted(totals, search.target + 1))  # the first pivot at or after the target
            if j < len(pivots) and totals[j] == search.target + 1:
                found[cluster] = Cutoff(*pivots[j])
                del searches[cluster]
                continue
            before = int(totals[j - 1]) if j else 0
            upper = pivots[j] if j < len(pivots) else search.window[1]
            rows = (int(totals[j]) - 1 if j < len(pivots) else search.rows) - before
            searches[cluster] = Search(search.target - before, rows,
                                       (pivots[j - 1] if j else search.window[0], upper))
    return tuple(found.get(cluster) for cluster in range(len(counts)))
