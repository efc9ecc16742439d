"""`--input` specs -> shards, and shards -> sample records (pipeline.io.sources)."""

from __future__ import annotations

import io
import os
import re
import tarfile
import threading
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.io.sources import (
    FOLDER,
    PARQUET,
    WEBDATASET,
    InputError,
    Shard,
    expand_inputs,
    read_samples,
    record_metadata,
    reference_captions,
    webdataset,
)
from pipeline.io.sources import records as source_records
from pipeline.io.sources.records import _split_key

RECORD_KEYS = {"key", "source", "image", "original_text", "meta", "status", "error"}


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(tar_bytes(members))
    return path


def read_all(url: str, kind: str, **kwargs) -> list[dict]:
    records = list(read_samples(Shard(url, kind), **kwargs))
    assert all(set(r) == RECORD_KEYS for r in records)
    assert all((r["error"] is None) == (r["status"] == "ok") for r in records)
    return records


@pytest.fixture
def memfs() -> Iterator[fsspec.AbstractFileSystem]:
    fs = fsspec.filesystem("memory")
    yield fs
    fs.store.clear()  # the memory filesystem is process-global
    fs.pseudo_dirs[:] = [""]


# ---------------------------------------------------------------------------------------- expand_inputs


def test_brace_range_expands_in_order_and_names_a_missing_member(tmp_path: Path) -> None:
    for i in range(4):
        write_tar(tmp_path / "shards" / f"{i:05d}.tar", [(f"{i}.jpg", b"x")])
    shards = expand_inputs([f"{tmp_path}/shards/{{00000..00003}}.tar"])
    assert shards == [Shard(str(tmp_path / "shards" / f"{i:05d}.tar"), WEBDATASET) for i in range(4)]

    with pytest.raises(InputError, match=r"shard missing: .*00004\.tar \(from brace range"):
        expand_inputs([f"{tmp_path}/shards/{{00000..00004}}.tar"])
    with pytest.raises(InputError, match="unbalanced braces"):
        expand_inputs([f"{tmp_path}/shards/{{00000..00003.tar"])


def test_globs_sort_within_a_spec_keep_spec_order_and_drop_repeats(tmp_path: Path) -> None:
    for name in ("b.tar", "a.tar", "c.parquet"):
        target = tmp_path / name
        if name.endswith(".tar"):
            write_tar(target, [("k.jpg", b"x")])
        else:
            pq.write_table(pa.table({"jpg": [b"x"]}), target)
    shards = expand_inputs([str(tmp_path / "c.parquet"), str(tmp_path / "*.tar"), str(tmp_path / "a.tar")])
    assert [(Path(s.url).name, s.kind) for s in shards] == [("c.parquet", PARQUET), ("a.tar", WEBDATASET),
                                                            ("b.tar", WEBDATASET)]


@pytest.mark.parametrize(("spec", "message"), [
    ("shards/*.tar", r"no file matches '.*shards/\*\.tar'"),
    ("nothing-here.tar", r"no such file or directory: '.*nothing-here\.tar'"),
    ("notes.csv", r"unknown input format: .*notes\.csv"),
    ("nope://bucket/x.tar", r"cannot open --input 'nope://bucket/x\.tar'"),
    ("", r"^empty --input$"),  # was taken as the current directory
])
def test_bad_specs_raise_one_clear_line(tmp_path: Path, spec: str, message: str) -> None:
    (tmp_path / "shards").mkdir()
    (tmp_path / "notes.csv").write_text("a,b\n")
    if spec and "://" not in spec:
        spec = f"{tmp_path}/{spec}"
    with pytest.raises(InputError, match=message) as raised:
        expand_inputs([spec])
    assert "\n" not in str(raised.value)
    with pytest.raises(InputError, match="no --input"):
        expand_inputs([])


def test_directory_input_walks_nested_folders(tmp_path: Path) -> None:
    root = tmp_path / "images"
    for relative in ("a.jpg", "sub/b.PNG", "sub/deeper/c.webp", "sub/d.avif", "sub/IMG_0001.HEIC", ".hidden/x.jpg",
                     "sub/._b.jpg"):
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(relative.encode())
    (root / "sub" / "b.txt").write_text("İki sarı yıldız", encoding="utf-8")
    (root / "sub" / "b.json").write_text('{"w": 1}')
    (root / "notes.md").write_text("not an image")

    shards = expand_inputs([str(root) + "/"])
    assert shards == [Shard(str(root), FOLDER)]
    records = read_all(shards[0].url, FOLDER)
    keys = ["a.jpg", "sub/IMG_0001.HEIC", "sub/b.PNG", "sub/d.avif", "sub/deeper/c.webp"]
    assert [r["key"] for r in records] == keys  # HEIC is a sample too: a row saying it cannot be decoded
    assert [r["image"] for r in records] == [key.encode() for key in keys]
    assert {r["source"] for r in records} == {str(root)}
    assert [r["original_text"] for r in records] == [None, None, "İki sarı yıldız", None, None]
    assert records[2]["meta"] == '{"w": 1}'


def test_directory_without_images_is_refused_with_a_hint(tmp_path: Path) -> None:
    write_tar(tmp_path / "out" / "00000.tar", [("k.jpg", b"x")])
    with pytest.raises(InputError, match=r"no image files in directory .*out; it holds 1 \.tar/\.parquet"):
        expand_inputs([str(tmp_path / "out")])


def test_file_and_memory_urls(tmp_path: Path, memfs: fsspec.AbstractFileSystem) -> None:
    local = write_tar(tmp_path / "local.tar", [("k.jpg", b"local")])
    assert expand_inputs([f"file://{local}"]) == [Shard(str(local), WEBDATASET)]

    for i in (1, 0):
        memfs.pipe(f"/bucket/shards/{i:05d}.tar", tar_bytes([(f"s{i}.jpg", bytes([i]))]))
    memfs.pipe("/bucket/folder/x/y.png", b"png")
    shards = expand_inputs(["memory://bucket/shards/*.tar", "memory://bucket/shards/{00000..00001}.tar",
                            "memory://bucket/folder"])
    assert shards == [Shard("memory:///bucket/shards/00000.tar", WEBDATASET),
                      Shard("memory:///bucket/shards/00001.tar", WEBDATASET),
                      Shard("memory:///bucket/folder", FOLDER)]
    assert [(r["key"], r["image"], r["source"]) for r in read_all(shards[1].url, WEBDATASET)] == [
        ("s1", b"\x01", "memory:///bucket/shards/00001.tar")]
    assert [(r["key"], r["image"]) for r in read_all(shards[2].url, FOLDER)] == [("x/y.png", b"png")]
    with pytest.raises(InputError, match=r"shard missing: memory://bucket/shards/00002\.tar"):
        expand_inputs(["memory://bucket/shards/{00000..00002}.tar"])


# ------------------------------------------------------------------------------------------ tar shards


def test_key_rule_is_webdatasets() -> None:
    from webdataset.tariterators import base_plus_ext

    for name in ("00000.jpg", "dir/00000.seg.png", "a.b/c.d.JPG", "./0001.txt", "x/.hid.jpg", "noext", "a.b/c"):
        assert _split_key(name) == base_plus_ext(name), name


def test_img2dataset_layout(tmp_path: Path) -> None:
    shard = write_tar(tmp_path / "00000.tar", [
        ("00000.jpg", b"jpeg-0"), ("00000.txt", "Kırmızı bir daire".encode()), ("00000.json", b'{"url": "u0"}'),
        ("00001.txt", b"caption without image"), ("00001.json", b"{}"),
        ("00002.cls", b"3"), ("00002.webp", b"webp-2"), ("00002.npy", b"\x93NUMPY"),
        ("00003.png", b"png-3"), ("00003.JPG", b"jpg-3"),  # both: jpg preferred, whatever the member order
        ("00004.jpg", b"jpeg-4"), ("00004.txt", b"caf\xe9 \xff"),  # Latin-1: the Turkish code page reads it alike
        ("sub/00005.jpg", b"jpeg-5"),
        ("README", b"a member without an extension is not a sample"),
    ])
    records = read_all(str(shard), WEBDATASET)
    assert [(r["key"], r["status"]) for r in records] == [
        ("00000", "ok"), ("00001", "no_image"), ("00002", "ok"), ("00003", "ok"), ("00004", "ok"),
        ("sub/00005", "ok")]
    assert records[0] == {"key": "00000", "source": str(shard), "image": b"jpeg-0",
                          "original_text": "Kırmızı bir daire", "meta": '{"url": "u0"}', "status": "ok", "error": None}
    assert records[1]["image"] is None and records[1]["original_text"] == "caption without image"
    assert "txt, json" in records[1]["error"]
    assert records[2]["image"] == b"webp-2" and records[2]["original_text"] is None
    assert records[3]["image"] == b"jpg-3"
    assert records[4]["original_text"] == "café ÿ"


def test_key_reappearing_later_is_reported_not_merged(tmp_path: Path) -> None:
    shard = write_tar(tmp_path / "s.tar", [("a.jpg", b"a"), ("b.jpg", b"b"), ("a.txt", b"late caption")])
    records = read_all(str(shard), WEBDATASET)
    assert [(r["key"], r["status"]) for r in records] == [("a", "ok"), ("b", "ok"), ("a", "split_sample")]
    assert records[0]["original_text"] is None and records[2]["image"] is None
    assert "not contiguous" in records[2]["error"]


# Each sample is two members of 512 header + 1024 data bytes: 3072 bytes per sample.
@pytest.mark.parametrize("cut", [
    pytest.param(None, id="half"),
    pytest.param(3 * 3072, id="at-a-member-boundary"),  # tarfile alone would call this a clean end
    pytest.param(3 * 3072 + 100, id="inside-a-header"),  # ...and this too
    pytest.param(3 * 3072 + 512 + 300, id="inside-member-data"),
])
def test_truncated_tar_yields_complete_samples_then_one_error(tmp_path: Path, cut: int | None) -> None:
    members = [(f"{i:05d}.{ext}", bytes([i]) * 700) for i in range(10) for ext in ("jpg", "txt")]
    full = write_tar(tmp_path / "full.tar", members)
    truncated = tmp_path / "cut.tar"
    data = full.read_bytes()
    truncated.write_bytes(data[: len(data) // 2 if cut is None else cut])

    complete = read_all(str(full), WEBDATASET)
    assert [r["status"] for r in complete] == ["ok"] * 10
    records = read_all(str(truncated), WEBDATASET)
    *ok, last = records
    assert 0 < len(ok) < 10
    assert [(r["key"], r["image"], r["original_text"]) for r in ok] == [
        (r["key"], r["image"], r["original_text"]) for r in complete[: len(ok)]]
    assert last["status"] == "truncated_shard" and last["key"] == f"{truncated}#truncated_shard"
    assert last["image"] is None and f"after {len(ok)} complete samples" in last["error"]


def test_a_file_that_is_not_a_tar_is_one_unreadable_record(tmp_path: Path) -> None:
    fake = tmp_path / "fake.tar"
    fake.write_text("this is a text file, not a tar archive\n" * 50)
    assert expand_inputs([str(fake)]) == [Shard(str(fake), WEBDATASET)]  # listing does not read the data
    records = read_all(str(fake), WEBDATASET)
    assert [(r["key"], r["status"]) for r in records] == [(f"{fake}#unreadable_shard", "unreadable_shard")]


class PipeFileSystem(fsspec.AbstractFileSystem):
    """An fsspec filesystem whose files are the read ends of OS pipes: no seeking, no size, no rereading,
    like a socket to an object store."""

    protocol = "testpipe"
    pipes: ClassVar[dict[str, int]] = {}

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> BinaryIO:
        return os.fdopen(self.pipes.pop(path), "rb")


def test_tar_is_read_as_a_stream() -> None:
    # The writer holds back the second half of the shard until the test has the first record: a reader
    # that needed the whole shard first would only get it after the writer's timeout.
    data = tar_bytes([(f"{i:05d}.jpg", bytes([i]) * 50_000) for i in range(20)])
    fsspec.register_implementation(PipeFileSystem.protocol, PipeFileSystem, clobber=True)
    read_end, write_end = os.pipe()
    PipeFileSystem.pipes["stream.tar"] = read_end
    release = threading.Event()
    sent = {"second_half": False}

    def writer() -> None:
        with os.fdopen(write_end, "wb") as pipe:
            pipe.write(data[: len(data) // 2])
            pipe.flush()
            release.wait(timeout=5)
            sent["second_half"] = True
            pipe.write(data[len(data) // 2:])

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        samples = read_samples(Shard("testpipe://stream.tar", WEBDATASET))
        assert isinstance(samples, Iterator)
        first = next(samples)
        assert first["key"] == "00000" and first["image"] == bytes(50_000) and not sent["second_half"]
    finally:
        release.set()
    assert [r["key"] for r in samples] == [f"{i:05d}" for i in range(1, 20)]
    thread.join()


def test_oversized_tar_members_become_too_large_rows_without_being_read(monkeypatch) -> None:
    monkeypatch.setattr(source_records, "MAX_IMAGE_BYTES", 1000)
    monkeypatch.setattr(source_records, "MAX_TEXT_BYTES", 100)
    read = []
    member_bytes = webdataset._member_bytes
    monkeypatch.setattr(webdataset, "_member_bytes", lambda tar, member: read.append(member.name) or member_bytes(
        tar, member))
    data = tar_bytes([("big.jpg", b"j" * 5000), ("big.txt", b"a caption"),
                      ("wordy.jpg", b"j" * 10), ("wordy.json", b"{" * 500),
                      ("fine.jpg", b"j" * 1000), ("fine.txt", b"t" * 100)])
    fsspec.filesystem("memory").pipe("/oversized.tar", data)
    try:
        records = read_all("memory://oversized.tar", WEBDATASET)
    finally:
        fsspec.filesystem("memory").rm("/oversized.tar")
    assert [(r["key"], r["status"]) for r in records] == [("big", "too_large"), ("wordy", "too_large"),
                                                         ("fine", "ok")]
    assert records[0]["error"] == "big.jpg is 5,000 bytes, over the limit of 1,000; not read"
    assert records[0]["original_text"] == "a caption" and records[0]["image"] is None
    assert "wordy.json is 500 bytes" in records[1]["error"]
    assert records[2]["image"] == b"j" * 1000 and records[2]["original_text"] == "t" * 100
    assert read == ["big.txt", "wordy.jpg", "fine.jpg", "fine.txt"]


def test_member_names_that_are_not_utf8_give_storable_keys_and_errors(tmp_path: Path) -> None:
    """tarfile decodes such names with surrogate escapes, which Arrow refuses: keys and error texts carry the
    bytes as backslash escapes, so names that differ only in such a byte (Latin-1 "café", "cafè") stay two keys."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT, errors="surrogateescape") as tar:
        for name, data in (("k\udcff.jpg", b"image"), ("k\udcfe.jpg", b"image"), ("m.jp\udcfeg", b"no image suffix")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (tmp_path / "names.tar").write_bytes(buffer.getvalue())
    records = read_all(str(tmp_path / "names.tar"), WEBDATASET)
    assert [(r["key"], r["status"]) for r in records] == [("k\\xff", "ok"), ("k\\xfe", "ok"), ("m", "no_image")]
    assert "jp\\xfeg" in records[2]["error"]
    pa.table({"key": [r["key"] for r in records], "error": [r["error"] for r in records]})  # Arrow takes them


def test_tar_links_are_rows_never_followed(tmp_path: Path) -> None:
    """A link member named like an image is a sample that cannot be read (a row saying so), never a path the
    reader follows; a link beside a real image, or a linked caption, is ignored."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        def add(name: str, data: bytes | None = None, link: str | None = None, kind: bytes = tarfile.SYMTYPE):
            info = tarfile.TarInfo(name)
            if link is None:
                info.size = len(data or b"")
                tar.addfile(info, io.BytesIO(data or b""))
            else:
                info.type, info.linkname = kind, link
                tar.addfile(info)
        add("a.jpg", link="../../etc/passwd")
        add("b.jpg", b"b-image")
        add("b.png", link="a.jpg")
        add("c.jpg", link="b.jpg", kind=tarfile.LNKTYPE)
        add("d.txt", link="/etc/hostname")
        add("d.jpg", b"d-image")
    (tmp_path / "links.tar").write_bytes(buffer.getvalue())
    records = read_all(str(tmp_path / "links.tar"), WEBDATASET)
    assert [(r["key"], r["status"], r["image"], r["original_text"]) for r in records] == [
        ("a", "unsupported", None, None), ("b", "ok", b"b-image", None), ("c", "unsupported", None, None),
        ("d", "ok", b"d-image", None)]
    assert records[0]["error"] == "a.jpg is a symbolic link in the tar; links are not followed"
    assert records[2]["error"] == "c.jpg is a hard link in the tar; links are not followed"


def test_folder_entries_that_are_not_regular_files_or_too_large_are_rows_not_reads(tmp_path: Path,
                                                                                   monkeypatch) -> None:
    """A FIFO or a link to a device named like an image would block or read forever; a huge file would be
    read whole. Each becomes one row saying why, and the run goes on."""
    monkeypatch.setattr(source_records, "MAX_IMAGE_BYTES", 1000)
    root = tmp_path / "images"
    root.mkdir()
    (root / "a.jpg").write_bytes(b"a")
    (root / "big.jpg").write_bytes(b"b" * 1001)
    (root / "device.jpg").symlink_to("/dev/null")
    os.mkfifo(root / "fifo.jpg")
    (root / "z.jpg").write_bytes(b"z")
    os.mkfifo(root / "z.txt")
    result: list[list[dict]] = []
    reader = threading.Thread(target=lambda: result.append(read_all(str(root), FOLDER)), daemon=True)
    reader.start()
    reader.join(timeout=20)
    assert result, "reading the folder blocked"
    assert [(r["key"], r["status"]) for r in result[0]] == [
        ("a.jpg", "ok"), ("big.jpg", "too_large"), ("device.jpg", "unsupported"), ("fifo.jpg", "unsupported"),
        ("z.jpg", "unsupported")]
    assert result[0][2]["error"] == f"not a regular file: {root / 'device.jpg'}"
    assert result[0][4]["error"] == f"not a regular file: {root / 'z.txt'}"


# -------------------------------------------------------------------------------------- parquet shards


def test_parquet_binary_column_with_null_image_and_key_column(tmp_path: Path) -> None:
    path = tmp_path / "part.parquet"
    pq.write_table(pa.table({"key": [10, 11, 12], "jpg": [b"i0", None, b"i2"], "caption": ["bir", "iki", None],
                             "error_message": [None, "HTTP Error 404: Not Found", None]}), path)  # img2dataset's
    [shard] = expand_inputs([str(path)])
    records = read_all(shard.url, PARQUET)
    assert [(r["key"], r["image"], r["original_text"], r["status"]) for r in records] == [
        ("10", b"i0", "bir", "ok"), ("11", None, "iki", "no_image"), ("12", b"i2", None, "ok")]
    assert records[1]["error"] == "image column 'jpg' is null (error_message: HTTP Error 404: Not Found)"
    assert {r["source"] for r in records} == {str(path)}


def test_parquet_text_column_is_found_in_any_case_caption_first(tmp_path: Path) -> None:
    path = tmp_path / "laion.parquet"
    pq.write_table(pa.table({"TEXT": ["bir kedi"], "URL": ["http://x"], "jpg": [b"i0"]}), path)
    assert read_all(str(path), PARQUET)[0]["original_text"] == "bir kedi"
    pq.write_table(pa.table({"text": ["alt"], "Caption": ["başlık"], "jpg": [b"i0"]}), path)
    assert read_all(str(path), PARQUET)[0]["original_text"] == "başlık"


def test_parquet_that_datasets_made_of_a_webdataset_keeps_its_keys_and_texts(tmp_path: Path) -> None:
    """`load_dataset("webdataset", ...).to_parquet()` names columns after the members (jpg, txt, json) and
    keeps the sample key in __key__: keys became positional and the KEY.txt text was dropped."""
    path = tmp_path / "from-wds.parquet"
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pq.write_table(pa.table({"jpg": pa.array([{"bytes": b"i0", "path": "a.jpg"}], image_type), "txt": ["bir kuş"],
                             "__key__": ["000123"], "__url__": ["shard-0.tar"]}), path)
    [record] = read_all(str(path), PARQUET)
    assert (record["key"], record["original_text"]) == ("000123", "bir kuş")
    # a key column the user names still wins, and a real "key" column over __key__
    assert read_all(str(path), PARQUET, key_column="__url__")[0]["key"] == "shard-0.tar"
    pq.write_table(pa.table({"jpg": [b"i0"], "key": ["k"], "__key__": ["hf"]}), path)
    assert read_all(str(path), PARQUET)[0]["key"] == "k"


def test_parquet_caption_list_column_gives_every_caption_as_a_reference_in_nfc(tmp_path: Path) -> None:
    """Hugging Face datasets keep a COCO image's captions as list<string>: all are references, the first is
    the sample's text; decomposed (NFD) Turkish letters become the composed form generated captions use."""
    path = tmp_path / "coco.parquet"
    nfd = unicodedata.normalize("NFD", "küçük bir kuş")
    pq.write_table(pa.table({"image": [b"i0", b"i1"], "captions": [[nfd, "", "iki kedi"], []]}), path)
    first, second = read_all(str(path), PARQUET)
    assert first["original_text"] == "küçük bir kuş"
    assert reference_captions(first, record_metadata(first)) == ["küçük bir kuş", "iki kedi"]
    assert second["original_text"] is None and reference_captions(second, record_metadata(second)) == []


def test_parquet_huggingface_image_struct_and_missing_key_column(tmp_path: Path) -> None:
    path = tmp_path / "train-00000.parquet"
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    images = [{"bytes": bytes([i]), "path": None} for i in range(150)]
    images[70] = {"bytes": None, "path": "elsewhere/70.jpg"}
    images[71] = None
    table = pa.table({"image": pa.array(images, type=image_type), "text": [f"t{i}" for i in range(150)]})
    pq.write_table(table, path, row_group_size=50)  # several row groups and batches
    [shard] = expand_inputs([str(path)])
    records = read_all(shard.url, PARQUET)
    assert [r["key"] for r in records] == [f"train-00000/{i}" for i in range(150)]
    assert [r["status"] for r in records].count("ok") == 148
    assert records[149]["image"] == bytes([149]) and records[149]["original_text"] == "t149"
    assert records[70]["status"] == "no_image" and "elsewhere/70.jpg" in records[70]["error"]
    assert records[71]["status"] == "no_image"


def test_parquet_image_column_is_checked_at_expand_time(tmp_path: Path) -> None:
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"key": ["a"], "jpg": [1], "pixels": [b"x"]}), path)
    with pytest.raises(InputError, match=r"image column 'jpg' in .*bad\.parquet has type int64"):
        expand_inputs([str(path)])
    with pytest.raises(InputError, match=r"image column 'photo' not found in .*bad\.parquet \(columns: key, jpg"):
        expand_inputs([str(path)], image_column="photo")
    [shard] = expand_inputs([str(path)], image_column="pixels")
    assert [(r["key"], r["image"]) for r in read_all(shard.url, PARQUET, image_column="pixels")] == [("a", b"x")]
    # Read directly (schema changed after listing): every row is reported, none raises.
    assert [(r["key"], r["status"]) for r in read_all(shard.url, PARQUET)] == [("a", "unsupported")]


def test_corrupt_parquet_is_one_unreadable_record(tmp_path: Path) -> None:
    path = tmp_path / "corrupt.parquet"
    path.write_bytes(b"PAR1 not really parquet")
    [shard] = expand_inputs([str(path)])
    assert [r["status"] for r in read_all(shard.url, PARQUET)] == ["unreadable_shard"]


# ------------------------------------------------------------------------- shards written by other tools


def test_tars_from_other_tools_hidden_members_dotted_names_repeats_and_text_files(tmp_path: Path) -> None:
    """macOS litter is skipped, an image is found by its last extension (webdataset's key ends at the first
    dot), a repeated member is a sample of its own (the run marks its key a duplicate), `echo`'s newline goes."""
    shard = write_tar(tmp_path / "s.tar", [
        ("__MACOSX/._a.jpg", b"fork"), ("._a.jpg", b"fork"), ("a.jpg", b"a"), ("a.txt", b"caption a\n"),
        ("x.y.jpg", b"xy"), ("x.y.txt", b"not KEY.txt"),
        ("m.seg.png", b"mask"), ("m.jpg", b"m"),  # a plain image suffix wins over a dotted one
        ("d.jpg", b"d1"), ("d.txt", b"first"), ("d.jpg", b"d2"),
        (".hidden/e.jpg", b"e"), ("./f.jpg", b"f"),
    ])
    records = read_all(str(shard), WEBDATASET)
    assert [(r["key"], r["image"], r["original_text"], r["status"]) for r in records] == [
        ("a", b"a", "caption a", "ok"), ("x", b"xy", None, "ok"), ("m", b"m", None, "ok"),
        ("d", b"d1", "first", "ok"), ("d", b"d2", None, "ok"), ("./f", b"f", None, "ok")]


def test_concatenated_tars_report_the_data_after_the_first_end(tmp_path: Path) -> None:
    first, second = tar_bytes([("a.jpg", b"a")]), tar_bytes([("b.jpg", b"b")])
    (tmp_path / "joined.tar").write_bytes(first + second)
    records = read_all(str(tmp_path / "joined.tar"), WEBDATASET)
    assert [(r["key"], r["status"]) for r in records] == [
        ("a", "ok"), (f"{tmp_path / 'joined.tar'}#trailing_data", "trailing_data")]
    assert "cat" in records[1]["error"]
    (tmp_path / "padded.tar").write_bytes(first + bytes(20480))  # zero padding past the end is no data
    assert [r["status"] for r in read_all(str(tmp_path / "padded.tar"), WEBDATASET)] == ["ok"]


def _compressed_tar(path: Path, mode: str, key: str, size: int = 1) -> bytes:
    with tarfile.open(path, mode) as tar:
        info = tarfile.TarInfo(f"{key}.jpg")
        info.size = size
        tar.addfile(info, io.BytesIO(key.encode() * size))
    return path.read_bytes()


@pytest.mark.parametrize("suffix,mode", [(".tar.gz", "w:gz"), (".tar.bz2", "w:bz2"), (".tar.xz", "w:xz")])
def test_compressed_tars(tmp_path: Path, suffix: str, mode: str) -> None:
    _compressed_tar(tmp_path / f"s{suffix}", mode, "k")
    [shard] = expand_inputs([str(tmp_path / "*")])
    assert shard.kind == WEBDATASET and [(r["key"], r["image"]) for r in read_all(shard.url, WEBDATASET)] == [
        ("k", b"k")]


@pytest.mark.parametrize("size", [1, 300_000])  # within one read of the file, and across many
@pytest.mark.parametrize("suffix,mode", [(".tar.gz", "w:gz"), (".tar.bz2", "w:bz2"), (".tar.xz", "w:xz")])
def test_compressed_tars_joined_with_cat_report_what_was_not_read(tmp_path: Path, suffix: str, mode: str,
                                                                  size: int) -> None:
    """tarfile stops at the end of the first compressed stream, so the second tar of `cat a.tar.gz b.tar.gz`
    vanished without a row, where a joined plain tar gets its trailing_data row."""
    first = _compressed_tar(tmp_path / f"a{suffix}", mode, "a", size)
    second = _compressed_tar(tmp_path / f"b{suffix}", mode, "b", size)
    joined, padded = tmp_path / f"joined{suffix}", tmp_path / f"padded{suffix}"
    joined.write_bytes(first + second)
    padded.write_bytes(first + bytes(20480))  # zeros after the compressed stream are no data
    assert [(r["key"], r["status"]) for r in read_all(str(joined), WEBDATASET)] == [
        ("a", "ok"), (f"{joined}#trailing_data", "trailing_data")]
    assert [r["status"] for r in read_all(str(padded), WEBDATASET)] == ["ok"]
    assert [r["status"] for r in read_all(str(tmp_path / f"a{suffix}"), WEBDATASET)] == ["ok"]


def test_folder_follows_links_to_files_and_finds_upper_case_caption_files(tmp_path: Path) -> None:
    """A Hugging Face hub snapshot holds links into its blob store; a camera card says C.JPG and C.TXT."""
    blobs, root = tmp_path / "blobs", tmp_path / "snapshot"
    blobs.mkdir()
    root.mkdir()
    (blobs / "1f3a").write_bytes(b"linked image")
    (blobs / "2b4c").write_bytes(b"linked caption\n")
    (root / "a.jpg").symlink_to(blobs / "1f3a")
    (root / "a.txt").symlink_to(blobs / "2b4c")
    (root / "broken.jpg").symlink_to(blobs / "missing")
    (root / "C.JPEG").write_bytes(b"c")
    (root / "C.TXT").write_bytes(b"upper")
    records = read_all(str(root), FOLDER)
    assert [(r["key"], r["image"], r["original_text"], r["status"]) for r in records] == [
        ("C.JPEG", b"c", "upper", "ok"), ("a.jpg", b"linked image", "linked caption", "ok"),
        ("broken.jpg", None, None, "read_error")]


def test_globs_skip_hidden_files_unless_the_pattern_names_them(tmp_path: Path) -> None:
    write_tar(tmp_path / "a.tar", [("k.jpg", b"k")])
    write_tar(tmp_path / "._a.tar", [("k.jpg", b"k")])  # a macOS resource fork copied along
    write_tar(tmp_path / ".cache" / "b.tar", [("k.jpg", b"k")])
    assert [s.url for s in expand_inputs([str(tmp_path / "*.tar")])] == [str(tmp_path / "a.tar")]
    assert [s.url for s in expand_inputs([str(tmp_path / "**" / "*.tar")])] == [str(tmp_path / "a.tar")]
    assert [s.url for s in expand_inputs([str(tmp_path / ".*.tar")])] == [str(tmp_path / "._a.tar")]
    # one shard spelt two ways is read once
    same = [str(tmp_path / "a.tar"), f"{tmp_path}/.cache/../a.tar", f"{tmp_path}//a.tar"]
    assert [s.url for s in expand_inputs(same)] == [str(tmp_path / "a.tar")]


def test_parquet_from_other_tools(tmp_path: Path) -> None:
    """Hugging Face's converted layout (0000.parquet in each split's folder) keeps keys unique; a shard of failed
    downloads (pandas writes its all-None image column as type null), a dictionary-encoded image column and
    pandas' float keys are read; a key column the user names must exist."""
    for split in ("train", "test"):
        (tmp_path / "default" / split).mkdir(parents=True)
        pq.write_table(pa.table({"jpg": [b"i0", b"i1"]}), tmp_path / "default" / split / "0000.parquet")
    shards = expand_inputs([str(tmp_path / "default" / "*" / "*.parquet")])
    keys = [r["key"] for shard in shards for r in read_samples(shard)]
    assert keys == ["test/0000/0", "test/0000/1", "train/0000/0", "train/0000/1"]
    [one] = expand_inputs([str(tmp_path / "default" / "test" / "0000.parquet")])
    assert [r["key"] for r in read_samples(one)] == ["0000/0", "0000/1"]  # a single file: its stem

    pq.write_table(pa.table({"key": pa.array([1.0, None, 3.0]), "jpg": pa.nulls(3),
                             "webp": pa.array([b"w", b"w", b"w"]).dictionary_encode()}), tmp_path / "odd.parquet")
    [odd] = expand_inputs([str(tmp_path / "odd.parquet")])
    assert [(r["key"], r["status"]) for r in read_samples(odd)] == [
        ("1", "no_image"), ("odd/1", "no_image"), ("3", "no_image")]
    [webp] = expand_inputs([str(tmp_path / "odd.parquet")], image_column="webp")
    assert [r["image"] for r in read_samples(webp, image_column="webp")] == [b"w"] * 3
    with pytest.raises(InputError, match=r"key column 'image_id' not found in .*odd\.parquet"):
        expand_inputs([str(tmp_path / "odd.parquet")], key_column="image_id")


class _NoCredentials(fsspec.AbstractFileSystem):
    """A store that refuses every call the way s3fs does without credentials (botocore's error is no OSError)."""

    protocol = "nocreds"

    def info(self, path, **kwargs):
        raise RuntimeError("Unable to locate credentials")

    ls = info


def test_a_storage_backend_error_is_one_usage_line(tmp_path: Path) -> None:
    fsspec.register_implementation("nocreds", _NoCredentials, clobber=True)
    for spec in ("nocreds://bucket/a.tar", "nocreds://bucket/*.tar"):
        with pytest.raises(InputError, match=rf"^cannot read --input '{re.escape(spec)}': RuntimeError: Unable to "):
            expand_inputs([spec])
