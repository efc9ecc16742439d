"""Which float type to compute in. bf16 only where the hardware runs it natively: on a CPU without
AVX-512 PyTorch falls back to scalar bf16 kernels (measured 0.3 GFLOP/s against 130 for fp32 on an
AVX2 EPYC), so bf16 there would make inference and training hundreds of times slower."""

from __future__ import annotations

import torch

# torch's own name for the widest vector unit it dispatches to; oneDNN runs bf16 matmuls natively
# (AVX512-BF16/AMX) or at about fp32 speed (plain AVX-512) on these, and not at all below them.
_BF16_CPU_CAPABILITIES = ("AVX512", "AVX512_BF16", "AMX")


def cpu_has_fast_bf16() -> bool:
    return torch.backends.cpu.get_cpu_capability() in _BF16_CPU_CAPABILITIES


def cuda_has_native_bf16() -> bool:
    # torch counts emulated bf16 (before Ampere: a T4, a V100) as supported by default; it has no tensor cores
    return torch.cuda.is_bf16_supported(including_emulation=False)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto': bf16 on a CPU with fast bf16 matmuls, bf16 (else fp16) on GPU, fp32 otherwise."""
    if name == "fp32":
        return torch.float32
    if name == "bf16":
        return torch.bfloat16
    if name == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if cuda_has_native_bf16() else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
