"""Hostile inputs through the real pipeline: one run over every kind of bad data at once (repeated keys
included), checked with `pipeline.quality.verify`; and bad usage, which must fail before any work starts."""

from __future__ import annotations

import io
import re
import struct
import subprocess
import sys
import tarfile
import unicodedata
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import jpeg_bytes, read_parts, write_tar
from PIL import Image

from pipeline.config import GenerationSettings, RunConfig
from pipeline.io.sources import InputError, expand_inputs
from pipeline.quality.verify import verify
from pipeline.run.chain import run
from pipeline.run.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]
GOOD = (48, 40)  # conftest.jpeg_bytes' default size
ODD = (30, 20)


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _noise(size: tuple[int, int], mode: str = "RGB", seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert(mode)


def _png_claiming(width: int, height: int) -> bytes:
    """A valid-CRC PNG header claiming width x height, with no pixel data behind it."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def _rotated_jpeg() -> bytes:
    """60x40 pixels stored with EXIF orientation 6 (rotate 90°): the image is 40 wide, 60 high."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return _encode(_noise((60, 40), seed=1), "JPEG", exif=exif)


def _animated_gif() -> bytes:
    frames = [_noise(ODD, "P", seed=seed) for seed in range(3)]
    return _encode(frames[0], "GIF", save_all=True, append_images=frames[1:])


def _gray16_png() -> bytes:
    values = np.random.default_rng(2).integers(0, 65536, (ODD[1], ODD[0])).astype(np.uint16)
    return _encode(Image.fromarray(values), "PNG")


# key -> (tar members, expected status, expected (width, height) or None)
HOSTILE_TAR: dict[str, tuple[dict[str, bytes], str, tuple[int, int] | None]] = {
    "good-0": ({"jpg": jpeg_bytes(0), "txt": "kırmızı bir daire".encode()}, "ok", GOOD),
    "good-1": ({"jpg": jpeg_bytes(1), "json": b'{"url": "x"}'}, "ok", GOOD),
    "good-2": ({"jpg": jpeg_bytes(2)}, "ok", GOOD),
    "zero-bytes": ({"jpg": b""}, "empty", None),
    "truncated-jpeg": ({"jpg": jpeg_bytes(3, (200, 160))[:1500]}, "decode_error", None),
    "random-bytes": ({"jpg": np.random.default_rng(4).integers(0, 256, 2000, dtype=np.uint8).tobytes()},
                     "decode_error", None),
    "png-bomb-50000x50000": ({"png": _png_claiming(50000, 50000)}, "too_large", None),
    "one-pixel": ({"png": _encode(_noise((1, 1)), "PNG")}, "ok", (1, 1)),
    "grayscale": ({"png": _encode(_noise(ODD, "L"), "PNG")}, "ok", ODD),
    "palette": ({"png": _encode(_noise(ODD, "P"), "PNG")}, "ok", ODD),
    "rgba": ({"png": _encode(_noise(ODD, "RGBA"), "PNG")}, "ok", ODD),
    "cmyk": ({"jpg": _encode(_noise(ODD, "CMYK"), "JPEG")}, "ok", ODD),
    "gray-16bit": ({"png": _gray16_png()}, "ok", ODD),
    "animated": ({"gif": _animated_gif()}, "ok", ODD),
    "webp": ({"webp": _encode(_noise(ODD), "WEBP")}, "ok", ODD),
    "avif": ({"avif": _encode(_noise(ODD), "AVIF")}, "ok", ODD),
    "iphone-heic": ({"heic": b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64)}, "unsupported", None),
    "exif-rotated": ({"jpg": _rotated_jpeg()}, "ok", (40, 60)),
    "text-only": ({"txt": b"resim yok", "json": b"{}"}, "no_image", None),
    "not-an-image": ({"bin": b"\x00\x01\x02"}, "no_image", None),
    "cp1254-text": ({"jpg": jpeg_bytes(5), "txt": "Işık, çığ ve ağaç".encode("cp1254")}, "ok", GOOD),
    "notepad-text": ({"jpg": jpeg_bytes(6), "txt": "\ufeffmavi kare\r\n".encode()}, "ok", GOOD),
    "undecodable-text": ({"jpg": jpeg_bytes(7), "txt": b"a\x81\x8db"}, "ok", GOOD),
}
CUT_SAMPLES = 4  # in cut.tar; the tar is cut in the middle of the third sample


@dataclass
class Inputs:
    specs: tuple[str, ...]
    expected: dict[str, tuple[str, tuple[int, int] | None]]  # key -> (status, size), for rows that keep their key
    repeated: list[tuple[str, str, str]]  # (key, source URL, status) of the later samples of a repeated key
    samples: int  # records the inputs yield: rows the output must have


def _write_hostile_inputs(root: Path) -> Inputs:
    """Every hostile case, in four shards: a WebDataset tar, a tar cut in the middle, a Parquet file, and a
    tar repeating a key of the first."""
    expected = {key: (status, size) for key, (_, status, size) in HOSTILE_TAR.items()}
    tar = write_tar(root / "hostile.tar", {key: members for key, (members, _, _) in HOSTILE_TAR.items()})
    with tarfile.open(tar, "a") as archive:
        # A second, non-contiguous group of an earlier key (a "split" sample), then members that are
        # no sample at all: a name without an extension and a folder (no row, no failure).
        for name, data in (("good-2.txt", b"later text"), ("README", b"abc")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        folder = tarfile.TarInfo("subdir")
        folder.type = tarfile.DIRTYPE
        archive.addfile(folder)

    cut = write_tar(root / "cut.tar", {f"cut-{i}": {"jpg": jpeg_bytes(10 + i)} for i in range(CUT_SAMPLES)})
    data = cut.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    expected |= {"cut-0": ("ok", GOOD), "cut-1": ("ok", GOOD),
                 f"{_url(cut)}#truncated_shard": ("truncated_shard", None)}

    parquet = root / "rows.parquet"
    table = pa.table({"key": ["pq-good", "pq-null", "pq-twice", "pq-twice"],
                      "jpg": pa.array([jpeg_bytes(20), None, jpeg_bytes(21), jpeg_bytes(22)], pa.binary()),
                      "caption": ["bir resim", None, None, None]})
    pq.write_table(table, parquet)
    expected |= {"pq-good": ("ok", GOOD), "pq-null": ("no_image", None), "pq-twice": ("ok", GOOD)}

    again = write_tar(root / "again.tar", {"good-0": {"jpg": jpeg_bytes(40)}, "again-1": {"jpg": jpeg_bytes(41)}})
    with tarfile.open(again, "a") as archive:
        # again-1.jpg a second time (a sample of its own, so a duplicate key), and a macOS resource fork (no row)
        for name, data in (("again-1.jpg", jpeg_bytes(42)), ("._again-1.jpg", b"\x00\x05\x16\x07")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    # a second tar joined with `cat`: readers stop at the first end-of-archive, so it is reported
    appended = write_tar(root / "appended.tar", {"lost": {"jpg": jpeg_bytes(43)}})
    again.write_bytes(again.read_bytes() + appended.read_bytes())
    appended.unlink()
    expected |= {"again-1": ("ok", GOOD), f"{_url(again)}#trailing_data": ("trailing_data", None)}
    # a later sample that already failed keeps its own status (the split group); an ok one is a duplicate
    repeated = [("good-2", _url(tar), "split_sample"), ("pq-twice", _url(parquet), "duplicate_key"),
                ("good-0", _url(again), "duplicate_key"), ("again-1", _url(again), "duplicate_key")]
    return Inputs((str(tar), str(cut), str(parquet), str(again)), expected, repeated, len(expected) + len(repeated))


def _url(path: Path) -> str:
    """The shard URL the pipeline records as `source`."""
    return expand_inputs([str(path)])[0].url


@dataclass
class HostileRun:
    inputs: Inputs
    output: Path
    summary: dict
    rows: list[dict]  # captions/


@pytest.fixture(scope="module")
def hostile(ray_local, tiny_bundle, tmp_path_factory) -> HostileRun:
    """The one pipeline run over all hostile inputs together."""
    root = tmp_path_factory.mktemp("hostile")
    inputs = _write_hostile_inputs(root / "in")
    config = RunConfig(inputs=inputs.specs, output=str(root / "out"), model=str(tiny_bundle),
                       decode=GenerationSettings(max_new_tokens=4), batch_size=8)
    summary = run(config)
    return HostileRun(inputs, root / "out", summary, read_parts(root / "out" / "captions").to_pylist())


def _renamed(row: dict) -> bool:
    """A later sample of a repeated key, written under KEY@SOURCE#POSITION."""
    return re.fullmatch(rf".+@{re.escape(row['source'])}#\d+", row["key"]) is not None


def _by_key(hostile: HostileRun) -> dict[str, dict]:
    """The rows that kept their input key."""
    return {row["key"]: row for row in hostile.rows if not _renamed(row)}


def test_output_verifies_against_the_inputs(hostile):
    report = verify(str(hostile.output), list(hostile.inputs.specs))
    assert report.ok, "\n".join(report.lines())
    assert {check.name for check in report.checks} >= {"complete", "unique_keys", "filtered", "run_json", "layout"}


def test_every_input_sample_exactly_once(hostile):
    keys = [row["key"] for row in hostile.rows]
    assert len(keys) == len(set(keys)) == hostile.inputs.samples
    assert sorted(_by_key(hostile)) == sorted(hostile.inputs.expected)


def test_each_hostile_sample_gets_its_status_and_size(hostile):
    got = {key: (row["status"], None if row["width"] is None else (row["width"], row["height"]))
           for key, row in _by_key(hostile).items()}
    assert got == hostile.inputs.expected


def test_a_repeated_key_keeps_both_samples(hostile):
    """The first sample (in input order) keeps the key; each later one gets a new key, and 'duplicate_key'
    unless it had already failed for another reason."""
    later = sorted((row["key"].split("@")[0], row["source"], row["status"]) for row in hostile.rows if _renamed(row))
    assert later == sorted(hostile.inputs.repeated)
    first = _by_key(hostile)
    assert all(first[key]["status"] == "ok" for key, _, _ in hostile.inputs.repeated)
    assert first["good-0"]["source"] == _url(Path(hostile.inputs.specs[0]))  # input order decides, not finish order


def test_failed_rows_say_why_in_one_line_and_have_no_caption(hostile):
    for row in hostile.rows:
        if row["status"] == "ok":
            assert row["error"] is None
            continue
        assert row["error"] and "\n" not in row["error"] and "0x" not in row["error"], row
        assert row["caption"] is None and row["clip_score"] is None and row["image_embedding"] is None
        assert row["keep"] is False


def test_good_rows_have_captions_scores_and_embeddings(hostile):
    ok = [row for row in hostile.rows if row["status"] == "ok"]
    assert len(ok) == sum(status == "ok" for status, _ in hostile.inputs.expected.values())
    for row in ok:
        assert isinstance(row["caption"], str) and unicodedata.is_normalized("NFC", row["caption"])
        assert "<|" not in row["caption"]  # no special tokens
        assert -1 <= row["clip_score"] <= 1
        assert len(row["image_embedding"]) == 24
        assert row["keep"] is True  # no filter configured: every ok row is kept


def test_sample_text_survives_bad_encodings(hostile):
    rows = _by_key(hostile)
    assert rows["good-0"]["original_text"] == "kırmızı bir daire"
    # Windows Turkish text read as UTF-8 lost every Turkish letter to U+FFFD, and training learnt U+FFFD
    assert rows["cp1254-text"]["original_text"] == "Işık, çığ ve ağaç"
    assert rows["notepad-text"]["original_text"] == "mavi kare"  # its byte-order mark is no text
    assert rows["undecodable-text"]["original_text"] == "a\ufffd\ufffdb"  # neither reads it; the row stays ok
    assert rows["pq-good"]["original_text"] == "bir resim"


def test_run_json_counts_match(hostile):
    counts = hostile.summary["counts"]
    expected = Counter(status for status, _ in hostile.inputs.expected.values())
    expected.update(status for _, _, status in hostile.inputs.repeated)
    assert counts["rows"] == hostile.inputs.samples
    assert counts["by_status"] == dict(sorted(expected.items()))
    assert counts["kept"] == expected["ok"]
    # what the models computed (a sample renamed duplicate_key afterwards too), not rows failed before them
    computed = expected["ok"] + expected["duplicate_key"]
    assert sum(counts["rows_by_node"].values()) == sum(counts["rows_by_compute"].values()) == computed


# --------------------------------------------------------------------------------------------------
# bad usage: one clear line before any work starts (no Ray, no model, nothing written)


def _missing_shard(root: Path) -> tuple[str, str]:
    write_tar(root / "00000.tar", {"a": {"jpg": jpeg_bytes(0)}})
    write_tar(root / "00002.tar", {"b": {"jpg": jpeg_bytes(1)}})
    return str(root / "{00000..00002}.tar"), "shard missing"


def _wrong_image_type(root: Path) -> tuple[str, str]:
    root.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"key": ["a"], "jpg": pa.array([7], pa.int64())}), root / "ints.parquet")
    return str(root / "ints.parquet"), "has type int64"


def _unreadable_path(root: Path) -> tuple[str, str]:
    # Through a regular file: unreadable for every user, root included (chmod 000 would not stop root).
    root.mkdir(parents=True, exist_ok=True)
    (root / "file").write_text("x")
    return str(root / "file" / "shard.tar"), "cannot access"


@pytest.mark.parametrize("make", [_missing_shard, _wrong_image_type, _unreadable_path])
def test_bad_input_fails_before_any_work(make, tiny_bundle, tmp_path):
    spec, message = make(tmp_path / "in")
    with pytest.raises(InputError, match=message) as info:
        run(RunConfig(inputs=(spec,), output=str(tmp_path / "out"), model=str(tiny_bundle)))
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_an_output_url_nothing_can_open_fails_before_any_work(tiny_bundle, tmp_path):
    """An unknown protocol, or one whose fsspec backend is not installed (s3:// without s3fs), is bad usage."""
    spec, _ = _missing_shard(tmp_path / "in")
    with pytest.raises(UsageError, match=r"^cannot open --output 'nosuch://bucket/out': .*nosuch") as info:
        run(RunConfig(inputs=(spec.replace("{00000..00002}", "00000"),), output="nosuch://bucket/out",
                      model=str(tiny_bundle)))
    assert "\n" not in str(info.value)


def test_an_output_store_that_refuses_access_fails_before_any_work(tiny_bundle, tmp_path):
    """s3:// without credentials: botocore's NoCredentialsError is no OSError, and it was a traceback."""
    class NoCredentials(fsspec.AbstractFileSystem):
        protocol = "nocreds"

        def info(self, path, **kwargs):
            raise RuntimeError("Unable to locate credentials")

    fsspec.register_implementation("nocreds", NoCredentials, clobber=True)
    spec, _ = _missing_shard(tmp_path / "in")
    with pytest.raises(UsageError, match=r"^cannot access --output 'nocreds://b/out': RuntimeError: Unable to"):
        run(RunConfig(inputs=(spec.replace("{00000..00002}", "00000"),), output="nocreds://b/out",
                      model=str(tiny_bundle)))


def test_cli_reports_a_missing_shard_in_one_line(tiny_bundle, tmp_path):
    spec, message = _missing_shard(tmp_path / "in")
    result = subprocess.run([sys.executable, str(ROOT / "jobs" / "caption_shards.py"), "--input", spec,
                             "--output", str(tmp_path / "out"), "--model", str(tiny_bundle)],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "00001.tar" in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


def test_inputs_without_a_sample_still_give_readable_tables(ray_local, tiny_bundle, tmp_path):
    """An empty tar (webdataset's ShardWriter can leave one): captions/ and filtered/ hold empty tables, so
    pq.read_table / datasets.load_dataset on them work instead of finding no file."""
    empty = write_tar(tmp_path / "in" / "empty.tar", {})
    config = RunConfig(inputs=(str(empty),), output=str(tmp_path / "out"), model=str(tiny_bundle),
                       decode=GenerationSettings(max_new_tokens=4), batch_size=8)
    assert run(config)["counts"]["rows"] == 0
    for folder in ("captions", "filtered"):
        table = pq.read_table(tmp_path / "out" / folder)
        assert table.num_rows == 0 and "image_embedding" in table.column_names
    report = verify(str(tmp_path / "out"), [str(empty)])
    assert report.ok, "\n".join(report.lines())


@pytest.mark.parametrize("option", [("--gpus-per-actor", "nan"), ("--gpus-per-actor", "inf"), ("--gpus-per-actor", "2"),
                                    ("--temperature", "nan"), ("--decode", "sample", "--top-p", "nan")])
def test_impossible_values_are_one_usage_line_before_torch_or_ray_load(option, tmp_path):
    """NaN passes click's range checks (every comparison with it is false); it reached Ray as a traceback, or
    sampled NaN probabilities for every row. Usage is checked before the model stack is imported."""
    script = ("import runpy, sys\n"
              f"sys.path.insert(0, {str(ROOT / 'jobs')!r})\n"  # where `python jobs/caption_shards.py` looks first
              f"sys.argv = ['caption_shards.py', '--input', 'x', '--output', 'y', *{list(option)!r}]\n"
              "try:\n"
              f"    runpy.run_path({str(ROOT / 'jobs' / 'caption_shards.py')!r}, run_name='__main__')\n"
              "except SystemExit as exc:\n"
              "    print(exc.code, 'torch' in sys.modules, 'ray' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.stdout.split() == ["2", "False", "False"], result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")


def test_gpu_actors_on_a_local_ray_without_gpus_are_one_usage_line(ray_local, tiny_bundle, tmp_path):
    """--gpus-per-actor 1 on a laptop: the pool waited forever for a GPU node no autoscaler would add."""
    shard = write_tar(tmp_path / "in" / "s.tar", {"a": {"jpg": jpeg_bytes(0)}})
    config = RunConfig(inputs=(str(shard),), output=str(tmp_path / "out"), model=str(tiny_bundle),
                       gpus_per_actor=1.0, decode=GenerationSettings(max_new_tokens=4), batch_size=8)
    with pytest.raises(UsageError, match=r"^no model actor \(1 CPU and 1 GPU each\) fits on this machine \(.*0 GPUs"):
        run(config)


def test_a_shard_repeating_another_shards_keys_loses_no_row(ray_local, tiny_bundle, tmp_path):
    """The same images as a .tar and as a copy (or as .parquet): staged parts were named by their keys, so the
    second shard's part replaced the first's and its rows were lost, while the run said it wrote them all."""
    samples = {f"k{i}": {"jpg": jpeg_bytes(i)} for i in range(3)}
    first, second = write_tar(tmp_path / "in" / "a.tar", samples), write_tar(tmp_path / "in" / "b.tar", samples)
    config = RunConfig(inputs=(str(first), str(second)), output=str(tmp_path / "out"), model=str(tiny_bundle),
                       decode=GenerationSettings(max_new_tokens=4), batch_size=3, rows_per_file=3)  # a part per shard
    assert run(config)["counts"]["by_status"] == {"duplicate_key": 3, "ok": 3}
    rows = read_parts(tmp_path / "out" / "captions").to_pylist()
    assert sorted(row["source"] for row in rows) == [_url(first)] * 3 + [_url(second)] * 3
    report = verify(str(tmp_path / "out"), [str(first), str(second)])
    assert report.ok, "\n".join(report.lines())
