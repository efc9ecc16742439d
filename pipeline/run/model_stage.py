"""The model stage: what a Ray Data model actor runs (`model_actor.CaptionActor`): it holds encoder + captioner +
scorer once and captions batches of decoded (or, on CPU clusters, raw) samples. Plain PyTorch underneath:
`caption_batch`."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import torch

from pipeline.config import GenerationSettings
from pipeline.generation.captioning import caption_batch
from pipeline.models.bundle import Bundle, load_bundle
from pipeline.models.errors import ModelLoadError
from pipeline.precision import resolve_dtype
from pipeline.run.data_stages import ImageSpecs, decode_images, peak_rss_mb, pixels_from_column, staging_schema
from pipeline.run.model_actor import ShippedBundle
from pipeline.text import describe_error
from schemas.captions import CANDIDATE_TYPE

log = logging.getLogger(__name__)


def load_shipped(shipped: ShippedBundle, captioner: bool = True) -> Bundle:
    """The shipped bundle's models (without its captioner where `captioner` is False)."""
    # reading the copy meant a copy in memory and one on disk in every actor (~1 s of its start here)
    try:
        bundle = load_bundle(shipped.path, captioner)  # checks every file against its bundle.json, once
        found = bundle.identity()["sha256"]
        if found == shipped.sha256:
            return bundle
        problem = f"it is another bundle now (sha256 {found[:12]}...)"
    except ModelLoadError as exc:
        problem = str(exc)  # not on this node, or its files changed
    if shipped.files is None:
        raise ModelLoadError(f"the model bundle {shipped.path} changed since this run validated it: {problem}")
    # not on this node, or another bundle there now
    return load_shipped_bundle(ray.get(shipped.files), captioner)


def load_shipped_bundle(files: dict[str, bytes], captioner: bool = True) -> Bundle:
    """Load a bundle shipped through the object store. Its files go to a temporary directory that is
    removed once loaded: every actor start wrote one (~590 MB for ViT-B/32 + GPT-2), and restarts filled /tmp."""
    with tempfile.TemporaryDirectory(prefix="bundle-") as root:
        for relative, data in files.items():
            target = Path(root) / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        return load_bundle(root, captioner)


def actor_device(gpu_ids: Sequence[Any], cuda_available: bool) -> torch.device:
    """The device a model actor computes on: the GPU Ray gave it, else the CPU. Not whether CUDA is
    visible: Ray leaves CUDA_VISIBLE_DEVICES alone for an actor of 0 GPUs, so every CPU actor on a GPU
    node would crowd onto its first GPU; and an actor holding a GPU it cannot use would run ~100x slower."""
    if not gpu_ids:
        return torch.device("cpu")
    if not cuda_available:
        raise ModelLoadError(f"this model actor holds GPU {', '.join(map(str, gpu_ids))} but PyTorch sees no CUDA "
                             f"device (torch {torch.__version__}, built for CUDA {torch.version.cuda or 'none'}): "
                             "install a CUDA build of torch on the GPU nodes, or caption on CPUs with "
                             "--gpus-per-actor 0")
    if os.environ.get("RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"):  # every GPU visible: pick Ray's by number
        return torch.device("cuda", int(gpu_ids[0]))
    return torch.device("cuda")  # Ray set CUDA_VISIBLE_DEVICES to the GPU it gave: cuda:0 is that one


class CaptionStage:
    """Model stage actor: loads the three models once, then captions batches of decoded rows.

    A batch that fails in the models (including out-of-memory) is split in halves and retried,
    down to single rows; a row that still fails becomes a `model_error` row. Nothing is lost.
    `settings` None: embeddings only (--embed-only), no caption decoded.
    """

    def __init__(self, bundle: ShippedBundle, settings: GenerationSettings | None, dtype: str,
                 batch_size: int, embedding_dim: int, metadata_json: str, cpu_threads: int | None = None,
                 image_specs: ImageSpecs | None = None):
        self.device = actor_device(ray.get_gpu_ids(), torch.cuda.is_available())
        # Ray pins OMP threads to the actor's 1 reserved CPU; a CPU-only actor may use its share of the
        # node (the reservation stays 1 so that read tasks can always be scheduled beside it). Ray Data
        # calls the actor on another thread than this one, and OpenMP gives every calling thread its own
        # team: two teams of 2 threads on 2 cores make libgomp stop spinning at barriers, which halved
        # the decode loop's speed. So load on this thread alone and compute on the caller's threads.
        self.cpu_threads = cpu_threads
        if cpu_threads:
            torch.set_num_threads(1)
        self.dtype = resolve_dtype(dtype, self.device)
        # an embed-only run decodes no caption: its actors hold no language model
        self.bundle: Bundle = load_shipped(bundle, captioner=settings is not None).to(self.device, self.dtype)
        self.settings = settings
        self.batch_size = batch_size
        self.schema = staging_schema(embedding_dim, metadata_json)
        self.node_id = ray.get_runtime_context().get_node_id()
        self.actor_id = ray.get_runtime_context().get_actor_id()
        self.embedding_dim = embedding_dim
        # given a ImageSpecs, batches arrive as raw samples and are decoded here, on cpu_threads threads
        self.image_specs = image_specs
        self.decode_parallelism = cpu_threads or 1
        self.decode_threads = ThreadPoolExecutor(self.decode_parallelism) if image_specs else None

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.cpu_threads:
            torch.set_num_threads(self.cpu_threads)  # this calling thread's OpenMP team
        if self.image_specs is not None:
            batch = self._decode(batch)
        n = batch.num_rows
        pixels = {"pixels": pixels_from_column(batch.column("pixels"), self.bundle.encoder.image_spec.size)}
        if "scorer_pixels" in batch.column_names:
            pixels["scorer_pixels"] = pixels_from_column(batch.column("scorer_pixels"),
                                                         self.bundle.scorer.image_spec.size)
        result = _Results(batch.column("status").to_pylist(), batch.column("error").to_pylist())
        ok = [i for i in range(n) if result.status[i] == "ok"]
        keys = batch.column("key").to_pylist()
        originals = batch.column("original_text").to_pylist()
        for start in range(0, len(ok), self.batch_size):
            self._caption(pixels, keys, originals, ok[start:start + self.batch_size], result)
        flat = np.zeros((n, self.embedding_dim), dtype=np.float16)
        for i, embedding in result.embeddings.items():
            flat[i] = embedding
        embedding_mask = pa.array([i not in result.embeddings for i in range(n)], type=pa.bool_())
        with_candidates = self.settings is not None and self.settings.num_candidates > 1
        columns = {
            "key": batch.column("key"),
            "source": batch.column("source"),
            "status": pa.array(result.status, pa.string()),
            "error": pa.array(result.error, pa.string()),
            "width": batch.column("width"),
            "height": batch.column("height"),
            "caption": pa.array([result.captions.get(i) for i in range(n)], pa.string()),
            "clip_score": pa.array([result.scores.get(i) for i in range(n)], pa.float32()),
            "image_embedding": pa.FixedSizeListArray.from_arrays(
                pa.array(flat.reshape(-1), pa.float16()), type=self.schema.field("image_embedding").type,
                mask=embedding_mask),
            "candidates": pa.array([result.candidates.get(i) if with_candidates else None for i in range(n)],
                                   pa.list_(CANDIDATE_TYPE)),
            "keep": pa.array([status == "ok" for status in result.status], pa.bool_()),
            "original_text": batch.column("original_text"),
            "original_clip_score": pa.array([result.original_scores.get(i) for i in range(n)], pa.float32()),
            "index": batch.column("index"),
            "node": pa.array([self.node_id] * n, pa.string()),
            "actor": pa.array([self.actor_id] * n, pa.string()),
            # "auto" resolves per machine: a run resumed elsewhere may have captioned in another precision
            "compute": pa.array([f"{self.device.type} {str(self.dtype).removeprefix('torch.')}"] * n, pa.string()),
            "actor_peak_rss_mb": pa.array([peak_rss_mb()] * n, pa.float32()),
        }
        return pa.table(columns, schema=self.schema)

    def _decode(self, batch: pa.Table) -> pa.Table:
        """decode_images over slices of the batch in parallel (Pillow releases the GIL while decoding)."""
        if batch.num_rows < 2 or self.decode_parallelism == 1:
            return decode_images(batch, self.image_specs)
        step = -(-batch.num_rows // self.decode_parallelism)
        slices = [batch.slice(start, step) for start in range(0, batch.num_rows, step)]
        decoded = self.decode_threads.map(lambda part: decode_images(part, self.image_specs), slices)
        return pa.concat_tables(decoded).combine_chunks()

    def _caption(self, pixels: dict[str, np.ndarray], keys: list[str], originals: list[str | None], rows: list[int],
                 result: _Results) -> None:
        if not rows:
            return
        try:
            tensors = {name: self._host_batch(array, rows) for name, array in pixels.items()}
            # each sample draws from its key's stream: its captions do not depend on the rows batched with it
            captioned = caption_batch(self.bundle, tensors["pixels"], self.settings, tensors.get("scorer_pixels"),
                                      [keys[i] for i in rows], [originals[i] for i in rows])
        except torch.AcceleratorError:
            raise  # a CUDA error leaves the device unusable to this process: every later batch would fail too
        except Exception as exc:  # any other model failure (out of memory included) must turn into rows
            failure = describe_error(exc)
        else:
            for j, i in enumerate(rows):
                if captioned.captions[j] is not None:  # else embeddings only
                    result.captions[i] = captioned.captions[j]
                    result.scores[i] = float(captioned.clip_scores[j])
                result.embeddings[i] = captioned.image_embeddings[j]
                result.candidates[i] = [{"caption": c, "clip_score": s} for c, s in captioned.candidates[j]]
                if not np.isnan(captioned.original_scores[j]):
                    result.original_scores[i] = float(captioned.original_scores[j])
            return
        # retried only here, past the except block: the exception's traceback holds the failed attempt's frames,
        # and with them its activations and KV cache, which every smaller retry would otherwise run beside
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if len(rows) > 1:
            half = len(rows) // 2
            self._caption(pixels, keys, originals, rows[:half], result)
            self._caption(pixels, keys, originals, rows[half:], result)
            return
        log.warning("model failed on %s: %s", keys[rows[0]], failure)
        result.status[rows[0]] = "model_error"
        result.error[rows[0]] = failure

    def _host_batch(self, array: np.ndarray, rows: list[int]) -> torch.Tensor:
        """The rows' images as one uint8 tensor; for a GPU, gathered straight into pinned memory, from which
        the copy to the device runs asynchronously (pinning a gathered copy would copy the batch twice)."""
        if self.device.type != "cuda":
            return torch.from_numpy(array[rows])
        host = torch.empty((len(rows), *array.shape[1:]), dtype=torch.uint8, pin_memory=True)
        np.take(array, rows, axis=0, out=host.numpy())
        return host


@dataclass
class _Results:
    """Per-row outputs of one model-stage call, filled as sub-batches succeed."""

    status: list[str]
    error: list[str | None]
    captions: dict[int, str] = field(default_factory=dict)
    scores: dict[int, float] = field(default_factory=dict)
    embeddings: dict[int, np.ndarray] = field(default_factory=dict)
    candidates: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    original_scores: dict[int, float] = field(default_factory=dict)
