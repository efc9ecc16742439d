"""The benchmark's own measuring tools (the benchmarks themselves are run by hand, not in tests)."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid

import pytest
import torch

from pipeline.quality.benchmarks import draft_effect, flops_per_image
from pipeline.quality.measuring import GpuSampler, ProcessSampler, bottleneck

# a stand-in worker: it holds ~200 MB of its own and touches 300 MB of shared memory (as a Ray worker
# maps object-store blocks), and burns 1.5 s of CPU
BUSY = ("import mmap, time; block = bytearray(200 * 2**20); block[::4096] = b'x' * len(block[::4096]); "
        "shared = mmap.mmap(-1, 300 * 2**20); shared[::4096] = b'y' * len(shared[::4096]); "
        "end = time.process_time() + 1.5\nwhile time.process_time() < end: pass")


def test_process_sampler_attributes_cpu_and_memory_to_roles_by_command_line(tmp_path):
    script = tmp_path / f"busy-{uuid.uuid4().hex}.py"  # a name no other process on the machine has
    script.write_text(BUSY)
    roles = (("never-matches-anything-0f3a", "idle role"), (script.name, "busy role"))
    with ProcessSampler(interval_s=0.1, roles=roles) as sampler:
        subprocess.run([sys.executable, str(script)], check=True, timeout=60)
    summary = sampler.summary()
    assert set(summary) == {"busy role"}
    busy = summary["busy role"]
    assert busy["processes"] == 1 and 1.2 <= busy["cpu_s"] <= 5.0 and busy["cpu_share"] == 1.0
    assert 500 <= busy["peak_rss_mb"] < 1300
    assert 200 <= busy["peak_private_mb"] < 450  # the shared pages are not its own


def test_ray_workers_are_not_taken_for_ray_daemons():
    # a worker's command line before Ray titles it names the raylet socket; later titles name its task
    worker = ("python .../ray/_private/workers/default_worker.py --raylet-name=/tmp/ray/sockets/raylet "
              "--gcs-address=127.0.0.1:6379")
    role = [name for needle, name in ProcessSampler.ROLES if needle in worker]
    assert "Ray daemons" not in role
    raylet = "/venv/lib/python3.11/site-packages/ray/core/src/ray/raylet/raylet --raylet_socket_name=/tmp/x"
    assert next(name for needle, name in ProcessSampler.ROLES if needle in raylet) == "Ray daemons"


def test_flop_counts_include_the_fused_attention_of_the_vision_tower(tiny_bundle, tmp_path):
    """nn.MultiheadAttention's inference fast path has no FLOP formula: uncounted, the encoder's count
    would lose its attention projections and the model stage's share of the matmul peak would read low."""
    from conftest import jpeg_bytes, write_tar

    from pipeline.models.bundle import load_bundle

    write_tar(tmp_path / "00000.tar", {f"{i:04d}": {"jpg": jpeg_bytes(i)} for i in range(4)})
    counts = flops_per_image(tiny_bundle, str(tmp_path / "00000.tar"), torch.float32, images=4)
    visual = load_bundle(tiny_bundle).encoder.clip.visual
    tokens = (visual.image_size[0] // visual.patch_size[0]) ** 2 + 1  # patches + class token
    matrices = sum(p.numel() for p in visual.transformer.parameters() if p.dim() == 2)
    assert counts["encoder"] >= 2 * tokens * matrices
    assert counts["decoder"] > 0 and counts["scorer"] > 0


def test_gpu_sampler_reads_nvidia_smi_and_names_the_bottleneck(tmp_path):
    """The benchmark's GPU figures come from nvidia-smi's loop: here a stand-in prints what it prints
    (one line per GPU and sample, "[N/A]" where a value is missing) and waits to be stopped."""
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho \"$@\" > \"$0.args\"\n"
                    "printf '0, 900\\n87, 1200\\n[N/A], 1300\\n93, 1500\\n0, 1500\\n0, 1500\\n'\nsleep 60\n")
    fake.chmod(0o755)
    with GpuSampler(command=str(fake)) as sampler:
        for _ in range(100):  # until the stand-in has written its samples
            if (tmp_path / "nvidia-smi.args").exists() and sampler.summary():
                break
            time.sleep(0.05)
    # the idle samples before the first busy one and after the last (Ray starting, models loading) stay out
    assert sampler.summary() == {"samples": 5, "utilization_mean_pct": 36.0, "utilization_active_mean_pct": 90.0,
                                 "utilization_max_pct": 93.0, "memory_peak_mib": 1500.0}
    assert "--query-gpu=utilization.gpu,memory.used" in (tmp_path / "nvidia-smi.args").read_text()
    assert sampler.process.poll() is not None  # stopped with the sampler
    with GpuSampler(command=str(tmp_path / "absent")) as none:
        pass
    assert none.summary() is None
    gpu = sampler.summary()
    assert bottleneck(gpu, cpu_busy_cores=3.0, cores=16).startswith("GPU")
    idle_gpu = {**gpu, "utilization_active_mean_pct": 40.0}
    assert bottleneck(idle_gpu, cpu_busy_cores=15.0, cores=16).startswith("CPU")
    assert bottleneck(idle_gpu, cpu_busy_cores=6.0, cores=16).startswith("neither")
    assert bottleneck(None, 6.0, 16) == "no GPU measured"


def test_the_draft_measure_compares_a_drafted_jpeg_with_its_full_decode(tiny_bundle, tmp_path):
    from conftest import jpeg_bytes

    (tmp_path / "large.jpg").write_bytes(jpeg_bytes(0, (600, 400)))  # past twice the encoder's 32 px: drafted
    (tmp_path / "small.jpg").write_bytes(jpeg_bytes(1, (60, 40)))  # decoded at full scale either way
    large, small = draft_effect(tiny_bundle, [tmp_path / "large.jpg", tmp_path / "small.jpg"], repeats=1)
    assert (large["width"], large["height"], large["pixels_differ"]) == (600, 400, True)
    assert 0.9 < large["cosine"] <= 1.0 and large["full_ms"] > 0 and large["draft_ms"] > 0
    assert not small["pixels_differ"] and small["cosine"] == pytest.approx(1.0, abs=1e-5)
