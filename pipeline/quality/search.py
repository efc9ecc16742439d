"""Text-to-image search over an output's `image_embedding` column, as clip-retrieval's knn does over its
index: the query is embedded by the bundle's scorer text tower, which must share the encoder's image tower
(the scorer is the encoder, or a text tower trained against it), and ranked by cosine, one part at a time."""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from pipeline.io.sinks import CAPTIONS, OutputDir
from pipeline.models.bundle import Bundle
from schemas.captions import embedding_matrix

COLUMNS = ["key", "source", "status", "caption", "image_embedding"]


class SearchError(ValueError):
    """The output or the bundle cannot answer a query; one line for the user."""


@dataclass(frozen=True, order=True)
class Hit:
    score: float
    key: str
    source: str
    caption: str | None


@torch.inference_mode()
def search(output_url: str, bundle: Bundle, query: str, top: int = 10, folder: str = CAPTIONS) -> list[Hit]:
    """The `top` rows of `folder` whose image embeddings are closest to `query`, best first. Memory holds one
    part and the hits, whatever the output's size."""
    if not bundle.scorer.shares_image_tower(bundle.encoder):
        raise SearchError("this bundle's scorer has an image tower of its own, so its text embeddings do not "
                          "compare with image_embedding (the encoder's): use a bundle whose scorer is its encoder "
                          "or a text tower trained against it (train_captioner.py --train-scorer)")
    text = bundle.scorer.encode_texts([query]).float().cpu().numpy()[0]
    output = OutputDir(output_url)
    parts = output.parts(folder)
    if not parts:
        raise SearchError(f"no {folder}/ parts in {output_url}: not the output of a run")
    best: list[Hit] = []  # a min-heap of the hits so far
    for path in parts:
        with output.fs.open(path, "rb") as handle:
            table = pq.read_table(handle, columns=COLUMNS, use_threads=False)
        table = table.filter(pc.equal(table.column("status"), "ok"))
        if table.num_rows == 0:
            continue
        embeddings = embedding_matrix(table)
        width = embeddings.shape[1]
        if width != len(text):
            raise SearchError(f"{path}: {width}-d image embeddings, but the bundle's scorer embeds text in "
                              f"{len(text)} dimensions: give the bundle that made this output")
        scores = embeddings @ text
        keys, sources = table.column("key").to_pylist(), table.column("source").to_pylist()
        captions = table.column("caption").to_pylist()
        for i in np.argsort(-scores)[:top]:
            hit = Hit(float(scores[i]), keys[i], sources[i], captions[i])
            if len(best) < top:
                heapq.heappush(best, hit)
            elif hit > best[0]:
                heapq.heapreplace(best, hit)
    return sorted(best, reverse=True)
