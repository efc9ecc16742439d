"""A training run (jobs/train_captioner.py): the checks that stop a bad run before any image is read, then the
stages (`clip_stage`, `caption_stage`) and the bundle, in this process or on Ray Train.

On Ray Train the run is a TorchTrainer of `Scaling.num_workers` workers (DDP; gloo on CPUs, NCCL on GPUs).
Each epoch's checkpoint, the latest state of every stage so far, goes through Ray Train to `--out/checkpoints`
(a local path or an fsspec URL); a worker group that fails restarts from it (`FailureConfig`), and a rerun with
the same --out resumes from it. The main worker writes the bundle and train_summary.json to --out.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import fsspec
import torch
from tqdm import tqdm

from pipeline.io.images import ImageSpec
from pipeline.io.sources import InputError
from pipeline.models.bundle import load_bundle, save_bundle
from pipeline.models.clip_factory import ClipSpec, load_pretrained_clip, pretrained_clip_spec
from pipeline.models.errors import ModelLoadError
from pipeline.models.languages import PROJECT_LANGUAGE
from pipeline.models.manifest import BUNDLE_FILE
from pipeline.models.text_tower import read_text_tower_config
from pipeline.training.caption_stage import build_captioner, check_caption_room, shared_tokenizer, train_captioner
from pipeline.training.checkpoints import Checkpoints
from pipeline.training.clip_stage import build_custom_clip, build_locked_scorer, train_clip, train_scorer
from pipeline.training.compute import Compute, embed_images, seed_everything
from pipeline.training.config import TrainConfig
from pipeline.training.examples import StoreWriter, add_embedding_examples, add_image_examples
from pipeline.training.parallel import Parallel

log = logging.getLogger(__name__)

# more epochs resume a run, and so does a smaller shuffle buffer
RESUMABLE_SETTINGS = ("out", "clip_epochs", "caption_epochs", "scorer_epochs", "shuffle_buffer_mb")
CHECKPOINTS = "checkpoints"  # below --out: Ray Train's run folder, or the in-process run's checkpoints
TOKENIZER_FILE = "text_tokenizer.json"  # in the checkpoints: a resumed run reads texts as it did


@dataclass(frozen=True)
class Scaling:
    """The Ray Train workers of a run: each holds `cpus_per_worker` CPUs (its torch threads) and
    `gpus_per_worker` GPUs (0: it trains on its CPUs); None: sized to the cluster (`resolved`)."""

    num_workers: int = 1
    gpus_per_worker: float | None = None
    cpus_per_worker: int | None = None
    max_failures: int = 3  # worker group restarts from the last checkpoint before the run fails

    def resolved(self, device: str) -> Scaling:
        """Sized to the Ray cluster (started here unless RAY_ADDRESS names one): a GPU a worker where the cluster
        has GPUs and `device` allows them, and the cluster's CPUs shared among the workers, at most one node's.
        ValueError (one line) for GPUs the cluster does not have."""
        import ray

        from pipeline.run.chain import init_ray

        init_ray()
        gpus_there = ray.cluster_resources().get("GPU", 0)
        gpus = self.gpus_per_worker
        if gpus is None:
            gpus = 0 if device == "cpu" or not gpus_there else 1
        if device == "cpu" and gpus:
            raise ValueError("--device cpu trains on CPUs: not with --gpus-per-worker")
        if device.startswith("cuda") and not gpus:
            raise ValueError(f"--device {device}: the Ray cluster has no GPU" if not gpus_there
                             else f"--device {device} needs --gpus-per-worker above 0")
        if gpus * self.num_workers > gpus_there:
            raise ValueError(f"{self.num_workers} workers of {gpus:g} GPUs need {gpus * self.num_workers:g} GPUs; "
                             f"the Ray cluster has {gpus_there:g}")
        cpus = self.cpus_per_worker
        if cpus is None:
            node_cpus = max((node["Resources"].get("CPU", 0) for node in ray.nodes() if node["Alive"]), default=1)
            cpus = max(1, int(min(node_cpus, ray.cluster_resources().get("CPU", 1) // self.num_workers)))
        return replace(self, gpus_per_worker=gpus, cpus_per_worker=cpus)


@dataclass(frozen=True)
class _RunOptions:
    """What a run's bundle carries besides the trained weights."""

    caption_language: str = PROJECT_LANGUAGE
    scorer_languages: tuple[str, ...] | None = None
    scorer: str | None = None  # the CLIP that scores the bundle's captions (default: the encoder)


def train(config: TrainConfig, caption_language: str = PROJECT_LANGUAGE,
          scorer_languages: tuple[str, ...] | None = None, scorer: str | None = None,
          scaling: Scaling | None = None) -> dict:
    """Train and write the bundle; `scorer` names the CLIP that scores its captions (default: the encoder),
    which training does not use: it is only stored in the bundle. `scaling`: on Ray Train with those workers
    (Ray started here unless RAY_ADDRESS names a cluster); None: in this process, --out a local folder.
    Returns the run's summary (train_summary.json)."""
    options = _RunOptions(caption_language, scorer_languages, scorer)
    _check(config, options)
    out_fs, out_path = fsspec.core.url_to_fs(config.out)
    _claim_run_directory(out_fs, out_path, config)
    if scaling is None:
        if not _is_local(out_fs):
            raise ValueError(f"--out {config.out}: a run in this process writes to a local folder; an fsspec URL "
                             "takes the run on Ray Train")
        out = Path(out_path)
        summary = _fit(config, options, Checkpoints(out / CHECKPOINTS), out / "work",
                       Parallel(device=Compute.of(config).device))
    else:
        _fit_on_ray(config, options, scaling, out_fs, out_path)
        summary = json.loads(out_fs.cat_file(f"{out_path}/train_summary.json"))
    return summary


def _check(config: TrainConfig, options: _RunOptions) -> None:
    """The mistakes that would otherwise stop a run after its images were read, or hours of training."""
    if config.lm is None:  # the small GPT-2's positions are known now, before the CLIP stage
        check_caption_room(config.lm_arch.n_positions - config.prefix_length, config.prefix_length)
    if options.scorer and config.train_scorer:
        raise ValueError("give --scorer or --train-scorer, not both: each makes the bundle's scorer")
    if config.scorer_text_tower and not config.train_scorer:
        raise ValueError("--scorer-text-tower is what --train-scorer starts from: give both")
    if config.embeddings_from and not config.clip:
        raise ValueError("--embeddings-from needs --clip: the encoder that made those embeddings")
    if config.clip and not (Path(config.clip) / BUNDLE_FILE).is_file():
        pretrained_clip_spec(config.clip, "--clip", "encoder")
    if config.scorer_text_tower:
        read_text_tower_config(config.scorer_text_tower)
    if options.scorer:
        load_pretrained_clip(options.scorer, "--scorer", "scorer")


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def _claim_run_directory(fs: fsspec.AbstractFileSystem, out: str, config: TrainConfig) -> None:
    """A rerun resumes from the checkpoints only under the same settings (more epochs excepted): the
    checkpoints of other data or models would be resumed silently. A run that stopped before its first
    checkpoint (a typo in --data) binds nothing."""
    settings = json.loads(json.dumps({k: v for k, v in config.to_json().items() if k not in RESUMABLE_SETTINGS}))
    recorded_file = f"{out}/work/settings.json"
    if fs.isfile(recorded_file):
        from pipeline.config import differing_keys

        changed = differing_keys(settings, json.loads(fs.cat_file(recorded_file)))
        if changed and fs.glob(f"{out}/{CHECKPOINTS}/*"):
            raise ValueError(f"{config.out} holds a training run with other settings ({', '.join(changed)}); "
                             "use another --out (only more epochs resume a run)")
    fs.makedirs(f"{out}/work", exist_ok=True)
    fs.pipe_file(recorded_file, json.dumps(settings, indent=2, ensure_ascii=False).encode())


def _fit(config: TrainConfig, options: _RunOptions, checkpoints: Checkpoints, work: Path,
         parallel: Parallel) -> dict:
    """The stages and the bundle, in one of `parallel`'s processes (each computes its share of every batch; the
    main one writes the bundle and the summary to --out). Returns the summary."""
    started = time.time()
    seed_everything(config.seed)
    compute = Compute.of(config)
    log.info("training on %s in %s%s", compute.device, str(compute.dtype).removeprefix("torch."),
             f", worker {parallel.rank + 1} of {parallel.world_size}" if parallel.world_size > 1 else "")
    summary: dict = {}
    progress = tqdm if parallel.is_main else functools.partial(tqdm, disable=True)  # one bar for the run
    # the examples are read once into a store on local disk, which every epoch streams
    with StoreWriter(work / "examples") as writer:
        if config.clip:
            clip, spec, identity, bundle_captioner = _encoder(config)
            joined, images = _split_data(config)
            if config.embeddings_from:
                metadata = add_embedding_examples(writer, list(config.embeddings_from), config.text_column, joined)
                _check_embeddings_encoder(config, writer.shape[0], metadata, clip, identity)
            if images:
                # a pretrained encoder stays frozen: each image is encoded as it is read, and only its embedding kept
                add_image_examples(writer, images, clip.image_spec, config.limit, progress, config.image_root,
                                   encode=lambda pixels: embed_images(clip, pixels, compute), parallel=parallel)
        else:
            bundle_captioner = None
            add_image_examples(writer, list(config.data), ImageSpec(size=config.clip_arch.image_size), config.limit,
                               progress, config.image_root, parallel=parallel)
    examples = writer.store
    if parallel.is_main:
        log.info("%d training examples", examples.count)

    # the small CLIP's text tower and a GPT-2 from scratch share one tokenizer trained on the captions
    tokenizer_file = checkpoints.root / TOKENIZER_FILE
    tokenizer = None
    if config.lm is None or not config.clip or (config.train_scorer and not config.scorer_text_tower):
        tokenizer = shared_tokenizer(examples.captions(), config.vocab_size, tokenizer_file, parallel)
    if not config.clip:
        clip, spec = build_custom_clip(config.clip_arch, tokenizer_file)
        summary["clip_losses"] = train_clip(clip, examples, config, checkpoints, progress, parallel)
        pixels = examples
        examples = pixels.map(lambda values: embed_images(clip, torch.from_numpy(values), compute).numpy(),
                              work / "embeddings")
        shutil.rmtree(pixels.folder)
    scorer_model, scorer_spec = None, None
    if config.train_scorer:
        scorer_model, scorer_spec = build_locked_scorer(clip, config.clip_arch, tokenizer_file,
                                                        config.scorer_text_tower)
        summary["scorer_losses"] = train_scorer(scorer_model, examples, config, checkpoints, progress, parallel)
        scorer_model = scorer_model.cpu().float()
    if config.caption_epochs == 0 and bundle_captioner is not None:
        captioner = bundle_captioner  # a new scorer for a bundle's captioner, which stays as it is
    else:
        captioner = build_captioner(config, clip.embed_dim, None if config.lm else tokenizer)
        summary["caption_losses"] = train_captioner(captioner, examples, config, checkpoints, progress, parallel)
    summary["examples"] = examples.count
    summary["resumed_from"] = checkpoints.resumed_from
    shutil.rmtree(examples.folder)
    if parallel.is_main:
        if options.scorer:
            scorer_model, scorer_spec = load_pretrained_clip(options.scorer, "--scorer", "scorer")
        summary |= _write_bundle(config, options, work, clip, spec, captioner, scorer_model, scorer_spec)
        summary["train_s"] = round(time.time() - started, 1)
        from pipeline.run.data_stages import (
            peak_rss_mb,  # here: the module imports Ray Data, which a run in-process skips
        )

        summary["peak_rss_mb"] = round(peak_rss_mb())  # of this process: where the run is on Ray, its main worker
        _write_summary(config, summary)
    return summary


def _write_bundle(config: TrainConfig, options: _RunOptions, work: Path, clip, spec: ClipSpec, captioner,
                  scorer, scorer_spec: ClipSpec | None) -> dict[str, Any]:
    """The bundle at --out/bundle (written in `work` and copied there, for an fsspec URL)."""
    fs, out = fsspec.core.url_to_fs(config.out)
    local = Path(out) / "bundle" if _is_local(fs) else work / "bundle"
    manifest = save_bundle(local, clip.cpu().float(), spec, captioner.cpu().float(), scorer=scorer,
                           scorer_spec=scorer_spec, name=Path(out).name,
                           dtype=torch.float16 if config.save_fp16 else torch.float32,
                           caption_language=options.caption_language, scorer_languages=options.scorer_languages)
    if not _is_local(fs):
        if fs.exists(f"{out}/bundle"):
            fs.rm(f"{out}/bundle", recursive=True)
        fs.put(f"{local}/", f"{out}/bundle", recursive=True)
    return {"bundle": f"{config.out.rstrip('/')}/bundle", "languages": manifest["languages"],
            "bundle_sha256": manifest["sha256"]}


def _write_summary(config: TrainConfig, summary: dict[str, Any]) -> None:
    fs, out = fsspec.core.url_to_fs(config.out)
    text = json.dumps({"config": config.to_json(), **summary, "finished": time.time()}, indent=2, ensure_ascii=False)
    fs.pipe_file(f"{out}/train_summary.json", text.encode())


def _encoder(config: TrainConfig):
    """A pretrained encoder: a bundle directory's encoder, an open_clip ARCH[:WEIGHTS], or a transformers CLIP.
    Returns the model, its spec and, from a bundle, the bundle.json entry that identifies it and the bundle's
    captioner (else None twice)."""
    if config.clip and (Path(config.clip) / BUNDLE_FILE).is_file():
        bundle = load_bundle(config.clip)
        spec = ClipSpec(**{k: v for k, v in bundle.manifest["encoder"].items() if k in ClipSpec.__dataclass_fields__})
        if spec.weights and (Path(config.clip) / spec.weights).is_file():
            # a file of that bundle (an imported ClipCap's encoder.safetensors): the new bundle copies it in
            spec = replace(spec, weights=str(Path(config.clip) / spec.weights))
        return bundle.encoder, spec, bundle.manifest["encoder"], bundle.captioner
    return (*load_pretrained_clip(config.clip, "--clip", "encoder"), None, None)


def _split_data(config: TrainConfig) -> tuple[tuple[str, ...], list[str]]:
    """--data as the caption files joined to --embeddings-from by key, and the images to encode; without
    --embeddings-from, all images."""
    from pipeline.io.caption_files import is_caption_file

    if not config.embeddings_from:
        return (), list(config.data)
    return (tuple(spec for spec in config.data if is_caption_file(spec)),
            [spec for spec in config.data if not is_caption_file(spec)])


def _check_embeddings_encoder(config: TrainConfig, width: int, metadata: dict, clip, identity: dict | None) -> None:
    """The stored embeddings (`width` wide) must come from the encoder the new bundle ships, or its captions are
    noise. `identity`: the encoder's bundle.json entry, where --clip is a bundle."""
    if width != clip.embed_dim:
        raise ValueError(f"--embeddings-from holds {width}-d embeddings, but --clip {config.clip} makes "
                         f"{clip.embed_dim}-d ones: give the encoder that made them")
    made_by = metadata.get("encoder")
    if made_by and identity is not None and identity != made_by:
        raise ValueError(f"--embeddings-from was made by the encoder of model {metadata.get('model')!r}, "
                         f"not by the one of --clip {config.clip}: give the bundle that made them")


class RayTrainCheckpoints(Checkpoints):
    """Checkpoints through Ray Train: kept in a local folder laid out as `Checkpoints` (the latest epoch of every
    stage, and the tokenizer), which the main worker reports, whole, after each epoch; at start, the folder is
    Ray Train's latest checkpoint of this run (after a restart of the worker group, or in a rerun)."""

    def __init__(self, root: Path, parallel: Parallel):
        import ray.train

        super().__init__(root)
        self.parallel = parallel
        latest = ray.train.get_checkpoint()
        if latest is not None:
            with latest.as_directory() as folder:
                shutil.copytree(folder, root, dirs_exist_ok=True)
            self.resumed_from = Path(latest.path).name
            log.info("resuming from checkpoint %s", latest.path)

    def save(self, stage: str, epoch: int, modules: dict[str, torch.nn.Module],
             optimizer: torch.optim.Optimizer, losses: list[float | None]) -> None:
        import ray.train

        metrics = {"stage": stage, "epoch": epoch, "loss": losses[-1]}
        if not self.parallel.is_main:
            ray.train.report(metrics)  # every worker reports: it is the barrier of the checkpoint
            return
        super().save(stage, epoch, modules, optimizer, losses)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(self.root),
                         checkpoint_dir_name=f"{stage}-{epoch:04d}")


def _ray_worker(settings: dict[str, Any]) -> str | None:
    """One Ray Train worker: its device and threads, then the run, checkpointed through Ray Train. Returns the
    message of an error of the data or of a model it names (the main worker's is the run's result), else None."""
    import ray.train.torch

    scaling: Scaling = settings["scaling"]
    torch.set_num_threads(scaling.cpus_per_worker)
    device = ray.train.torch.get_device() if scaling.gpus_per_worker else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    config = replace(settings["config"], device=str(device))
    parallel = Parallel.current(device)
    with tempfile.TemporaryDirectory(prefix="train-") as local:
        checkpoints = RayTrainCheckpoints(Path(local) / CHECKPOINTS, parallel)
        try:
            _fit(config, settings["options"], checkpoints, Path(local) / "work", parallel)
        except USER_ERRORS as exc:
            # the data or a model it names: the same on every worker and in every retry, so the run ends here
            # with the message, where a raised error would be retried (`max_failures`) and end in a traceback
            return f"{type(exc).__name__}: {exc}" if isinstance(exc, OSError) else str(exc)
    return None


def _fit_on_ray(config: TrainConfig, options: _RunOptions, scaling: Scaling, out_fs: fsspec.AbstractFileSystem,
                out_path: str) -> None:
    """The run as a TorchTrainer; raises the first worker's error (one line) when it fails for good."""
    import pyarrow.fs
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    scaling = scaling.resolved(config.device)
    # Ray Train moves every worker into a folder of its own, where relative paths (--data, --out, --clip) miss;
    # kept where Ray starts them (the job's working directory), they resolve as in the driver and Ray Data's tasks
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    if _is_local(out_fs):
        storage = {"storage_path": str(Path(out_path).resolve())}
    else:  # any fsspec filesystem, with its credentials and endpoint, as Ray Train's storage
        storage = {"storage_path": out_path,
                   "storage_filesystem": pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(out_fs))}
    resources = {"CPU": scaling.cpus_per_worker} | ({"GPU": scaling.gpus_per_worker} if scaling.gpus_per_worker else {})
    trainer = TorchTrainer(
        _ray_worker,
        train_loop_config={"config": config, "options": options, "scaling": scaling},
        scaling_config=ScalingConfig(num_workers=scaling.num_workers, use_gpu=bool(scaling.gpus_per_worker),
                                     resources_per_worker=resources),
        run_config=RunConfig(name=CHECKPOINTS, failure_config=FailureConfig(max_failures=scaling.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2), **storage),
    )
    log.info("training on Ray Train: %s", json.dumps(asdict(scaling)))
    try:
        result = trainer.fit()
    except Exception as exc:
        raise TrainingFailed(_root_cause(exc)) from exc
    if result.return_value:
        raise TrainingFailed(result.return_value)


USER_ERRORS = (ModelLoadError, InputError, ValueError, FileNotFoundError)


class TrainingFailed(RuntimeError):
    """The run failed on its workers (after its restarts); the message is the first worker's error."""


def _root_cause(exc: BaseException) -> str:
    failures = getattr(exc, "worker_failures", None)
    if failures:
        exc = failures[min(failures)]
    while getattr(exc, "cause", None) is not None:  # a RayTaskError holds the worker's own exception
        exc = exc.cause
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
