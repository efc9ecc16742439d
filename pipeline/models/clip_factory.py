"""How a CLIP (`pipeline.models.clip.ClipModel`) is built from where it comes from: any open_clip architecture
(a name, a hub repo, a local folder) with a tag or a weights file, a Hugging Face transformers CLIP, OpenAI's
TorchScript files, or a small custom one; and how one is saved as an open_clip folder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import pickle
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.hf_model import HFTextEncoder
from open_clip.modified_resnet import ModifiedResNet
from open_clip.pretrained import download_pretrained_from_hf
from open_clip.tokenizer import HFTokenizer
from torch import nn

from pipeline.io.images import ImageSpec
from pipeline.models.clip import LOCKED_PREFIX, LOCKED_VISION_PLACEHOLDER, ClipModel
from pipeline.models.errors import ModelLoadError
from pipeline.models.text_tokenizers import ClipTextTokenizer
from pipeline.models.text_tower import LAST, MEAN, create_text_tower
from pipeline.models.transformers_clip import read_transformers_clip
from pipeline.models.weights import (
    building_for,
    is_torchscript_archive,
    load_failure,
    load_state,
    load_weights,
    read_torchscript_state,
    save_weights,
)
from pipeline.text import describe_error

CUSTOM = "custom"
TEXT_TOWER = "text_tower"  # a custom config's entry for a Hugging Face model's text tower (text_tower.py)
LOCAL_DIR = "local-dir:"
HF_HUB = "hf-hub:"
SCHEMAS = (HF_HUB, LOCAL_DIR)
# An open_clip folder's text_cfg names its Hugging Face text tower (hf_model_name, hf_tokenizer_name) with
# this when the tower's config.json and tokenizer files are the folder's own: such a folder can be moved.
IN_FOLDER = "."


@dataclass
class ClipSpec:
    """Where a CLIP model comes from.

    arch: an open_clip model name ('ViT-B-32', 'xlm-roberta-base-ViT-B-32', 'hf-hub:org/repo',
      'local-dir:/path'), 'custom', or a Hugging Face transformers CLIP (hub name 'openai/clip-vit-base-patch32'
      or a directory with its config.json), converted to open_clip's CLIP on load. A local-dir folder whose
      text_cfg names its Hugging Face text tower "." holds that tower's config.json and tokenizer itself.
    weights: an open_clip pretrained tag ('openai', 'laion2b_s34b_b79k') or a local file
      (.safetensors / .pt / .bin, relative paths resolve against the bundle directory), including
      OpenAI's original TorchScript files (`clip.load`'s ViT-B-32.pt), which imply QuickGELU.
    quick_gelu: build the architecture with QuickGELU, as OpenAI's weights need (open_clip's '-quickgelu'
      names and 'openai' tags do that themselves; a bundle records it for weights it stores).
    config: for 'custom', the keyword arguments of `open_clip.CLIP` plus an optional 'preprocess'
      entry (size, mean, std, interpolation).
    tokenizer: for 'custom', a `tokenizers` JSON file.
      A custom config with a TEXT_TOWER entry is a Hugging Face model's text tower instead (`text_tower.py`),
      which scores against the encoder's image tower and reads with the model's own tokenizer.
    image_tower: 'encoder' for a scorer whose text tower was trained against the bundle's frozen encoder
      (`lock_image_tower`): its weights hold the text tower only, the image tower is the encoder's.
    """

    arch: str
    weights: str | None = None
    config: dict[str, Any] | None = None
    tokenizer: str | None = None
    quick_gelu: bool | None = None
    image_tower: str | None = None

    @classmethod
    def parse(cls, text: str) -> ClipSpec:
        """'ARCH[:WEIGHTS]', e.g. 'ViT-B-32:openai', 'RN50x4:/ckpt/rn50x4.pt', 'hf-hub:org/repo'."""
        if text.startswith(SCHEMAS):
            return cls(arch=text)
        arch, _, weights = text.partition(":")
        if not arch:
            raise ModelLoadError(f"empty CLIP architecture in {text!r} (expected ARCH[:WEIGHTS])")
        return cls(arch=arch, weights=weights or None)

    def to_json(self) -> dict[str, Any]:
        return {key: value for key, value in asdict(self).items() if value is not None}


def create_clip(spec: ClipSpec, base_dir: Path | None = None) -> ClipModel:
    """Build a ClipModel from a spec; loads no network resource when all paths are local."""
    if spec.arch == CUSTOM:
        return _create_custom(spec, base_dir or Path("."))
    arch = spec.arch
    if not arch.startswith(SCHEMAS) and (Path(arch) / "open_clip_config.json").is_file():
        arch = f"{LOCAL_DIR}{arch}"  # an open_clip folder (a hub snapshot) named without local-dir:
    elif is_transformers_clip(arch):
        return _create_from_transformers(arch)
    weights = _resolve(spec.weights, base_dir)
    if arch.startswith(LOCAL_DIR) and base_dir is not None and (base_dir / arch.removeprefix(LOCAL_DIR)).is_dir():
        arch = f"{LOCAL_DIR}{base_dir / arch.removeprefix(LOCAL_DIR)}"  # a folder inside the bundle
    folder = Path(arch.removeprefix(LOCAL_DIR)) if arch.startswith(LOCAL_DIR) else None
    # OpenAI's own files are TorchScript: read safely here (open_clip would refuse or run them), QuickGELU
    openai_archive = weights is not None and Path(weights).is_file() and is_torchscript_archive(weights)
    what = f"{spec.arch}:{spec.weights}" if spec.weights else spec.arch
    quick_gelu = bool(spec.quick_gelu) or openai_archive
    folder_config = None
    try:
        if folder is not None and (folder / "open_clip_config.json").is_file():  # else open_clip says what is amiss
            folder_config = json.loads((folder / "open_clip_config.json").read_text())
        with building_for(weights is not None), _quiet_random_init_warning(openai_archive), _no_silent_resizing():
            clip = open_clip.create_model(arch, pretrained=None if openai_archive else weights, weights_only=True,
                                          force_quick_gelu=quick_gelu, **_text_tower_in_folder(folder, folder_config))
        tokenizer = open_clip.get_tokenizer(arch)
        if folder is None and has_hf_text_tower(clip):  # a bundle stores it as a folder: the config it was built from
            folder_config = {"model_cfg": _model_config(arch, quick_gelu)}
    except (RuntimeError, FileNotFoundError, KeyError, OSError, ValueError, AssertionError,
            pickle.UnpicklingError) as exc:
        raise ModelLoadError(f"cannot load CLIP {what!r}: {load_failure(exc)}") from None
    if openai_archive:
        expected = clip.state_dict()  # the archive also holds tensors that are not weights (cached masks)
        load_state(clip, {k: v for k, v in read_torchscript_state(weights).items() if k in expected}, weights)
    cfg = open_clip.get_model_preprocess_cfg(clip)
    if cfg.get("resize_mode", "shortest") != "shortest":
        raise ModelLoadError(f"CLIP {spec.arch!r}: resize_mode {cfg['resize_mode']!r} is not supported yet")
    size = cfg["size"] if isinstance(cfg["size"], int) else cfg["size"][0]
    image_spec = ImageSpec(size=size, interpolation=cfg.get("interpolation", "bicubic"))
    if folder is None and folder_config is not None:  # a tag's preprocessing, as open_clip merged it
        folder_config["preprocess_cfg"] = json.loads(json.dumps(cfg))
    return ClipModel(clip, tokenizer, image_spec, tuple(cfg["mean"]), tuple(cfg["std"]), folder_config)


def load_pretrained_clip(text: str, option: str, role: str) -> tuple[ClipModel, ClipSpec]:
    """A pretrained CLIP the user names (`option`, for `role`): an open_clip ARCH:WEIGHTS, an open_clip folder or a
    transformers CLIP, and its spec. An architecture without weights is refused: it would be a random model."""
    spec = pretrained_clip_spec(text, option, role)
    return create_clip(spec), spec


def pretrained_clip_spec(text: str, option: str, role: str) -> ClipSpec:
    """The spec of `load_pretrained_clip`, checked without loading anything."""
    spec = ClipSpec.parse(text)
    if spec.weights is None and not spec.arch.startswith(SCHEMAS) and "/" not in spec.arch \
            and not Path(spec.arch).is_dir():
        raise ModelLoadError(f"{option} {text} names no weights, so it would be a random {role}; "
                             "give ARCH:TAG (e.g. ViT-B-32:openai) or ARCH:FILE")
    return spec


def has_hf_text_tower(clip: nn.Module) -> bool:
    """open_clip's CustomTextCLIP around a Hugging Face transformers text encoder (xlm-roberta-base-ViT-B-32,
    nllb-clip-base): its config.json and tokenizer come from the Hugging Face hub, not from open_clip."""
    return isinstance(getattr(clip, "text", None), HFTextEncoder)


def _text_tower_in_folder(folder: Path | None, folder_config: dict[str, Any] | None) -> dict[str, Any]:
    """create_model keyword arguments that point a text tower named IN_FOLDER at the folder itself: open_clip
    hands hf_model_name to transformers as it is, which resolves a relative path against the working directory.
    (Its tokenizer needs nothing: open_clip reads a local-dir folder's tokenizer from the folder, whatever
    hf_tokenizer_name says.) The folder's files stay as they are."""
    model_cfg = folder_config.get("model_cfg") if isinstance(folder_config, dict) else None
    text_cfg = model_cfg.get("text_cfg") if isinstance(model_cfg, dict) else None
    if folder is None or not isinstance(text_cfg, dict) or text_cfg.get("hf_model_name") != IN_FOLDER:
        return {}  # a hand-written config open_clip then judges itself
    # the argument replaces the whole text_cfg, and with it the flag open_clip sets itself where the folder has
    # CLIP weights (they hold the tower's): without it transformers would look for the tower's own weights
    return {"text_cfg": text_cfg | {"hf_model_name": str(folder.resolve()), "hf_model_pretrained": False}}


def _model_config(arch: str, quick_gelu: bool) -> dict[str, Any]:
    """The model config open_clip built `arch` from: a built-in name's, or a hub repo's open_clip_config.json
    (in the hub cache: create_model just read it there)."""
    if arch.startswith(HF_HUB):
        file = download_pretrained_from_hf(arch.removeprefix(HF_HUB), filename="open_clip_config.json")
        config = json.loads(Path(file).read_text())["model_cfg"]
    else:
        config = open_clip.get_model_config(arch.replace("/", "-"))  # how create_model looks a name up
    return config | ({"quick_gelu": True} if quick_gelu else {})


def save_open_clip_folder(model: ClipModel, folder: Path, dtype: torch.dtype = torch.float32) -> None:
    """`model` (one with an `open_clip_config`) as an open_clip folder that `create_clip` loads wherever the folder
    is moved: open_clip_config.json and open_clip_model.safetensors, and for a Hugging Face text tower that tower's
    config.json and tokenizer files, named IN_FOLDER. The tower's weights are in the CLIP state dict already."""
    config = json.loads(json.dumps(model.open_clip_config))
    text_cfg = config["model_cfg"]["text_cfg"]
    folder.mkdir(parents=True, exist_ok=True)
    if has_hf_text_tower(model.clip):
        model.clip.text.config.save_pretrained(folder)
        text_cfg.update(hf_model_name=IN_FOLDER, hf_model_pretrained=False)
    if isinstance(model.tokenizer, HFTokenizer):
        model.tokenizer.save_pretrained(folder)
        # open_clip reads a local-dir folder's tokenizer from the folder; its length defaults to 77, not this one's
        text_cfg.update(hf_tokenizer_name=IN_FOLDER, context_length=model.tokenizer.context_length)
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    save_weights(model.clip, folder / "open_clip_model.safetensors", dtype)


def is_transformers_clip(arch: str) -> bool:
    """A Hugging Face transformers CLIP: a folder with a config.json, or an org/name that is no open_clip name."""
    if arch.startswith(SCHEMAS) or arch == CUSTOM:
        return False
    if (Path(arch) / "config.json").is_file():
        return True
    return "/" in arch and not Path(arch).exists() and arch not in open_clip.list_models()


def _create_from_transformers(name: str) -> ClipModel:
    converted = read_transformers_clip(name)
    preprocess = converted.preprocess_cfg
    image_spec = ImageSpec(size=preprocess["size"], interpolation=preprocess["interpolation"])
    return ClipModel(converted.clip, converted.tokenizer, image_spec, tuple(preprocess["mean"]),
                     tuple(preprocess["std"]), {"model_cfg": converted.model_cfg, "preprocess_cfg": preprocess})


def _create_custom(spec: ClipSpec, base_dir: Path) -> ClipModel:
    if spec.config and TEXT_TOWER in spec.config:
        return _create_text_tower_scorer(spec, base_dir)
    if not spec.config or not spec.tokenizer:
        raise ModelLoadError("a custom CLIP needs 'config' and 'tokenizer' in its spec")
    config = dict(spec.config)
    preprocess = config.pop("preprocess", {})
    stride = config.pop("vision_stride", 32)
    try:
        with building_for(bool(spec.weights)):
            clip = open_clip.CLIP(**config)
    except (TypeError, ValueError, AssertionError) as exc:
        raise ModelLoadError(f"invalid custom CLIP config: {describe_error(exc)}") from None
    if stride == 16 and isinstance(clip.visual, ModifiedResNet):
        clip.visual.avgpool = nn.Identity()  # the stem's 2x average pool: the tower's stride halves to 16
    elif stride != 32:
        raise ModelLoadError(f"invalid custom CLIP config: vision_stride {stride!r} (32, or 16 for a ResNet tower)")
    if spec.weights:
        load_weights(clip, base_dir / spec.weights, skip=LOCKED_PREFIX if spec.image_tower else None)
    tokenizer_path = base_dir / spec.tokenizer
    if not tokenizer_path.is_file():
        raise ModelLoadError(f"CLIP tokenizer file missing: {tokenizer_path}")
    tokenizer = ClipTextTokenizer.from_file(tokenizer_path, clip.context_length)
    image_spec = ImageSpec(
        size=int(preprocess.get("size", config["vision_cfg"]["image_size"])),
        interpolation=preprocess.get("interpolation", "bicubic"),
    )
    mean = tuple(preprocess.get("mean", open_clip.OPENAI_DATASET_MEAN))
    std = tuple(preprocess.get("std", open_clip.OPENAI_DATASET_STD))
    return ClipModel(clip, tokenizer, image_spec, mean, std)


def _create_text_tower_scorer(spec: ClipSpec, base_dir: Path) -> ClipModel:
    """A Hugging Face model's text tower (`pipeline.models.text_tower`) that scores against the encoder's image
    tower: config {"embed_dim": D, TEXT_TOWER: {"model": hub name or folder (in the bundle: its config.json and
    tokenizer), "pooling", "context_length"}}. Without weights, the model's own pretrained ones (training starts
    there); with them, every weight but the image tower's comes from that file."""
    tower = spec.config[TEXT_TOWER]
    if spec.image_tower is None or not isinstance(tower, dict) or not isinstance(tower.get("model"), str) \
            or tower.get("pooling") not in (None, MEAN, LAST) or not isinstance(tower.get("context_length", 1), int) \
            or not isinstance(spec.config.get("embed_dim"), int):
        raise ModelLoadError(f"invalid text tower spec {spec.to_json()}: it needs image_tower, embed_dim and "
                             f"{TEXT_TOWER}.model, with pooling {MEAN!r} or {LAST!r}")
    model = base_dir / tower["model"] if (base_dir / tower["model"]).is_dir() else tower["model"]
    clip, tokenizer = create_text_tower(model, spec.config["embed_dim"], tower.get("pooling"),
                                        tower.get("context_length"), pretrained=not spec.weights)
    if spec.weights:
        load_weights(clip, base_dir / spec.weights, skip=LOCKED_PREFIX)
    # preprocessing and image tower come with lock_image_tower
    return ClipModel(clip, tokenizer, ImageSpec(size=LOCKED_VISION_PLACEHOLDER["image_size"]),
                     open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)


@contextlib.contextmanager
def _quiet_random_init_warning(quiet: bool) -> Iterator[None]:
    """open_clip warns "Model initialized randomly" when it loads no weights itself; untrue when we do."""
    if not quiet:
        yield
        return

    def drop(record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()

    logging.getLogger().addFilter(drop)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(drop)


@contextlib.contextmanager
def _no_silent_resizing() -> Iterator[None]:
    """open_clip interpolates a checkpoint's position embeddings to the named model's image grid and text
    length and says so only at INFO level: weights of another image size (ViT-B-32 weights named as
    ViT-B-32-256) would load and give other features. Here a size that differs is an error."""
    factory = open_clip.factory
    originals = factory.resize_pos_embed, factory.resize_text_pos_embed

    def checked(resize: Any, what: str, keys: tuple[str, ...], owners: tuple[str, ...]) -> Any:
        def check(state_dict: dict[str, torch.Tensor], model: nn.Module, *args: Any, **kwargs: Any) -> Any:
            stored = next((state_dict[k] for k in keys if k in state_dict), None)
            wanted = _position_embedding(model, owners)
            if stored is not None and wanted is not None and tuple(stored.shape) != tuple(wanted.shape):
                raise ValueError(f"the checkpoint's {what} position embedding is {tuple(stored.shape)}, the model's "
                                 f"{tuple(wanted.shape)}: weights of another image size or model")
            return resize(state_dict, model, *args, **kwargs)
        return check

    factory.resize_pos_embed = checked(originals[0], "image", ("visual.positional_embedding",), ("visual",))
    factory.resize_text_pos_embed = checked(originals[1], "text", ("positional_embedding", "text.positional_embedding"),
                                            ("", "text"))
    try:
        yield
    finally:
        factory.resize_pos_embed, factory.resize_text_pos_embed = originals


def _position_embedding(model: nn.Module, owners: tuple[str, ...]) -> torch.Tensor | None:
    """The first positional_embedding among the model itself ("") and its named submodules."""
    for name in owners:
        embedding = getattr(getattr(model, name, None) if name else model, "positional_embedding", None)
        if embedding is not None:
            return embedding
    return None


def _resolve(weights: str | None, base_dir: Path | None) -> str | None:
    """A weights entry that names an existing file (relative to the bundle) is a file; else a tag."""
    if weights and base_dir is not None and (base_dir / weights).is_file():
        return str(base_dir / weights)
    return weights
