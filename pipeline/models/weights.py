"""Safe weight files: safetensors in, safetensors out, TorchScript archives read without running them,
and state-dict checks with readable errors."""

from __future__ import annotations

import collections
import pickle
import zipfile
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.initialization import no_init_weights

from pipeline.models.errors import ModelLoadError
from pipeline.text import describe_error


def building_for(weights: bool) -> AbstractContextManager:
    """Around a module's construction: no random initialization when a strict load of every parameter
    follows (it was ~1 s of ViT-B/32 + the ClipCap mapper's load on one core, in each model actor)."""
    return no_init_weights() if weights else nullcontext()


def load_weights(module: nn.Module, path: Path, rename: dict[str, str] | None = None, skip: str | None = None) -> None:
    """Load a safetensors file into `module`, strictly, naming the file and key on any mismatch. `skip`: a
    prefix of the module's keys the file does not hold (a tower the module borrows from another)."""
    if not path.is_file():
        raise ModelLoadError(f"weights file missing: {path}")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: not a readable safetensors file ({exc})") from None
    load_state(module, state, str(path), skip)


def load_state(module: nn.Module, state: dict[str, torch.Tensor], source: str, skip: str | None = None) -> None:
    """`load_state_dict(strict=True)` with a one-line error listing missing/unexpected/mis-shaped keys;
    the keys starting with `skip` are neither expected nor loaded."""
    expected = {key: value for key, value in module.state_dict().items() if skip is None or not key.startswith(skip)}
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
    module.load_state_dict(state, strict=skip is None)  # every other key was checked above


def save_weights(module: nn.Module, path: Path, dtype: torch.dtype = torch.float32, skip: str | None = None) -> None:
    """Write `module`'s state dict as safetensors, floating tensors stored as `dtype` (contiguous
    copies, so shared views are fine), without the keys starting with `skip`."""
    state = {key: (value.to(dtype) if value.is_floating_point() else value).detach().contiguous().clone()
             for key, value in module.state_dict().items() if skip is None or not key.startswith(skip)}
    save_file(state, str(path))


def is_torchscript_archive(path: str | Path) -> bool:
    """A `torch.jit.save` zip (OpenAI's original CLIP files are these): it holds data.pkl + constants.pkl."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        names = set(archive.namelist())
    return any(name.endswith("/constants.pkl") and name.replace("constants.pkl", "data.pkl") in names
               for name in names)


def read_torchscript_state(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor attribute of a TorchScript archive's modules, by dotted path ('visual.conv1.weight').

    `torch.jit.load` compiles the archive's code and can run it, and `torch.load(weights_only=True)` refuses
    such archives; so the archive's data.pkl is read here by an unpickler that builds tensors from the
    archive's storages, stand-ins that only keep state for the archive's own classes, and nothing else.
    Non-parameter tensors (a cached attention mask) come along; the caller keeps the keys its model has."""
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [name for name in archive.namelist() if name.endswith("/data.pkl") and name.count("/") == 1]
            if not pickles:
                raise ModelLoadError(f"{path}: a zip without a TorchScript data.pkl")
            root = pickles[0].removesuffix("data.pkl")
            byteorder = f"{root}byteorder"
            if byteorder in archive.namelist() and archive.read(byteorder).strip() == b"big":
                raise ModelLoadError(f"{path}: big-endian TorchScript archives are not supported")
            with archive.open(pickles[0]) as handle:
                module = _TorchScriptUnpickler(handle, archive, root).load()
        state: dict[str, torch.Tensor] = {}
        _collect_tensors(module, "", state)
    except ModelLoadError:
        raise
    except Exception as exc:  # a hostile or broken pickle can fail in any way; it gets one line, not a traceback
        raise ModelLoadError(f"{path}: not a readable TorchScript archive ({describe_error(exc, 200)})") from None
    return state


class _ScriptObject:
    """Stands in for one of the archive's TorchScript classes: keeps the state it is given, runs nothing."""

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _rebuild_tensor(storage: torch.Tensor, offset: int, size: tuple[int, ...], stride: tuple[int, ...],
                    *_unused: Any) -> torch.Tensor:
    return storage.as_strided(size, stride, offset)


def _same(value: Any, *_type_tags: Any) -> Any:
    return value


_STORAGE_DTYPES = {f"{name}Storage": dtype for name, dtype in (
    ("Float", torch.float32), ("Half", torch.float16), ("BFloat16", torch.bfloat16), ("Double", torch.float64),
    ("Long", torch.int64), ("Int", torch.int32), ("Short", torch.int16), ("Char", torch.int8),
    ("Byte", torch.uint8), ("Bool", torch.bool))}
# the only callables the archive's pickle may name: tensor rebuilding and TorchScript's typed-list helpers
_ALLOWED = {("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
            ("collections", "OrderedDict"): collections.OrderedDict,
            **{("torch.jit._pickle", name): _same for name in (
                "build_intlist", "build_doublelist", "build_boollist", "build_tensorlist", "restore_type_tag")},
            **{("torch", name): dtype for name, dtype in _STORAGE_DTYPES.items()}}


class _TorchScriptUnpickler(pickle.Unpickler):
    def __init__(self, handle: Any, archive: zipfile.ZipFile, root: str):
        super().__init__(handle)
        self.archive = archive
        self.root = root

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("__torch__.") or module == "__torch__":
            return _ScriptObject
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        raise pickle.UnpicklingError(f"refusing {module}.{name}")

    def persistent_load(self, pid: Any) -> torch.Tensor:
        """('storage', dtype, key, location, numel): the flat tensor stored under data/<key>."""
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], torch.dtype)):
            raise pickle.UnpicklingError(f"unexpected persistent id {str(pid)[:80]}")
        _, dtype, key, _location, numel = pid
        data = bytearray(self.archive.read(f"{self.root}data/{key}"))
        if len(data) < numel * dtype.itemsize:
            raise pickle.UnpicklingError(f"storage {key} holds {len(data)} bytes, not {numel} x {dtype}")
        return torch.frombuffer(data, dtype=dtype, count=numel) if numel else torch.empty(0, dtype=dtype)


def _collect_tensors(value: Any, prefix: str, out: dict[str, torch.Tensor]) -> None:
    state = getattr(value, "state", None) if isinstance(value, _ScriptObject) else value
    if not isinstance(state, dict):
        return
    for name, item in state.items():
        if isinstance(item, torch.Tensor):
            out[f"{prefix}{name}"] = item
        elif isinstance(item, (_ScriptObject, dict)):
            _collect_tensors(item, f"{prefix}{name}.", out)


def _few(items: list[str], limit: int = 4) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def load_failure(exc: BaseException) -> str:
    """Why a checkpoint did not load, in one line; a pickle refused by torch.load(weights_only=True) says so."""
    if isinstance(exc, pickle.UnpicklingError):
        return "refused: the checkpoint pickles more than tensors (only weights-only checkpoints are loaded)"
    return describe_error(exc)
