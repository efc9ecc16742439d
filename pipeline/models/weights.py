"""Safe weight files: safetensors in, safetensors out, and state-dict checks with readable errors."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.initialization import no_init_weights

from pipeline.models.errors import ModelLoadError


def building_for(weights: bool) -> AbstractContextManager:
    """Around a module's construction: no random initialization when a strict load of every parameter
    follows (it was ~1 s of ViT-B/32 + the ClipCap mapper's load on one core, in each model actor)."""
    return no_init_weights() if weights else nullcontext()


def load_weights(module: nn.Module, path: Path, rename: dict[str, str] | None = None) -> None:
    """Load a safetensors file into `module`, strictly, naming the file and key on any mismatch."""
    if not path.is_file():
        raise ModelLoadError(f"weights file missing: {path}")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: not a readable safetensors file ({exc})") from None
    load_state(module, state, str(path))


def load_state(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """`load_state_dict(strict=True)` with a one-line error listing missing/unexpected/mis-shaped keys."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = [
        f"{key} {list(state[key].shape)} (model needs {list(expected[key].shape)})"
        for key in sorted(set(state) & set(expected))
        if state[key].shape != expected[key].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_few(unexpected)}")
    if wrong_shape:
        problems.append(f"wrong shapes {_few(wrong_shape)}")
    if problems:
        raise ModelLoadError(f"{source}: " + "; ".join(problems))
    module.load_state_dict(state, strict=True)


def save_weights(module: nn.Module, path: Path, dtype: torch.dtype = torch.float32) -> None:
    """Write `module`'s state dict as safetensors, floating tensors stored as `dtype` (contiguous
    copies, so shared views are fine)."""
    state = {key: (value.to(dtype) if value.is_floating_point() else value).detach().contiguous().clone()
             for key, value in module.state_dict().items()}
    save_file(state, str(path))


def _few(items: list[str], limit: int = 4) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")
