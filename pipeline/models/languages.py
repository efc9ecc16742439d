"""Which language a bundle's captioner writes and which languages its scorer's text tower reads.

bundle.json records both ("languages": {"captions": "tr", "scorer": ["tr"]}). A CLIP score is only a
measure of caption quality in a language its text tower was trained on: OpenAI's and LAION-2B's
English towers rank Turkish sentences by how English they look, so a run warns about such a scorer
and filters with it only when told to."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MULTILINGUAL = "multilingual"
PROJECT_LANGUAGE = "tr"
# pipeline.models.clip_factory.CUSTOM and LOCAL_DIR, repeated here so that this module imports no torch
CUSTOM = "custom"
LOCAL_DIR = "local-dir:"
# open_clip names, Hugging Face text towers and their config.json model_type, trained on many languages,
# Turkish among them (xlm-roberta-*-ViT-*: LAION-5B's multilingual half; nllb-clip-*: NLLB's 200 languages,
# an m2m_100 encoder)
_MULTILINGUAL_TOWERS = re.compile(r"xlm-roberta|nllb|m2m_100|multilingual|\bmt5|labse|m-clip", re.IGNORECASE)
_CODE = re.compile(r"[a-z]{2,3}")


@dataclass(frozen=True)
class Languages:
    captions: str                 # ISO 639 code of the language the captioner writes
    scorer: tuple[str, ...]       # the languages its scorer's text tower was trained on, or ("multilingual",)
    inferred: bool = False        # the bundle declared none: guessed from the scorer's name (`infer`)

    def __post_init__(self) -> None:
        for code in (self.captions, *self.scorer):
            if code != MULTILINGUAL and not is_language_code(code):
                raise ValueError(f"a language is an ISO 639 code such as tr or en, or {MULTILINGUAL}; got {code!r}")
        if not self.scorer:
            raise ValueError("a scorer reads at least one language")

    @property
    def scorer_reads_captions(self) -> bool:
        return self.captions in self.scorer or MULTILINGUAL in self.scorer

    def warning(self) -> str | None:
        """One line when the scorer was not trained on the captions' language, else None."""
        if self.scorer_reads_captions:
            return None
        how = "is guessed from its name" if self.inferred else "is declared in bundle.json"
        return (f"the scorer's text tower reads {', '.join(self.scorer)} (this {how}), not the captions' "
                f"language {self.captions}: clip_score ranks these captions by how much they look like "
                f"{', '.join(self.scorer)}, not by how well they describe the image")

    def to_json(self) -> dict[str, Any]:
        return {"captions": self.captions, "scorer": list(self.scorer)} | ({"inferred": True} if self.inferred else {})


def is_language_code(code: str) -> bool:
    """An ISO 639-1 or 639-3 code in lower case: tr, en, tur."""
    return bool(_CODE.fullmatch(code))


def infer(manifest: dict[str, Any]) -> Languages:
    """The languages of a bundle.json that records none (bundles written before it did), or the scorer
    languages a new bundle records unless its maker declares them. The captioner is taken to write the
    project's language. A custom CLIP was trained by this project on the captions themselves; a
    multilingual tower says so in its name or, in an open_clip folder, in the folder's files; every other
    pretrained CLIP (OpenAI's, LAION-2B's, a transformers CLIP) was trained on English alt text."""
    recorded = manifest.get("languages")
    captions = recorded.get("captions", PROJECT_LANGUAGE) if isinstance(recorded, dict) else PROJECT_LANGUAGE
    scorer = manifest.get("encoder") if manifest.get("scorer") == "encoder" else manifest.get("scorer")
    described = _describe(scorer)
    if isinstance(scorer, dict) and scorer.get("arch") == CUSTOM:
        read = (captions,)
    elif _MULTILINGUAL_TOWERS.search(described):
        read = (MULTILINGUAL,)
    else:
        read = ("en",)
    return Languages(captions, read, inferred=True)


def of_manifest(manifest: dict[str, Any]) -> Languages:
    """The bundle's languages: as recorded, else inferred."""
    recorded = manifest.get("languages")
    if isinstance(recorded, dict) and isinstance(recorded.get("scorer"), list) and recorded.get("captions"):
        try:
            return Languages(str(recorded["captions"]), tuple(str(code) for code in recorded["scorer"]))
        except ValueError:
            pass  # a hand-edited entry: fall back to the guess, which says it is one
    return infer(manifest)


def _describe(entry: Any) -> str:
    """The names in a CLIP spec that may tell its text tower: arch, weights tag, an HF text tower's name, and
    what an open_clip folder's files say of its tower (the folder's own name may say nothing)."""
    if not isinstance(entry, dict):
        return str(entry)
    text_cfg = _mapping(_mapping(entry.get("config")).get("text_cfg"))
    names = [entry.get("arch"), entry.get("weights"), text_cfg.get("hf_model_name"), text_cfg.get("hf_tokenizer_name")]
    if isinstance(entry.get("arch"), str):
        names += _folder_text_tower(Path(entry["arch"].removeprefix(LOCAL_DIR)))
    return " ".join(str(name) for name in names if name)


def _folder_text_tower(folder: Path) -> list[Any]:
    """An open_clip folder's text_cfg hf_model_name and hf_tokenizer_name, and the model_type of the Hugging Face
    text tower config.json it keeps beside them (a bundle's folders name the tower "."); none where no folder."""
    text_cfg = _mapping(_mapping(_read_json(folder / "open_clip_config.json").get("model_cfg")).get("text_cfg"))
    if not text_cfg.get("hf_model_name"):
        return []
    return [text_cfg.get("hf_model_name"), text_cfg.get("hf_tokenizer_name"),
            _read_json(folder / "config.json").get("model_type")]


def _read_json(file: Path) -> dict[str, Any]:
    try:
        return _mapping(json.loads(file.read_text(encoding="utf-8")))
    except (OSError, ValueError):  # no such file, or not JSON
        return {}


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}
