"""The whole run: read -> decode -> caption -> stage, then filter -> captions/ + filtered/ + run.json.

This is the one place that knows about Ray; everything it calls is plain Python.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from pipeline import __version__
from pipeline.config import DEMO_MODEL, ActorRange, RunConfig, differing_keys
from pipeline.filtering import TopFraction, keep_mask, top_fraction
from pipeline.model_stage import CaptionStage, ShippedBundle
from pipeline.models.bundle import is_bundle, load_bundle, read_languages, save_encoder_bundle
from pipeline.models.errors import ModelLoadError
from pipeline.sinks import (
    CAPTIONS,
    FILTERED,
    REFILTER,
    REPORT,
    RUN_JSON,
    STAGING,
    STAGING_CONFIG,
    WEBDATASET,
    WEBDATASET_COLUMNS,
    OutputDir,
    read_columns,
    read_part,
)
from pipeline.sources import Shard, expand_inputs
from pipeline.stages import (
    SHARD_RECORDS,
    STAGING_ONLY,
    DecodeSpec,
    ShardDatasource,
    StagingSink,
    decode_batch,
    finished_shards,
    peak_rss_mb,
    write_webdataset_tar,
)
from pipeline.text import describe_error, one_line
from schemas.captions import captions_schema, conform, validate_table

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


class UsageError(ValueError):
    """Bad usage found before any work starts; the message is one line for the user."""


class ActorStartFailed(RuntimeError):
    """The model actors did not start: not in time, or their setup raised. One line for the user."""


class StagingNotListed(RuntimeError):
    """Parts this run wrote are missing from the staging listing; nothing was committed. One line for the user."""


def run(config: RunConfig) -> dict[str, Any]:
    """Run (or resume) a captioning job; returns the run summary that is also written to run.json. An --embed-only
    run's --model may be a CLIP alone (ARCH:WEIGHTS, a folder, a transformers name): its actors get it as an
    encoder bundle, written for the run beside it."""
    if config.embed_only and config.model != DEMO_MODEL and not is_bundle(config.model_path):
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
    bundle = load_bundle(model_path, captioner=not config.embed_only)
    if bundle.captioner is None and not config.embed_only:
        raise UsageError(f"--model {config.model} holds an encoder and no captioner: it can only --embed-only")
    try:
        if not config.embed_only:
            bundle.captioner.check_max_new_tokens(config.decode.max_new_tokens)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    embedding_dim = bundle.encoder.embed_dim
    scorer_images = None if bundle.scorer.shares_image_tower(bundle.encoder) else bundle.scorer.image_spec
    decode_spec = DecodeSpec(encoder=bundle.encoder.image_spec, scorer=scorer_images)
    identity = bundle.identity()
    if identity["scorer_encodes_images"]:
        log.info("the scorer is a model of its own: each image is decoded at its %d px too and encoded twice "
                 "(image_embedding stays the encoder's)", decode_spec.scorer.size)
    del bundle  # the driver only validates the models; actors load their own copies

    # the shards the inputs match define the run too: a glob that matches a shard added since a finished
    # run would otherwise leave its samples out while the rerun reports the output complete
    defining = {"config": config.output_defining(), "model_sha256": identity["sha256"],
                "shards_sha256": _shards_digest(shards)}
    provenance = {"model": identity["name"], "model_sha256": identity["sha256"]}
    metadata_json = json.dumps({"encoder": identity["encoder"], "captioner": identity["captioner"],
                                "scorer": identity["scorer"], "languages": identity["languages"],
                                "model": identity["name"],
                                "model_sha256": identity["sha256"],
                                "decoding": None if config.embed_only else config.decode.to_json(),
                                "filter": config.filter.to_json(), "version": __version__},
                               ensure_ascii=False)
    previous, refilter = _prepare_output(output, config, defining)
    if previous is not None and refilter:
        log.info("only the filter changed: re-filtering the stored scores of %s, no model run", output.url)
        return _jsonable(_refilter(output, config, previous, defining, embedding_dim, metadata_json, shards,
                                   provenance))
    if previous is not None:
        log.info("output is complete already: %s", output.url)
        if config.write_webdataset and "webdataset" not in previous:  # asked for after the run
            init_ray()
            previous["webdataset"] = _export_webdataset(output, config, shards, provenance)
            previous["config"]["write_webdataset"] = True
            output.write_json(previous, RUN_JSON)
        return _jsonable(previous)

    done = _committed_samples(output)
    already = sum(len(indices) for indices in done.values())
    finished = finished_shards(output, shards, done)
    if finished:
        log.info("resuming: %d of %d shards are staged completely and are not read again", len(finished),
                 len(shards))

    init_ray()
    model_started = time.time()
    remaining = None if config.limit is None else config.limit - already
    unfinished = [shard for shard in shards if shard.url not in finished]
    actors, parts_written = None, set()
    if unfinished and (remaining is None or remaining > 0):
        actors, parts_written = _caption_into_staging(config, output, unfinished, done, decode_spec, embedding_dim,
                                                      metadata_json, remaining, model_path, identity["sha256"])
    model_seconds = time.time() - model_started

    finalize_started = time.time()
    counts = _finalize(output, config, [shard.url for shard in shards], embedding_dim, metadata_json, parts_written)
    export_started = time.time()
    webdataset = _export_webdataset(output, config, shards, provenance) if config.write_webdataset else None
    counts["driver_peak_rss_mb"] = round(peak_rss_mb(), 1)  # should not grow with the corpus
    summary = {
        "config": config.to_json(),
        "output_defining": defining,
        "model": identity,
        "packages": {name: _version(name) for name in PACKAGES} | {"pipeline": __version__},
        "inputs": {"shards": len(shards)},
        "counts": counts,
        "resumed_rows": already,
        "actors": asdict(actors) if actors else None,  # the pool this attempt used (--actors auto: resolved)
        "timings": {
            "started": datetime.fromtimestamp(started, UTC).isoformat(),
            "finished": datetime.now(UTC).isoformat(),
            "wall_s": round(time.time() - started, 3),
            "model_stage_s": round(model_seconds, 3),
            "finalize_s": round(export_started - finalize_started, 3),
            "webdataset_s": round(time.time() - export_started, 3) if webdataset is not None else None,
            "images_per_s": round((counts["rows"] - already) / model_seconds, 3) if model_seconds > 0 else None,
        },
        "output": config.output,
    }
    if foreign_scorer:
        summary["warnings"] = [foreign_scorer]
    if webdataset is not None:
        summary["webdataset"] = webdataset
    output.write_json(summary, RUN_JSON)
    output.remove(STAGING)
    return _jsonable(summary)


def _prepare_output(output: OutputDir, config: RunConfig, defining: dict[str, Any],
                    ) -> tuple[dict[str, Any] | None, bool]:
    """Decide between a fresh start, a resume, a re-filter and a refusal. Returns the old summary when
    the run already finished, and whether its rows must be re-filtered (only the filter changed, under
    --overwrite, or an earlier re-filter was interrupted)."""
    finished = output.read_json(RUN_JSON)
    refiltering = output.read_json(REFILTER)  # where an interrupted re-filter was heading
    staged = output.read_json(STAGING, STAGING_CONFIG)
    # An attempt that staged nothing (refused at actor placement, killed while starting) left only its
    # configuration: nothing to keep, so it binds no later command.
    started_only = staged is not None and finished is None and refiltering is None and not (
        output.parts(STAGING) or output.parts(f"{STAGING}/{SHARD_RECORDS}", pattern="*"))
    if started_only:
        staged = None
    recorded = refiltering or (finished or {}).get("output_defining") or staged
    different = recorded is not None and _jsonable(recorded) != _jsonable(defining)
    if different and not config.overwrite:
        ours, theirs = _jsonable(defining), _jsonable(recorded)
        changed = differing_keys(ours["config"], theirs.get("config") or {})
        changed += [name for key, name in (("model_sha256", "model"), ("shards_sha256", "the shards --input matches"))
                    if ours.get(key) != theirs.get(key)]
        raise UsageError(f"{config.output} holds a run with a different configuration ({', '.join(changed)}); "
                         f"use another --output, or --overwrite to replace it")
    if recorded is None and not started_only and not output.is_empty() and not config.overwrite:
        raise UsageError(f"{config.output} is not empty and holds no run of this tool; "
                         f"use an empty --output, or --overwrite")
    try:  # the first write: an output nobody may write to is one line, before any work
        output.clean_temporaries()
        if staged is None and finished is None and refiltering is None:
            output.write_json(defining, STAGING, STAGING_CONFIG)
    except Exception as exc:  # a storage backend's own errors are not all OSErrors
        raise UsageError(f"cannot write --output {config.output}: {describe_error(exc)}") from None
    if finished is not None and (different or refiltering) and _only_filter_differs(finished, defining):
        return finished, True
    if different and config.overwrite:
        for folder in (CAPTIONS, FILTERED, WEBDATASET, STAGING, REFILTER, RUN_JSON, REPORT):
            output.remove(folder)
        finished = None
    if finished is not None:
        output.remove(STAGING)  # a run killed after its commit record but before this clean-up
        return finished, False
    if different:  # replaced under --overwrite
        output.write_json(defining, STAGING, STAGING_CONFIG)
    return None, False


def _shards_digest(shards: list[Shard]) -> str:
    return hashlib.sha256("\n".join(sorted(shard.url for shard in shards)).encode("utf-8")).hexdigest()


def _only_filter_differs(finished: dict[str, Any], defining: dict[str, Any]) -> bool:
    def without_filter(settings: dict[str, Any]) -> dict[str, Any]:
        settings = _jsonable(settings)
        settings["config"].pop("filter", None)
        return settings
    return without_filter(finished["output_defining"]) == without_filter(defining)


def _refilter(output: OutputDir, config: RunConfig, summary: dict[str, Any], defining: dict[str, Any],
              embedding_dim: int, metadata_json: str, shards: list[Shard], provenance: dict[str, Any],
              ) -> dict[str, Any]:
    """A finished run under new filter settings, from the scores stored in captions/: every part is
    rewritten with its new keep flags (and its filtered/ part with the kept rows), no model runs.
    REFILTER names the target until run.json records it, so an interrupted re-filter is completed by
    the next run before anything else; the WebDataset copy of the old filtered set is dropped."""
    started = time.time()
    output.write_json(defining, REFILTER)
    output.remove(WEBDATASET)
    output.remove(REPORT)  # a page of the old filter's figures
    paths = output.parts(CAPTIONS)
    scores = read_columns(output, CAPTIONS, ["key", "status", "clip_score"], paths)
    is_ok = pc.equal(scores.column("status"), "ok") if scores is not None else None
    top = None if scores is None else top_fraction(
        config.filter, scores.filter(is_ok).column("clip_score").to_numpy(zero_copy_only=False),
        scores.filter(is_ok).column("key").to_pylist(),
        _embeddings_of(output, paths, is_ok.to_numpy(zero_copy_only=False)))
    schema = captions_schema(embedding_dim, metadata_json)
    kept = 0
    for path in paths:
        with output.fs.open(path, "rb") as handle:
            table = pq.read_table(handle, use_threads=False)
        name = path.rsplit("/", 1)[-1]
        kept += _write_part(output, config, top, conform(table, schema), embedding_dim, name)
    summary.pop("webdataset", None)
    summary["config"], summary["output_defining"] = config.to_json(), defining
    summary["counts"] = {k: v for k, v in summary["counts"].items() if not k.startswith("top_fraction_cutoff")}
    summary["counts"] |= {"kept": kept, **_cutoff_counts(top)}
    summary["timings"]["refilter_s"] = round(time.time() - started, 3)
    if config.write_webdataset:
        init_ray()
        summary["webdataset"] = _export_webdataset(output, config, shards, provenance)
    output.write_json(summary, RUN_JSON)
    output.remove(REFILTER)
    return summary


def _write_part(output: OutputDir, config: RunConfig, top: TopFraction | None, table: pa.Table,
                embedding_dim: int, name: str) -> int:
    """One captions/ part with its keep flags set by the filter, and its kept rows as the filtered/ part
    of the same name (written when it keeps none too: readers of filtered/ then always find a table, if an
    empty one); returns how many rows it kept."""
    keep = keep_mask(config.filter, top, table.column("status").to_pylist(),
                     table.column("clip_score").to_numpy(zero_copy_only=False), table.column("key").to_pylist(),
                     _embedding_matrix(table) if top is not None and top.centroids is not None else None)
    position = table.schema.get_field_index("keep")
    table = table.set_column(position, table.schema.field(position), pa.array(keep))  # the schema's field: not null
    validate_table(table, embedding_dim, captioned=not config.embed_only)
    output.write_parquet(table, CAPTIONS, name)
    kept_rows = table.filter(pc.field("keep"))
    output.write_parquet(kept_rows, FILTERED, name)
    return kept_rows.num_rows


def _committed_samples(output: OutputDir) -> dict[str, set[int]]:
    """(source -> positions) of the samples already staged by earlier attempts of this run."""
    staged = read_columns(output, STAGING, ["source", "index"])
    done: dict[str, set[int]] = {}
    if staged is not None:
        for source, index in zip(staged.column("source").to_pylist(), staged.column("index").to_pylist(), strict=True):
            done.setdefault(source, set()).add(index)
    return done


def _caption_into_staging(config: RunConfig, output: OutputDir, shards, done, decode_spec: DecodeSpec,
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
        raise UsageError(f"no model actor ({need}) fits on this machine ({_total_resources(nodes)}); "
                         "use --gpus-per-actor 0 on a machine without GPUs")
    if places == 0:
        log.warning("no node up now can hold a model actor (%s; the cluster has %s): waiting up to %d s for "
                    "the autoscaler to add one", need, _total_resources(nodes), NO_PLACE_TIMEOUT_S)
    timeout = NO_PLACE_TIMEOUT_S if places == 0 else MIN_ACTORS_TIMEOUT_S if places >= actors.min else -1
    context.wait_for_min_actors_s = timeout
    if remaining is not None:
        context.execution_options.preserve_order = True  # --limit takes the first rows, deterministically
    cpu_threads = None if gpus else _cpu_threads_per_actor(nodes, actors.max)
    source = ShardDatasource(shards, done, config.image_column, config.key_column, output.url)
    dataset = ray.data.read_datasource(source,
                                       num_cpus=READ_CPUS, override_num_blocks=len(shards),
                                       concurrency=min(len(shards), READS_PER_ACTOR * actors.max))
    if remaining is not None:
        dataset = dataset.limit(remaining)
    if gpus:  # CPU tasks decode while the GPU actors compute
        dataset = dataset.map_batches(decode_batch, fn_kwargs={"spec": decode_spec}, batch_format="pyarrow",
                                      batch_size=config.batch_size)
    dataset = dataset.map_batches(
        CaptionStage,
        # a Ray this process started is this one machine: its actors read the bundle in place, no copy needed
        fn_constructor_kwargs={"bundle": ShippedBundle.of(model_path, bundle_sha256,
                                                          ship=not _ray_started_here()),
                               "settings": None if config.embed_only else config.decode,
                               "dtype": config.dtype, "batch_size": config.batch_size, "embedding_dim": embedding_dim,
                               "metadata_json": metadata_json, "cpu_threads": cpu_threads,
                               # a CPU actor already uses its cores: decoding beside it would only make its
                               # matmul threads wait, so it decodes each batch itself, on the same threads
                               "decode_spec": None if gpus else decode_spec},
        compute=ray.data.ActorPoolStrategy(min_size=actors.min, max_size=actors.max),
        batch_size=config.batch_size,
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
    return actors, sink.parts_written


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


def _total_resources(nodes: list[dict[str, float]]) -> str:
    return (f"{sum(n.get('CPU', 0) for n in nodes):g} CPUs, {sum(n.get('GPU', 0) for n in nodes):g} GPUs "
            f"on {len(nodes)} node(s)")


def live_node_resources() -> list[dict[str, float]]:
    """The resources of each node that is up now."""
    return [node["Resources"] for node in ray.nodes() if node.get("Alive")]


def actor_places(nodes: list[dict[str, float]], gpus_per_actor: float, memory_per_actor: float = 0.0) -> int:
    """How many model actors (1 CPU, `gpus_per_actor` GPUs and `memory_per_actor` bytes each) these nodes hold."""
    places = 0
    for resources in nodes:
        fit = int(resources.get("CPU", 0))
        if gpus_per_actor:
            fit = min(fit, int(resources.get("GPU", 0) / gpus_per_actor + 1e-9))
        if memory_per_actor:
            fit = min(fit, int(resources.get("memory", 0) // memory_per_actor))
        places += fit
    return places


def auto_actors(nodes: list[dict[str, float]], gpus_per_actor: float, memory_per_actor: float) -> ActorRange:
    """`--actors auto`: one actor per GPU share on GPU nodes; on CPU-only nodes one per core (each with one
    thread: faster than one actor with every core, docs/cluster.md), as many as each node's memory holds."""
    count = max(1, actor_places(nodes, gpus_per_actor, memory_per_actor))
    return ActorRange(count, count)


def actor_memory_estimate(model_path: Path) -> float:
    """Bytes a model actor holds: the runtime (~1.5 GiB: torch, transformers, Ray) and its models at ~4x their
    files (ViT-B/32 + GPT-2 small stored as fp16, 0.48 GB: 3.4 GB measured peak RSS loading the shipped copy;
    2.5 GB where the actor reads the bundle in place, so this errs on the safe side)."""
    files = sum(file.stat().st_size for file in model_path.rglob("*") if file.is_file())
    return 1.5 * 2**30 + 4 * files


def _cpu_threads_per_actor(nodes: list[dict[str, float]], actors: int) -> int:
    """A CPU-only actor's share of the smallest node's cores."""
    cores = min((int(resources.get("CPU", 1)) for resources in nodes), default=1)
    actors_per_node = max(1, -(-actors // max(1, len(nodes))))
    return max(1, cores // actors_per_node)


def _finalize(output: OutputDir, config: RunConfig, shard_order: list[str], embedding_dim: int,
              metadata_json: str, parts_written: set[str]) -> dict[str, Any]:
    """Staged parts -> captions/ (every sample exactly once, with keep) and filtered/ (kept rows).

    A sample staged twice (a retried write) is written once. Two samples that share a key (the same
    key in two shards) are both kept: the first in input order keeps the key, the others become
    `duplicate_key` rows under a key that names their shard and position. The global top fraction
    reads the stored scores only: it costs no model re-run. Every part this attempt wrote must be listed
    first: committing without one would drop its rows, since the staging area is deleted after the commit.
    """
    staged_paths = output.parts(STAGING)  # one listing: the parts checked are the parts committed
    unlisted = parts_written - {path.rsplit("/", 1)[-1] for path in staged_paths}
    if unlisted:
        raise StagingNotListed(f"{len(unlisted)} part(s) this run wrote are not listed in {output.url}/{STAGING} "
                               f"(e.g. {min(unlisted)}); nothing was committed or deleted: submit the job again")
    staged = read_columns(output, STAGING, ["key", "source", "index", "status", "clip_score"], staged_paths)
    columns = [staged.column(c).to_pylist() for c in staged.column_names] if staged is not None else [[]] * 5
    renamed = _renamed_duplicates(*columns[:3], shard_order)
    ok_keys, ok_scores, ok_rows, seen = [], [], [], set()
    for key, source, index, status, score in zip(*columns, strict=True):
        ok_rows.append((source, index) not in seen and (source, index) not in renamed and status == "ok")
        if ok_rows[-1]:
            ok_keys.append(key)
            ok_scores.append(score)
        seen.add((source, index))
    top = top_fraction(config.filter, np.array(ok_scores, dtype=np.float64), ok_keys,
                       _embeddings_of(output, staged_paths, np.array(ok_rows, dtype=bool)))
    schema = captions_schema(embedding_dim, metadata_json)
    written: set[tuple[str, int]] = set()
    counts: Counter[str] = Counter()
    by_node: Counter[str] = Counter()
    by_compute: Counter[str] = Counter()
    actor_peak_mb = 0.0
    kept = 0
    for path in staged_paths:
        with output.fs.open(path, "rb") as handle:
            table = pq.read_table(handle, use_threads=False)
        table = _mark_duplicates(_drop_written(table, written), renamed)
        captioned = table.filter(pc.equal(table.column("status"), "ok"))  # not rows failed before the models
        by_node.update(captioned.column("node").to_pylist())
        # parts staged by a version that did not record it
        by_compute.update(captioned.column("compute").to_pylist() if "compute" in table.column_names
                          else ["unrecorded"] * captioned.num_rows)
        actor_peak_mb = max(actor_peak_mb, pc.max(table.column("actor_peak_rss_mb")).as_py() or 0.0)
        table = conform(table.drop_columns([c for c in STAGING_ONLY if c in table.column_names]), schema)
        kept += _write_part(output, config, top, table, embedding_dim, path.rsplit("/", 1)[-1])
        counts.update(table.column("status").to_pylist())
    if not output.parts(CAPTIONS):  # inputs without one sample (an empty tar): readers still find the tables
        _write_part(output, config, top, schema.empty_table(), embedding_dim, "part-empty.parquet")
    return {"rows": sum(counts.values()), "by_status": dict(sorted(counts.items())), "kept": kept,
            **_cutoff_counts(top), "rows_by_node": dict(by_node),
            "rows_by_compute": dict(by_compute),
            "model_actor_peak_rss_mb": round(actor_peak_mb, 1)}


def _cutoff_counts(top: TopFraction | None) -> dict[str, Any]:
    return top.to_json() if top is not None else {"top_fraction_cutoff_score": None}


def _embeddings_of(output: OutputDir, paths: list[str], rows: np.ndarray) -> Callable[[], Iterator[np.ndarray]]:
    """The image embeddings of some rows (`rows`: a mask over the parts' rows, in the order of `paths`), read a
    part at a time whenever the returned function is called."""
    def blocks() -> Iterator[np.ndarray]:
        start = 0
        for path in paths:
            with output.fs.open(path, "rb") as handle:
                part = read_part(handle, ["image_embedding"])
            yield _embedding_matrix(part)[rows[start:start + part.num_rows]]
            start += part.num_rows
    return blocks


def _embedding_matrix(table: pa.Table) -> np.ndarray:
    """A table's image_embedding column as one matrix; rows without one (failed samples) are zeros."""
    column = table.column("image_embedding").combine_chunks()
    width = column.type.list_size
    matrix = np.zeros((len(column), width), dtype=np.float32)
    valid = column.is_valid().to_numpy(zero_copy_only=False)
    matrix[valid] = column.filter(valid).flatten().to_numpy(zero_copy_only=False).reshape(-1, width)
    return matrix


def _export_webdataset(output: OutputDir, config: RunConfig, shards: list[Shard],
                       provenance: dict[str, Any]) -> dict[str, Any]:
    """filtered/ -> WEBDATASET/: the kept rows grouped by input shard, one Ray task per shard that
    re-reads it for the images (the run stores no image bytes) and writes its tar."""
    kept = read_columns(output, FILTERED, list(WEBDATASET_COLUMNS))
    rows_of: dict[str, list[int]] = {}
    for row, source in enumerate(kept.column("source").to_pylist() if kept is not None else []):
        rows_of.setdefault(source, []).append(row)
    write = ray.remote(num_cpus=1)(write_webdataset_tar)
    tasks = [write.remote(kept.take(rows_of[shard.url]), position, shard, output.url, config.image_column,
                          config.key_column, provenance)
             for position, shard in enumerate(shards) if shard.url in rows_of]
    stats = ray.get(tasks)
    missing = sum(row["missing"] for row in stats)
    if missing:
        log.warning("%d kept samples were not found in their input shards again; not in %s", missing, WEBDATASET)
    return {"folder": WEBDATASET, "tars": len(stats), "samples": sum(row["samples"] for row in stats),
            "missing": missing}


def _renamed_duplicates(keys: list[str], sources: list[str], indices: list[int],
                        shard_order: list[str]) -> dict[tuple[str, int], tuple[str, str]]:
    """(source, index) -> (new key, first source) for every sample whose key an earlier sample holds."""
    rank = {url: i for i, url in enumerate(shard_order)}
    owners: dict[str, list[tuple[int, int, str]]] = {}
    for key, source, index in zip(keys, sources, indices, strict=True):
        owners.setdefault(key, []).append((rank.get(source, len(rank)), index, source))
    renamed = {}
    for key, samples in owners.items():
        unique = sorted(set(samples))
        for _, index, source in unique[1:]:
            renamed[(source, index)] = (f"{key}@{source}#{index}", unique[0][2])
    return renamed


def _drop_written(table: pa.Table, written: set[tuple[str, int]]) -> pa.Table:
    """Rows of samples not written yet (a retried block can never add a sample twice)."""
    first = []
    for source, index in zip(table.column("source").to_pylist(), table.column("index").to_pylist(), strict=True):
        first.append((source, index) not in written)
        written.add((source, index))
    return table.filter(pa.array(first, pa.bool_()))


def _mark_duplicates(table: pa.Table, renamed: dict[tuple[str, int], tuple[str, str]]) -> pa.Table:
    hits = [renamed.get((s, i)) for s, i in zip(table.column("source").to_pylist(), table.column("index").to_pylist(),
                                                strict=True)]
    if not any(hits):
        return table
    is_duplicate = pa.array([hit is not None for hit in hits])
    replacements = {
        "key": pa.array([hit[0] if hit else key for hit, key in zip(hits, table.column("key").to_pylist(),
                                                                   strict=True)], pa.string()),
        # a row that already failed keeps its own reason; only an ok row becomes duplicate_key
        "status": pc.if_else(pc.and_(is_duplicate, pc.equal(table.column("status"), "ok")), "duplicate_key",
                             table.column("status")),
        "error": pc.if_else(pc.and_(is_duplicate, pc.equal(table.column("status"), "ok")),
                            pa.array([f"key also used by an earlier sample in {hit[1]}" if hit else None
                                      for hit in hits], pa.string()), table.column("error")),
    }
    for name in ("caption", "clip_score", "image_embedding", "candidates"):
        column = table.column(name)
        replacements[name] = pc.if_else(is_duplicate, pa.nulls(len(table), column.type), column)
    for name, values in replacements.items():
        table = table.set_column(table.schema.get_field_index(name), name, values)
    return table


def init_ray() -> None:
    """Ray for a job: the cluster RAY_ADDRESS names (`ray job submit` sets it), else a local one started here."""
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        if address:
            _check_ray_address(address)
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


def _jsonable(data: Any) -> Any:
    return json.loads(json.dumps(data, default=str))


__all__ = ["UsageError", "init_ray", "run"]
