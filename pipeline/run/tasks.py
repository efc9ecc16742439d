"""The Ray tasks of the steps around the model stage (the commit, the resume, the WebDataset export): one CPU
each, and the split of rows into ranges that one task per range then reads."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import ray


def cluster_cpus() -> int:
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def task(function: Callable[..., Any], returns: int = 1, spread: bool = True, cpus: int = 1) -> Any:
    """`function` as a Ray task of one CPU (or `cpus`). Steps that read and write parts spread over the nodes
    (their input is the output's storage, which every node reaches); the others run where their objects are."""
    return ray.remote(num_cpus=cpus, num_returns=returns, scheduling_strategy="SPREAD" if spread else "DEFAULT")(
        function)


def split_into_ranges(function: Callable[..., Any], ranges: int, calls: list[tuple]) -> list[list[ray.ObjectRef]]:
    """One task of `function(*call, ranges)` per call, each returning `ranges` tables (`by_range`): the
    references of every call's pieces, as lists even for one range."""
    split = task(function, returns=ranges)
    pieces = [split.remote(*call, ranges) for call in calls]
    return pieces if ranges > 1 else [[piece] for piece in pieces]


def hash_ranges(values: pa.ChunkedArray, ranges: int) -> np.ndarray:
    """Each value's range by a hash that is the same in every process (Python's own is salted)."""
    hashes = pd.util.hash_array(values.to_numpy(zero_copy_only=False).astype(object))
    return (hashes % np.uint64(ranges)).astype(np.int64)


def by_range(rows: pa.Table, which: np.ndarray, ranges: int) -> list[pa.Table] | pa.Table:
    """`rows` split by their range in `which` (-1: none); one range: the table itself, as a Ray task of one
    return value returns it."""
    tables = [rows.filter(pa.array(which == r)) for r in range(ranges)]
    return tables if ranges > 1 else tables[0]
