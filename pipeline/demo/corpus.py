"""The demo world's corpus files: samples regenerated from (seed, split, index) alone, written as WebDataset shards
(img2dataset's layout) and/or Parquet, with a manifest.json."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import multiprocessing
import os
import random
import tarfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline.demo.captions import captions_for, scene_negatives
from pipeline.demo.scenes import WORLD_VERSION, generate_scene, render_scene
from pipeline.io.digest import file_sha256

SPLITS = ("train", "val", "test")
FORMATS = ("webdataset", "parquet")
JPEG_QUALITY = 90
# Hard negatives for contrastive training (see scene_negatives).
NEGATIVES_PER_SAMPLE = 8
PARQUET_SCHEMA = pa.schema([
    ("key", pa.string()), ("jpg", pa.binary()), ("caption", pa.string()), ("captions", pa.list_(pa.string())),
    ("objects", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
])
_ROW_GROUP = 1000


def sample_rng(seed: int, split: str, index: int, stream: str) -> random.Random:
    """An independent RNG per (seed, split, index, stream), so any sample can be regenerated on its own."""
    digest = hashlib.sha256(f"demo-world/{WORLD_VERSION}/{seed}/{split}/{index}/{stream}".encode()).digest()
    return random.Random(int.from_bytes(digest[:16], "big"))


def sample_key(split: str, index: int) -> str:
    return f"{split}_{index:09d}"


@dataclass(frozen=True)
class Sample:
    """One generated sample: the JPEG, its captions (canonical first) and the scene's objects."""

    key: str
    jpg: bytes
    captions: list[str]
    negatives: list[str]
    objects: list[dict[str, Any]]
    width: int
    height: int

    @property
    def caption(self) -> str:
        return self.captions[0]

    def meta(self) -> dict[str, Any]:
        return {"key": self.key, "captions": self.captions, "negatives": self.negatives, "objects": self.objects,
                "width": self.width, "height": self.height}


def make_sample(seed: int, split: str, index: int, size: tuple[int, int] = (64, 64)) -> Sample:
    """Sample `index` of `split`: identical wherever and whenever it is generated."""
    width, height = size
    scene = generate_scene(sample_rng(seed, split, index, "scene"))
    image = render_scene(scene, width, height, sample_rng(seed, split, index, "render"))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    captions = captions_for(scene, sample_rng(seed, split, index, "captions"))
    negative_rng = sample_rng(seed, split, index, "negatives")
    negatives = scene_negatives(scene, negative_rng, NEGATIVES_PER_SAMPLE)
    return Sample(sample_key(split, index), buffer.getvalue(), captions, negatives, scene.objects(), width, height)


@contextlib.contextmanager
def _atomic(path: Path) -> Iterator[Path]:
    """A hidden temporary name beside `path`, renamed into place only when the block succeeds."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)  # fixed metadata: same samples, same bytes
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    tar.addfile(info, io.BytesIO(data))


def write_shard(out_dir: str | Path, seed: int, split: str, shard: int, count: int, size: tuple[int, int],
                shard_size: int, formats: Sequence[str], on_sample: Callable[[], None] | None = None,
                ) -> list[dict[str, Any]]:
    """Write shard number `shard` of a split holding `count` samples; returns its manifest file entries."""
    out_dir = Path(out_dir)
    indices = range(shard * shard_size, min(count, (shard + 1) * shard_size))
    split_dir = out_dir / split
    split_dir.mkdir(parents=True, exist_ok=True)
    paths = {fmt: split_dir / f"shard-{shard:05d}.{'tar' if fmt == 'webdataset' else 'parquet'}" for fmt in formats}
    rows: list[Sample] = []
    with contextlib.ExitStack() as stack:
        tar = parquet = None
        if "webdataset" in paths:
            tmp = stack.enter_context(_atomic(paths["webdataset"]))
            tar = stack.enter_context(tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT))
        if "parquet" in paths:
            parquet = stack.enter_context(pq.ParquetWriter(stack.enter_context(_atomic(paths["parquet"])),
                                                           PARQUET_SCHEMA))

        def flush() -> None:
            if parquet is not None and rows:
                parquet.write_table(pa.Table.from_pylist([
                    {"key": s.key, "jpg": s.jpg, "caption": s.caption, "captions": s.captions,
                     "objects": json.dumps(s.objects, ensure_ascii=False), "width": s.width, "height": s.height}
                    for s in rows], schema=PARQUET_SCHEMA))
            rows.clear()

        for index in indices:
            sample = make_sample(seed, split, index, size)
            if tar is not None:  # img2dataset's member order: KEY.jpg, KEY.json, KEY.txt
                _tar_member(tar, f"{sample.key}.jpg", sample.jpg)
                _tar_member(tar, f"{sample.key}.json", json.dumps(sample.meta(), ensure_ascii=False).encode())
                _tar_member(tar, f"{sample.key}.txt", sample.caption.encode())
            rows.append(sample)
            if len(rows) >= _ROW_GROUP:
                flush()
            if on_sample is not None:
                on_sample()
        flush()
    return [{"path": path.relative_to(out_dir).as_posix(), "samples": len(indices), "bytes": path.stat().st_size,
             "sha256": file_sha256(path)} for path in paths.values()]


_drawn: Any = None  # in a corpus worker process: the shared count of samples drawn, for the progress bar


def _count_drawn() -> None:
    with _drawn.get_lock():
        _drawn.value += 1


def _start_corpus_worker(counter: Any) -> None:
    global _drawn
    _drawn = counter


def _write_shards_in_processes(out_dir: Path, seed: int, shards: list[tuple[str, int, int]], size: tuple[int, int],
                               shard_size: int, formats: Sequence[str], workers: int, bar: tqdm,
                               ) -> list[dict[str, Any]]:
    # spawn, not fork: the caller may hold threads (Ray, torch) that a forked child would inherit mid-lock
    context = multiprocessing.get_context("spawn")
    counter = context.Value("q", 0)
    with ProcessPoolExecutor(min(workers, len(shards)), mp_context=context, initializer=_start_corpus_worker,
                             initargs=(counter,)) as pool:
        pending = {pool.submit(write_shard, out_dir, seed, split, shard, count, size, shard_size, formats,
                               _count_drawn) for split, shard, count in shards}
        done: set[Future] = set()
        try:
            while pending:
                finished, pending = wait(pending, timeout=1.0, return_when=FIRST_EXCEPTION)
                done |= finished
                bar.update(counter.value - bar.n)
                for future in finished:
                    future.result()  # a worker's error stops the run now, not after every shard is drawn
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise
    return [entry for future in done for entry in future.result()]


def write_corpus(out_dir: str | Path, seed: int, counts: dict[str, int], size: tuple[int, int] = (64, 64),
                 shard_size: int = 10000, formats: Sequence[str] = FORMATS, progress: bool = False,
                 workers: int = 1) -> dict[str, Any]:
    """Write every split's shards and `manifest.json` (seed, counts, sizes, sha256 per file); returns the manifest.

    `workers` processes draw shards side by side (each sample depends only on seed, split and index, so the
    files are the same for any number of workers). Shard files of earlier runs that this run does not
    produce are removed, so the directory matches the manifest.
    """
    out_dir = Path(out_dir)
    if (not formats or not set(formats) <= set(FORMATS) or not set(counts) <= set(SPLITS)
            or min(counts.values(), default=0) < 0 or shard_size < 1 or min(size) < 1 or workers < 1):
        raise ValueError(f"bad corpus settings: formats={formats}, counts={counts}, size={size}, "
                         f"shard_size={shard_size}, workers={workers}")
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = [(split, shard, counts[split]) for split in SPLITS if counts.get(split, 0)
              for shard in range(math.ceil(counts[split] / shard_size))]
    files: list[dict[str, Any]] = []
    with tqdm(total=sum(counts.values()), unit="img", desc="demo corpus", disable=not progress) as bar:
        if workers == 1 or len(shards) == 1:
            for split, shard, count in shards:
                files += write_shard(out_dir, seed, split, shard, count, size, shard_size, formats,
                                     on_sample=lambda: bar.update(1))
        else:
            files = _write_shards_in_processes(out_dir, seed, shards, size, shard_size, formats, workers, bar)
    written = {f["path"] for f in files}
    for split in SPLITS:
        for stale in sorted((out_dir / split).glob("shard-*")):
            if stale.suffix in (".tar", ".parquet") and stale.relative_to(out_dir).as_posix() not in written:
                stale.unlink()
    manifest = {
        "world_version": WORLD_VERSION, "seed": seed, "counts": {s: counts.get(s, 0) for s in SPLITS},
        "width": size[0], "height": size[1], "shard_size": shard_size, "formats": list(formats),
        "files": sorted(files, key=lambda f: f["path"]),
    }
    with _atomic(out_dir / "manifest.json") as tmp:
        tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return manifest
