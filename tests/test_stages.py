"""The Ray Data stages as plain objects: decode turns bad bytes into status rows, and the model
stage falls back to smaller batches when a batch fails, so one bad sample never costs a batch."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tempfile
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from pipeline.config import GenerationSettings
from pipeline.io.images import ImageSpec
from pipeline.models.bundle import load_bundle
from pipeline.models.errors import ModelLoadError
from pipeline.models.manifest import load_manifest
from pipeline.run import data_stages as stages
from pipeline.run import model_stage
from pipeline.run.model_actor import ShippedBundle

POISON = 7


def _png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (value, value, value)).save(buffer, format="PNG")
    return buffer.getvalue()


def _samples(images: list[bytes | None]) -> pa.Table:
    n = len(images)
    return pa.table({"key": [f"k{i}" for i in range(n)], "source": ["s.tar"] * n, "index": list(range(n)),
                     "image": pa.array(images, pa.large_binary()), "original_text": [None] * n,
                     "status": ["ok"] * n, "error": pa.array([None] * n, pa.string())}, schema=stages.SAMPLE_SCHEMA)


def test_decode_batch_keeps_every_row_and_reports_bad_bytes():
    table = stages.decode_images(_samples([_png(100), b"", b"not an image", _png(200)]),
                                stages.ImageSpecs(encoder=ImageSpec(size=32)))
    assert table.column("status").to_pylist() == ["ok", "empty", "decode_error", "ok"]
    assert table.column("width").to_pylist() == [40, None, None, 40]
    pixels = stages.pixels_from_column(table.column("pixels"), 32)
    assert pixels.shape == (4, 32, 32, 3) and (pixels[0] == 100).all() and (pixels[1] == 0).all()
    assert (stages.pixels_from_column(table.column("pixels").slice(3), 32) == 200).all()  # offsets respected


def _caption_stage(ray_local, bundle: Path, seen_at: Path | None = None, **options) -> model_stage.CaptionStage:
    """The model actor's class built in this process, as a Ray Data actor builds it, on the tiny bundle
    (looked for at `seen_at` instead of its own path, if given)."""
    shipped = ShippedBundle.of(bundle, load_manifest(bundle)["sha256"])
    return model_stage.CaptionStage(replace(shipped, path=str(seen_at or shipped.path)),
                                    GenerationSettings(max_new_tokens=3), "fp32", batch_size=8, embedding_dim=24,
                                    metadata_json="{}", **options)


def _ok_values(table: pa.Table, name: str) -> np.ndarray:
    """A numeric column's values on the rows the models captioned."""
    statuses = table.column("status").to_pylist()
    return np.array([v for v, status in zip(table.column(name).to_pylist(), statuses, strict=True) if status == "ok"],
                    dtype=np.float64)


@pytest.fixture()
def stage(ray_local, tiny_bundle):
    return _caption_stage(ray_local, tiny_bundle)


def test_the_model_actor_leaves_no_copy_of_the_bundle_on_disk(ray_local, tiny_bundle, tmp_path, monkeypatch):
    # each actor start used to leave its bundle copy in /tmp (240 copies, 8.6 GB, on this machine)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    actor = _caption_stage(ray_local, tiny_bundle, seen_at=tmp_path / "on-another-node")  # loads the copy
    assert list(tmp_path.iterdir()) == []
    out = actor(stages.decode_images(_samples([_png(10), _png(90)]), stages.ImageSpecs(ImageSpec(size=32))))
    assert out.column("status").to_pylist() == ["ok", "ok"] and None not in out.column("caption").to_pylist()


def test_an_actor_that_sees_the_validated_bundle_loads_it_in_place(ray_local, tiny_bundle, monkeypatch):
    def no_copy(files):
        raise AssertionError("the shipped copy was read")

    monkeypatch.setattr(model_stage, "load_shipped_bundle", no_copy)
    actor = _caption_stage(ray_local, tiny_bundle)
    assert actor.bundle.identity()["sha256"] == load_manifest(tiny_bundle)["sha256"]


def test_an_actor_that_does_not_see_the_validated_bundle_loads_the_shipped_copy(ray_local, tiny_bundle, tmp_path):
    shipped = ShippedBundle.of(tiny_bundle, load_manifest(tiny_bundle)["sha256"])
    elsewhere = tmp_path / "elsewhere"  # another node: no such directory
    moved = replace(shipped, path=str(elsewhere))
    assert model_stage.load_shipped(moved).identity() == model_stage.load_shipped(shipped).identity()
    shutil.copytree(tiny_bundle, elsewhere)  # the same path now holds another bundle
    manifest = json.loads((elsewhere / "bundle.json").read_text())
    (elsewhere / "bundle.json").write_text(json.dumps({**manifest, "name": "another"}))
    assert load_bundle(elsewhere).identity()["name"] == "another"
    assert model_stage.load_shipped(moved).identity()["name"] == manifest["name"]


def test_without_a_shipped_copy_a_bundle_changed_since_validation_is_an_error(ray_local, tiny_bundle, tmp_path):
    # a Ray the driver started itself gets no copy: its actors must find the very bundle the driver validated
    unshipped = ShippedBundle.of(tiny_bundle, load_manifest(tiny_bundle)["sha256"], ship=False)
    assert unshipped.files is None
    assert model_stage.load_shipped(unshipped).identity()["sha256"] == load_manifest(tiny_bundle)["sha256"]
    changed = tmp_path / "changed"
    shutil.copytree(tiny_bundle, changed)
    manifest = json.loads((changed / "bundle.json").read_text())
    (changed / "bundle.json").write_text(json.dumps({**manifest, "name": "another"}))
    with pytest.raises(ModelLoadError, match="changed since this run validated it: it is another bundle"):
        model_stage.load_shipped(replace(unshipped, path=str(changed)))
    with pytest.raises(ModelLoadError, match="changed since this run validated it"):
        model_stage.load_shipped(replace(unshipped, path=str(tmp_path / "gone")))


def test_a_seeded_sampled_caption_follows_its_sample_not_its_batch(ray_local, tiny_bundle):
    # Ray Data batches rows as blocks arrive, and a resumed run batches the rest anew: with draws per
    # batch, --seed repeated nothing; each sample now draws from its key's stream
    settings = GenerationSettings(method="sample", num_candidates=2, temperature=3.0, max_new_tokens=6, seed=11)
    shipped = ShippedBundle.of(tiny_bundle, load_manifest(tiny_bundle)["sha256"], ship=False)

    def captions(batch_size: int, order: list[int]) -> dict[str, str]:
        actor = model_stage.CaptionStage(shipped, settings, "fp32", batch_size=batch_size, embedding_dim=24,
                                         metadata_json="{}")
        samples = _samples([_png(30 * i) for i in range(6)]).take(order)
        out = actor(stages.decode_images(samples, stages.ImageSpecs(ImageSpec(size=32))))
        return dict(zip(out.column("key").to_pylist(), out.column("caption").to_pylist(), strict=True))

    whole = captions(6, list(range(6)))
    assert captions(2, [5, 3, 1, 0, 2, 4]) == whole and len(set(whole.values())) > 1
    other_seed = model_stage.CaptionStage(shipped, GenerationSettings(**{**settings.to_json(), "seed": 12}), "fp32",
                                          batch_size=6, embedding_dim=24, metadata_json="{}")
    out = other_seed(stages.decode_images(_samples([_png(30 * i) for i in range(6)]),
                                         stages.ImageSpecs(ImageSpec(size=32))))
    assert out.column("caption").to_pylist() != list(whole.values())


def test_a_failing_sample_becomes_model_error_and_its_batch_mates_are_captioned(stage, monkeypatch):
    real = model_stage.caption_batch
    calls = []

    def fails_on_poison(bundle, pixels, settings, scorer_pixels=None, keys=None, original_texts=None):
        calls.append(len(pixels))
        if bool((pixels == POISON).flatten(1).all(dim=1).any()):
            raise torch.OutOfMemoryError("simulated out of memory")
        return real(bundle, pixels, settings, scorer_pixels, keys, original_texts)

    monkeypatch.setattr(model_stage, "caption_batch", fails_on_poison)
    values = [10, 20, POISON, 30, 40, 50, 60, 70]
    decoded = stages.decode_images(_samples([_png(v) for v in values]), stages.ImageSpecs(ImageSpec(size=32)))
    out = stage(decoded)
    statuses = out.column("status").to_pylist()
    assert statuses == ["ok", "ok", "model_error", "ok", "ok", "ok", "ok", "ok"]
    assert "OutOfMemoryError" in out.column("error")[2].as_py()
    assert out.column("caption")[2].as_py() is None and out.column("image_embedding")[2].as_py() is None
    assert all(out.column("caption")[i].as_py() is not None for i in range(8) if i != 2)
    assert calls[0] == 8 and 1 in calls  # whole batch first, then halves down to the single bad sample
    embeddings = np.array([out.column("image_embedding")[i].as_py() for i in (0, 1)], dtype=np.float32)
    assert np.allclose(np.linalg.norm(embeddings, axis=1), 1, atol=1e-2)


def test_a_failed_batch_frees_its_memory_before_its_halves_are_retried(stage, monkeypatch):
    """The halves of a batch that ran out of GPU memory ran inside the except block, beside the failed
    attempt's activations and KV cache, which the exception's traceback kept alive: single rows were
    retried with ~1.75 batches' memory held, and failed too."""
    attempts, held = [], []

    def out_of_memory(bundle, pixels, settings, scorer_pixels=None, keys=None, original_texts=None):
        activations = torch.empty(len(pixels), 1024)  # stands for what the attempt had allocated
        held.append(sum(attempt() is not None for attempt in attempts))
        attempts.append(weakref.ref(activations))
        raise torch.OutOfMemoryError("simulated out of memory")

    monkeypatch.setattr(model_stage, "caption_batch", out_of_memory)
    out = stage(stages.decode_images(_samples([_png(v) for v in (10, 20, 30, 40)]),
                                    stages.ImageSpecs(ImageSpec(size=32))))
    assert out.column("status").to_pylist() == ["model_error"] * 4
    assert held == [0] * 7  # 4 rows, 2 halves, 4 single rows: none ran beside an earlier attempt's memory


def test_a_cuda_error_stops_the_actor_instead_of_failing_every_later_row(stage, monkeypatch):
    """A CUDA error (a device-side assert, an ECC error) leaves the device unusable to the process: turned
    into model_error rows, every later batch of the actor failed the same way, and was committed as failed."""
    def device_error(*args, **kwargs):
        raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(model_stage, "caption_batch", device_error)
    with pytest.raises(torch.AcceleratorError, match="illegal memory access"):
        stage(stages.decode_images(_samples([_png(10), _png(20)]), stages.ImageSpecs(ImageSpec(size=32))))


def test_a_cpu_actor_decoding_its_own_batches_gives_the_same_rows(ray_local, tiny_bundle, stage):
    """On CPU-only clusters the model actor decodes raw samples itself, in slices on its threads: the
    rows (bad images included, in order) equal those of the separate decode stage."""
    spec = stages.ImageSpecs(ImageSpec(size=32))
    decoding = _caption_stage(ray_local, tiny_bundle, cpu_threads=2, image_specs=spec)
    raw = _samples([_png(10), b"broken", _png(30), _png(40), b"", _png(60), _png(70)])
    expected = stage(stages.decode_images(raw, spec))
    got = decoding(raw)
    assert got.column("status").to_pylist() == ["ok", "decode_error", "ok", "ok", "empty", "ok", "ok"]
    for name in ("key", "status", "error", "width", "height", "caption"):
        assert got.column(name).to_pylist() == expected.column(name).to_pylist(), name
    # Scores are computed over other batch shapes here (the actor's slices): CPU kernels block a matmul by
    # its shape and instruction set (AVX2, AVX-512, AMX), so the last bits of a float32 may differ.
    np.testing.assert_allclose(_ok_values(got, "clip_score"), _ok_values(expected, "clip_score"), rtol=0, atol=1e-5)
    np.testing.assert_allclose(_ok_values(got, "image_embedding"), _ok_values(expected, "image_embedding"),
                               rtol=0, atol=1e-3)  # float16 in the table: one step of its rounding
    assert decoding(raw.slice(0, 1)).column("status").to_pylist() == ["ok"]


def test_a_cpu_actor_computes_on_the_calling_threads_team_only(ray_local, tiny_bundle, monkeypatch):
    """Ray Data calls the actor on another thread than its constructor's. An OpenMP team left on the
    constructor's thread made libgomp stop spinning at barriers (more threads than cores) and halved
    the decode loop's speed, so the constructor loads on one thread and each call computes on cpu_threads."""
    seen = []
    real = model_stage.caption_batch

    def recording(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(model_stage, "caption_batch", recording)
    before = torch.get_num_threads()
    try:
        actor = _caption_stage(ray_local, tiny_bundle, cpu_threads=2)
        assert torch.get_num_threads() == 1  # no team of 2 on the constructor's thread
        batch = stages.decode_images(_samples([_png(10), _png(90)]), stages.ImageSpecs(ImageSpec(size=32)))
        with ThreadPoolExecutor(1) as caller:
            out = caller.submit(actor, batch).result()
    finally:
        torch.set_num_threads(before)
    assert out.column("status").to_pylist() == ["ok", "ok"]
    assert seen == [2]


def test_read_decode_and_write_tasks_do_not_import_the_model_stack():
    # every short-lived read/decode/write worker imports pipeline.run.data_stages; torch + transformers cost
    # each of them ~10 s of CPU on a small machine, which the model actor then lacks
    code = ("import sys, pipeline.run.data_stages; "
            "print(sorted({'torch', 'transformers', 'open_clip'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1], check=True).stdout
    assert out.strip() == "[]"
