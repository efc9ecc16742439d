"""Model bundles: one directory holding encoder + captioner + scorer, described by bundle.json.

Layout:
  bundle.json           specs, captioner config (null in an encoder bundle, which only embeds images) and a
                        sha256 for every file below
  encoder.safetensors   CLIP weights (omitted when the encoder names an open_clip pretrained tag)
  encoder_tokenizer.json   custom CLIP text tokenizer (custom architectures only)
  mapper.safetensors    ClipCap mapper weights
  lm/                   the language model and its tokenizer, Hugging Face `save_pretrained` form
  scorer.*              only when the scorer is not the encoder itself
  scorer_text/          a scorer text tower made from a Hugging Face model: its config.json and tokenizer
                        (weights in scorer.safetensors, image tower the encoder's)
  ROLE_open_clip/       in place of ROLE.safetensors (ROLE: encoder, scorer): an open_clip folder, for
                        local-dir and transformers CLIPs and Hugging Face text towers (with the tower's
                        config.json and tokenizer files)
Nothing is unpickled with code execution: weights are safetensors, open_clip `.pt` files load with
weights_only=True, and TorchScript archives (OpenAI's CLIP files) through an unpickler that only builds tensors.
"""

from __future__ import annotations

import json
import pickle
import shutil
import uuid
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.io.digest import file_sha256
from pipeline.models.captioner import MAPPERS, CaptionerConfig, PrefixCaptioner
from pipeline.models.clip import LOCKED_PREFIX, ClipModel, lock_image_tower, uses_quick_gelu
from pipeline.models.clip_factory import (
    CUSTOM,
    LOCAL_DIR,
    TEXT_TOWER,
    ClipSpec,
    create_clip,
    load_pretrained_clip,
    save_open_clip_folder,
)
from pipeline.models.errors import ModelLoadError
from pipeline.models.languages import PROJECT_LANGUAGE, Languages, infer, of_manifest
from pipeline.models.manifest import (
    BUNDLE_FILE,
    FACTS,
    FORMAT,
    SAME_AS_ENCODER,
    BundleFacts,
    load_manifest,
    model_identity,
)
from pipeline.models.text_tokenizers import ClipTextTokenizer
from pipeline.models.text_tower import TextTowerClip, save_text_tower_files
from pipeline.models.weights import building_for, load_failure, load_weights, save_weights
from pipeline.text import describe_error

LM_DIR = "lm"


@dataclass
class Bundle:
    """The three frozen models of a run. `scorer` may be the very same object as `encoder`; `captioner` is None in
    an encoder bundle, which embeds images (--embed-only) and captions none."""

    encoder: ClipModel
    captioner: PrefixCaptioner | None
    scorer: ClipModel
    manifest: dict[str, Any]

    def to(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> Bundle:
        for module in {id(m): m for m in (self.encoder, self.captioner, self.scorer) if m is not None}.values():
            module.to(device=device, dtype=dtype)
        return self

    @property
    def languages(self) -> Languages:
        return of_manifest(self.manifest)

    def facts(self) -> BundleFacts:
        return models_facts(self.encoder, self.scorer, self.captioner)

    def identity(self) -> dict[str, Any]:
        """What run.json and the Parquet metadata record about the models."""
        return model_identity(self.manifest, self.facts())


def models_facts(encoder: ClipModel, scorer: ClipModel, captioner: PrefixCaptioner | None) -> BundleFacts:
    return BundleFacts(embed_dim=encoder.embed_dim, encoder_image=encoder.image_spec,
                       scorer_image=None if scorer.shares_image_tower(encoder) else scorer.image_spec,
                       caption_tokens=None if captioner is None else captioner.max_caption_tokens())


def save_bundle(path: str | Path, encoder: ClipModel, encoder_spec: ClipSpec, captioner: PrefixCaptioner | None,
                scorer: ClipModel | None = None, scorer_spec: ClipSpec | None = None,
                name: str | None = None, dtype: torch.dtype = torch.float32,
                caption_language: str = PROJECT_LANGUAGE, scorer_languages: tuple[str, ...] | None = None,
                ) -> dict[str, Any]:
    """Write a complete, self-contained bundle; returns its manifest (the bundle.json content).
    `dtype` is the storage type of floating weights (fp16 halves the size); loading always
    gives float32 models, so a run picks its compute dtype itself. `caption_language` is what the
    captioner writes, `scorer_languages` what the scorer's text tower was trained on, as its maker
    declares them; by default guessed from the specs (`pipeline.models.languages.infer`).

    The bundle is written beside `path` and then replaces it: written into an earlier bundle, that
    bundle's files stayed (an LM once saved in shards left its shard index, which transformers loads
    first) and were hashed into the new one. `path` must be new, empty or an earlier bundle."""
    path = Path(path)
    if path.exists() and not (path / BUNDLE_FILE).is_file() and (not path.is_dir() or any(path.iterdir())):
        raise ModelLoadError(f"{path} exists and is not a model bundle: write a bundle to a new or empty "
                             "directory, or over an earlier bundle")
    path.parent.mkdir(parents=True, exist_ok=True)
    writing = path.with_name(f".{path.name}.writing-{uuid.uuid4().hex[:8]}")
    separate_scorer = scorer is not None and scorer is not encoder
    if separate_scorer and scorer_spec is None:
        scorer_spec = ClipSpec(arch=CUSTOM)
    if scorer_languages is None:  # from the specs as given: saving renames some (local-dir: folders)
        scorer_languages = infer({"encoder": encoder_spec.to_json(), "languages": {"captions": caption_language},
                                  "scorer": scorer_spec.to_json() if separate_scorer else SAME_AS_ENCODER}).scorer
    languages = Languages(caption_language, tuple(scorer_languages))
    writing.mkdir()
    try:
        _write_bundle(writing, name or path.name, encoder, encoder_spec, captioner,
                      scorer if separate_scorer else None, scorer_spec, dtype, languages)
    except BaseException:
        shutil.rmtree(writing, ignore_errors=True)
        raise
    if path.exists():
        replaced = path.with_name(f".{path.name}.replaced-{uuid.uuid4().hex[:8]}")
        path.rename(replaced)
        writing.rename(path)
        shutil.rmtree(replaced)
    else:
        writing.rename(path)
    return load_manifest(path)


def _write_bundle(path: Path, name: str, encoder: ClipModel, encoder_spec: ClipSpec, captioner: PrefixCaptioner | None,
                  scorer: ClipModel | None, scorer_spec: ClipSpec | None, dtype: torch.dtype,
                  languages: Languages) -> None:
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "name": name,
        "encoder": _save_clip(path, "encoder", encoder, encoder_spec, dtype),
        "captioner": None,
        "languages": languages.to_json(),
        FACTS: models_facts(encoder, encoder if scorer is None else scorer, captioner).to_json(),
    }
    if captioner is not None:
        manifest["captioner"] = {**captioner.config.to_json(), "weights": "mapper.safetensors",
                                 "language_model": LM_DIR}
        save_weights(captioner.mapper, path / "mapper.safetensors", dtype)
        original_dtype = captioner.lm.dtype
        captioner.lm.to(dtype).save_pretrained(path / LM_DIR)
        captioner.lm.to(original_dtype)
        captioner.tokenizer.save_pretrained(path / LM_DIR)
    if scorer is None:
        manifest["scorer"] = SAME_AS_ENCODER
    else:
        manifest["scorer"] = _save_clip(path, "scorer", scorer, scorer_spec, dtype)
    manifest["files"] = {
        str(file.relative_to(path)): file_sha256(file)
        for file in sorted(path.rglob("*")) if file.is_file() and file.name != BUNDLE_FILE
    }
    (path / BUNDLE_FILE).write_text(json.dumps(manifest, indent=2, ensure_ascii=False), encoding="utf-8")


def load_bundle(path: str | Path, captioner: bool = True) -> Bundle:
    """Load all three models from a bundle directory, on CPU in float32, in eval mode; `captioner` False leaves the
    captioner out (an embed-only run needs none: no language model in memory)."""
    path = Path(path)
    manifest = load_manifest(path)
    encoder = create_clip(_clip_spec(manifest["encoder"], "encoder"), path)
    scorer = encoder if manifest["scorer"] == SAME_AS_ENCODER else _load_scorer(manifest["scorer"], path, encoder)
    entry = manifest["captioner"] if captioner else None
    captioner = None if entry is None else _load_captioner(path, entry)
    if captioner is not None and captioner.config.prefix_dim != encoder.embed_dim:
        raise ModelLoadError(f"{path / BUNDLE_FILE}: captioner prefix_dim {captioner.config.prefix_dim} "
                             f"does not match the encoder's embedding width {encoder.embed_dim}")
    bundle = Bundle(encoder=encoder, captioner=captioner, scorer=scorer, manifest=manifest)
    if FACTS in manifest:  # what a run's driver planned with, read from bundle.json: it must be what the models are
        recorded = BundleFacts.from_json(manifest[FACTS])
        if captioner is None:
            recorded = replace(recorded, caption_tokens=None)
        found = bundle.facts()
        if recorded != found:
            raise ModelLoadError(f"{path / BUNDLE_FILE}: its {FACTS!r} ({recorded}) are not those of its models "
                                 f"({found})")
    return bundle


def save_encoder_bundle(clip: str, path: str | Path) -> dict[str, Any]:
    """An encoder bundle (no captioner) of the pretrained CLIP `clip` names (open_clip ARCH:WEIGHTS, an open_clip
    folder, a transformers CLIP): what an --embed-only run of a CLIP alone carries to its model actors. Returns its
    manifest; the same CLIP gives the same bundle, so a rerun resumes."""
    encoder, spec = load_pretrained_clip(clip, "--model", "encoder")
    return save_bundle(path, encoder, spec, None, name=clip)


def load_language_model(name_or_dir: str | Path):
    """A Hugging Face causal LM and its tokenizer from a local directory (never touching the network)
    or a hub name. Returns (model, tokenizer)."""
    local = Path(name_or_dir).is_dir()
    try:
        lm = AutoModelForCausalLM.from_pretrained(name_or_dir, local_files_only=local, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(name_or_dir, local_files_only=local)
    except (OSError, ValueError, KeyError, pickle.UnpicklingError) as exc:
        raise ModelLoadError(f"cannot load language model {str(name_or_dir)!r}: {load_failure(exc)}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return lm.eval(), tokenizer


def _load_captioner(path: Path, entry: dict[str, Any]) -> PrefixCaptioner:
    known = {f.name for f in fields(CaptionerConfig)}
    config = CaptionerConfig(**{k: v for k, v in entry.items() if k in known})
    if config.mapper not in MAPPERS:
        raise ModelLoadError(f"{path / BUNDLE_FILE}: unknown mapper {config.mapper!r}")
    lm_ref = entry.get("language_model", LM_DIR)
    lm, tokenizer = load_language_model(path / lm_ref if (path / lm_ref).is_dir() else lm_ref)
    try:
        with building_for(weights=True):
            captioner = PrefixCaptioner(config, lm, tokenizer)
    except (TypeError, ValueError, RuntimeError) as exc:  # a hand-edited entry: "prefix_length": "4"
        raise ModelLoadError(f"{path / BUNDLE_FILE}: invalid captioner entry: {describe_error(exc)}") from None
    load_weights(captioner.mapper, path / entry.get("weights", "mapper.safetensors"))
    return captioner.eval()


def _load_scorer(entry: Any, path: Path, encoder: ClipModel) -> ClipModel:
    spec = _clip_spec(entry, "scorer")
    if spec.image_tower is None:
        return create_clip(spec, path)
    if spec.image_tower != SAME_AS_ENCODER:
        raise ModelLoadError(f"{path / BUNDLE_FILE}: scorer image_tower {spec.image_tower!r} (expected "
                             f"{SAME_AS_ENCODER!r})")
    return lock_image_tower(create_clip(spec, path), encoder)


def _clip_spec(entry: Any, role: str) -> ClipSpec:
    if not isinstance(entry, dict) or "arch" not in entry:
        raise ModelLoadError(f"{BUNDLE_FILE}: {role} entry needs an 'arch'")
    known = {f.name for f in fields(ClipSpec)}
    return ClipSpec(**{k: v for k, v in entry.items() if k in known})


def _save_clip(path: Path, role: str, model: ClipModel, spec: ClipSpec, dtype: torch.dtype) -> dict[str, Any]:
    """Custom models, local weight files, local-dir and transformers CLIPs and every model with a Hugging Face
    text tower are copied in (weights as safetensors), so the bundle stands alone; open_clip's other pretrained
    tags and hub names stay references."""
    entry = spec.to_json()
    if model.open_clip_config is not None:  # stored as an open_clip folder, which holds all the model needs
        folder = path / f"{role}_open_clip"
        save_open_clip_folder(model, folder, dtype)
        entry = {"arch": f"{LOCAL_DIR}{folder.name}"}
    elif spec.arch == CUSTOM or (spec.weights and Path(spec.weights).is_file()):
        save_weights(model.clip, path / f"{role}.safetensors", dtype, skip=LOCKED_PREFIX if spec.image_tower else None)
        entry["weights"] = f"{role}.safetensors"
        if spec.arch != CUSTOM and uses_quick_gelu(model.clip):
            entry["quick_gelu"] = True  # the stored weights need it whatever the name says (OpenAI's files)
    if isinstance(model.tokenizer, ClipTextTokenizer):
        model.tokenizer.tokenizer.save(str(path / f"{role}_tokenizer.json"))
        entry["tokenizer"] = f"{role}_tokenizer.json"
    if isinstance(model.clip, TextTowerClip):  # its weights are in ROLE.safetensors already
        save_text_tower_files(model.clip, model.tokenizer, path / f"{role}_text")
        entry["config"][TEXT_TOWER]["model"] = f"{role}_text"
    return entry


