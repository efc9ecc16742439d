"""WebDataset tars (img2dataset's layout; gzip, bzip2 and xz too) -> sample records, streamed member by member."""

from __future__ import annotations

import contextlib
import itertools
import lzma
import tarfile
import zlib
from collections.abc import Iterable, Iterator

import fsspec

from pipeline.io.sources.records import (
    _NO_IMAGE_RANK,
    _hidden,
    _image_rank,
    _over_limit,
    _shard_error,
    _split_key,
    raise_if_transient,
    sample_record,
)
from pipeline.text import decode_text

_SCAN_CHUNK = 1 << 16


class _TrackingTarFile(tarfile.TarFile):
    """tarfile ends iteration silently when a header after the first member is cut short or garbled,
    exactly as for a proper end-of-archive block. `end_error` keeps the header error that ended the
    iteration, so a truncated shard is reported instead of silently read as a shorter one."""

    end_error: tarfile.HeaderError | None = None


class _TrackingTarInfo(tarfile.TarInfo):
    @classmethod
    def fromtarfile(cls, tar: _TrackingTarFile) -> tarfile.TarInfo:  # type: ignore[override]
        try:
            return super().fromtarfile(tar)
        except tarfile.HeaderError as exc:
            tar.end_error = exc
            raise


class _TarSample:
    """The members of one key, holding only what a record needs (one image, txt, json)."""

    def __init__(self, key: str, split: bool) -> None:
        self.key = key
        self.split = split  # the key was already seen earlier in this tar
        self.suffixes: list[str] = []
        self.image_rank = _NO_IMAGE_RANK
        self.image: bytes | None = None
        self.text: bytes | None = None
        self.meta: bytes | None = None
        self.too_large: str | None = None
        self.not_a_file: str | None = None  # an image member that is a link or device: never followed

    def repeats(self, suffix: str) -> bool:
        return suffix in self.suffixes

    def add(self, suffix: str, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        self.suffixes.append(suffix)
        if self.split:
            return
        rank = _image_rank(suffix)
        if not member.isfile():
            if rank is not None and self.not_a_file is None:
                kind = "a symbolic link" if member.issym() else "a hard link" if member.islnk() else "not a file"
                self.not_a_file = f"{member.name} is {kind} in the tar; links are not followed"
            return
        # Members are read only when used; a repeated suffix keeps the first copy.
        if not ((rank is not None and rank < self.image_rank) or (suffix == "txt" and self.text is None)
                or (suffix == "json" and self.meta is None)):
            return
        too_large = _over_limit(f"{self.key}.{suffix}", member.size, image=rank is not None)
        if too_large:
            self.too_large = self.too_large or too_large
            return
        data = _member_bytes(tar, member)
        if rank is not None:
            self.image, self.image_rank = data, rank
        elif suffix == "txt":
            self.text = data
        else:
            self.meta = data

    def record(self, url: str) -> dict:
        found = ", ".join(self.suffixes)
        if self.split:
            return sample_record(self.key, url, status="split_sample",
                           error=f"members of key {self.key!r} are not contiguous in the tar; this later group "
                                 f"({found}) was not merged with the earlier one")
        # `echo caption > KEY.txt` ends in \n; bytes no encoding reads are U+FFFD, the row stays ok (its image is)
        text = None if self.text is None else decode_text(self.text).strip()
        meta = None if self.meta is None else decode_text(self.meta)
        if self.too_large:
            return sample_record(self.key, url, original_text=text, meta=meta, status="too_large", error=self.too_large)
        if self.image is None and self.not_a_file:
            return sample_record(self.key, url, original_text=text, meta=meta, status="unsupported",
                                 error=self.not_a_file)
        if self.image is None:
            return sample_record(self.key, url, original_text=text, meta=meta, status="no_image",
                           error=f"no image member for key {self.key!r} (members: {found})")
        return sample_record(self.key, url, image=self.image, original_text=text, meta=meta)


def _member_bytes(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    data = tar.extractfile(member)
    assert data is not None  # only regular files get here
    return data.read()


def read_tar(url: str) -> Iterator[dict]:
    with contextlib.ExitStack() as stack:
        try:
            raw = stack.enter_context(fsspec.open(url, "rb"))
            tar = stack.enter_context(_TrackingTarFile.open(fileobj=raw, mode="r|*", tarinfo=_TrackingTarInfo))
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise_if_transient(exc, url)
            yield _shard_error(url, "unreadable_shard", f"not a readable tar file: {exc}")
            return
        yield from _tar_samples(tar, url)


def _tar_samples(tar: _TrackingTarFile, url: str) -> Iterator[dict]:
    """Group consecutive members by key (webdataset's rule). Only the current sample is held in memory;
    the set of keys already seen is kept so that a key reappearing later is reported, not merged."""
    sample: _TarSample | None = None
    seen: set[str] = set()
    complete = 0
    problem: str | None = None
    try:
        while (member := tar.next()) is not None:
            tar.members = []  # stream mode still appends every TarInfo to .members: drop them, memory stays flat
            key, suffix = _split_key(member.name)
            if key is None or suffix is None or member.isdir() or _hidden(member.name):
                continue
            suffix = suffix.lower()
            # a repeated member (a second KEY.jpg right after the first) starts a sample of its own
            if sample is None or key != sample.key or sample.repeats(suffix):
                repeated = sample is not None and key == sample.key
                if sample is not None:
                    yield sample.record(url)
                    complete += 1
                sample = _TarSample(key, split=key in seen and not repeated)
                seen.add(key)
            sample.add(suffix, tar, member)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise_if_transient(exc, url)
        problem = str(exc)
    else:
        if isinstance(tar.end_error, tarfile.EmptyHeaderError):
            problem = "the archive ends without its end-of-archive blocks"
        elif not isinstance(tar.end_error, tarfile.EOFHeaderError):
            problem = f"bad header: {tar.end_error}"
    if problem is None:
        if sample is not None:
            yield sample.record(url)
        if _data_follows(tar, url):
            yield _shard_error(url, "trailing_data", "more data follows the tar's end-of-archive blocks (tars joined "
                                                     "with cat?); tar readers stop there, so it was not read")
        return
    # The sample being read when the data ended may be missing members, so it is not yielded as ok.
    dropped = f"; incomplete sample {sample.key!r} skipped" if sample is not None else ""
    yield _shard_error(url, "truncated_shard", f"tar is cut or corrupt after {complete} complete samples: "
                                               f"{problem}{dropped}")


def _data_follows(tar: tarfile.TarFile, url: str) -> bool:
    """Whether anything but zero padding follows the end-of-archive blocks (read until it does): in the tar
    stream, or for a compressed tar, after its compressed stream (a second one joined with cat), which
    tarfile's stream never returns."""
    stream = tar.fileobj
    decompressor = getattr(stream, "cmp", None)
    try:
        if decompressor is None:  # an uncompressed tar
            return _not_zeros(iter(lambda: stream.read(_SCAN_CHUNK), b""))
        raw_rest = iter(lambda: stream.fileobj.read(_SCAN_CHUNK), b"")
        # fed by hand: once its stream ends, tarfile's read would take the rest of the file into memory
        decompressed, stream.dbuf, raw, stream.buf = stream.dbuf, b"", stream.buf, b""
        while not decompressor.eof:
            if decompressed.strip(b"\0"):
                return True
            raw = raw or next(raw_rest, b"")
            if not raw:
                return False  # cut after the archive's end: nothing is lost
            decompressed, raw = decompressor.decompress(raw), b""
        after = decompressor.unused_data + raw
        if stream.comptype == "gz":  # tarfile inflates raw deflate data: gzip's 8-byte trailer is left over too
            while len(after) < 8 and (more := next(raw_rest, b"")):
                after += more
            after = after[8:]
        return _not_zeros(itertools.chain((decompressed, after), raw_rest))
    except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError) as exc:  # a damaged tail after the end
        raise_if_transient(exc, url)
        return False


def _not_zeros(chunks: Iterable[bytes]) -> bool:
    """Whether any chunk holds a byte other than zero padding (reading no further than that chunk)."""
    return any(chunk.strip(b"\0") for chunk in chunks)
