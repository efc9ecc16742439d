"""The HTML run report: built from a hand-made output directory and a real WebDataset shard, checked
as HTML and rendered in a real headless Chromium."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import jpeg_bytes, write_tar
from PIL import Image

from pipeline.quality.report import HISTOGRAM_BINS, build_report
from schemas.captions import captions_schema

ROOT = Path(__file__).resolve().parents[1]
DIM = 4
MIN_SCORE = 0.2
CAPTIONS = ["Parlak bir ışık altında kırmızı daire.", "İzmir'de güneşli bir gün.",
            '<b>Işık & "gölge"</b> <img src=x>', "Çiçekli ağaç, öğrenci, şişe."]
BROKEN_ERROR = "<script>alert('kırık')</script> is not an image"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1200,2000"]


class _Tags(HTMLParser):
    """Every start tag with its attributes, and the page's text."""

    def __init__(self, text: str):
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_startendtag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)

    def find(self, tag: str, cls: str | None = None) -> list[dict[str, str]]:
        return [a for t, a in self.tags if t == tag and (cls is None or cls in a.get("class", "").split())]


def _rows(input_tar: str) -> list[dict]:
    """12 ok rows (scores 0.05 .. 0.38), one decode error read from the tar, one row of a shard that is gone."""
    rows = []
    for i in range(12):
        score = round(0.05 + 0.03 * i, 2)
        rows.append({"key": f"k{i:02d}", "source": input_tar, "status": "ok", "error": None, "width": 48,
                     "height": 40, "caption": CAPTIONS[i % len(CAPTIONS)], "clip_score": score,
                     "image_embedding": [0.5] * DIM, "candidates": [], "original_text": f"örnek {i}",
                     "original_clip_score": round(0.5 - 0.01 * i, 2)})
    rows.append({"key": "broken", "source": input_tar, "status": "decode_error", "error": BROKEN_ERROR,
                 "width": None, "height": None, "caption": None, "clip_score": None, "image_embedding": None,
                 "candidates": [], "original_text": None})
    rows.append({"key": "lost", "source": "/nowhere/gone.tar", "status": "ok", "error": None, "width": 48,
                 "height": 40, "caption": "Kayıp görüntü.", "clip_score": 0.33, "image_embedding": [0.5] * DIM,
                 "candidates": [{"caption": "Kayıp görüntü.", "clip_score": 0.33},
                                {"caption": "Başka bir aday.", "clip_score": 0.1}], "original_text": None})
    return rows


@pytest.fixture
def run_output(tmp_path: Path) -> dict:
    """A finished run's output dir written by hand: two captions parts, filtered/, run.json."""
    samples = {f"k{i:02d}": {"jpg": jpeg_bytes(i, size=(48 + 8 * i, 40)), "txt": f"örnek {i}".encode()}
               for i in range(12)}
    samples["broken"] = {"jpg": b"not a jpeg at all"}
    tar = str(write_tar(tmp_path / "in" / "00000.tar", samples))
    rows = _rows(tar)
    ok_scores = np.array([r["clip_score"] for r in rows if r["status"] == "ok"], dtype=np.float32)
    cutoff = float(np.sort(ok_scores)[::-1][len(ok_scores) // 2 - 1])  # keep_top_fraction 0.5
    for row in rows:
        row["keep"] = bool(row["status"] == "ok" and np.float32(row["clip_score"]) >= max(MIN_SCORE, cutoff))
    schema = captions_schema(DIM, json.dumps({"model": "el-yapımı"}, ensure_ascii=False))
    out = tmp_path / "out"
    for folder in ("captions", "filtered"):
        (out / folder).mkdir(parents=True)
    for part, chunk in enumerate((rows[:7], rows[7:])):
        table = pa.Table.from_pylist(chunk, schema=schema)
        pq.write_table(table, out / "captions" / f"part-{part}.parquet")
        pq.write_table(table.filter(table.column("keep")), out / "filtered" / f"part-{part}.parquet")
    kept = sum(row["keep"] for row in rows)
    run_json = {
        "config": {"inputs": [str(tmp_path / "in" / "*.tar")], "output": str(out), "model": "demo",
                   "image_column": None, "key_column": "key",
                   "filter": {"min_clip_score": MIN_SCORE, "keep_top_fraction": 0.5},
                   "decode": {"method": "greedy", "max_new_tokens": 20}},
        "model": {"name": "demo-türkçe", "sha256": "ab" * 32, "encoder": {"arch": "ViT-B-32"},
                  "captioner": {"mapper": "mlp", "language_model": "lm"}, "scorer": "encoder"},
        "packages": {"pyarrow": pa.__version__},
        "counts": {"rows": len(rows), "by_status": {"decode_error": 1, "ok": len(rows) - 1}, "kept": kept,
                   "top_fraction_cutoff_score": cutoff},
        "resumed_rows": 0,
        "timings": {"finished": "2026-11-23T08:47:52+00:00", "wall_s": 12.5, "model_stage_s": 10.0,
                    "finalize_s": 0.1, "images_per_s": 1.4},
    }
    (out / "run.json").write_text(json.dumps(run_json, ensure_ascii=False), encoding="utf-8")
    return {"out": out, "tar": Path(tar), "rows": rows, "cutoff": cutoff, "kept": kept, "ok_scores": ok_scores}


def _cards(tags: _Tags) -> int:
    return len(tags.find("figure", "card"))


def test_report_shows_sampled_images_captions_and_escapes_everything(run_output):
    page = build_report(str(run_output["out"]), samples=24)
    tags = _Tags(page)
    assert re.search(r'<html lang="tr">', page) and '<meta charset="utf-8">' in page
    assert "<script" not in page  # no JavaScript at all: the escaped error must not become a script
    # every row is shown: 6 kept + 7 dropped (one of them from a shard that is gone) + 1 failed
    assert _cards(tags) == len(run_output["rows"]) == 14
    images = tags.find("img")
    assert len(images) == 12  # 12 readable JPEGs; the broken bytes and the gone shard get placeholders
    for img in images:
        prefix = "data:image/jpeg;base64,"
        assert img["src"].startswith(prefix)
        picture = Image.open(io.BytesIO(base64.b64decode(img["src"][len(prefix):])))
        picture.load()
        assert picture.format == "JPEG" and picture.size == (128, 128)
    text = "".join(tags.text)
    assert "ışık" in page and "İzmir" in page and "İzmir'de güneşli bir gün." in text  # raw UTF-8, not entities
    # captions and errors are escaped: they read right as text and add no tags
    assert '<b>Işık & "gölge"</b> <img src=x>' in text and "&lt;b&gt;Işık &amp; &quot;gölge&quot;&lt;/b&gt;" in page
    assert BROKEN_ERROR in text and "&lt;script&gt;" in page
    placeholders = [m for m in re.findall(r'<div class="placeholder">([^<]*)</div>', page)]
    assert len(placeholders) == 2
    assert any("not found" in p for p in placeholders) and any("decode_error" in p for p in placeholders)
    # counts, timings, configuration and model identity from run.json
    assert "demo-türkçe" in text and "ab" * 32 in text and "ViT-B-32" in text and "filter.min_clip_score" in text
    assert f"{run_output['kept']}" in text and "1.40" in text and "decode_error" in text
    # the text that came with a sample, and the scorer's score of it
    assert all(f"örnek {i} CLIP {0.5 - 0.01 * i:.3f}" in text for i in range(12))


def test_a_report_reads_parts_written_before_original_clip_score_existed(run_output):
    for path in (run_output["out"] / "captions").glob("*.parquet"):
        pq.write_table(pq.read_table(path).drop_columns(["original_clip_score"]), path)
    text = "".join(_Tags(build_report(str(run_output["out"]), samples=24)).text)
    assert "örnek 3" in text and "örnek 3 CLIP" not in text


def test_histogram_bars_and_threshold_lines(run_output):
    tags = _Tags(build_report(str(run_output["out"]), samples=0))
    assert _cards(tags) == 0 and not tags.find("img")
    svg = tags.find("svg", "histogram")[0]
    bars = tags.find("rect", "bar")
    assert len(bars) == int(svg["data-bins"]) == HISTOGRAM_BINS
    edges = [float(bars[0]["data-lo"])] + [float(bar["data-hi"]) for bar in bars]
    scores = run_output["ok_scores"]
    assert edges[0] <= scores.min() and edges[-1] >= scores.max()
    assert [int(bar["data-count"]) for bar in bars] == np.histogram(scores, edges)[0].tolist()
    kept = [int(rect["data-count"]) for rect in tags.find("rect", "kept")]
    assert sum(kept) == run_output["kept"]
    left = float(bars[0]["x"])
    width = float(bars[-1]["x"]) + float(bars[-1]["width"]) - left
    lines = {line["data-name"]: line for line in tags.find("line", "threshold")}
    assert set(lines) == {"min-clip-score", "top-fraction cutoff"}
    for name, score in (("min-clip-score", MIN_SCORE), ("top-fraction cutoff", run_output["cutoff"])):
        line = lines[name]
        assert float(line["x1"]) == float(line["x2"]) == pytest.approx(
            left + (score - edges[0]) / (edges[-1] - edges[0]) * width, abs=0.02)
        # the line lies inside the bar of the bin that holds the score
        holder = next(bar for bar in bars if float(bar["data-lo"]) <= score < float(bar["data-hi"]))
        assert float(holder["x"]) <= float(line["x1"]) <= float(holder["x"]) + float(holder["width"])


def test_a_resumed_run_says_its_times_are_the_last_attempts(run_output):
    def stat_labels() -> list[str]:
        page = build_report(str(run_output["out"]), samples=0)
        return re.findall(r'<div class="label">([^<]*)</div>', page)

    assert "Wall time" in stat_labels()
    run_json = run_output["out"] / "run.json"
    summary = json.loads(run_json.read_text(encoding="utf-8"))
    summary["resumed_rows"] = 5
    run_json.write_text(json.dumps(summary), encoding="utf-8")
    labels = stat_labels()
    assert "Wall time (last attempt)" in labels and "Wall time" not in labels


def test_sample_is_seeded_bounded_and_survives_missing_inputs(run_output, tmp_path):
    out = str(run_output["out"])
    first = build_report(out, samples=2, seed=3)
    assert first == build_report(out, samples=2, seed=3)
    tags = _Tags(first)
    sections = re.findall(r'data-section="(\w+)"(.*?)</div></section>', first, flags=re.S)
    assert [name for name, _ in sections] == ["kept", "dropped", "failed"]
    assert [body.count('class="card"') for _, body in sections] == [2, 2, 1]
    assert _cards(tags) == 5
    seeds = {tuple(re.findall(r'<div class="key"[^>]*>([^<]*)<', build_report(out, samples=2, seed=s)))
             for s in range(6)}
    assert len(seeds) > 1
    # inputs that are gone: placeholders and a notice, no crash
    gone = _Tags(build_report(out, inputs=[str(tmp_path / "nowhere" / "*.tar")]))
    assert not gone.find("img") and _cards(gone) == 14 and "pass --input" in "".join(gone.text)
    # inputs that moved: found again by shard file name
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.move(run_output["tar"], moved / run_output["tar"].name)
    assert not _Tags(build_report(out)).find("img")
    assert len(_Tags(build_report(out, inputs=[str(moved / "*.tar")])).find("img")) == 12


def test_job_writes_the_report_and_refuses_a_non_run(run_output, tmp_path):
    job = [sys.executable, str(ROOT / "jobs" / "report.py")]
    done = subprocess.run([*job, str(run_output["out"]), "--samples", "3"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    path = Path(done.stdout.strip())
    assert path == run_output["out"] / "report.html" and "İzmir" in path.read_text(encoding="utf-8")
    assert not [p for p in run_output["out"].iterdir() if p.name.startswith(".")]  # no temporary left behind
    (tmp_path / "empty").mkdir()
    refused = subprocess.run([*job, str(tmp_path / "empty")], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and refused.stderr.startswith("error: no run.json")
    assert "Traceback" not in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    # a damaged output: a cut captions part, then a run.json that is not JSON
    damaged = tmp_path / "damaged"
    shutil.copytree(run_output["out"], damaged)
    part = next((damaged / "captions").glob("*.parquet"))
    part.write_bytes(part.read_bytes()[:100])
    (damaged / "broken").mkdir()
    (damaged / "broken" / "run.json").write_text('{"counts": \x01')
    for folder, message in ((damaged, f"{part.name} is unreadable"), (damaged / "broken", "run.json is unreadable")):
        refused = subprocess.run([*job, str(folder)], capture_output=True, text=True, timeout=60)
        assert refused.returncode == 2 and message in refused.stderr, refused.stderr
        assert "Traceback" not in refused.stderr and len(refused.stderr.strip().splitlines()) == 1


def test_report_renders_in_headless_chromium(run_output, tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("chromium is not installed: apt-get install -y --no-install-recommends chromium")
    page = build_report(str(run_output["out"]))
    report = tmp_path / "report.html"
    report.write_text(page, encoding="utf-8")
    screenshot = tmp_path / "report.png"
    shot = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile-1'}",
                           f"--screenshot={screenshot}", report.as_uri()], capture_output=True, timeout=60)
    assert shot.returncode == 0 and screenshot.exists(), shot.stderr[-2000:]
    pixels = np.asarray(Image.open(screenshot).convert("L"), dtype=np.float32)
    assert pixels.shape == (2000, 1200) and pixels.std() > 20  # text, bars and photos, not a blank page
    # Count the images the browser really decoded: a probe script (added to a copy only; the report has
    # no script) writes the count into the DOM once the page has loaded.
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", "<script>addEventListener('load', () => {"
                                              "const all = [...document.images];"
                                              "document.body.dataset.total = all.length;"
                                              "document.body.dataset.loaded = all.filter("
                                              "i => i.complete && i.naturalWidth === 128).length;"
                                              "});</script></body>"), encoding="utf-8")
    dom = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile-2'}", "--dump-dom",
                          probe.as_uri()], capture_output=True, text=True, timeout=60)
    assert dom.returncode == 0, dom.stderr[-2000:]
    body = re.search(r"<body[^>]*>", dom.stdout).group(0)
    assert 'data-total="12"' in body and 'data-loaded="12"' in body, body
    assert "İzmir'de güneşli bir gün." in dom.stdout and dom.stdout.count('class="card"') == 14
