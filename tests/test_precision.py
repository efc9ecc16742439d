import pytest
import torch

from pipeline import precision
from pipeline.training.compute import Compute
from pipeline.training.config import TrainConfig


@pytest.mark.parametrize(("capability", "expected"), [
    ("AVX512", torch.bfloat16), ("AMX", torch.bfloat16), ("AVX2", torch.float32), ("DEFAULT", torch.float32)])
def test_auto_takes_bf16_only_where_the_cpu_runs_it_natively(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert precision.resolve_dtype("auto", torch.device("cpu")) == expected
    # training's autocast default follows the same rule; an explicit choice is kept
    assert Compute.of(TrainConfig(out="x", device="cpu")).dtype == expected
    assert Compute.of(TrainConfig(out="x", device="cpu", precision="bf16")).dtype == torch.bfloat16


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


def test_training_takes_the_gpu_only_where_there_is_one_and_names_a_device_it_lacks(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert Compute.of(TrainConfig(out="x")).device == torch.device("cpu")
    with pytest.raises(ValueError, match="--device cuda: PyTorch sees no CUDA device"):
        Compute.of(TrainConfig(out="x", device="cuda"))
    with pytest.raises(ValueError, match="expected auto, cpu, cuda or cuda:N"):
        Compute.of(TrainConfig(out="x", device="gpu"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    compute = Compute.of(TrainConfig(out="x"))  # a T4 or V100: fp16, with loss scaling
    assert compute.device == torch.device("cuda") and compute.dtype == torch.float16
