"""Whether an output starts, resumes, is re-filtered or is refused, and which samples earlier attempts staged."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pipeline.config import RunConfig, differing_keys
from pipeline.io.sinks import (
    CAPTIONS,
    FILTERED,
    REFILTER,
    REPORT,
    RUN_JSON,
    STAGING,
    STAGING_CONFIG,
    WEBDATASET,
    OutputDir,
    read_columns,
)
from pipeline.io.sources import Shard
from pipeline.run.data_stages import SHARD_RECORDS
from pipeline.run.errors import UsageError
from pipeline.text import describe_error


def prepare_output(output: OutputDir, config: RunConfig, defining: dict[str, Any],
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
    different = recorded is not None and jsonable(recorded) != jsonable(defining)
    if different and not config.overwrite:
        ours, theirs = jsonable(defining), jsonable(recorded)
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


def shards_digest(shards: list[Shard]) -> str:
    return hashlib.sha256("\n".join(sorted(shard.url for shard in shards)).encode("utf-8")).hexdigest()


def _only_filter_differs(finished: dict[str, Any], defining: dict[str, Any]) -> bool:
    def without_filter(settings: dict[str, Any]) -> dict[str, Any]:
        settings = jsonable(settings)
        settings["config"].pop("filter", None)
        return settings
    return without_filter(finished["output_defining"]) == without_filter(defining)


def committed_samples(output: OutputDir) -> dict[str, set[int]]:
    """(source -> positions) of the samples already staged by earlier attempts of this run."""
    staged = read_columns(output, STAGING, ["source", "index"])
    done: dict[str, set[int]] = {}
    if staged is not None:
        for source, index in zip(staged.column("source").to_pylist(), staged.column("index").to_pylist(), strict=True):
            done.setdefault(source, set()).add(index)
    return done


def jsonable(data: Any) -> Any:
    return json.loads(json.dumps(data, default=str))
