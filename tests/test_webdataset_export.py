"""--write-webdataset: the filtered set with its images as WebDataset tars that training jobs read."""

from __future__ import annotations

import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import jpeg_bytes, read_parts, write_tar
from PIL import Image

from pipeline.config import GenerationSettings, RunConfig
from pipeline.io.images import ImageError, portable_image
from pipeline.io.sinks import WEBDATASET, OutputDir, webdataset_stem, write_webdataset_shard
from pipeline.io.sources import expand_inputs
from pipeline.run.chain import run
from pipeline.run.data_stages import write_webdataset_tar
from pipeline.run.filtering import FilterSettings


def _image(fmt: str, size: tuple[int, int], mode: str = "RGB", seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, (seed * 40 % 255, 90, 200) if mode == "RGB" else seed).save(buffer, format=fmt)
    return buffer.getvalue()


def _mixed_inputs(root):
    """Two tars (one holding a PNG, a GIF and a broken JPEG), a Parquet file, a folder with dotted names."""
    write_tar(root / "00000.tar", {f"a{i:03d}": {"jpg": jpeg_bytes(i), "txt": f"kaynak {i}".encode()}
                                   for i in range(4)})
    write_tar(root / "00001.tar", {"b000": {"png": _image("PNG", (30, 20), seed=1)},
                                   "b001": {"gif": _image("GIF", (26, 22), mode="P", seed=2)},
                                   "b002": {"jpg": b"\xff\xd8 not a jpeg"},
                                   "b003": {"webp": _image("WEBP", (24, 24), seed=3)}})
    pq.write_table(pa.table({"key": [f"c{i}" for i in range(3)], "jpg": [jpeg_bytes(10 + i) for i in range(3)]}),
                   root / "00002.parquet")
    folder = root / "folder" / "sub"
    folder.mkdir(parents=True)
    (folder / "photo.v2.jpg").write_bytes(jpeg_bytes(20))
    (folder / "scan.bmp").write_bytes(_image("BMP", (21, 33), seed=4))
    return [str(root / "*.tar"), str(root / "00002.parquet"), str(root / "folder")]


def _tar_samples(folder) -> dict[str, dict[str, bytes]]:
    """Tar members grouped into samples the way WebDataset groups them (stem before the first dot)."""
    samples: dict[str, dict[str, bytes]] = {}
    for path in sorted(folder.glob("*.tar")):
        with tarfile.open(path) as tar:
            for member in tar:
                stem, _, extension = member.name.partition(".")
                samples.setdefault(stem, {})[extension] = tar.extractfile(member).read()
    return samples


def test_write_webdataset_matches_filtered_and_loads_in_training_readers(ray_local, tiny_bundle, tmp_path):
    inputs = _mixed_inputs(tmp_path / "in")
    out = tmp_path / "out"
    summary = run(RunConfig(inputs=tuple(inputs), output=str(out), model=str(tiny_bundle),
                            decode=GenerationSettings(max_new_tokens=4), batch_size=4,
                            filter=FilterSettings(keep_top_fraction=0.75), write_webdataset=True))
    filtered = read_parts(out / "filtered")
    kept = {row["key"]: row for row in filtered.to_pylist()}
    assert 0 < len(kept) < summary["counts"]["rows"]
    assert summary["webdataset"] == {"folder": WEBDATASET, "tars": len({row["source"] for row in kept.values()}),
                                     "samples": len(kept), "missing": 0}
    # stats beside each tar, as img2dataset writes them
    stats = [json.loads(p.read_text()) for p in sorted((out / WEBDATASET).glob("*_stats.json"))]
    assert sum(s["samples"] for s in stats) == len(kept)

    samples = _tar_samples(out / WEBDATASET)
    assert len(samples) == len(kept)
    sizes = {}
    for stem, members in samples.items():
        meta = json.loads(members["json"])
        row = kept[meta["key"]]
        assert members["txt"].decode() == row["caption"] and meta["clip_score"] == pytest.approx(row["clip_score"])
        assert meta["source"] == row["source"] and meta["model"] == "tiny" and "." not in stem
        (extension,) = set(members) - {"txt", "json"}
        assert extension in ("jpg", "png", "webp")
        with Image.open(io.BytesIO(members[extension])) as image:
            assert image.size == (row["width"], row["height"])
            sizes[meta["key"]] = (extension, image.format)
    # PNG and WebP stay as they were; GIF and BMP become JPEGs; the dotted file name keeps its key in KEY.json
    expected = {"b000": ("png", "PNG"), "b003": ("webp", "WEBP"), "b001": ("jpg", "JPEG"),
                "sub/scan.bmp": ("jpg", "JPEG"), "sub/photo.v2.jpg": ("jpg", "JPEG")}
    assert {key: value for key, value in sizes.items() if key in expected} == \
        {key: value for key, value in expected.items() if key in kept}

    # training readers: the webdataset library and Hugging Face datasets' webdataset builder
    import datasets
    import webdataset as wds

    urls = [str(p) for p in sorted((out / WEBDATASET).glob("*.tar"))]
    pipeline = wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("jpg;png;webp", "txt", "json")
    read = [(image.size, text, meta["key"]) for image, text, meta in pipeline]
    assert sorted(key for _, _, key in read) == sorted(kept)
    assert all(text == kept[key]["caption"] for _, text, key in read)
    loaded = datasets.load_dataset("webdataset", data_files=urls, split="train", cache_dir=str(tmp_path / "hf"))
    assert len(loaded) == len(kept)


def test_webdataset_can_be_asked_for_after_the_run(ray_local, tiny_bundle, tmp_path):
    write_tar(tmp_path / "in.tar", {f"k{i}": {"jpg": jpeg_bytes(i)} for i in range(5)})
    base = {"inputs": (str(tmp_path / "in.tar"),), "output": str(tmp_path / "out"), "model": str(tiny_bundle),
            "decode": GenerationSettings(max_new_tokens=4)}
    first = run(RunConfig(**base))
    assert "webdataset" not in first and not (tmp_path / "out" / WEBDATASET).exists()
    again = run(RunConfig(**base, write_webdataset=True))  # no "different configuration" refusal, no re-captioning
    assert again["webdataset"]["samples"] == 5 and again["counts"] == first["counts"]
    assert json.loads((tmp_path / "out" / "run.json").read_text())["webdataset"]["tars"] == 1
    assert len(_tar_samples(tmp_path / "out" / WEBDATASET)) == 5


def test_a_shard_with_stats_is_skipped_and_one_without_is_rewritten(tmp_path):
    """A resumed export: a tar whose stats file exists is complete; a tar without (killed mid-write) is redone."""
    write_tar(tmp_path / "in.tar", {f"k{i}": {"jpg": jpeg_bytes(i)} for i in range(3)})
    (shard,) = expand_inputs([str(tmp_path / "in.tar")])
    rows = pa.table({"key": ["k0", "k2"], "source": [shard.url] * 2, "caption": ["bir", "iki"],
                     "clip_score": pa.array([0.5, 0.4], pa.float32()), "original_text": [None, None],
                     "width": pa.array([48, 48], pa.int32()), "height": pa.array([40, 40], pa.int32())})
    arguments = {"position": 7, "shard": shard, "output_url": str(tmp_path / "out"), "image_column": None,
                 "key_column": "key", "provenance": {}}
    first = write_webdataset_tar(rows, **arguments)
    assert first == {"source": shard.url, "tar": "00007.tar", "samples": 2, "missing": 0}
    tar_path = tmp_path / "out" / WEBDATASET / "00007.tar"
    tar_path.write_bytes(b"left alone")
    assert write_webdataset_tar(rows, **arguments) == first and tar_path.read_bytes() == b"left alone"
    (tmp_path / "out" / WEBDATASET / "00007_stats.json").unlink()
    assert write_webdataset_tar(rows, **arguments) == first
    assert sorted(_tar_samples(tmp_path / "out" / WEBDATASET)) == ["k0", "k2"]


def test_first_record_of_a_key_is_taken_and_missing_ones_are_counted(tmp_path):
    records = [{"key": "x", "image": jpeg_bytes(1)}, {"key": "x", "image": jpeg_bytes(2)},
               {"key": "gone", "image": None}]
    rows = {key: {"key": key, "caption": key} for key in ("x", "gone", "absent")}
    counts = write_webdataset_shard(OutputDir(str(tmp_path)), "t.tar", records, rows, {}, portable_image)
    assert counts == {"samples": 1, "missing": 2}
    with tarfile.open(tmp_path / WEBDATASET / "t.tar") as tar:
        assert tar.getnames() == ["x.jpg", "x.txt", "x.json"]
        assert tar.extractfile("x.jpg").read() == jpeg_bytes(1)


@pytest.mark.parametrize(("key", "stem"), [
    ("000123", "000123"), ("a.b.c", "a_b_c"), ("sub/photo.v2.jpg", "sub/photo_v2_jpg"),
    ("../../etc/passwd", "etc/passwd"), ("/abs/x", "abs/x"), ("", "_"), ("..", "_"), ("görsel 1", "görsel 1"),
])
def test_webdataset_stem_is_a_safe_member_name(key, stem):
    assert webdataset_stem(key) == stem


def test_stems_that_collide_get_a_suffix(tmp_path):
    records = [{"key": "a.b", "image": jpeg_bytes(1)}, {"key": "a_b", "image": jpeg_bytes(2)}]
    rows = {key: {"key": key, "caption": key} for key in ("a.b", "a_b")}
    write_webdataset_shard(OutputDir(str(tmp_path)), "t.tar", records, rows, {}, portable_image)
    with tarfile.open(tmp_path / WEBDATASET / "t.tar") as tar:
        names = tar.getnames()
    assert names == ["a_b.jpg", "a_b.txt", "a_b.json", "a_b_1.jpg", "a_b_1.txt", "a_b_1.json"]


def test_portable_image_keeps_common_formats_and_reencodes_the_rest():
    png = _image("PNG", (9, 7))
    assert portable_image(png) == (png, "png")
    data, extension = portable_image(_image("TIFF", (9, 7), mode="L", seed=100))
    with Image.open(io.BytesIO(data)) as image:
        assert (extension, image.format, image.mode, image.size) == ("jpg", "JPEG", "RGB", (9, 7))
    with pytest.raises(ImageError):
        portable_image(b"not an image")
