"""A Hugging Face transformers CLIPModel folder or hub name, read as the open_clip CLIP it was converted from
(`pipeline.models.clip_factory` names these by `is_transformers_clip` and wraps them as any other CLIP)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch

from pipeline.models.errors import ModelLoadError
from pipeline.models.weights import building_for, load_state
from pipeline.text import describe_error


@dataclass(frozen=True)
class TransformersClip:
    """The converted model, its tokenizer, and the open_clip configuration that rebuilds it."""

    clip: open_clip.CLIP
    tokenizer: open_clip.tokenizer.SimpleTokenizer
    model_cfg: dict[str, Any]
    preprocess_cfg: dict[str, Any]


def read_transformers_clip(name: str) -> TransformersClip:
    """transformers' CLIPModel (ViT towers, OpenAI's BPE tokenizer) as the open_clip CLIP it was converted from:
    the same weights under open_clip's names, so encoding, scoring and bundles work as for any open_clip model."""
    from transformers import AutoConfig, CLIPImageProcessor, CLIPModel

    local = Path(name).is_dir()
    try:
        model_type = AutoConfig.from_pretrained(name, local_files_only=local).model_type
        if model_type != "clip":
            raise ValueError(f"its config is a {model_type!r} model, not 'clip'")
        # transformers fills weights a checkpoint lacks with random ones and only warns: here that is an error
        hf, loading = CLIPModel.from_pretrained(name, local_files_only=local, dtype=torch.float32,
                                                output_loading_info=True)
        if missing := sorted(loading["missing_keys"]):
            raise ValueError(f"{len(missing)} weights missing from its checkpoint, e.g. {missing[0]}")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"cannot load CLIP {name!r} with transformers: {describe_error(exc)}") from None
    vision, text = hf.config.vision_config, hf.config.text_config
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=text.max_position_embeddings)
    if text.vocab_size != tokenizer.vocab_size:
        raise ModelLoadError(f"CLIP {name!r}: a text vocabulary of {text.vocab_size} tokens is not OpenAI's BPE, "
                             "the only tokenizer a transformers CLIP is read with")
    model_cfg = {
        "embed_dim": hf.config.projection_dim, "quick_gelu": vision.hidden_act == "quick_gelu",
        "vision_cfg": {"image_size": vision.image_size, "patch_size": vision.patch_size, "width": vision.hidden_size,
                       "layers": vision.num_hidden_layers, "mlp_ratio": vision.intermediate_size / vision.hidden_size,
                       "head_width": vision.hidden_size // vision.num_attention_heads},
        "text_cfg": {"context_length": text.max_position_embeddings, "vocab_size": text.vocab_size,
                     "width": text.hidden_size, "heads": text.num_attention_heads, "layers": text.num_hidden_layers,
                     "mlp_ratio": text.intermediate_size / text.hidden_size},
    }
    try:
        processor = CLIPImageProcessor.from_pretrained(name, local_files_only=local)
        preprocess_cfg = {"size": processor.crop_size["height"], "mean": list(processor.image_mean),
                          "std": list(processor.image_std),
                          "interpolation": "bilinear" if processor.resample == 2 else "bicubic"}
    except (OSError, ValueError, KeyError, TypeError):  # no preprocessor_config.json: CLIP's own preprocessing
        preprocess_cfg = {"size": vision.image_size, "mean": list(open_clip.OPENAI_DATASET_MEAN),
                          "std": list(open_clip.OPENAI_DATASET_STD), "interpolation": "bicubic"}
    with building_for(True):
        clip = open_clip.CLIP(**model_cfg)
    try:
        state = open_clip_state(hf.state_dict(), vision.num_hidden_layers, text.num_hidden_layers)
    except KeyError as exc:
        raise ModelLoadError(f"CLIP {name!r}: not a transformers CLIPModel checkpoint (missing {exc})") from None
    load_state(clip, state, name)
    return TransformersClip(clip, tokenizer, model_cfg, preprocess_cfg)


def open_clip_state(hf: dict[str, torch.Tensor], vision_layers: int, text_layers: int) -> dict[str, torch.Tensor]:
    """transformers' CLIPModel names -> open_clip's (OpenAI's original ones): q/k/v projections fused into
    in_proj, projections stored transposed."""
    state = {
        "logit_scale": hf["logit_scale"],
        "visual.proj": hf["visual_projection.weight"].T,
        "text_projection": hf["text_projection.weight"].T,
        "visual.class_embedding": hf["vision_model.embeddings.class_embedding"],
        "visual.conv1.weight": hf["vision_model.embeddings.patch_embedding.weight"],
        "visual.positional_embedding": hf["vision_model.embeddings.position_embedding.weight"],
        "token_embedding.weight": hf["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": hf["text_model.embeddings.position_embedding.weight"],
    }
    pairs = [("vision_model.pre_layrnorm", "visual.ln_pre"), ("vision_model.post_layernorm", "visual.ln_post"),
             ("text_model.final_layer_norm", "ln_final")]
    for tower, ours, layers in (("vision_model", "visual.transformer", vision_layers),
                                ("text_model", "transformer", text_layers)):
        for i in range(layers):
            source, target = f"{tower}.encoder.layers.{i}.", f"{ours}.resblocks.{i}."
            pairs += [(source + a, target + b) for a, b in (
                ("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"))]
            for kind in ("weight", "bias"):
                state[f"{target}attn.in_proj_{kind}"] = torch.cat(
                    [hf[f"{source}self_attn.{q}_proj.{kind}"] for q in "qkv"])
    for source, target in pairs:
        for kind in ("weight", "bias"):
            state[f"{target}.{kind}"] = hf[f"{source}.{kind}"]
    return {key: value.contiguous() for key, value in state.items()}
