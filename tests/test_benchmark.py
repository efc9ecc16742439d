"""The benchmark's own measuring tools (the benchmarks themselves are run by hand, not in tests)."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))
import benchmark

# a stand-in worker: it holds ~200 MB of its own and touches 300 MB of shared memory (as a Ray worker
# maps object-store blocks), and burns 1.5 s of CPU
BUSY = ("import mmap, time; block = bytearray(200 * 2**20); block[::4096] = b'x' * len(block[::4096]); "
        "shared = mmap.mmap(-1, 300 * 2**20); shared[::4096] = b'y' * len(shared[::4096]); "
        "end = time.process_time() + 1.5\nwhile time.process_time() < end: pass")


def test_process_sampler_attributes_cpu_and_memory_to_roles_by_command_line(tmp_path):
    script = tmp_path / f"busy-{uuid.uuid4().hex}.py"  # a name no other process on the machine has
    script.write_text(BUSY)
    roles = (("never-matches-anything-0f3a", "idle role"), (script.name, "busy role"))
    with benchmark.ProcessSampler(interval_s=0.1, roles=roles) as sampler:
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
    role = [name for needle, name in benchmark.ProcessSampler.ROLES if needle in worker]
    assert "Ray daemons" not in role
    raylet = "/venv/lib/python3.11/site-packages/ray/core/src/ray/raylet/raylet --raylet_socket_name=/tmp/x"
    assert next(name for needle, name in benchmark.ProcessSampler.ROLES if needle in raylet) == "Ray daemons"
