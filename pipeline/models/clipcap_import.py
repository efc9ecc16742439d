"""Import checkpoints of the original ClipCap code (rmokady/CLIP_prefix_caption) into a bundle.

Its `ClipCaptionModel` / `ClipCaptionPrefix` state dicts hold the mapper under `clip_project.` and,
usually, GPT-2 under `gpt.`; our mapper modules use the same names below those prefixes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pipeline.models.bundle import load_language_model, save_bundle
from pipeline.models.captioner import MAPPERS, CaptionerConfig, PrefixCaptioner
from pipeline.models.clip_factory import ClipSpec, create_clip
from pipeline.models.errors import ModelLoadError
from pipeline.models.languages import PROJECT_LANGUAGE
from pipeline.models.weights import load_state
from pipeline.text import describe_error

MAPPER_PREFIX = "clip_project."
LM_PREFIX = "gpt."
# Old transformers versions saved GPT-2's causal-mask buffers in state dicts; current ones rebuild them.
_LEGACY_LM_BUFFERS = (".attn.bias", ".attn.masked_bias")


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """torch.load with weights_only=True: a checkpoint can never run code while it is read."""
    if not path.is_file():
        raise ModelLoadError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a file of junk fails deep in the unpickler in any way (KeyError, IndexError ...)
        raise ModelLoadError(f"{path}: not a loadable weights-only checkpoint ({describe_error(exc, 200)})") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and set(state) == {wrapper}:
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"{path}: expected a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):  # saved from nn.DataParallel / DDP
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def import_clipcap(checkpoint: Path, lm: str, clip: str, mapper: str, prefix_length: int, out: Path,
                   clip_length: int | None = None, num_layers: int | None = None,
                   normalize_prefix: bool = False, stop_token: str = ".",
                   scorer: str | None = None, caption_language: str = PROJECT_LANGUAGE,
                   scorer_languages: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Build a bundle from a ClipCap checkpoint; returns the bundle manifest. `scorer` names another
    open_clip model (e.g. a multilingual one) to score captions; by default the encoder scores. The
    languages are recorded as `save_bundle` records them."""
    if mapper not in MAPPERS:
        raise ModelLoadError(f"unknown mapper {mapper!r} (expected one of {', '.join(MAPPERS)})")
    state = read_checkpoint(checkpoint)
    mapper_state = {k[len(MAPPER_PREFIX):]: v for k, v in state.items() if k.startswith(MAPPER_PREFIX)}
    lm_state = {k[len(LM_PREFIX):]: v for k, v in state.items() if k.startswith(LM_PREFIX)}
    unknown = sorted(k for k in state if not k.startswith((MAPPER_PREFIX, LM_PREFIX)))
    if not mapper_state and not lm_state:  # the mapper's own state dict: torch.save(model.clip_project.state_dict())
        mapper_state, unknown = state, []
    if unknown or not mapper_state:
        what = f"unknown keys {', '.join(unknown[:4])}" if unknown else f"no '{MAPPER_PREFIX}*' keys"
        raise ModelLoadError(f"{checkpoint}: not a ClipCap checkpoint ({what})")

    encoder_spec = ClipSpec.parse(clip)
    encoder = create_clip(encoder_spec)
    language_model, tokenizer = load_language_model(lm)
    if lm_state:
        expected = language_model.state_dict()
        lm_state = {k: v for k, v in lm_state.items() if k in expected or not k.endswith(_LEGACY_LM_BUFFERS)}
        load_state(language_model, lm_state, f"{checkpoint} ({LM_PREFIX}*)")

    embed_dim = language_model.get_input_embeddings().weight.shape[1]
    if mapper == "transformer":
        layer_ids = {int(k.split(".")[2]) for k in mapper_state if k.startswith("transformer.layers.")}
        num_layers = num_layers or len(layer_ids)
        if clip_length is None and "linear.weight" in mapper_state:
            clip_length = mapper_state["linear.weight"].shape[0] // embed_dim
    config = CaptionerConfig(mapper=mapper, prefix_length=prefix_length, prefix_dim=encoder.embed_dim,
                             clip_length=clip_length or prefix_length, num_layers=num_layers or 8,
                             raw_prefix=not normalize_prefix, stop_token=stop_token)
    captioner = PrefixCaptioner(config, language_model, tokenizer)
    load_state(captioner.mapper, mapper_state, f"{checkpoint} ({MAPPER_PREFIX}*)")
    scorer_spec = ClipSpec.parse(scorer) if scorer else None
    return save_bundle(out, encoder, encoder_spec, captioner, name=out.name,
                       scorer=create_clip(scorer_spec) if scorer_spec else None, scorer_spec=scorer_spec,
                       caption_language=caption_language, scorer_languages=scorer_languages)
