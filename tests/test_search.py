"""Text-to-image search over an output's image_embedding column with the bundle's scorer text tower."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import TURKISH_SENTENCES, tiny_clip

from pipeline.models.bundle import Bundle, load_bundle
from pipeline.quality.search import SearchError, search
from schemas.captions import captions_schema

ROOT = Path(__file__).resolve().parents[1]
TEXTS = sorted(set(TURKISH_SENTENCES))


def _output(root: Path, bundle: Bundle) -> Path:
    """An output whose every image embedding is the scorer's embedding of the row's caption, in two parts,
    plus a failed row: the query that is a row's caption must find that row first, with a cosine of 1."""
    with torch.inference_mode():
        embeddings = bundle.scorer.encode_texts(TEXTS).numpy().astype(np.float16)
    dim = embeddings.shape[1]
    rows = [{"key": f"k{i}", "source": "s.tar", "status": "ok", "caption": text, "clip_score": 0.5,
             "image_embedding": embeddings[i].tolist(), "keep": i % 2 == 0} for i, text in enumerate(TEXTS)]
    rows.append({"key": "bad", "source": "s.tar", "status": "decode_error", "keep": False})
    table = pa.Table.from_pylist(rows, schema=captions_schema(dim))
    for folder in ("captions", "filtered"):
        (root / folder).mkdir(parents=True)
    for part, (start, stop) in enumerate(((0, 3), (3, len(rows)))):
        pq.write_table(table.slice(start, stop - start), root / "captions" / f"part-{part}.parquet")
    pq.write_table(table.filter(table.column("keep")), root / "filtered" / "part-0.parquet")
    return root


def test_a_query_finds_the_images_its_text_describes_across_parts(tiny_bundle, tmp_path):
    bundle = load_bundle(tiny_bundle)
    out = _output(tmp_path / "out", bundle)
    for i, text in enumerate(TEXTS):
        hits = search(str(out), bundle, text, top=3)
        assert hits[0].key == f"k{i}" and hits[0].score == pytest.approx(1.0, abs=2e-3)
        assert len(hits) == 3 and [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
        assert hits[0].caption == text and "bad" not in {h.key for h in hits}
    assert len(search(str(out), bundle, TEXTS[0], top=50)) == len(TEXTS)  # every ok row, no more
    assert {h.key for h in search(str(out), bundle, TEXTS[1], top=50, folder="filtered")} == {
        f"k{i}" for i in range(0, len(TEXTS), 2)}


def test_a_scorer_with_an_image_tower_of_its_own_is_refused(tiny_bundle, tokenizer, tmp_path):
    bundle = load_bundle(tiny_bundle)
    out = _output(tmp_path / "out", bundle)
    other, _ = tiny_clip(tokenizer, tmp_path / "other", seed=5)
    separate = Bundle(encoder=bundle.encoder, captioner=bundle.captioner, scorer=other, manifest=bundle.manifest)
    with pytest.raises(SearchError, match="image tower of its own"):
        search(str(out), separate, TEXTS[0])


def test_search_cli_reads_the_model_from_run_json_and_reports_in_one_line(tiny_bundle, tmp_path):
    out = _output(tmp_path / "out", load_bundle(tiny_bundle))
    job = [sys.executable, str(ROOT / "jobs" / "search.py"), str(out), TEXTS[2], "--top", "2"]
    missing = subprocess.run(job, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and missing.stderr.strip().splitlines()[-1].startswith("error: no run.json")
    (out / "run.json").write_text(json.dumps({"config": {"model": str(tiny_bundle)}}))
    found = subprocess.run(job, capture_output=True, text=True, timeout=120)
    assert found.returncode == 0, found.stderr
    lines = found.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[0].split()[2] == "k2" and TEXTS[2] in lines[0]
