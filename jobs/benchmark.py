"""Speed benchmarks on real-size architectures with random weights (speed does not depend on them).

  python jobs/benchmark.py decoding [--batch-size 64] [--json out.json]
  python jobs/benchmark.py pipeline [--images 3000] [--json out.json]
  python jobs/benchmark.py scale [--images 123287] [--kill-after 600] [--keep-top-fraction 0.5] [--json out.json]

Each run measures every figure it reports itself, so ratios compare numbers taken on one machine
in one run. Model: ClipCap MLP mapper 512 -> 3840 -> 7680 + GPT-2 small (124M, 50,257-token vocab).
"""

from __future__ import annotations

import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import _bootstrap  # noqa: F401
import click
import numpy as np
import torch
from tokenizers import Tokenizer, models
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from pipeline.config import DecodeSettings
from pipeline.generation.decoding import decode_texts, generate, reference_clipcap_generate
from pipeline.models.captioner import CaptionerConfig, PrefixCaptioner
from pipeline.precision import cpu_has_fast_bf16, cuda_has_native_bf16, resolve_dtype

GPT2_VOCAB = 50257
CPU = torch.device("cpu")
EOS = "<|endoftext|>"


def gpt2_small_captioner(seed: int = 0) -> PrefixCaptioner:
    """GPT-2 small's exact shapes with a stand-in word-level vocabulary of GPT-2's size: decoding cost
    depends on the vocabulary size, not on which strings the ids stand for. The words are short letter
    strings, so the scorer's tokenizer reads a caption of 20 of them in about as many tokens as a real
    one (digits would be one CLIP token each and fill its 77-token context)."""
    vocab = {_letters(i): i for i in range(GPT2_VOCAB - 1)} | {EOS: GPT2_VOCAB - 1}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token=EOS)),
                                        eos_token=EOS, pad_token=EOS)
    torch.manual_seed(seed)
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=GPT2_VOCAB, eos_token_id=GPT2_VOCAB - 1)).eval()
    # no '.' stop: every caption runs the full max_new_tokens, the same work for both loops
    return PrefixCaptioner(CaptionerConfig(stop_token=""), lm, tokenizer).eval()


def _letters(number: int) -> str:
    word = ""
    while True:
        number, digit = divmod(number, 26)
        word += chr(ord("a") + digit)
        if not number:
            return word


def compute_dtypes(device: torch.device = CPU) -> list[torch.dtype]:
    """On CPU fp32, and bf16 where this CPU runs it natively (elsewhere a bf16 model would take hours here);
    on a GPU the half precisions it has tensor cores for."""
    if device.type == "cuda":
        return [torch.float16] + ([torch.bfloat16] if cuda_has_native_bf16() else [])
    return [torch.float32, torch.bfloat16] if cpu_has_fast_bf16() else [torch.float32]


def _sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that a timer read next includes it (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _rate(count: int, fn) -> float:
    start = time.perf_counter()
    fn()
    return count / (time.perf_counter() - start)


@torch.inference_mode()
def bench_decoding(batch_size: int, max_new_tokens: int, reference_images: int) -> dict:
    captioner = gpt2_small_captioner()
    embeddings = torch.nn.functional.normalize(torch.randn(batch_size, 512), dim=-1)
    settings = DecodeSettings(max_new_tokens=max_new_tokens)
    figures: dict[str, float] = {}
    names = {dtype: _dtype_name(dtype) for dtype in compute_dtypes()}
    for dtype, name in names.items():
        captioner.to(dtype)
        prefix = captioner.prefix(embeddings)
        generate(captioner, prefix[:4], settings)  # warm-up
        figures[f"reference_{name}"] = _rate(reference_images, lambda p=prefix: [
            reference_clipcap_generate(captioner, p[i:i + 1], max_new_tokens) for i in range(reference_images)])
        figures[f"batched_{name}"] = _rate(batch_size, lambda p=prefix: generate(captioner, p, settings))
    reference = figures["reference_float32"]  # the original ClipCap loop runs in fp32
    best = max(figures[f"batched_{d}"] for d in names.values())
    return {
        "captions_per_s": figures,
        "speedup_vs_reference_fp32": best / reference,
        "speedup_same_dtype": {d: figures[f"batched_{d}"] / figures[f"reference_{d}"]
                               for d in names.values()},
        "batch_size": batch_size,
        "max_new_tokens": max_new_tokens,
    }


def real_size_bundle(path: Path) -> Path:
    """ViT-B-32 (open_clip config) + ClipCap MLP 512->3840->7680 + GPT-2 small, random weights,
    saved as a bundle (fp16 storage) so the pipeline and the bare loop load the very same model."""
    from safetensors.torch import save_file

    from pipeline.models.bundle import save_bundle
    from pipeline.models.clip import ClipSpec, create_clip

    if (path / "bundle.json").is_file():
        return path
    torch.manual_seed(0)
    clip = create_clip(ClipSpec(arch="ViT-B-32"))
    weights = path.parent / "vit-b-32-random.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in clip.clip.state_dict().items()}, str(weights))
    save_bundle(path, clip, ClipSpec(arch="ViT-B-32", weights=str(weights)), gpt2_small_captioner(),
                name="bench-vit-b-32-gpt2-small", dtype=torch.float16)
    weights.unlink()
    return path


def photo_corpus(root: Path, images: int, shards: int) -> str:
    """640x480 JPEG scenes in WebDataset shards (the demo world drawn at COCO size), one corpus per size."""
    from pipeline.demo.world import write_corpus

    root = root.with_name(f"{root.name}-{images}x{shards}")
    if not (root / "test").is_dir():
        write_corpus(root, seed=1, counts={"test": images}, size=(640, 480),
                     shard_size=max(1, -(-images // shards)), formats=("webdataset",),
                     workers=len(os.sched_getaffinity(0)))
    return str(root / "test" / "*.tar")


def flops_per_image(bundle_dir: Path, inputs: str, dtype: torch.dtype, images: int = 16) -> dict[str, float]:
    """FLOPs of each model step per image, as PyTorch's FlopCounterMode counts the operations that run
    (a multiply-add is 2), on the corpus's first images, decoding as the bare loop does."""
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.io.images import decode_image
    from pipeline.io.sources import expand_inputs, read_samples
    from pipeline.models.bundle import load_bundle

    bundle = load_bundle(bundle_dir).to("cpu", dtype)
    records = (record for shard in expand_inputs([inputs]) for record in read_samples(shard))
    pixels = torch.from_numpy(np.stack([decode_image(next(records)["image"], bundle.encoder.image_spec).pixels
                                        for _ in range(images)]))
    counts = {}
    # the fused attention fast path of nn.MultiheadAttention has no FLOP formula: count the same math unfused
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    with torch.inference_mode():
        with FlopCounterMode(display=False) as counter:
            embeddings = bundle.encoder.encode_images(pixels)
        counts["encoder"] = counter.get_total_flops() / images
        with FlopCounterMode(display=False) as counter:
            texts = decode_texts(bundle.captioner, [c[0] for c in generate(
                bundle.captioner, bundle.captioner.prefix(embeddings), DecodeSettings(max_new_tokens=20))])
        counts["decoder"] = counter.get_total_flops() / images
        with FlopCounterMode(display=False) as counter:
            bundle.scorer.encode_texts(texts)
        counts["scorer"] = counter.get_total_flops() / images
    torch.backends.mha.set_fastpath_enabled(fastpath)
    return counts


def bare_loop(bundle_dir: Path, inputs: str, batch_size: int, dtype: torch.dtype, limit: int | None = None,
              device: torch.device = CPU) -> dict:
    """decode JPEG -> encode -> caption -> score in one process, no Ray; model load included, as in
    the pipeline's actor. Also times each stage (decoding on this process's one thread)."""
    from pipeline.io.images import decode_image
    from pipeline.io.sources import expand_inputs, read_samples
    from pipeline.models.bundle import load_bundle

    started = time.perf_counter()
    bundle = load_bundle(bundle_dir).to(device, dtype)
    _sync(device)
    stages = {"load": time.perf_counter() - started, "read+decode": 0.0, "encode": 0.0, "caption": 0.0,
              "score": 0.0}
    settings = DecodeSettings(max_new_tokens=20)
    images = 0

    def run_batch(pixels: list) -> None:
        batch = torch.from_numpy(np.stack(pixels))
        with torch.inference_mode():
            t0 = time.perf_counter()
            features = bundle.encoder.encode_images(batch, normalize=False)  # as caption_batch
            embeddings = torch.nn.functional.normalize(features, dim=-1)
            _sync(device)
            t1 = time.perf_counter()
            texts = decode_texts(bundle.captioner, [c[0] for c in generate(
                bundle.captioner, bundle.captioner.prefix(features), settings)])
            t2 = time.perf_counter()
            (embeddings * bundle.scorer.encode_texts(texts)).sum(-1).cpu()  # as caption_batch: scores to the host
            t3 = time.perf_counter()
        stages["encode"] += t1 - t0
        stages["caption"] += t2 - t1
        stages["score"] += t3 - t2

    pending: list = []
    t_read = time.perf_counter()
    for shard in expand_inputs([inputs]):
        for record in read_samples(shard):
            pending.append(decode_image(record["image"], bundle.encoder.image_spec).pixels)
            images += 1
            if len(pending) == batch_size or images == limit:
                stages["read+decode"] += time.perf_counter() - t_read
                run_batch(pending)
                pending = []
                t_read = time.perf_counter()
            if images == limit:
                break
        if images == limit:
            break
    if pending:
        stages["read+decode"] += time.perf_counter() - t_read
        run_batch(pending)
    wall = time.perf_counter() - started
    return {"images": images, "wall_s": wall, "images_per_s": images / wall, "stage_s": stages}


def ray_pipeline(bundle_dir: Path, inputs: list[str], out: Path, batch_size: int, dtype: str,
                 actors: int | None = None, running: bool = False, gpus: float | None = None) -> dict:
    """The whole job in this process as a driver. By default it starts and stops Ray inside the measured
    time (`python jobs/caption_shards.py` on a machine without a Ray); `running`: it connects to the
    Ray that `running_ray` started, as a job `ray job submit` sends to a running head does (its
    connecting is measured). On CPU the model actors share the cores (one actor: all of them as its
    threads). None: the job's defaults, `--actors auto` and `--gpus-per-actor` (1 where there are GPUs)."""
    import shutil

    import ray

    from pipeline.config import ActorRange, RunConfig
    from pipeline.run.chain import run

    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    if running:
        ray.init(address="auto", log_to_driver=True, configure_logging=False)
    summary = run(RunConfig(inputs=tuple(inputs), output=str(out), model=str(bundle_dir), batch_size=batch_size,
                            dtype=dtype, decode=DecodeSettings(max_new_tokens=20),
                            actors=actors and ActorRange(actors, actors), gpus_per_actor=gpus))
    ray.shutdown()
    wall = time.perf_counter() - started
    rows = summary["counts"]["rows"]
    return {"images": rows, "wall_s": wall, "images_per_s": rows / wall,
            "model_stage_images_per_s": rows / summary["timings"]["model_stage_s"],
            "actor_peak_rss_mb": summary["counts"]["model_actor_peak_rss_mb"], "actors": summary["actors"]["max"],
            "timings": summary["timings"]}


@contextmanager
def running_ray() -> Iterator[float]:
    """A Ray head on this machine, as `ray start --head` starts one for `ray job submit`; yields the
    seconds it took to start, stops it at the end."""
    ray_cli = str(Path(sys.executable).with_name("ray"))
    # Ray 2.60 turns token auth on for a head once any local ray.init() wrote a token: both sides use it
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token")}
    started = time.perf_counter()
    subprocess.run([ray_cli, "start", "--head", f"--num-cpus={len(os.sched_getaffinity(0))}",
                    "--disable-usage-stats"], env=env, check=True, capture_output=True)
    try:
        yield time.perf_counter() - started
    finally:
        subprocess.run([ray_cli, "stop", "--force"], env=env, capture_output=True)


def matmul_gflops(dtype: torch.dtype, size: int = 2048, repeats: int = 5,
                  device: torch.device = CPU) -> float:
    a, b = (torch.randn(size, size, dtype=dtype, device=device) for _ in range(2))
    a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
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
    ray::ReadReadShards, ray::MapWorker(MapBatches(CaptionStage)), ray::Write) or the command line.
    CPU seconds per role are the time share of each stage; Linux only."""

    ROLES = (("CaptionStage", "model actor"), ("ReadReadShards", "read tasks"), ("Write", "write tasks"),
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


@click.group()
def main() -> None:
    """Benchmarks; each prints a table and can write JSON."""


@main.command()
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--max-new-tokens", default=20, show_default=True, type=click.IntRange(min=1))
@click.option("--reference-images", default=3, show_default=True, type=click.IntRange(min=1))
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None)
def decoding(batch_size: int, max_new_tokens: int, reference_images: int, json_path: Path | None) -> None:
    """Batched KV-cache greedy decoding vs the original ClipCap loop, GPT-2 small, fp32 (and bf16 where
    this CPU runs it natively)."""
    result = bench_decoding(batch_size, max_new_tokens, reference_images)
    result["machine"] = {"cpu_threads": torch.get_num_threads(), "processor": platform.processor(),
                         "torch": torch.__version__}
    click.echo(f"{'loop':<28}{'captions/s':>12}")
    for name, value in result["captions_per_s"].items():
        click.echo(f"{name:<28}{value:>12.2f}")
    click.echo(f"batched (best dtype) / reference fp32: {result['speedup_vs_reference_fp32']:.1f}x")
    if json_path:
        json_path.write_text(json.dumps(result, indent=2))



@main.command()
@click.option("--images", default=3000, show_default=True, type=click.IntRange(min=8),
              help="Enough for the run's fixed cost (Ray's start, actors loading their models) to weigh "
                   "less than in a short run; the steady-state figures remove it.")
@click.option("--batch-size", default=256, show_default=True, type=click.IntRange(min=1),
              help="The job's default.")
@click.option("--workdir", default="/tmp/captioner-bench", show_default=True, type=click.Path(path_type=Path))
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where the models run, in the bare loop and in the pipeline (auto: cuda where there is one).")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None)
def pipeline(images: int, batch_size: int, workdir: Path, device: str, json_path: Path | None) -> None:
    """Bare in-process loop vs the full Ray pipeline on the same real-size model and 640x480 JPEGs;
    dtype and batch-size variants of the bare loop; time per stage; actor memory. The pipeline runs
    as the job does by default (`--actors auto`): as plain `python` (Ray started inside the measured time),
    and on a running Ray head (as `ray job submit` runs it; the head's start is reported apart); also with
    one model actor on all cores when that default is more than one. On a GPU the running-head run also
    samples GPU utilisation and memory and the cores' load, and names the bottleneck; the pipeline runs
    in each half precision."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    on = torch.device(device)
    gpus = 1.0 if on.type == "cuda" else 0.0
    bundle_dir = real_size_bundle(workdir / "bundle")
    inputs = photo_corpus(workdir / "corpus", images, shards=max(4, -(-images // 400)))
    shards = sorted(str(path) for path in Path(inputs).parent.glob("*.tar"))
    dtype = resolve_dtype("auto", on)  # what the pipeline's "auto" computes in there
    result: dict = {"images": images, "batch_size": batch_size, "device": str(on), "dtype": _dtype_name(dtype),
                    # FLOPs do not depend on where they run: counted on the CPU
                    "flops_per_image": flops_per_image(bundle_dir, inputs,
                                                       dtype if on.type == "cpu" else torch.float32)}
    if on.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(on)
        result["matmul_gflops"] = {_dtype_name(d): matmul_gflops(d, size=8192, repeats=20, device=on)
                                   for d in compute_dtypes(on)}
    else:  # a dtype this CPU does not run natively is timed on a small product only, to record how slow it is
        result["matmul_gflops"] = {_dtype_name(d): matmul_gflops(d, size=2048 if d in compute_dtypes() else 256)
                                   for d in (torch.float32, torch.bfloat16)}
    variants = {}
    for variant_dtype in compute_dtypes(on):
        for size in sorted({32, batch_size}):
            variants[f"{_dtype_name(variant_dtype)}_batch{size}"] = bare_loop(
                bundle_dir, inputs, size, variant_dtype, limit=min(images, 2 * size), device=on)["images_per_s"]
    result["bare_variants_images_per_s"] = variants
    result["bare"] = bare_loop(bundle_dir, inputs, batch_size, dtype, device=on)
    result["ray"] = ray_pipeline(bundle_dir, shards, workdir / "out", batch_size, "auto", gpus=gpus)
    result["ray_over_bare"] = result["ray"]["images_per_s"] / result["bare"]["images_per_s"]
    if result["ray"]["actors"] > 1 and on.type == "cpu":
        result["ray_one_actor"] = ray_pipeline(bundle_dir, shards, workdir / "out", batch_size, "auto", 1, gpus=gpus)
        result["ray_one_actor_over_bare"] = result["ray_one_actor"]["images_per_s"] / result["bare"]["images_per_s"]
    # Steady state: each again on the first half of the shards; the second half's images over the
    # difference in wall time cancels each side's fixed start-up cost (model load; actors starting).
    half_shards = shards[: len(shards) // 2]
    half_images = result["bare"]["images"] * len(half_shards) // len(shards)
    result["bare_half"] = bare_loop(bundle_dir, inputs, batch_size, dtype, limit=half_images, device=on)
    with running_ray() as start_s:
        result["ray_start_s"] = start_s
        with ProcessSampler() as processes, GpuSampler() as gpu:
            result["ray_running"] = ray_pipeline(bundle_dir, shards, workdir / "out", batch_size, "auto",
                                                 running=True, gpus=gpus)
        by_role, gpu_sampled, cores = processes.summary(), gpu.summary(), len(os.sched_getaffinity(0))
        busy_cores = sum(role["cpu_s"] for role in by_role.values()) / result["ray_running"]["wall_s"]
        result["ray_running"].update(processes=by_role, gpu_sampled=gpu_sampled, busy_cores=round(busy_cores, 2),
                                     cores=cores)
        if on.type == "cuda":
            result["bottleneck"] = bottleneck(gpu_sampled, busy_cores, cores)
            # the run above computed in "auto"'s half precision: the others run once more
            result["ray_running_by_dtype_images_per_s"] = {_dtype_name(dtype): result["ray_running"]["images_per_s"]}
            for name in ("fp16", "bf16"):  # as the job's --dtype names them
                other = resolve_dtype(name, on)
                if other != dtype and other in compute_dtypes(on):
                    result["ray_running_by_dtype_images_per_s"][_dtype_name(other)] = ray_pipeline(
                        bundle_dir, shards, workdir / "out", batch_size, name, running=True, gpus=gpus)["images_per_s"]
        result["ray_running_half"] = ray_pipeline(bundle_dir, half_shards, workdir / "out", batch_size, "auto",
                                                  running=True, gpus=gpus)
    result["ray_running_over_bare"] = result["ray_running"]["images_per_s"] / result["bare"]["images_per_s"]
    rest = result["ray_running"]["images"] - result["ray_running_half"]["images"]
    result["steady_images_per_s"] = {
        "bare": rest / (result["bare"]["wall_s"] - result["bare_half"]["wall_s"]),
        "ray": rest / (result["ray_running"]["wall_s"] - result["ray_running_half"]["wall_s"])}
    result["ray_over_bare_steady"] = result["steady_images_per_s"]["ray"] / result["steady_images_per_s"]["bare"]
    peak = result["matmul_gflops"][_dtype_name(dtype)] * 1e9

    def share_of_peak(steps: dict[str, str]) -> float:  # FLOP count -> stage timed for it
        seconds = sum(result["bare"]["stage_s"][stage] for stage in steps.values())
        return result["bare"]["images"] * sum(result["flops_per_image"][k] for k in steps) / seconds / peak

    result["model_stage_share_of_matmul_peak"] = share_of_peak(
        {"encoder": "encode", "decoder": "caption", "scorer": "score"})
    result["encoder_decoder_share_of_matmul_peak"] = share_of_peak({"encoder": "encode", "decoder": "caption"})
    click.echo(f"compute dtype {_dtype_name(dtype)}; matmul GFLOP/s: "
               + ", ".join(f"{k} {v:.1f}" for k, v in result["matmul_gflops"].items())
               + "; GFLOP per image: " + ", ".join(f"{k} {v / 1e9:.2f}" for k, v in result["flops_per_image"].items()))
    click.echo(f"{'measure':<44}{'value':>12}")
    for label, value in [*((f"bare loop {k} (images/s)", v) for k, v in variants.items()),
                         ("bare loop, full corpus (images/s)", result["bare"]["images_per_s"]),
                         (f"Ray pipeline, {result['ray']['actors']} actor(s), Ray started (images/s)",
                          result["ray"]["images_per_s"]),
                         ("Ray started / bare", result["ray_over_bare"]),
                         ("Ray's start (ray start --head, s)", result["ray_start_s"]),
                         ("Ray pipeline on a running Ray (images/s)", result["ray_running"]["images_per_s"]),
                         ("Ray on a running Ray / bare", result["ray_running_over_bare"]),
                         *([("Ray pipeline, 1 actor (images/s)", result["ray_one_actor"]["images_per_s"]),
                            ("Ray with 1 actor / bare", result["ray_one_actor_over_bare"])]
                           if "ray_one_actor" in result else []),
                         ("bare loop, steady state (images/s)", result["steady_images_per_s"]["bare"]),
                         ("Ray pipeline, steady state (images/s)", result["steady_images_per_s"]["ray"]),
                         ("Ray / bare, steady state", result["ray_over_bare_steady"]),
                         ("model stage share of matmul peak", result["model_stage_share_of_matmul_peak"]),
                         ("  encoder + decoder only", result["encoder_decoder_share_of_matmul_peak"]),
                         ("model actor peak RSS (MB)", result["ray"]["actor_peak_rss_mb"]),
                         ("cores busy during the running-Ray run", result["ray_running"]["busy_cores"]),
                         *((f"GPU {k} (running-Ray run)", v) for k, v in (result["ray_running"]["gpu_sampled"]
                                                                          or {}).items()),
                         *((f"Ray pipeline {k} (images/s)", v)
                           for k, v in result.get("ray_running_by_dtype_images_per_s", {}).items())]:
        click.echo(f"{label:<44}{value:>12.3f}")
    if "bottleneck" in result:
        click.echo(f"bottleneck: {result['bottleneck']}")
    stage_s = result["bare"]["stage_s"]
    click.echo("bare loop time share: " + ", ".join(f"{k} {v / sum(stage_s.values()):.0%}" for k, v in stage_s.items()))
    if json_path:
        json_path.write_text(json.dumps(result, indent=2))


@main.command()
@click.option("--images", default=123_287, show_default=True, type=click.IntRange(min=1),
              help="COCO 2014 train+val has 123,287 images.")
@click.option("--shard-size", default=10_000, show_default=True, type=click.IntRange(min=1),
              help="Images per WebDataset shard (img2dataset's default).")
@click.option("--size", default="640x480", show_default=True, help="Image size WxH (COCO-like).")
@click.option("--workdir", default="/tmp/captioner-scale", show_default=True, type=click.Path(path_type=Path))
@click.option("--keep-top-fraction", type=float, default=None, help="Passed to the job (global quantile).")
@click.option("--kill-after", type=float, default=None,
              help="Kill the job this many seconds in (SIGKILL of the driver's process group and `ray stop "
                   "--force` of the Ray it started; with --address, `ray job stop`), then run it again.")
@click.option("--address", default=None, help="Submit with `ray job submit --address URL`; default: plain python.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None)
def scale(images: int, shard_size: int, size: str, workdir: Path, keep_top_fraction: float | None,
          kill_after: float | None, address: str | None, json_path: Path | None) -> None:
    """The demo model over a COCO-scale corpus drawn by the demo world: wall time, images/s, time per
    phase, peak memory of the driver and the model actor, output bytes per image; optionally a kill
    mid-run and the resume, with the time the kill cost."""
    import shutil

    from pipeline.demo.world import write_corpus

    width, height = (int(v) for v in size.lower().split("x"))
    # one corpus per size and shard size, drawn once for the largest --images asked: sample i is the same
    # image in any corpus of the seed, so a smaller run reads the first shards of a larger corpus
    corpus = workdir / f"corpus-{width}x{height}-{shard_size}"
    shards = math.ceil(images / shard_size)
    result: dict = {"images": images, "shard_size": shard_size, "size": [width, height]}
    manifest = corpus / "manifest.json"
    if not manifest.is_file() or json.loads(manifest.read_text())["counts"]["test"] < images:
        tic = time.perf_counter()
        write_corpus(corpus, seed=7, counts={"test": images}, size=(width, height), shard_size=shard_size,
                     formats=("webdataset",), progress=True, workers=len(os.sched_getaffinity(0)))
        result["corpus_s"] = round(time.perf_counter() - tic, 1)
    inputs = str(corpus / "test" / f"shard-{{00000..{shards - 1:05d}}}.tar")
    out = workdir / (f"out-{images}" + ("" if keep_top_fraction is None else f"-top{keep_top_fraction}"))
    shutil.rmtree(out, ignore_errors=True)  # a fresh run: a finished output would only be reported back
    command = [sys.executable, str(Path(__file__).with_name("caption_shards.py")), "--input", inputs,
               "--output", str(out), "--batch-size", "64"]
    if keep_top_fraction is not None:
        command += ["--keep-top-fraction", str(keep_top_fraction)]
    attempts = []
    with ProcessSampler() as sampler:
        if kill_after is not None:
            attempts.append(_run_job(command, address, kill_after))
            if (out / "run.json").is_file():
                raise click.ClickException(f"the run had finished before --kill-after {kill_after}; give less")
        attempts.append(_run_job(command, address, None))
    summary = json.loads((out / "run.json").read_text())
    rows, timings = summary["counts"]["rows"], summary["timings"]
    output_bytes = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    wall_s = sum(a["wall_s"] for a in attempts)
    result.update({
        "attempts": attempts,
        "wall_s": round(wall_s, 1),
        "images_per_s": round(rows / wall_s, 2),
        "model_stage_images_per_s": timings["images_per_s"],
        "phases_s": {"model_stage": timings["model_stage_s"], "finalize": timings["finalize_s"],
                     "webdataset": timings.get("webdataset_s")},
        "driver_peak_rss_mb": summary["counts"]["driver_peak_rss_mb"],
        "model_actor_peak_rss_mb": summary["counts"]["model_actor_peak_rss_mb"],
        "output_bytes_per_image": round(output_bytes / rows, 1),
        "counts": summary["counts"], "resumed_rows": summary["resumed_rows"],
        "processes": sampler.summary(),
    })
    if kill_after is not None:
        # the killed attempt's time minus what its kept rows are worth at the resumed run's model-stage rate
        saved_s = summary["resumed_rows"] / timings["images_per_s"] if timings["images_per_s"] else 0.0
        result["kill"] = {"after_s": kill_after, "rows_kept": summary["resumed_rows"],
                          "time_lost_s": round(attempts[0]["wall_s"] - saved_s, 1)}
    click.echo(json.dumps({k: v for k, v in result.items() if k != "counts"}, indent=2))
    if json_path:
        json_path.write_text(json.dumps(result, indent=2))


def _run_job(command: list[str], address: str | None, kill_after: float | None) -> dict:
    """Run the job, as a local process group or through `ray job submit --address`; after `kill_after`
    seconds SIGKILL the group (then stop the Ray instance its driver started) or `ray job stop` it."""
    ray_cli = str(Path(sys.executable).with_name("ray"))
    submission_id = f"scale-{uuid.uuid4().hex[:8]}"
    if address:
        command = [ray_cli, "job", "submit", "--address", address, "--submission-id", submission_id,
                   "--working-dir", str(Path(__file__).resolve().parents[1]), "--", "python", *command[1:]]
    tic = time.perf_counter()
    # the job's output (`ray job submit` streams the job's logs) is kept to explain a failure
    with tempfile.TemporaryFile() as output:
        job = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            job.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            if address:
                subprocess.run([ray_cli, "job", "stop", "--address", address, submission_id], capture_output=True)
            else:
                os.killpg(job.pid, signal.SIGKILL)
                # the local Ray instance the killed driver started (this stops every Ray process here)
                subprocess.run([ray_cli, "stop", "--force"], capture_output=True)
            job.wait()
            return {"wall_s": round(time.perf_counter() - tic, 1), "killed": True}
        if job.returncode != 0:
            output.seek(0)
            tail = output.read().decode(errors="replace").strip().splitlines()[-15:]
            raise click.ClickException(f"the job failed (exit {job.returncode}): {' '.join(command)}\n"
                                       + "\n".join(tail))
    return {"wall_s": round(time.perf_counter() - tic, 1), "killed": False}


if __name__ == "__main__":
    main()
