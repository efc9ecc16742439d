"""Speed benchmarks on real-size architectures with random weights (speed does not depend on them).

  python jobs/benchmark.py decoding [--batch-size 64] [--json out.json]
  python jobs/benchmark.py pipeline [--images 3000] [--json out.json]
  python jobs/benchmark.py commands [--images 576] [--clip-retrieval PATH] [--json out.json]
  python jobs/benchmark.py scale [--images 123287] [--kill-after 600] [--keep-top-fraction 0.5] [--json out.json]
  python jobs/benchmark.py commit [--rows 1000000 --rows 10000000] [--clusters 32] [--json out.json]
  python jobs/benchmark.py jpeg-draft --photos DIR --model BUNDLE [--model BUNDLE ...] [--json out.json]

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
from pathlib import Path

import _bootstrap  # noqa: F401
import click
import numpy as np
import torch

from pipeline.precision import resolve_dtype
from pipeline.quality.benchmarks import (
    VIT_B32_WEIGHTS,
    bare_loop,
    bench_decoding,
    caption_command,
    clip_retrieval_command,
    clip_retrieval_embeddings,
    compute_dtypes,
    draft_effect,
    dtype_name,
    flops_per_image,
    image_folder,
    photo_corpus,
    ray_pipeline,
    real_size_bundle,
    reference_loop,
    running_ray,
    whole_command,
)
from pipeline.quality.measuring import GpuSampler, ProcessSampler, bottleneck, cpu_model, matmul_gflops


@click.group()
def main() -> None:
    """Benchmarks; each prints a table and can write JSON."""


@main.command()
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--max-new-tokens", default=20, show_default=True, type=click.IntRange(min=1))
@click.option("--reference-images", default=3, show_default=True, type=click.IntRange(min=1))
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None)
def decoding(batch_size: int, max_new_tokens: int, reference_images: int, json_path: Path | None) -> None:
    """Batched KV-cache greedy decoding vs the original ClipCap loop and transformers' generate, GPT-2 small,
    fp32 (and bf16 where this CPU runs it natively)."""
    result = bench_decoding(batch_size, max_new_tokens, reference_images)
    result["machine"] = {"cpu_threads": torch.get_num_threads(), "processor": platform.processor(),
                         "torch": torch.__version__}
    click.echo(f"{'loop':<28}{'captions/s':>12}")
    for name, value in result["captions_per_s"].items():
        click.echo(f"{name:<28}{value:>12.2f}")
    click.echo(f"batched (best dtype) / reference fp32: {result['speedup_vs_reference_fp32']:.1f}x")
    for name, ratio in result["batched_over_hf_generate"].items():
        click.echo(f"batched / transformers generate, {name}: {ratio:.2f}x")
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
    result: dict = {"images": images, "batch_size": batch_size, "device": str(on), "dtype": dtype_name(dtype),
                    # FLOPs do not depend on where they run: counted on the CPU
                    "flops_per_image": flops_per_image(bundle_dir, inputs,
                                                       dtype if on.type == "cpu" else torch.float32)}
    if on.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(on)
        result["matmul_gflops"] = {dtype_name(d): matmul_gflops(d, size=8192, repeats=20, device=on)
                                   for d in compute_dtypes(on)}
    else:  # a dtype this CPU does not run natively is timed on a small product only, to record how slow it is
        result["matmul_gflops"] = {dtype_name(d): matmul_gflops(d, size=2048 if d in compute_dtypes() else 256)
                                   for d in (torch.float32, torch.bfloat16)}
    variants = {}
    for variant_dtype in compute_dtypes(on):
        for size in sorted({32, batch_size}):
            variants[f"{dtype_name(variant_dtype)}_batch{size}"] = bare_loop(
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
            result["ray_running_by_dtype_images_per_s"] = {dtype_name(dtype): result["ray_running"]["images_per_s"]}
            for name in ("fp16", "bf16"):  # as the job's --dtype names them
                other = resolve_dtype(name, on)
                if other != dtype and other in compute_dtypes(on):
                    result["ray_running_by_dtype_images_per_s"][dtype_name(other)] = ray_pipeline(
                        bundle_dir, shards, workdir / "out", batch_size, name, running=True, gpus=gpus)["images_per_s"]
        result["ray_running_half"] = ray_pipeline(bundle_dir, half_shards, workdir / "out", batch_size, "auto",
                                                  running=True, gpus=gpus)
    result["ray_running_over_bare"] = result["ray_running"]["images_per_s"] / result["bare"]["images_per_s"]
    rest = result["ray_running"]["images"] - result["ray_running_half"]["images"]
    result["steady_images_per_s"] = {
        "bare": rest / (result["bare"]["wall_s"] - result["bare_half"]["wall_s"]),
        "ray": rest / (result["ray_running"]["wall_s"] - result["ray_running_half"]["wall_s"])}
    result["ray_over_bare_steady"] = result["steady_images_per_s"]["ray"] / result["steady_images_per_s"]["bare"]
    peak = result["matmul_gflops"][dtype_name(dtype)] * 1e9

    def share_of_peak(steps: dict[str, str]) -> float:  # FLOP count -> stage timed for it
        seconds = sum(result["bare"]["stage_s"][stage] for stage in steps.values())
        return result["bare"]["images"] * sum(result["flops_per_image"][k] for k in steps) / seconds / peak

    result["model_stage_share_of_matmul_peak"] = share_of_peak(
        {"encoder": "encode", "decoder": "caption", "scorer": "score"})
    result["encoder_decoder_share_of_matmul_peak"] = share_of_peak({"encoder": "encode", "decoder": "caption"})
    click.echo(f"compute dtype {dtype_name(dtype)}; matmul GFLOP/s: "
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
@click.option("--images", default=576, show_default=True, type=click.IntRange(min=65),
              help="640x480 JPEGs; a 64-image run is timed too, and subtracted for the steady state.")
@click.option("--shards", default=1, show_default=True, type=click.IntRange(min=1),
              help="WebDataset shards they are written in (one shard must keep every model actor busy).")
@click.option("--clip-retrieval", "clip_retrieval", default=None,
              help="The clip-retrieval executable, installed in a virtual environment of its own (`make peer-env`: "
                   "its pins differ from ours); default: .venv-peer/bin/clip-retrieval or one on PATH, else the "
                   "peer is left out.")
@click.option("--reference-images", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--workdir", default="/tmp/captioner-bench", show_default=True, type=click.Path(path_type=Path))
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None)
def commands(images: int, shards: int, clip_retrieval: str | None, reference_images: int, workdir: Path,
             json_path: Path | None) -> None:
    """Whole commands as a user runs them, one after the other on the same JPEGs and the same real-size model
    (random weights): caption_shards.py (caption + score, and --embed-only) as plain python, clip-retrieval's
    embed-only inference, and the reference ClipCap loop (one image at a time, fp32)."""
    import shutil

    local_peer = Path(__file__).resolve().parents[1] / ".venv-peer" / "bin" / "clip-retrieval"
    peer = clip_retrieval or (str(local_peer) if local_peer.is_file() else shutil.which("clip-retrieval"))
    bundle_dir = real_size_bundle(workdir / "bundle")
    inputs = photo_corpus(workdir / "corpus", images, shards)
    small = photo_corpus(workdir / "corpus", 64, 1)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"HF_HUB_OFFLINE": "1"}
    out = workdir / "commands-out"
    wall = {"caption": whole_command(caption_command(bundle_dir, inputs, out), env),
            "caption_64": whole_command(caption_command(bundle_dir, small, out), env),
            "embed_only": whole_command(caption_command(bundle_dir, inputs, out, embed_only=True), env)}
    if peer:
        shutil.rmtree(out, ignore_errors=True)
        # clip-retrieval reads the same JPEGs from a folder: its webdataset reader hung here on a local shard
        folder = image_folder(sorted(str(path) for path in Path(inputs).parent.glob("*.tar")),
                              Path(inputs).parent.parent / "images")
        wall["clip_retrieval"] = whole_command(clip_retrieval_command(
            peer, folder, bundle_dir.parent / VIT_B32_WEIGHTS, out), env)
        embedded = clip_retrieval_embeddings(out)
        if embedded != images:
            raise click.ClickException(f"clip-retrieval wrote {embedded} embeddings of {images}")
    shutil.rmtree(out, ignore_errors=True)
    per_s = {name: (64 if name == "caption_64" else images) / seconds for name, seconds in wall.items()}
    per_s["caption_steady"] = (images - 64) / (wall["caption"] - wall["caption_64"])
    per_s["reference_loop"] = reference_loop(bundle_dir, inputs, reference_images)["images_per_s"]
    ratios = {"caption_steady_over_reference": per_s["caption_steady"] / per_s["reference_loop"]}
    if peer:
        ratios |= {"embed_only_over_clip_retrieval": per_s["embed_only"] / per_s["clip_retrieval"],
                   "caption_over_clip_retrieval": per_s["caption"] / per_s["clip_retrieval"]}
    result = {"images": images, "shards": shards, "machine": cpu_model(), "torch": torch.__version__,
              "wall_s": wall, "images_per_s": per_s, "ratios": ratios, "peer": peer}
    click.echo(f"{images} JPEGs of 640x480 in {shards} shard(s); {result['machine']}")
    click.echo(f"{'command':<52}{'wall s':>9}{'images/s':>10}")
    labels = {"caption": "caption_shards.py (caption + score)", "caption_64": "  the same, 64 images",
              "embed_only": "caption_shards.py --embed-only", "clip_retrieval": "clip-retrieval inference (embed only)"}
    for name, label in labels.items():
        if name in wall:
            click.echo(f"{label:<52}{wall[name]:>9.1f}{per_s[name]:>10.2f}")
    click.echo(f"{'caption_shards.py, steady state (64-image run subtracted)':<61}{per_s['caption_steady']:>10.2f}")
    click.echo(f"{'reference ClipCap loop (1 image at a time, fp32)':<61}{per_s['reference_loop']:>10.3f}")
    for name, value in ratios.items():
        click.echo(f"{name.replace('_', ' '):<61}{value:>9.2f}x")
    if not peer:
        click.echo("clip-retrieval not found: give --clip-retrieval, or run `make peer-env`")
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

    from pipeline.demo.corpus import write_corpus

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


@main.command()
@click.option("--rows", "sizes", multiple=True, type=click.IntRange(min=1), default=(1_000_000, 10_000_000),
              show_default=True, help="Rows to commit; give it again for each size.")
@click.option("--rows-per-part", default=4096, show_default=True, type=click.IntRange(min=1))
@click.option("--embedding-dim", default=512, show_default=True, type=click.IntRange(min=1))
@click.option("--keep-top-fraction", default=0.5, show_default=True, type=float)
@click.option("--clusters", default=32, show_default=True, type=click.IntRange(min=0),
              help="--filter-clusters of the commit; 0: one global fraction.")
@click.option("--workdir", default="/tmp/captioner-commit", show_default=True, type=click.Path(path_type=Path))
@click.option("--keep-output", is_flag=True, help="Leave each output in WORKDIR/out-ROWS (else removed).")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None)
def commit(sizes: tuple[int, ...], rows_per_part: int, embedding_dim: int, keep_top_fraction: float, clusters: int,
           workdir: Path, keep_output: bool, json_path: Path | None) -> None:
    """The commit alone on staged parts written without the models (random embeddings, scores and keys,
    with retried writes, shared keys and failed samples): seconds, rows/s and the driver's peak memory per
    size; each size in a process of its own, so that one size's memory does not show in another's."""
    import shutil

    results = []
    for rows in sizes:
        out = workdir / f"out-{rows}"
        shutil.rmtree(out, ignore_errors=True)
        command = [sys.executable, __file__, "commit-one", "--rows", str(rows), "--rows-per-part",
                   str(rows_per_part), "--embedding-dim", str(embedding_dim), "--keep-top-fraction",
                   str(keep_top_fraction), "--clusters", str(clusters), "--output", str(out)]
        with ProcessSampler() as sampler:
            finished = subprocess.run(command, capture_output=True, text=True)
        if finished.returncode:
            raise click.ClickException(f"committing {rows} rows failed:\n{finished.stderr[-3000:]}")
        result = json.loads(finished.stdout.strip().splitlines()[-1])
        result["processes"] = sampler.summary()
        result["output_bytes"] = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        results.append(result)
        click.echo(json.dumps({k: v for k, v in result.items() if k not in ("counts", "processes")}))
        if not keep_output:
            shutil.rmtree(out, ignore_errors=True)
    report = {"cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)), "rows_per_part": rows_per_part,
              "embedding_dim": embedding_dim, "keep_top_fraction": keep_top_fraction, "clusters": clusters or None,
              "sizes": results}
    if len(results) > 1:
        first, last = results[0], results[-1]
        report["driver_peak_rss_ratio"] = round(last["driver_peak_rss_mb"] / first["driver_peak_rss_mb"], 3)
        report["seconds_per_row_ratio"] = round((last["commit_s"] / last["rows"]) / (first["commit_s"] / first["rows"]),
                                                3)
    click.echo(json.dumps({k: v for k, v in report.items() if k != "sizes"}, indent=2))
    if json_path:
        json_path.write_text(json.dumps(report, indent=2))


@main.command("jpeg-draft")
@click.option("--photos", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A folder of JPEG photos (*.jpg, *.jpeg), of several sizes.")
@click.option("--model", "models", multiple=True, required=True, type=click.Path(exists=True, path_type=Path),
              help="A bundle whose encoder embeds them; give it again for each.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None)
def jpeg_draft(photos: Path, models: tuple[Path, ...], json_path: Path | None) -> None:
    """What decoding JPEGs in the DCT domain at 1/2, 1/4 or 1/8 scale (Pillow's draft, on by default) gains in
    time and moves in the embeddings: per photo and encoder, decode time with and without it and the cosine
    between the two embeddings."""
    files = sorted(p for p in photos.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
    if not files:
        raise click.UsageError(f"no *.jpg or *.jpeg in {photos}")
    report = {"cpu": cpu_model(), "photos": len(files), "encoders": []}
    for model in models:
        rows = draft_effect(model, files)
        drafted = [row for row in rows if row["pixels_differ"]]
        summary = {"model": str(model), "drafted": len(drafted),
                   "min_cosine": min((row["cosine"] for row in drafted), default=None),
                   "median_speedup": float(np.median([row["speedup"] for row in drafted])) if drafted else None}
        click.echo(json.dumps(summary))
        report["encoders"].append(summary | {"rows": rows})
    if json_path:
        json_path.write_text(json.dumps(report, indent=2))


@main.command("commit-one", hidden=True)
@click.option("--rows", type=int, required=True)
@click.option("--rows-per-part", type=int, required=True)
@click.option("--embedding-dim", type=int, required=True)
@click.option("--keep-top-fraction", type=float, required=True)
@click.option("--clusters", type=int, required=True)
@click.option("--output", required=True)
def commit_one(rows: int, rows_per_part: int, embedding_dim: int, keep_top_fraction: float, clusters: int,
               output: str) -> None:
    """One size of `commit`, in this process: staged parts written by Ray tasks, then the commit timed: the
    shards published (in a run, while the models work) and the published parts settled."""
    import ray

    from pipeline.config import RunConfig
    from pipeline.io.sinks import OutputDir
    from pipeline.quality.staged_rows import METADATA, StagedRows, write_staged
    from pipeline.run.commit import finalize
    from pipeline.run.data_stages import peak_rss_mb
    from pipeline.run.filtering import FilterSettings
    from pipeline.run.publish import Publisher

    cores = len(os.sched_getaffinity(0))
    ray.init(address="local", num_cpus=cores, include_dashboard=False, configure_logging=False,
             log_to_driver=False)
    spec = StagedRows(rows=rows, rows_per_part=rows_per_part, embedding_dim=embedding_dim)
    tic = time.perf_counter()
    write = ray.remote(num_cpus=1)(write_staged)
    staged = sum(ray.get([write.remote(output, spec, range(start, spec.parts(), cores)) for start in range(cores)]))
    staged_s = time.perf_counter() - tic
    settings = FilterSettings(keep_top_fraction=keep_top_fraction, clusters=clusters or None)
    config = RunConfig(inputs=("staged",), output=output, filter=settings)
    rss_before = peak_rss_mb()
    tic = time.perf_counter()
    # publishing every shard here, as a run does while its model stage goes on, then the commit's settling
    Publisher(OutputDir(output), config.rows_per_file).finish(set())
    publish_s = time.perf_counter() - tic
    counts = finalize(OutputDir(output), config, spec.shards(), embedding_dim, METADATA, set())
    commit_s = time.perf_counter() - tic
    click.echo(json.dumps({"rows": rows, "staged_rows": staged, "staging_s": round(staged_s, 1),
                           "commit_s": round(commit_s, 1), "publish_s": round(publish_s, 1),
                           "settle_s": round(commit_s - publish_s, 1), "rows_per_s": round(rows / commit_s),
                           "driver_peak_rss_mb": round(peak_rss_mb(), 1),
                           "driver_peak_rss_before_commit_mb": round(rss_before, 1), "counts": counts}))


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
