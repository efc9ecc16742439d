"""What every training stage computes with: the device and float type, one optimizer step, the learning-rate
schedule, seeding, and images encoded by a CLIP."""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from pipeline.models.clip import ClipModel
from pipeline.precision import resolve_dtype
from pipeline.training.config import TrainConfig


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class Compute:
    """Where training computes and in which float type: `dtype` is the autocast type (float32: no autocast);
    fp16 scales the loss so that small gradients do not underflow."""

    device: torch.device
    dtype: torch.dtype

    @classmethod
    def of(cls, config: TrainConfig) -> Compute:
        """ValueError (one line) for a device this machine does not have."""
        name = config.device
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            device = torch.device(name)
        except RuntimeError:
            raise ValueError(f"--device {config.device!r}: expected auto, cpu, cuda or cuda:N") from None
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"--device {config.device!r}: expected auto, cpu, cuda or cuda:N")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {config.device}: PyTorch sees no CUDA device (torch {torch.__version__}, "
                             f"built for CUDA {torch.version.cuda or 'none'})")
        return cls(device, resolve_dtype(config.precision, device))

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """Autocast in `dtype`. On a CPU, attention then takes SDPA's math kernel: the CPU flash-attention
        kernel's bf16 backward ran 7x slower than its fp32 one (82 ms against 11 ms a call on an AMX Xeon),
        which cost the CLIP step 40% of its time."""
        enabled = self.dtype != torch.float32
        with (torch.autocast(self.device.type, dtype=self.dtype, enabled=enabled),
              sdpa_kernel([SDPBackend.MATH]) if enabled and self.device.type == "cpu" else contextlib.nullcontext()):
            yield

    def scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)


def optimizer_step(losses: Iterable[torch.Tensor], optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
          clip_norm_of: list[torch.nn.Parameter] | None = None) -> float:
    """One update: the gradients of every loss `losses` yields (one batch's, or its micro-batches' parts of it,
    each freed after its backward), through the grad scaler, clipped to norm 1 where asked. Returns their sum."""
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for loss in losses:
        scaler.scale(loss).backward()
        total += loss.item()
    if clip_norm_of is not None:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(clip_norm_of, 1.0)
    scaler.step(optimizer)
    scaler.update()
    return total


def cosine_lr(optimizer: torch.optim.Optimizer, base: float, step: int, total: int, steps_per_epoch: int) -> None:
    """Linear warmup over the first epoch, but at most a quarter of the run (a one-epoch run would
    otherwise only ramp up and end at the peak), then the cosine decay to zero."""
    warmup = min(steps_per_epoch, max(1, total // 4))
    lr = base * (step + 1) / warmup if step < warmup else base * 0.5 * (1 + math.cos(math.pi * step / total))
    for group in optimizer.param_groups:
        group["lr"] = lr


@torch.inference_mode()
def embed_images(clip: ClipModel, pixels: torch.Tensor, compute: Compute, batch_size: int = 256) -> torch.Tensor:
    """L2-normalized float32 embeddings of uint8 images, on the CPU, computed on `compute`'s device."""
    clip.to(compute.device)
    out = []
    for start in range(0, len(pixels), batch_size):
        with compute.autocast():
            out.append(clip.encode_images(pixels[start:start + batch_size]).float().cpu())
    return torch.cat(out)
