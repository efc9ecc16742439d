"""The GPU path, checked on a machine without a GPU: the device a model actor takes, the half precisions a
GPU computes in, and the pipeline on a Ray that declares a GPU (a logical resource: Ray schedules the GPU
plan on it, while PyTorch finds no CUDA device)."""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import read_parts, tar_corpus

from pipeline.config import DEMO_BUNDLE, GenerationSettings, RunConfig
from pipeline.demo.scenes import generate_scene, render_scene
from pipeline.generation.captioning import caption_batch
from pipeline.io.images import prepare_pil
from pipeline.models.bundle import load_bundle
from pipeline.models.errors import ModelLoadError
from pipeline.run.model_stage import actor_device


def test_an_actor_computes_on_the_gpu_ray_gave_it_and_nowhere_else():
    # Ray leaves CUDA_VISIBLE_DEVICES alone for an actor of 0 GPUs: CUDA being visible is no reason to use it
    assert actor_device([], cuda_available=True) == torch.device("cpu")
    assert actor_device([], cuda_available=False) == torch.device("cpu")
    assert actor_device([3], cuda_available=True) == torch.device("cuda")
    with pytest.raises(ModelLoadError, match=r"^this model actor holds GPU 3 but PyTorch sees no CUDA device "
                                             r"\(torch .*\): .* --gpus-per-actor 0$"):
        actor_device([3], cuda_available=False)


def test_an_actor_given_every_gpu_takes_the_one_ray_named(monkeypatch):
    monkeypatch.setenv("RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES", "1")  # Ray sets no CUDA_VISIBLE_DEVICES
    assert actor_device(["2"], cuda_available=True) == torch.device("cuda", 2)


def test_an_actor_start_failure_is_the_remote_exception_on_one_line():
    """Ray's message carries the actor's remote traceback; torch's CUDA messages run over several lines,
    whose last named neither the error nor its cause."""
    from pipeline.run.chain import _creation_error

    def failure(*last_lines: str) -> Exception:
        return Exception("\n".join(["The actor died because of an error raised in its creation task, "
                                    "ray::MapWorker(MapBatches(CaptionActor)).__init__() (pid=1, ip=10.0.0.1)",
                                    "Traceback (most recent call last):",
                                    '  File "model_stage.py", line 9, in __init__',
                                    "    raise ModelLoadError(f'...: {problem}')", *last_lines]))

    assert _creation_error(failure("pipeline.models.errors.ModelLoadError: the bundle x changed")) == \
        "the bundle x changed"
    assert _creation_error(failure(
        "torch.AcceleratorError: CUDA error: no kernel image is available for execution on the device",
        "CUDA kernel errors might be asynchronously reported at some other API call, so the stacktrace below "
        "might be incorrect.", "For debugging consider passing CUDA_LAUNCH_BLOCKING=1",
        "Compile with `TORCH_USE_CUDA_DSA` to enable device-side assertions.", "")).startswith(
        "AcceleratorError: CUDA error: no kernel image is available for execution on the device CUDA kernel")
    assert _creation_error(failure("RuntimeError: Found no NVIDIA driver on your system. Please check that you",
                                   "have an NVIDIA GPU and installed a driver from",
                                   "http://www.nvidia.com/Download/index.aspx")) == (
        "RuntimeError: Found no NVIDIA driver on your system. Please check that you have an NVIDIA GPU and "
        "installed a driver from http://www.nvidia.com/Download/index.aspx")
    assert _creation_error(failure("MemoryError")) == "MemoryError"


@pytest.fixture(scope="module")
def demo_scenes():
    spec = load_bundle(DEMO_BUNDLE).encoder.image_spec
    rng = random.Random(11)
    images = [render_scene(generate_scene(rng), 320, 240, rng) for _ in range(24)]
    pixels = torch.from_numpy(np.stack([prepare_pil(image, spec) for image in images]))
    return pixels, [f"scene{i}" for i in range(len(images))]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("settings", [GenerationSettings(),
                                      GenerationSettings(method="beam", beam_width=3, num_candidates=3),
                                      GenerationSettings(method="sample", num_candidates=2, top_p=0.9)],
                         ids=["greedy", "beam", "sample"])
def test_half_precision_captions_as_fp32_does(demo_scenes, dtype, settings):
    """A GPU computes in fp16 or bf16 (`--dtype auto`): every method runs in them end to end (pixels
    normalized on the model's device, logits, KV cache, scorer) and agrees with fp32 on the demo bundle."""
    pixels, keys = demo_scenes
    reference = caption_batch(load_bundle(DEMO_BUNDLE), pixels, settings, keys=keys)
    half = caption_batch(load_bundle(DEMO_BUNDLE).to("cpu", dtype), pixels, settings, keys=keys)
    same = sum(a == b for a, b in zip(reference.captions, half.captions, strict=True))
    assert same >= 0.85 * len(keys)
    assert half.image_embeddings.dtype == np.float32 and half.clip_scores.dtype == np.float32
    assert np.abs(half.image_embeddings - reference.image_embeddings).max() < 0.01
    agreeing = [i for i in range(len(keys)) if reference.captions[i] == half.captions[i]]
    assert np.abs(half.clip_scores[agreeing] - reference.clip_scores[agreeing]).max() < 0.01


@pytest.fixture(scope="module")
def ray_with_a_logical_gpu():
    """Its own Ray, stopped afterwards, so that other modules' `ray_local` starts one without a GPU."""
    import ray

    ray.shutdown()
    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, configure_logging=False,
             log_to_driver=False, runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU machine's actor finds CUDA: the case is a node without")
def test_gpu_actors_that_find_no_cuda_stop_the_run_with_one_line(ray_with_a_logical_gpu, tiny_bundle, tmp_path):
    """A GPU node whose PyTorch has no CUDA (a CPU build, no driver) used to caption on its CPU while holding
    the GPU, ~100x slower and silent. The run takes the GPU plan (decode tasks, then actors of 1 GPU each,
    the default on a cluster with GPUs) and stops on the actor's reason; --gpus-per-actor 0 then captions
    every row on the CPUs of the same cluster."""
    from pipeline.run.chain import run
    from pipeline.run.errors import ActorStartFailed

    tar_corpus(tmp_path / "in", shards=2, per_shard=3)
    config = RunConfig(inputs=(str(tmp_path / "in" / "*.tar"),), output=str(tmp_path / "out"), model=str(tiny_bundle),
                       decode=GenerationSettings(max_new_tokens=3), batch_size=4)
    with pytest.raises(ActorStartFailed) as failed:
        run(config)
    assert "\n" not in str(failed.value)
    assert str(failed.value).startswith("a model actor could not start: this model actor holds GPU 0 but PyTorch "
                                        "sees no CUDA device")
    assert not (tmp_path / "out" / "captions").exists()
    run(replace(config, gpus_per_actor=0.0))
    table = read_parts(tmp_path / "out" / "captions")
    assert sorted(table.column("key").to_pylist()) == [f"{s:03d}{i:04d}" for s in range(2) for i in range(3)]
    assert set(table.column("status").to_pylist()) == {"ok"}
