"""Caption files as sample records: the forms Turkish MS COCO and its kin are distributed in.

- COCO's captions JSON: "images" [{id, file_name}] + "annotations" [{image_id, caption}];
- Karpathy's split JSON: "images" [{filepath, filename, split, sentences: [{raw}]}], of which only the
  asked-for splits are read (training: train + restval; evaluation: test);
- a JSON array, or JSON Lines, of {"image": path, "caption" | "captions": ..., "negatives": [...]}.

Each image becomes one record of `pipeline.io.sources` shape (key = the image path as the file writes
it), its captions in `meta` as KEY.json would hold them, so training and evaluation read both kinds of
input alike. Relative image paths are taken from `image_root`, else from the caption file's folder. An
entry that names no image or no caption is not a sample: it is skipped with a warning.
"""

from __future__ import annotations

import glob
import itertools
import json
import logging
from collections.abc import Iterable, Iterator
from typing import Any

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from pipeline.io.sources import InputError, Shard, expand_inputs, read_image_file, read_samples, text_list
from pipeline.text import decode_text, one_line

log = logging.getLogger(__name__)

CAPTION_FILE_SUFFIXES = (".jsonl", ".json")
TRAIN_SPLITS = ("train", "restval")  # Karpathy's: val and test are held out
TEST_SPLITS = ("test",)


def is_caption_file(spec: str) -> bool:
    return spec.lower().endswith(CAPTION_FILE_SUFFIXES)


def find_caption_files(specs: list[str]) -> list[str]:
    """Caption file paths or URLs, globs expanded; InputError (one line) for one that names nothing."""
    found = []
    for spec in specs:
        try:
            fs, path = url_to_fs(spec)
            matches = sorted(fs.glob(path)) if glob.has_magic(path) else [path] if fs.isfile(path) else []
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot access caption file {spec}: {one_line(exc)}") from None
        if not matches:
            raise InputError(f"no caption file matches {spec}")
        found += [match if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(match) for match in matches]
    return found


def expand_labelled_inputs(specs: list[str]) -> tuple[list[str], list[Shard]]:
    """The caption files and the shards among training or evaluation --data specs, both listed and
    checked now, before any work (bad usage is one InputError)."""
    others = [spec for spec in specs if not is_caption_file(spec)]
    caption_files = find_caption_files([spec for spec in specs if is_caption_file(spec)])
    return caption_files, expand_inputs(others) if others else []


def read_labelled_inputs(caption_files: list[str], shards: list[Shard], image_root: str | None = None,
                         splits: tuple[str, ...] = TRAIN_SPLITS) -> Iterator[dict]:
    """Every sample record: the caption files' images, then the shards' samples."""
    for spec in caption_files:
        yield from read_caption_file(spec, image_root, splits)
    for shard in shards:
        yield from read_samples(shard)


def read_caption_file(spec: str, image_root: str | None = None,
                      splits: tuple[str, ...] = TRAIN_SPLITS) -> Iterator[dict]:
    """The sample records of the images a caption file names, in its order."""
    root = (image_root or (spec.rsplit("/", 1)[0] if "/" in spec else ".")).rstrip("/")
    for image, references, negatives in caption_entries(spec, splits):
        url = image if "://" in image or image.startswith("/") else f"{root}/{image}"
        meta = json.dumps({"captions": references, "negatives": negatives}, ensure_ascii=False)
        yield read_image_file(url, image, spec, meta=meta)


def caption_entries(spec: str, splits: tuple[str, ...] = TRAIN_SPLITS) -> Iterator[tuple[str, list[str], list[str]]]:
    """(image path as the file writes it, references, hard negatives) of every usable entry; no image is read."""
    with fsspec.open(spec, "rb") as handle:
        first = handle.readline()
        head = _json_or_none(first)
        if isinstance(head, dict) and not _is_annotation_document(head):  # JSON Lines: streamed
            yield from _objects(spec, enumerate(itertools.chain([first], handle), 1))
            return
        rest = handle.read()
    document = head if head is not None else _json_or_none(first + rest)
    if document is None:  # JSON Lines whose first line is broken
        yield from _objects(spec, enumerate((first + rest).splitlines(), 1))
    elif _is_annotation_document(document):
        yield from _annotated_images(spec, document, splits)
    else:
        entries = document if isinstance(document, list) else [document]
        yield from _objects(spec, ((f"entry {n}", entry) for n, entry in enumerate(entries, 1)))


def _json_or_none(data: bytes) -> Any:
    try:
        return json.loads(decode_text(data))
    except (json.JSONDecodeError, RecursionError):
        return None


def _is_annotation_document(document: Any) -> bool:
    return isinstance(document, dict) and isinstance(document.get("images"), list)


def _objects(spec: str, rows: Iterable[tuple[Any, Any]]) -> Iterator[tuple[str, list[str], list[str]]]:
    """Entries from objects {"image", "caption" | "captions", "negatives"}, given as (line number, line
    bytes) or (name, parsed object)."""
    for where, row in rows:
        if isinstance(row, bytes):
            if not row.strip():
                continue
            where, row = f"line {where}", _json_or_none(row)
        references = (text_list(row.get("captions")) or text_list([row.get("caption")])
                      if isinstance(row, dict) else [])
        if not references or not isinstance(row.get("image"), str) or not row["image"]:
            log.warning("skipping %s %s: not an object with an image path and a caption", spec, where)
            continue
        yield row["image"], references, text_list(row.get("negatives"))


def _annotated_images(spec: str, document: dict, splits: tuple[str, ...]
                      ) -> Iterator[tuple[str, list[str], list[str]]]:
    images = [image for image in document["images"] if isinstance(image, dict)]
    if "annotations" in document:  # COCO: each caption is an annotation pointing at an image id
        captions: dict[Any, list[Any]] = {}
        annotations = document["annotations"] if isinstance(document["annotations"], list) else []
        for annotation in annotations:
            if isinstance(annotation, dict) and isinstance(annotation.get("image_id"), int | str):
                captions.setdefault(annotation["image_id"], []).append(annotation.get("caption"))
        rows = [(image.get("file_name"), captions.get(image.get("id"), [])) for image in images
                if isinstance(image.get("id"), int | str)]
    else:  # Karpathy: the sentences inside each image, which names its split
        chosen = [image for image in images if image.get("split", splits[0]) in splits]
        if len(chosen) < len(images):
            log.info("%s: reading its %s split(s), %d of %d images", spec, "/".join(splits), len(chosen), len(images))
        rows = [("/".join(part for part in (image.get("filepath"), image.get("filename")) if isinstance(part, str)),
                 [s.get("raw") for s in image.get("sentences", []) if isinstance(s, dict)]
                 if isinstance(image.get("sentences"), list) else [])
                for image in chosen]
    skipped = 0
    for path, references in rows:
        references = text_list(references)
        if isinstance(path, str) and path and references:
            yield path, references, []
        else:
            skipped += 1
    if skipped:
        log.warning("%s: %d images without a file name or a caption skipped", spec, skipped)
