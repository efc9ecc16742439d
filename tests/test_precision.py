import pytest
import torch

from pipeline import precision
from pipeline.training import TrainConfig


@pytest.mark.parametrize(("capability", "expected"), [
    ("AVX512", torch.bfloat16), ("AMX", torch.bfloat16), ("AVX2", torch.float32), ("DEFAULT", torch.float32)])
def test_auto_takes_bf16_only_where_the_cpu_runs_it_natively(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert precision.resolve_dtype("auto", torch.device("cpu")) == expected
    # training's autocast default follows the same rule; an explicit choice is kept
    assert TrainConfig(out="x").bf16 is (expected == torch.bfloat16)
    assert TrainConfig(out="x", bf16=True).bf16 is True


def test_explicit_dtypes_are_kept_on_any_device(monkeypatch):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        assert precision.resolve_dtype(name, torch.device("cpu")) == dtype
        assert precision.resolve_dtype(name, torch.device("cuda")) == dtype


@pytest.mark.parametrize(("native_bf16", "expected"), [(True, torch.bfloat16), (False, torch.float16)])
def test_auto_on_gpu_is_half_precision_with_tensor_cores(monkeypatch, native_bf16, expected):
    """torch counts bf16 emulated without tensor cores (a T4, a V100) as supported by default: fp16 there."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: native_bf16 or including_emulation)
    assert precision.resolve_dtype("auto", torch.device("cuda")) == expected
