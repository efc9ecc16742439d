"""Measuring a machine while it runs a job: CPU and memory per process role from /proc, GPU
utilisation and memory from nvidia-smi, the matmul peak, and which of them bound the run."""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from collections.abc import Iterable

import torch

CPU = torch.device("cpu")


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), with the instruction sets that decide its matmul speed."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                name, _, value = line.partition(":")
                fields.setdefault(name.strip(), value.strip())
    except OSError:
        import platform

        return platform.processor() or "unknown"
    flags = set(fields.get("flags", "").split())
    sets = [name for name, flag in (("AVX2", "avx2"), ("AVX-512", "avx512f"), ("AVX-512 bf16", "avx512_bf16"),
                                    ("AMX", "amx_tile")) if flag in flags]
    return f"{fields.get('model name', 'unknown')} ({', '.join(sets) or 'no AVX2'}), {os.cpu_count()} cores"


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that a timer read next includes it (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_gflops(dtype: torch.dtype, size: int = 2048, repeats: int = 5,
                  device: torch.device = CPU) -> float:
    a, b = (torch.randn(size, size, dtype=dtype, device=device) for _ in range(2))
    a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


class GpuSampler:
    """Samples the GPUs' utilisation and memory with `nvidia-smi --loop-ms` in the background; a summary of
    None where there is no nvidia-smi (no NVIDIA GPU)."""

    QUERY = ("--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits")

    def __init__(self, interval_ms: int = 250, command: str = "nvidia-smi"):
        self.command = [command, *self.QUERY, f"--loop-ms={interval_ms}"]
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> GpuSampler:
        self.output = tempfile.TemporaryFile()  # read back by summary()
        try:
            self.process = subprocess.Popen(self.command, stdout=self.output, stderr=subprocess.DEVNULL)
        except OSError:
            self.process = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait()

    def summary(self) -> dict[str, float] | None:
        """Over every sample of every GPU: mean and peak utilisation (%), peak memory used (MiB); and the mean
        from the first busy sample to the last, which leaves out the run's start and end (Ray, model load)."""
        self.output.seek(0)
        samples = []
        for line in self.output.read().decode(errors="replace").splitlines():
            try:
                utilization, memory = (float(field) for field in line.split(","))
            except ValueError:
                continue  # "[N/A]", a line cut by the stop
            samples.append((utilization, memory))
        if not samples:
            return None
        busy = [i for i, (utilization, _) in enumerate(samples) if utilization > 0]
        active = samples[busy[0]:busy[-1] + 1] if busy else samples
        return {"samples": len(samples), "utilization_mean_pct": _mean_pct(u for u, _ in samples),
                "utilization_active_mean_pct": _mean_pct(u for u, _ in active),
                "utilization_max_pct": max(u for u, _ in samples), "memory_peak_mib": max(m for _, m in samples)}


def _mean_pct(values: Iterable[float]) -> float:
    values = list(values)
    return round(sum(values) / len(values), 1)


def bottleneck(gpu: dict[str, float] | None, cpu_busy_cores: float, cores: int) -> str:
    """What held a GPU run back, from the GPU's mean utilisation while batches flowed and how many cores were
    busy (over the whole run: a lower bound)."""
    if gpu is None:
        return "no GPU measured"
    if gpu["utilization_active_mean_pct"] >= 80:
        return "GPU (the model stage)"
    if cpu_busy_cores >= 0.85 * cores:
        return "CPU (JPEG decode and the model actor's host work)"
    return "neither saturated: the pipeline's own latency (batches in flight, scheduling)"


class ProcessSampler:
    """Samples every process on this machine from /proc once a second, in a thread: peak RSS, peak
    private memory (RSS less the shared object-store pages a Ray worker has touched) and CPU seconds
    per role, the role read off Ray's process titles (a worker is titled by the task it runs:
    ray::ReadReadShards, ray::MapWorker(MapBatches(CaptionActor)), ray::Write) or the command line.
    CPU seconds per role are the time share of each stage; Linux only."""

    ROLES = (("CaptionActor", "model actor"), ("ReadReadShards", "read tasks"), ("Write", "write tasks"),
             ("write_webdataset", "webdataset tasks"), ("job submit", "ray job client"),
             ("caption_shards.py", "job driver"),
             # Ray's own processes, by their binaries and scripts: a worker's command line before its
             # first title names the raylet socket, so a bare "raylet" would match every worker
             ("ray/raylet/raylet", "Ray daemons"), ("ray/gcs/gcs_server", "Ray daemons"),
             ("ray/dashboard/", "Ray daemons"), ("ray-dashboard-", "Ray daemons"), ("DashboardAgent", "Ray daemons"),
             ("RuntimeEnvAgent", "Ray daemons"), ("log_monitor.py", "Ray daemons"),
             ("_private/monitor.py", "Ray daemons"),
             ("ray::", "other Ray workers"))

    def __init__(self, interval_s: float = 1.0, roles: tuple[tuple[str, str], ...] = ROLES):
        import threading

        self.interval_s = interval_s
        self.role_needles = roles
        self.ticks = os.sysconf("SC_CLK_TCK")
        self.first_cpu: dict[int, float] = {}
        self.last_cpu: dict[int, float] = {}
        self.peak_rss: dict[int, float] = {}
        self.peak_private: dict[int, float] = {}
        self.roles: dict[int, set[str]] = {}
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> ProcessSampler:
        self._sample()  # CPU used before the measurement (a running Ray head) is not counted
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        self.thread.join()
        self._sample()

    def _loop(self) -> None:
        while not self.stop_event.wait(self.interval_s):
            self._sample()

    def _sample(self) -> None:
        page_mb = os.sysconf("SC_PAGE_SIZE") / 2**20
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            pid = int(entry)
            try:
                with open(f"/proc/{pid}/stat") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
                with open(f"/proc/{pid}/cmdline", "rb") as handle:
                    title = handle.read().replace(b"\0", b" ").decode(errors="replace")
                role = next((name for needle, name in self.role_needles if needle in title), None)
                if role is None and pid not in self.roles:
                    continue
                with open(f"/proc/{pid}/status") as handle:
                    # anonymous pages only: Ray's object store is shared memory, counted in RSS by
                    # every worker that maps a block, though it is one copy on the machine
                    private_kb = next((int(line.split()[1]) for line in handle if line.startswith("RssAnon:")), 0)
            except (OSError, IndexError):
                continue  # the process ended between listing and reading
            cpu = (int(fields[11]) + int(fields[12])) / self.ticks
            self.first_cpu.setdefault(pid, cpu)
            self.last_cpu[pid] = cpu
            self.peak_rss[pid] = max(self.peak_rss.get(pid, 0.0), int(fields[21]) * page_mb)
            self.peak_private[pid] = max(self.peak_private.get(pid, 0.0), private_kb / 1024)
            roles = self.roles.setdefault(pid, set())
            if role is not None and role != "other Ray workers":
                roles.add(role)

    def summary(self) -> dict[str, dict[str, float]]:
        """Per role: processes, CPU seconds, share of all CPU seconds, peak RSS and peak private memory
        of one process (MB)."""
        by_role: dict[str, dict[str, float]] = {}
        for pid, roles in self.roles.items():
            role = " + ".join(sorted(roles)) or "other Ray workers"
            figures = by_role.setdefault(role, {"processes": 0, "cpu_s": 0.0, "peak_rss_mb": 0.0,
                                                "peak_private_mb": 0.0})
            figures["processes"] += 1
            figures["cpu_s"] += self.last_cpu[pid] - self.first_cpu[pid]
            figures["peak_rss_mb"] = max(figures["peak_rss_mb"], self.peak_rss[pid])
            figures["peak_private_mb"] = max(figures["peak_private_mb"], self.peak_private[pid])
        total = sum(f["cpu_s"] for f in by_role.values()) or 1.0
        return {role: {"processes": f["processes"], "cpu_s": round(f["cpu_s"], 1),
                       "cpu_share": round(f["cpu_s"] / total, 3), "peak_rss_mb": round(f["peak_rss_mb"], 1),
                       "peak_private_mb": round(f["peak_private_mb"], 1)}
                for role, f in sorted(by_role.items(), key=lambda item: -item[1]["cpu_s"])}
