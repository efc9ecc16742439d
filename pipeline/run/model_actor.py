"""What the driver hands Ray for the model stage: the bundle as the actors get it, and the actor class.

The class imports the models' code (torch, transformers, open_clip: ~4 s of a run's start) in the actor that runs
them: the driver only plans the run and never builds a model, so it does not import them at all."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray


class CaptionActor:
    """Ray Data's model actor: `model_stage.CaptionStage`, built from the same arguments in the actor."""

    def __init__(self, **stage_arguments: Any):
        from pipeline.run.model_stage import CaptionStage

        self.stage = CaptionStage(**stage_arguments)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.stage(batch)


def bundle_files(path: Path) -> dict[str, bytes]:
    """A bundle directory's files by relative path: what the driver ships to the actors."""
    return {str(file.relative_to(path)): file.read_bytes() for file in sorted(path.rglob("*")) if file.is_file()}


@dataclass(frozen=True)
class ShippedBundle:
    """The bundle the driver validated, as the model actors get it: at `path` where their node sees that
    very bundle (one machine, a shared filesystem), else from `files`, its copy in the object store.
    Without a copy (a Ray the driver started itself: one node, which sees the driver's files) a bundle
    changed since it was validated is an error, not another model."""

    path: str
    sha256: str
    files: ray.ObjectRef | None  # bundle_files(path)

    @classmethod
    def of(cls, path: Path, sha256: str, ship: bool = True) -> ShippedBundle:
        # the copy costs reading the whole bundle and holding it in the object store for the run
        # (~2.5 s and 590 MB for ViT-B/32 + GPT-2 small)
        return cls(str(path.resolve()), sha256, ray.put(bundle_files(path)) if ship else None)
