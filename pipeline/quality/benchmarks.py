"""What `jobs/benchmark.py` runs: real-size architectures with random weights (speed does not depend on
them), the reference ClipCap loop against batched decoding, the bare in-process loop against the Ray pipeline,
FLOPs per image, the corpora they read. Model: ClipCap MLP mapper 512 -> 3840 -> 7680 + GPT-2 small (124M,
50,257-token vocabulary)."""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, models
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from pipeline.config import GenerationSettings
from pipeline.generation.generate import decode_texts, generate
from pipeline.generation.reference import reference_clipcap_generate
from pipeline.models.captioner import CaptionerConfig, PrefixCaptioner
from pipeline.precision import cpu_has_fast_bf16, cuda_has_native_bf16
from pipeline.quality.measuring import CPU, sync

GPT2_VOCAB = 50257




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


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _rate(count: int, fn, repeats: int = 1) -> float:
    """Items per second of `fn()`, which handles `count` items: the best of `repeats` calls (the others met
    noise: another process, a page fault, the allocator growing)."""
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return count / min(seconds)


@torch.inference_mode()
def bench_decoding(batch_size: int, max_new_tokens: int, reference_images: int) -> dict:
    captioner = gpt2_small_captioner()
    embeddings = torch.nn.functional.normalize(torch.randn(batch_size, 512), dim=-1)
    settings = GenerationSettings(max_new_tokens=max_new_tokens)
    figures: dict[str, float] = {}
    names = {dtype: dtype_name(dtype) for dtype in compute_dtypes()}
    for dtype, name in names.items():
        captioner.to(dtype)
        prefix = captioner.prefix(embeddings)
        generate(captioner, prefix[:4], settings)  # warm-up
        figures[f"reference_{name}"] = _rate(reference_images, lambda p=prefix: [
            reference_clipcap_generate(captioner, p[i:i + 1], max_new_tokens) for i in range(reference_images)])
        figures[f"batched_{name}"] = _rate(batch_size, lambda p=prefix: generate(captioner, p, settings), repeats=3)
        figures[f"hf_generate_{name}"] = _rate(batch_size, lambda p=prefix: hf_generate(captioner, p, max_new_tokens),
                                               repeats=3)
    reference = figures["reference_float32"]  # the original ClipCap loop runs in fp32
    best = max(figures[f"batched_{d}"] for d in names.values())
    return {
        "captions_per_s": figures,
        "speedup_vs_reference_fp32": best / reference,
        "batched_over_hf_generate": {d: figures[f"batched_{d}"] / figures[f"hf_generate_{d}"] for d in names.values()},
        "speedup_same_dtype": {d: figures[f"batched_{d}"] / figures[f"reference_{d}"]
                               for d in names.values()},
        "batch_size": batch_size,
        "max_new_tokens": max_new_tokens,
    }


@torch.inference_mode()
def hf_generate(captioner: PrefixCaptioner, prefix: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """The peer: transformers' own greedy `generate` on the same LM, the prefixes as `inputs_embeds`, its KV
    cache on, every row running `max_new_tokens` (as the batched loop does with no stop token)."""
    return captioner.lm.generate(inputs_embeds=prefix, attention_mask=torch.ones(prefix.shape[:2], dtype=torch.long),
                                 max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                                 use_cache=True, pad_token_id=captioner.tokenizer.eos_token_id)


VIT_B32_WEIGHTS = "vit-b-32-random.safetensors"  # beside the real-size bundle


def vit_b32_weights(path: Path) -> Path:
    """ViT-B-32 (open_clip's config) with random weights from seed 0, as a safetensors file: the real-size
    bundle's encoder, and the local weights a peer (clip-retrieval) loads."""
    from safetensors.torch import save_file

    from pipeline.models.clip_factory import ClipSpec, create_clip

    if not path.is_file():
        torch.manual_seed(0)
        clip = create_clip(ClipSpec(arch="ViT-B-32"))
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in clip.clip.state_dict().items()}, str(path))
    return path


def real_size_bundle(path: Path) -> Path:
    """ViT-B-32 (`vit_b32_weights`, kept beside it) + ClipCap MLP 512->3840->7680 + GPT-2 small, random weights,
    saved as a bundle (fp16 storage) so the pipeline and the bare loop load the very same model."""
    from pipeline.models.bundle import save_bundle
    from pipeline.models.clip_factory import ClipSpec, create_clip

    weights = vit_b32_weights(path.parent / VIT_B32_WEIGHTS)
    if (path / "bundle.json").is_file():
        return path
    spec = ClipSpec(arch="ViT-B-32", weights=str(weights))
    save_bundle(path, create_clip(spec), spec, gpt2_small_captioner(), name="bench-vit-b-32-gpt2-small",
                dtype=torch.float16)
    return path


def photo_corpus(root: Path, images: int, shards: int) -> str:
    """640x480 JPEG scenes in WebDataset shards (the demo world drawn at COCO size), one corpus per size."""
    from pipeline.demo.corpus import write_corpus

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
    pixels = torch.from_numpy(np.stack([decode_image(record["image"], bundle.encoder.image_spec).pixels
                                        for record in itertools.islice(records, images)]))  # fewer in a small corpus
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
                bundle.captioner, bundle.captioner.prefix(embeddings), GenerationSettings(max_new_tokens=20))])
        counts["decoder"] = counter.get_total_flops() / images
        with FlopCounterMode(display=False) as counter:
            bundle.scorer.encode_texts(texts)
        counts["scorer"] = counter.get_total_flops() / images
    torch.backends.mha.set_fastpath_enabled(fastpath)
    return counts


def draft_effect(bundle_dir: Path, photos: list[Path], repeats: int = 5) -> list[dict]:
    """Per JPEG: decode time at full scale and with the DCT-domain reduction (`decode_image`'s draft, best of
    `repeats`), and the cosine between the encoder's embeddings of the two (fp32)."""
    from pipeline.io.images import decode_image
    from pipeline.models.bundle import load_bundle

    encoder = load_bundle(bundle_dir, captioner=False).encoder
    spec = encoder.image_spec
    rows = []
    for photo in photos:
        data = photo.read_bytes()
        seconds, pixels = {}, {}
        for draft in (False, True):
            best = math.inf
            for _ in range(repeats):
                tic = time.perf_counter()
                decoded = decode_image(data, spec, draft=draft)
                best = min(best, time.perf_counter() - tic)
            seconds[draft], pixels[draft] = best, decoded.pixels
        with torch.inference_mode():
            full, drafted = encoder.encode_images(torch.from_numpy(np.stack([pixels[False], pixels[True]])))
        rows.append({"photo": photo.name, "width": decoded.width, "height": decoded.height,
                     "full_ms": round(seconds[False] * 1e3, 2), "draft_ms": round(seconds[True] * 1e3, 2),
                     "speedup": round(seconds[False] / seconds[True], 2),
                     "pixels_differ": bool((pixels[False] != pixels[True]).any()),
                     "cosine": round(float(full @ drafted), 5)})
    return rows


def bare_loop(bundle_dir: Path, inputs: str, batch_size: int, dtype: torch.dtype, limit: int | None = None,
              device: torch.device = CPU) -> dict:
    """decode JPEG -> encode -> caption -> score in one process, no Ray; model load included, as in
    the pipeline's actor. Also times each stage (decoding on this process's one thread)."""
    from pipeline.io.images import decode_image
    from pipeline.io.sources import expand_inputs, read_samples
    from pipeline.models.bundle import load_bundle

    started = time.perf_counter()
    bundle = load_bundle(bundle_dir).to(device, dtype)
    sync(device)
    stages = {"load": time.perf_counter() - started, "read+decode": 0.0, "encode": 0.0, "caption": 0.0,
              "score": 0.0}
    settings = GenerationSettings(max_new_tokens=20)
    images = 0

    def run_batch(pixels: list) -> None:
        batch = torch.from_numpy(np.stack(pixels))
        with torch.inference_mode():
            t0 = time.perf_counter()
            features = bundle.encoder.encode_images(batch, normalize=False)  # as caption_batch
            embeddings = torch.nn.functional.normalize(features, dim=-1)
            sync(device)
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
                            dtype=dtype, decode=GenerationSettings(max_new_tokens=20),
                            actors=actors and ActorRange(actors, actors), gpus_per_actor=gpus))
    ray.shutdown()
    wall = time.perf_counter() - started
    rows = summary["counts"]["rows"]
    return {"images": rows, "wall_s": wall, "images_per_s": rows / wall,
            "model_stage_images_per_s": rows / summary["timings"]["model_stage_s"],
            "actor_peak_rss_mb": summary["counts"]["model_actor_peak_rss_mb"], "actors": summary["actors"]["max"],
            "timings": summary["timings"]}


def whole_command(command: list[str], env: dict[str, str] | None = None) -> float:
    """Wall seconds of `command` as a user runs it: a fresh process, from its start to its exit. RuntimeError
    with the tail of its output when it fails."""
    started = time.perf_counter()
    done = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - started
    if done.returncode:
        tail = "\n".join(done.stdout.decode(errors="replace").strip().splitlines()[-15:])
        raise RuntimeError(f"exit {done.returncode}: {' '.join(command)}\n{tail}")
    return wall


def caption_command(bundle_dir: Path, inputs: str, out: Path, embed_only: bool = False) -> list[str]:
    """`caption_shards.py` as the README runs it (plain python: it starts its own Ray), greedy, 20 new tokens."""
    job = Path(__file__).resolve().parents[2] / "jobs" / "caption_shards.py"
    return [sys.executable, str(job), "--input", inputs, "--output", str(out), "--model", str(bundle_dir),
            "--max-new-tokens", "20", "--overwrite", *(["--embed-only"] if embed_only else [])]


def image_folder(shards: list[str], folder: Path) -> Path:
    """The JPEGs of WebDataset `shards` as files in `folder` (once): clip-retrieval's documented input."""
    import tarfile

    if not folder.is_dir():
        partial = folder.with_name(folder.name + ".partial")
        partial.mkdir(parents=True, exist_ok=True)
        for shard in shards:
            with tarfile.open(shard) as tar:
                for member in tar:
                    if member.isfile() and member.name.endswith(".jpg"):
                        (partial / Path(member.name).name).write_bytes(tar.extractfile(member).read())
        partial.rename(folder)
    return folder


def clip_retrieval_command(executable: str, images: Path, weights: Path, out: Path) -> list[str]:
    """clip-retrieval's embed-only run as its README runs it over a folder of images: image embeddings with the
    same ViT-B-32 weights, fp32 (its CPU path), batch 64, 2 preprocessing workers."""
    return [executable, "inference", "--input_dataset", str(images), "--output_folder", str(out), "--clip_model",
            f"open_clip:ViT-B-32/{weights.resolve()}", "--enable_text", "False", "--enable_metadata", "False",
            "--batch_size", "64", "--num_prepro_workers", "2"]


def clip_retrieval_embeddings(out: Path) -> int:
    """How many image embeddings a clip-retrieval run wrote (its img_emb/*.npy)."""
    return sum(int(np.load(path, mmap_mode="r").shape[0]) for path in sorted((out / "img_emb").glob("*.npy")))


@torch.inference_mode()
def reference_loop(bundle_dir: Path, inputs: str, images: int) -> dict:
    """ClipCap's own way, as its predict.py captions: one image at a time, fp32, decode -> encode -> the
    original greedy loop (no KV cache, 20 new tokens) -> CLIP score; model load not counted."""
    from pipeline.io.images import decode_image
    from pipeline.io.sources import expand_inputs, read_samples
    from pipeline.models.bundle import load_bundle

    bundle = load_bundle(bundle_dir).to("cpu", torch.float32)
    records = (record for shard in expand_inputs([inputs]) for record in read_samples(shard))
    started = time.perf_counter()
    for record in itertools.islice(records, images):
        pixels = torch.from_numpy(decode_image(record["image"], bundle.encoder.image_spec).pixels[None])
        features = bundle.encoder.encode_images(pixels, normalize=False)  # the prefix's input, as the pipeline's
        tokens = reference_clipcap_generate(bundle.captioner, bundle.captioner.prefix(features), 20)
        embedding = torch.nn.functional.normalize(features, dim=-1)
        (embedding * bundle.scorer.encode_texts(decode_texts(bundle.captioner, [tokens]))).sum(-1)
    wall = time.perf_counter() - started
    return {"images": images, "wall_s": wall, "images_per_s": images / wall}


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
