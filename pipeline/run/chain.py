"""The run's Ray wiring: read -> decode -> caption -> stage on Ray Data, then the commit (`pipeline.run.commit`)
-> captions/ + filtered/ + run.json. The model actors' count and threads come from `pipeline.run.placement`."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import tempfile
import time
from dataclasses import asdict
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import ray

from pipeline import __version__
from pipeline.config import DEMO_MODEL, ActorRange, RunConfig
from pipeline.io.retry import TransientIOError, is_transient
from pipeline.io.sinks import (
    RUN_JSON,
    STAGING,
    OutputDir,
)
from pipeline.io.sources import count_samples, expand_inputs
from pipeline.models.errors import ModelLoadError
from pipeline.models.manifest import bundle_facts, is_bundle, load_manifest, model_identity, read_languages
from pipeline.run.commit import export_webdataset, finalize, refilter
from pipeline.run.data_stages import (
    ImageSpecs,
    ShardDatasource,
    StagingSink,
    decode_images,
    peak_rss_mb,
)
from pipeline.run.errors import ActorStartFailed, UsageError
from pipeline.run.model_actor import CaptionActor, ShippedBundle
from pipeline.run.placement import (
    actor_memory_estimate,
    actor_places,
    auto_actors,
    cpu_threads_per_actor,
    live_node_resources,
    rows_per_block,
    total_resources,
)
from pipeline.run.publish import Publisher
from pipeline.run.resume import jsonable, prepare_output, shards_digest, staged_samples
from pipeline.text import describe_error, one_line

log = logging.getLogger(__name__)

# Read tasks only fetch bytes (decode runs in the model actor on CPU clusters, in decode tasks beside GPU
# actors); reserving no CPU for them means actors holding every CPU (e.g. after a node is lost) never
# starve their own input.
READ_CPUS = 0
# ...and so nothing but this cap bounds how many run at once: without it Ray Data starts one worker per
# shard until the object store fills (10-13 at COCO scale here, ~470 MB private each). One read task streams
# ~1,000 images/s, so 4 per model actor keep even a GPU actor fed.
READS_PER_ACTOR = 4
# Long enough for actors to load their models; past it Ray Data stops the run with its own reason.
MIN_ACTORS_TIMEOUT_S = 1800
NO_PLACE_TIMEOUT_S = 900  # long enough for a cloud node to boot and install
RAY_ADDRESS_TIMEOUT_S = 10
PACKAGES = ("torch", "ray", "transformers", "open_clip_torch", "pyarrow", "pillow")


def run(config: RunConfig) -> dict[str, Any]:
    """Run (or resume) a captioning job; returns the run summary that is also written to run.json. An --embed-only
    run's --model may be a CLIP alone (ARCH:WEIGHTS, a folder, a transformers name): its actors get it as an
    encoder bundle, written for the run beside it."""
    if config.embed_only and config.model != DEMO_MODEL and not is_bundle(config.model_path):
        from pipeline.models.bundle import save_encoder_bundle  # builds the CLIP: torch, only here

        with tempfile.TemporaryDirectory(prefix="encoder-bundle-") as root:
            save_encoder_bundle(config.model, Path(root) / "bundle")
            return _run(config, Path(root) / "bundle")
    return _run(config, config.model_path)


def _run(config: RunConfig, model_path: Path) -> dict[str, Any]:
    started = time.time()
    languages = read_languages(model_path)
    foreign_scorer = languages.warning() if languages is not None and not config.embed_only else None
    if foreign_scorer:
        log.warning("%s", foreign_scorer)
        if config.filter.filters and not config.allow_foreign_scorer:
            raise UsageError(f"refusing to filter {languages.captions} captions by the scores of a scorer that reads "
                             f"{', '.join(languages.scorer)}: use a bundle whose scorer reads {languages.captions} "
                             "(a multilingual CLIP, or train_captioner.py --scorer-languages for one you trained), "
                             "or --allow-foreign-scorer")
    try:
        output = OutputDir(config.output)
    except (ValueError, ImportError) as exc:  # unknown protocol, or its fsspec backend (s3fs, gcsfs) not installed
        raise UsageError(f"cannot open --output {config.output!r}: {one_line(exc)}") from None
    try:
        is_file = output.is_file()
    except Exception as exc:  # what a storage backend raises: botocore's NoCredentialsError is no OSError
        raise UsageError(f"cannot access --output {config.output!r}: {describe_error(exc)}") from None
    if is_file:
        raise UsageError(f"--output {config.output} is a file, not a directory")
    shards = expand_inputs(list(config.inputs), image_column=config.image_column, key_column=config.key_column)
    # the driver plans from bundle.json (its files checked); the actors build the models and check them against it
    manifest = load_manifest(model_path)
    if manifest["captioner"] is None and not config.embed_only:
        raise UsageError(f"--model {config.model} holds an encoder and no captioner: it can only --embed-only")
    facts = bundle_facts(model_path, manifest)
    try:
        if not config.embed_only:
            facts.check_max_new_tokens(config.decode.max_new_tokens)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    embedding_dim = facts.embed_dim
    image_specs = ImageSpecs(encoder=facts.encoder_image, scorer=facts.scorer_image)
    identity = model_identity(manifest, facts)
    if facts.scorer_image is not None:
        log.info("the scorer is a model of its own: each image is decoded at its %d px too and encoded twice "
                 "(image_embedding stays the encoder's)", facts.scorer_image.size)

    # the shards the inputs match define the run too: a glob that matches a shard added since a finished
    # run would otherwise leave its samples out while the rerun reports the output complete
    defining = {"config": config.output_defining(), "model_sha256": identity["sha256"],
                "shards_sha256": shards_digest(shards)}
    provenance = {"model": identity["name"], "model_sha256": identity["sha256"]}
    metadata_json = json.dumps({"encoder": identity["encoder"], "captioner": identity["captioner"],
                                "scorer": identity["scorer"], "languages": identity["languages"],
                                "model": identity["name"],
                                "model_sha256": identity["sha256"],
                                "decoding": None if config.embed_only else config.decode.to_json(),
                                "filter": config.filter.to_json(), "version": __version__},
                               ensure_ascii=False)
    previous, refilter_needed = prepare_output(output, config, defining)
    if previous is not None and refilter_needed:
        log.info("only the filter changed: re-filtering the stored scores of %s, no model run", output.url)
        init_ray()
        previous = refilter(output, config, previous, defining, embedding_dim, metadata_json)
    elif previous is not None:
        log.info("output is complete already: %s", output.url)
    if previous is not None:
        if config.write_webdataset and "webdataset" not in previous:  # asked for after the run
            init_ray()
            previous["webdataset"] = export_webdataset(output, config, shards, provenance)
            previous["config"]["write_webdataset"] = True
            output.write_json(previous, RUN_JSON)
        return jsonable(previous)

    ray_started = time.time()
    init_ray()
    ray_seconds = time.time() - ray_started
    staged = staged_samples(output)
    if staged.finished:
        log.info("resuming: %d of %d shards are staged completely and are not read again", len(staged.finished),
                 len(shards))

    model_started = time.time()
    remaining = None if config.limit is None else config.limit - staged.rows
    unfinished = [shard for shard in shards if shard.url not in staged.finished]
    actors, parts_written = None, set()
    publisher = Publisher(output, config.rows_per_file, len(shards))  # captions/ fills shard by shard
    if unfinished and (remaining is None or remaining > 0):
        publisher.start()
        try:
            actors, parts_written = _caption_into_staging(config, output, unfinished, staged.partial, image_specs,
                                                          embedding_dim, metadata_json, remaining, model_path,
                                                          identity["sha256"])
        finally:
            publisher.stop()
    model_seconds = time.time() - model_started

    finalize_started = time.time()
    counts = finalize(output, config, [shard.url for shard in shards], embedding_dim, metadata_json, parts_written,
                      publisher)
    export_started = time.time()
    webdataset = export_webdataset(output, config, shards, provenance) if config.write_webdataset else None
    counts["driver_peak_rss_mb"] = round(peak_rss_mb(), 1)  # should not grow with the corpus
    summary = {
        "config": config.to_json(),
        "output_defining": defining,
        "model": identity,
        "packages": {name: _version(name) for name in PACKAGES} | {"pipeline": __version__},
        "inputs": {"shards": len(shards)},
        "counts": counts,
        "resumed_rows": staged.rows,
        "actors": asdict(actors) if actors else None,  # the pool this attempt used (--actors auto: resolved)
        "timings": {
            "started": datetime.fromtimestamp(started, UTC).isoformat(),
            "finished": datetime.now(UTC).isoformat(),
            "wall_s": round(time.time() - started, 3),
            "ray_start_s": round(ray_seconds, 3),  # starting a local Ray, or joining the cluster's
            # what a reader of captions/ waited for its first rows (a shard published whole); null: none this attempt
            "first_published_s": None if publisher.first_published is None
            else round(publisher.first_published - started, 3),
            "model_stage_s": round(model_seconds, 3),
            "finalize_s": round(export_started - finalize_started, 3),
            "webdataset_s": round(time.time() - export_started, 3) if webdataset is not None else None,
            "images_per_s": round((counts["rows"] - staged.rows) / model_seconds, 3) if model_seconds > 0 else None,
        },
        "output": config.output,
    }
    if foreign_scorer:
        summary["warnings"] = [foreign_scorer]
    if webdataset is not None:
        summary["webdataset"] = webdataset
    output.write_json(summary, RUN_JSON)
    output.remove(STAGING)
    return jsonable(summary)


def _caption_into_staging(config: RunConfig, output: OutputDir, shards, done, image_specs: ImageSpecs,
                          embedding_dim: int, metadata_json: str, remaining: int | None, model_path: Path,
                          bundle_sha256: str) -> tuple[ActorRange, set[str]]:
    """Caption the unfinished shards into staging/; returns the actor pool it used and the parts written."""
    context = ray.data.DataContext.get_current()
    # Each batch goes to the least busy model actor, not to one beside its block: model time per
    # batch dwarfs moving its uint8 pixels between nodes, and locality left other nodes' actors idle.
    context.execution_options.actor_locality_enabled = False
    nodes = live_node_resources()
    gpus = config.gpus_per_actor
    if gpus is None:
        gpus = 1.0 if any(resources.get("GPU", 0) > 0 for resources in nodes) else 0.0
        if not gpus and not _ray_started_here():  # the autoscaler adds GPU nodes only for actors that ask
            log.info("no node up now has a GPU: the model actors caption on CPUs (on an autoscaling GPU cluster, "
                     "give --gpus-per-actor 1 and --actors MIN-MAX)")
    actors = config.actors or auto_actors(nodes, gpus, actor_memory_estimate(model_path))
    # Where the nodes up now hold the pool's minimum, no batch goes out before those actors have loaded
    # their models: otherwise the first actor up takes every batch of a short run and --actors N is not N.
    # A pool that asks for more than there is starts with the actors it gets. Where not one actor fits,
    # only an autoscaler can help: a Ray this process started has none, and elsewhere the wait is bounded.
    places = actor_places(nodes, gpus)
    need = f"1 CPU{f' and {gpus:g} GPU' if gpus else ''} each"
    if places == 0 and _ray_started_here():
        raise UsageError(f"no model actor ({need}) fits on this machine ({total_resources(nodes)}); "
                         "use --gpus-per-actor 0 on a machine without GPUs")
    if places == 0:
        log.warning("no node up now can hold a model actor (%s; the cluster has %s): waiting up to %d s for "
                    "the autoscaler to add one", need, total_resources(nodes), NO_PLACE_TIMEOUT_S)
    timeout = NO_PLACE_TIMEOUT_S if places == 0 else MIN_ACTORS_TIMEOUT_S if places >= actors.min else -1
    context.wait_for_min_actors_s = timeout
    if remaining is not None:
        context.execution_options.preserve_order = True  # --limit takes the first rows, deterministically
    cpu_threads = None if gpus else cpu_threads_per_actor(nodes, actors.max)
    source = ShardDatasource(shards, done, config.image_column, config.key_column, output.url)
    dataset = ray.data.read_datasource(source,
                                       num_cpus=READ_CPUS, override_num_blocks=len(shards),
                                       concurrency=min(len(shards), READS_PER_ACTOR * actors.max))
    if remaining is not None:
        dataset = dataset.limit(remaining)
    # a CPU actor takes seconds a batch, so an actor left idle by a short run or a run's tail is worth counting
    # the rows for; a GPU's batch takes a fraction of a second
    rows = remaining if gpus else _rows_to_caption(config, shards, done, remaining, actors.max)
    block_rows = rows_per_block(rows, actors.max, config.batch_size)
    dataset = _in_blocks_of(dataset, block_rows)
    if gpus:  # CPU tasks decode while the GPU actors compute
        dataset = dataset.map_batches(decode_images, fn_kwargs={"spec": image_specs}, batch_format="pyarrow",
                                      batch_size=block_rows)
    dataset = dataset.map_batches(
        CaptionActor,
        # a Ray this process started is this one machine: its actors read the bundle in place, no copy needed
        fn_constructor_kwargs={"bundle": ShippedBundle.of(model_path, bundle_sha256,
                                                          ship=not _ray_started_here()),
                               "settings": None if config.embed_only else config.decode,
                               "dtype": config.dtype, "batch_size": config.batch_size, "embedding_dim": embedding_dim,
                               "metadata_json": metadata_json, "cpu_threads": cpu_threads,
                               # a CPU actor already uses its cores: decoding beside it would only make its
                               # matmul threads wait, so it decodes each batch itself, on the same threads
                               "image_specs": None if gpus else image_specs},
        compute=ray.data.ActorPoolStrategy(min_size=actors.min, max_size=actors.max),
        batch_size=block_rows,  # not more: Ray Data would join smaller blocks into one actor's task
        batch_format="pyarrow",
        num_gpus=gpus,
    )
    sink = StagingSink(output.url, config.rows_per_file)
    try:
        dataset.write_datasink(sink)
    except ray.exceptions.GetTimeoutError as exc:  # raised only by the wait above: the actors never came up
        raise ActorStartFailed(f"{actors.min} model actor(s) ({need}) did not start within {timeout} s "
                               f"(see the Ray logs for why); rows written so far are kept and a rerun resumes") \
            from exc
    except ray.exceptions.RayActorError as exc:
        if not exc.actor_init_failed:  # an actor lost mid-run that Ray Data gave up on: not a usage problem
            raise
        raise ActorStartFailed(f"a model actor could not start: {_creation_error(exc)}; rows written so far are "
                               "kept and a rerun resumes") from None
    except Exception as exc:
        if not is_transient(exc):
            raise
        reason = one_line(str(exc)).rpartition("TransientIOError: ")[2] or one_line(str(exc))
        raise TransientIOError(f"{reason}; rows written so far are kept and a rerun resumes (it reads again what "
                               "could not be read)") from None
    return actors, sink.parts_written


def _rows_to_caption(config: RunConfig, shards, done: dict[str, set[int]], remaining: int | None,
                     actors: int) -> int | None:
    """How many rows this attempt captions, where that is cheap to know (a small local input, or --limit)."""
    staged = sum(len(done.get(shard.url, ())) for shard in shards)
    at_most = 2 * actors * config.batch_size
    if remaining is not None:  # past the limit, counting on tells nothing more
        at_most = min(at_most, remaining + staged)
    counted = count_samples(shards, at_most, config.image_column, config.key_column)
    return remaining if counted is None else counted - staged


def _in_blocks_of(dataset: ray.data.Dataset, rows: int) -> ray.data.Dataset:
    """`dataset` in blocks of at most `rows` rows, each one model actor task (`placement.rows_per_block`).

    A read task's output is cut into blocks by bytes only (128 MiB): a shard of small images arrived as one
    block, which one actor captioned while the others waited. Ray's streaming repartition cuts by rows, but
    its tasks ask for a CPU, which the model actors may all hold: given none, like the read tasks, it runs
    beside them. (Ray 2.60's `repartition` takes no remote arguments; the project pins that version.)"""
    dataset = dataset.repartition(target_num_rows_per_block=rows)
    object.__setattr__(dataset._logical_plan.dag, "ray_remote_args", {"num_cpus": READ_CPUS})
    return dataset


def _creation_error(exc: ray.exceptions.RayActorError) -> str:
    """What an actor's __init__ raised, from the remote traceback Ray's message carries (it keeps no
    exception object): the exception's own line and any after it (torch's CUDA messages run over several),
    on one line, its type without the module path."""
    lines = str(exc).splitlines()
    start = next((i for i in range(len(lines) - 1, -1, -1) if _EXCEPTION_LINE.match(lines[i])), None)
    if start is None:
        return one_line(next((line for line in reversed(lines) if line.strip()), "unknown error"))
    name, _, message = lines[start].partition(":")
    name = name.rpartition(".")[2]
    message = one_line(" ".join([message, *lines[start + 1:]]))
    return message if name == ModelLoadError.__name__ else f"{name}: {message}" if message else name


# "pipeline.models.errors.ModelLoadError: ...", "torch.AcceleratorError: ...", "MemoryError": at the line's start
_EXCEPTION_LINE = re.compile(r"[A-Za-z_][\w.]*(Error|Exception)(:|$)")


def _ray_started_here() -> bool:
    """Whether this process started the Ray it runs on: then no autoscaler will ever add a node."""
    node = getattr(getattr(getattr(ray, "_private", None), "worker", None), "_global_node", None)
    return bool(getattr(node, "head", False))  # a driver that connected to a cluster has a non-head node


def init_ray() -> None:
    """Ray for a job: the cluster RAY_ADDRESS names (`ray job submit` sets it), else a local one started here."""
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        if address:
            _check_ray_address(address)
        else:
            # A Ray started here stops idle workers beyond one per CPU, and the model actors hold every CPU: each
            # read and write task waited ~2 s for a new worker process. (Read by the raylet started below; a
            # Ray that `ray start` began, which ray.init joins where there is one, keeps its own setting.)
            os.environ.setdefault("RAY_num_workers_soft_limit", str(2 * (os.cpu_count() or 1) + 4))
        ray.init(address=address, log_to_driver=True, configure_logging=False,
                 runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}} if address is None else None)


def _check_ray_address(address: str) -> None:
    """A RAY_ADDRESS nothing listens on makes ray.init() retry for minutes in silence: say so at once."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # "auto", "local": Ray resolves those itself
    try:
        socket.create_connection((host, int(port)), timeout=RAY_ADDRESS_TIMEOUT_S).close()
    except OSError as exc:
        raise UsageError(f"RAY_ADDRESS={address}: no Ray cluster answers there ({describe_error(exc)}); "
                         "start it, or unset RAY_ADDRESS to run on a local Ray") from None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


__all__ = ["init_ray", "run"]
