"""Training on Ray Train: workers that split each batch train as one process does, and a run whose worker is
killed resumes from its last checkpoint and still writes a complete bundle."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import jpeg_bytes, write_tar

from pipeline.models.bundle import load_bundle
from pipeline.training.config import ClipArch, LMArch, TrainConfig
from pipeline.training.trainer import Scaling, TrainingFailed, train
from schemas.captions import captions_schema

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["kırmızı", "mavi", "yeşil", "sarı", "kare", "daire", "üçgen", "yıldız", "büyük", "küçük", "solda", "sağda"]


def _write_output(folder: Path, rows: int, dim: int) -> None:
    """A pipeline output of `rows` ok rows: random embeddings and random captions of 3 to 9 words."""
    rng = random.Random(0)
    embeddings = np.random.default_rng(0).normal(size=(rows, dim)).astype(np.float16)
    captions = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) + "." for _ in range(rows)]
    table = pa.table({
        "key": [f"k{i}" for i in range(rows)], "source": ["s"] * rows, "status": ["ok"] * rows,
        "error": [None] * rows, "width": [32] * rows, "height": [32] * rows, "caption": captions,
        "clip_score": [0.5] * rows,
        "image_embedding": pa.FixedSizeListArray.from_arrays(pa.array(embeddings.reshape(-1), pa.float16()), dim),
        "candidates": [None] * rows, "keep": [True] * rows, "original_text": [None] * rows,
        "original_clip_score": pa.nulls(rows, pa.float32())},
        schema=captions_schema(dim))
    folder.mkdir(parents=True)
    pq.write_table(table, folder / "part-0.parquet")


def _config(out: Path, output: Path, bundle: Path, **overrides) -> TrainConfig:
    base = TrainConfig(
        out=str(out), embeddings_from=(str(output),), clip=str(bundle), train_scorer=True, scorer_epochs=2,
        caption_epochs=2, clip_batch_size=16, caption_batch_size=16, vocab_size=300, precision="fp32",
        prefix_length=4, device="cpu",
        clip_arch=ClipArch(text_width=32, text_layers=1, text_heads=2, context_length=16),
        lm_arch=LMArch(n_embd=32, n_layer=1, n_head=2, n_positions=32))
    return replace(base, **overrides)


def _write_images(path: Path, samples: int, broken: int) -> None:
    """A WebDataset shard of `samples` captioned JPEGs, the one at `broken` not an image."""
    rng = random.Random(1)
    write_tar(path, {f"k{i:04d}": {"jpg": b"not a jpeg" if i == broken else jpeg_bytes(i),
                                   "txt": " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))).encode()}
                     for i in range(samples)})


def test_two_workers_train_to_the_loss_of_one_with_the_same_global_batch(tiny_bundle, tmp_path, ray_local):
    """DDP over gloo, from images and a frozen encoder: each of 2 workers decodes and encodes every other image
    (the broken one left out by both), then computes half of every batch of 16 (the captioner's half in
    micro-batches of 3), and the contrastive scorer gathers both halves' features: every epoch's loss is the one
    1 worker computes on whole batches, within 1e-4 relative (float sums in another order). The paths are relative
    to the working directory, as a user gives them: they resolve in the workers as in the driver."""
    _write_images(tmp_path / "images" / "00000.tar", 97, broken=5)
    runs = {}
    for workers, micro in ((1, None), (2, 3)):
        config = _config(Path(os.path.relpath(tmp_path / f"w{workers}")), tmp_path, tiny_bundle, embeddings_from=(),
                         data=(os.path.relpath(tmp_path / "images" / "00000.tar"),), caption_micro_batch_size=micro)
        runs[workers] = train(config, scaling=Scaling(num_workers=workers, cpus_per_worker=1, max_failures=0))
    one, two = runs[1], runs[2]
    assert one["examples"] == two["examples"] == 96
    for stage in ("scorer_losses", "caption_losses"):
        assert len(one[stage]) == 2 and one[stage][1] < one[stage][0]  # it learns
        assert two[stage] == pytest.approx(one[stage], rel=1e-4), stage
    assert load_bundle(two["bundle"]).captioner is not None
    # checkpoints went through Ray Train: one folder an epoch, the latest two kept, each with every stage so far
    kept = sorted(path.name for path in (tmp_path / "w2" / "checkpoints").glob("captioner-*"))
    assert kept == ["captioner-0001", "captioner-0002"]
    assert {path.name for path in (tmp_path / "w2" / "checkpoints" / "captioner-0002").iterdir()} >= {
        "scorer-0002", "captioner-0002", "text_tokenizer.json"}


def test_an_error_of_the_data_ends_the_run_with_its_message_not_retries(tiny_bundle, tmp_path, ray_local):
    """Output rows without captions: every worker finds none to train on, and the run ends with that message
    (once, not after `max_failures` restarts) and writes no bundle."""
    _write_output(tmp_path / "output", 32, 24)
    config = _config(tmp_path / "run", tmp_path / "output", tiny_bundle, text_column="original_text")
    with pytest.raises(TrainingFailed, match=r"^no ok rows of .* 'original_text' column"):
        train(config, scaling=Scaling(num_workers=2, cpus_per_worker=1, max_failures=3))
    assert not (tmp_path / "run" / "bundle").exists()


def _train_workers(ancestor: int) -> list[int]:
    """Process ids of the Ray Train workers that `ancestor` started (through its local Ray)."""
    parents, titles = {}, {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                titles[int(entry.name)] = (entry / "cmdline").read_bytes()
            except (OSError, IndexError, ValueError):
                continue

    def descends(pid: int) -> bool:
        while pid > 1:
            pid = parents.get(pid, 0)
            if pid == ancestor:
                return True
        return False

    return [pid for pid, title in titles.items() if title.startswith(b"ray::RayTrainWorker") and descends(pid)]


def train_command(embeddings: Path, bundle: Path, out: Path, epochs: int = 4) -> list[str]:
    """`train_captioner.py` on two Ray Train workers: a tiny captioner, 4 caption epochs of `embeddings`."""
    return [sys.executable, str(ROOT / "jobs" / "train_captioner.py"), "--embeddings-from", str(embeddings),
            "--clip", str(bundle), "--caption-epochs", str(epochs), "--batch-size", "16", "--vocab-size", "300",
            "--lm-width", "32", "--lm-layers", "1", "--lm-heads", "2", "--lm-positions", "32", "--prefix-length", "4",
            "--precision", "fp32", "--num-workers", "2", "--out", str(out)]


def wait_for_first_checkpoint(out: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    """Until Ray Train has registered the first caption epoch's checkpoint (the run still going)."""
    deadline = time.time() + timeout
    snapshot = out / "checkpoints" / "checkpoint_manager_snapshot.json"  # the checkpoints Ray Train registered
    while not (snapshot.is_file() and "captioner-0001" in snapshot.read_text()) and process.poll() is None:
        assert time.time() < deadline, "no checkpoint in time"
        time.sleep(0.2)
    assert process.poll() is None, process.stdout.read()[-3000:]


def test_a_worker_killed_mid_epoch_resumes_from_the_last_checkpoint_and_the_bundle_is_complete(tiny_bundle,
                                                                                                tmp_path):
    """`train_captioner.py --num-workers 2`: once Ray Train has registered the first caption epoch's checkpoint,
    one worker is killed; Ray Train restarts the workers, which resume from a checkpoint, and the run ends with
    every epoch's loss and a bundle that loads. A rerun with more epochs resumes from the last checkpoint."""
    _write_output(tmp_path / "output", 3000, 24)
    out = tmp_path / "run"
    args = train_command(tmp_path / "output", tiny_bundle, out)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    try:
        wait_for_first_checkpoint(out, process, timeout=240)
        victims = _train_workers(process.pid)
        assert len(victims) == 2
        os.kill(victims[-1], signal.SIGKILL)
        output, _ = process.communicate(timeout=300)
    finally:
        process.kill()
    assert process.returncode == 0, output[-3000:]
    summary = json.loads((out / "train_summary.json").read_text())
    # the restarted workers resumed from a checkpoint
    assert (summary["resumed_from"] or "").startswith("captioner-000"), (victims, output[-1500:])
    assert len(summary["caption_losses"]) == 4 and all(loss is not None for loss in summary["caption_losses"])
    bundle = load_bundle(out / "bundle")
    assert bundle.captioner is not None and bundle.manifest["sha256"] == summary["bundle_sha256"]

    more = subprocess.run(train_command(tmp_path / "output", tiny_bundle, out, epochs=5), capture_output=True,
                          text=True, env=env, timeout=300)
    assert more.returncode == 0, more.stdout[-2000:] + more.stderr[-2000:]
    resumed = json.loads((out / "train_summary.json").read_text())
    assert resumed["resumed_from"] == "captioner-0004"
    assert resumed["caption_losses"][:4] == summary["caption_losses"] and len(resumed["caption_losses"]) == 5
