"""A bundle's bundle.json, read without building a model: what a run's driver needs (the file checks, the
identity it records, the facts it plans with) without importing torch, which only the model actors need."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from pipeline.io.digest import file_sha256
from pipeline.io.images import ImageSpec
from pipeline.models.errors import ModelLoadError
from pipeline.models.languages import Languages, of_manifest

BUNDLE_FILE = "bundle.json"
FORMAT = "clipcap-tr-bundle/1"
SAME_AS_ENCODER = "encoder"
FACTS = "facts"


@dataclass(frozen=True)
class BundleFacts:
    """What a run plans with, derived from the models and recorded in bundle.json when the bundle is saved:
    the image embedding's width, the encoder's input, the scorer's where it encodes images itself (else None),
    and the caption tokens the language model has room for after its prefix (None: no captioner, or no limit)."""

    embed_dim: int
    encoder_image: ImageSpec
    scorer_image: ImageSpec | None
    caption_tokens: int | None

    def to_json(self) -> dict[str, Any]:
        return {"embed_dim": self.embed_dim, "encoder_image": _model_input(self.encoder_image),
                "scorer_image": None if self.scorer_image is None else _model_input(self.scorer_image),
                "caption_tokens": self.caption_tokens}

    @classmethod
    def from_json(cls, entry: Any) -> BundleFacts:
        try:
            return cls(embed_dim=int(entry["embed_dim"]), encoder_image=_image_input(entry["encoder_image"]),
                       scorer_image=None if entry["scorer_image"] is None else _image_input(entry["scorer_image"]),
                       caption_tokens=None if entry["caption_tokens"] is None else int(entry["caption_tokens"]))
        except (TypeError, KeyError, ValueError) as exc:
            raise ModelLoadError(f"{BUNDLE_FILE}: invalid {FACTS!r} entry ({exc})") from None

    def check_max_new_tokens(self, max_new_tokens: int) -> None:
        """ValueError (one line) when captions of `max_new_tokens` would run past the LM's positions."""
        if self.caption_tokens is not None and max_new_tokens > self.caption_tokens:
            raise ValueError(f"--max-new-tokens {max_new_tokens} exceeds the {self.caption_tokens} positions the "
                             "model's language model has after its prefix")


def _model_input(spec: ImageSpec) -> dict[str, Any]:
    return {"size": spec.size, "interpolation": spec.interpolation}  # the pixel limit is the run's, not the model's


def _image_input(entry: dict[str, Any]) -> ImageSpec:
    return ImageSpec(size=int(entry["size"]), interpolation=str(entry["interpolation"]))


def load_manifest(path: str | Path) -> dict[str, Any]:
    """Read and check bundle.json and the files it lists (presence and sha256)."""
    path = Path(path)
    manifest_file = path / BUNDLE_FILE
    if not path.is_dir():
        raise ModelLoadError(f"model bundle not found: {path} is not a directory")
    if not manifest_file.is_file():
        raise ModelLoadError(f"not a model bundle: {manifest_file} is missing")
    try:
        raw = manifest_file.read_bytes()
        manifest = json.loads(raw)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{manifest_file}: unreadable ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ModelLoadError(f"{manifest_file}: not a {FORMAT} manifest")
    for key in ("encoder", "captioner", "scorer", "files"):
        if key not in manifest:
            raise ModelLoadError(f"{manifest_file}: missing entry {key!r}")
    files = manifest["files"]
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise ModelLoadError(f"{manifest_file}: 'files' must map file names to sha256 digests")
    for relative, digest in files.items():
        listed = PurePosixPath(relative)
        if listed.is_absolute() or ".." in listed.parts:
            raise ModelLoadError(f"{manifest_file}: listed file {relative!r} lies outside the bundle")
        file = path / relative
        if not file.is_file():
            raise ModelLoadError(f"bundle file missing: {file} (listed in {BUNDLE_FILE})")
        if file_sha256(file) != digest:
            raise ModelLoadError(f"bundle file does not match {BUNDLE_FILE}: {file} (sha256 differs)")
    manifest.setdefault("name", path.name)
    manifest["sha256"] = hashlib.sha256(raw).hexdigest()
    return manifest


def bundle_facts(path: str | Path, manifest: dict[str, Any]) -> BundleFacts:
    """The facts bundle.json records; for a bundle saved before they were recorded, from its models, built once
    here (which imports torch, transformers and open_clip: seconds)."""
    if FACTS in manifest:
        return BundleFacts.from_json(manifest[FACTS])
    from pipeline.models.bundle import load_bundle  # only for such a bundle: the import is what this module avoids

    return load_bundle(path).facts()


def model_identity(manifest: dict[str, Any], facts: BundleFacts) -> dict[str, Any]:
    """What run.json and the Parquet metadata record about the models."""
    return {key: manifest[key] for key in ("name", "sha256", "encoder", "captioner", "scorer")} | {
        "languages": of_manifest(manifest).to_json(),
        # a scorer of its own encodes every image again, from pixels decoded at its own input size
        "scorer_encodes_images": facts.scorer_image is not None}


def read_languages(path: str | Path) -> Languages | None:
    """The bundle's languages from its bundle.json alone, no file hashed nor model built (a run says them
    first); None where bundle.json is unreadable, which loading the bundle then reports."""
    try:
        manifest = json.loads((Path(path) / BUNDLE_FILE).read_bytes())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return of_manifest(manifest) if isinstance(manifest, dict) else None


def is_bundle(path: str | Path) -> bool:
    return (Path(path) / BUNDLE_FILE).is_file()
