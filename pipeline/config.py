"""The run's configuration: one typed object built by the CLI and recorded in run.json."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.generation.methods import METHODS
from pipeline.run.filtering import FilterSettings

DEMO_MODEL = "demo"
DEMO_BUNDLE = Path(__file__).resolve().parent / "assets" / "demo_bundle"
AUTO = "auto"
DTYPES = (AUTO, "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class GenerationSettings:
    """How captions are decoded (`pipeline.generation.generate.generate`); here, away from torch, so the CLI checks
    its usage without importing the model stack."""

    method: str = "greedy"
    max_new_tokens: int = 20
    num_candidates: int = 1       # beam: beams returned (<= beam_width); sample: samples per image
    beam_width: int = 5
    length_penalty: float = 1.0   # beam score = sum log p / length ** length_penalty
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown decoding method {self.method!r} (expected {', '.join(METHODS)})")
        if self.max_new_tokens < 1 or self.num_candidates < 1:
            raise ValueError("max_new_tokens and num_candidates must be at least 1")
        if self.num_candidates > 1 and "num_candidates" not in METHODS[self.method].settings:
            several = " or ".join(name for name, method in METHODS.items() if "num_candidates" in method.settings)
            raise ValueError(f"{self.method} decoding gives one caption per image: --num-candidates needs --decode "
                             f"{several}")
        if not -(2**63) <= self.seed < 2**63:  # a 64-bit seed, either sign
            raise ValueError(f"--seed must lie in [-2**63, 2**63), got {self.seed}")
        if self.method == "beam" and self.num_candidates > self.beam_width:
            raise ValueError(f"num_candidates ({self.num_candidates}) exceeds beam_width ({self.beam_width})")
        # written so that NaN fails too: every comparison with it is false
        if not (0 < self.temperature < math.inf and 0 < self.top_p <= 1 and self.top_k >= 0):
            raise ValueError(f"need 0 < temperature < inf, 0 < top_p <= 1 and top_k >= 0, got temperature "
                             f"{self.temperature}, top_p {self.top_p}, top_k {self.top_k}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def output_defining(self) -> dict[str, Any]:
        """The settings that can change this method's captions: those it ignores (greedy's seed, sampling's
        beam width) are left out, so a rerun that only differs there is the same run."""
        return {"method": self.method, "max_new_tokens": self.max_new_tokens} | {
            name: getattr(self, name) for name in METHODS[self.method].settings}


@dataclass(frozen=True)
class ActorRange:
    """Size of the model actor pool: fixed (min == max) or autoscaling between the two."""

    min: int = 1
    max: int = 1

    @classmethod
    def parse(cls, text: str) -> ActorRange | None:
        """'N' (fixed), 'MIN-MAX' (autoscaling) or 'auto' (None: as many as the nodes up now hold)."""
        if text == AUTO:
            return None
        low, _, high = text.partition("-")
        try:
            lo, hi = int(low), int(high or low)
        except ValueError:
            raise ValueError(f"--actors takes N, MIN-MAX or auto, got {text!r}") from None
        if not 1 <= lo <= hi:
            raise ValueError(f"--actors needs 1 <= MIN <= MAX, got {text!r}")
        return cls(lo, hi)


@dataclass(frozen=True)
class RunConfig:
    inputs: tuple[str, ...]
    output: str
    model: str = DEMO_MODEL
    image_column: str | None = None
    key_column: str = "key"
    filter: FilterSettings = field(default_factory=FilterSettings)
    decode: GenerationSettings = field(default_factory=GenerationSettings)
    batch_size: int = 256
    actors: ActorRange | None = None      # None: as many as the nodes up now hold (`run.placement.auto_actors`)
    gpus_per_actor: float | None = None   # None: 1 when the cluster has GPUs, else 0
    dtype: str = "auto"
    limit: int | None = None
    rows_per_file: int = 4096             # rows per Parquet part file
    write_webdataset: bool = False        # also write filtered/ with its images as WebDataset tars
    overwrite: bool = False
    allow_foreign_scorer: bool = False    # filter by a scorer not trained on the captions' language
    embed_only: bool = False              # image_embedding (+ original_clip_score) only: no caption decoded

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ValueError("at least one --input is required")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.gpus_per_actor is not None and not 0 <= self.gpus_per_actor <= 1:  # NaN fails too
            raise ValueError(f"--gpus-per-actor must be between 0 and 1 (a model actor computes on one GPU; "
                             f"more actors use more GPUs), got {self.gpus_per_actor}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be at least 1, got {self.limit}")
        if self.rows_per_file < 1:
            raise ValueError(f"--rows-per-file must be at least 1, got {self.rows_per_file}")
        if self.embed_only and self.filter.filters:
            raise ValueError("--embed-only writes no captions, so no clip_score to filter by: drop --min-clip-score "
                             "and --keep-top-fraction")

    @property
    def model_path(self) -> Path:
        return DEMO_BUNDLE if self.model == DEMO_MODEL else Path(self.model)

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"filter": self.filter.to_json()}

    def output_defining(self) -> dict[str, Any]:
        """What decides the content of the output. Resuming with a different value is refused;
        batch size, actors, GPUs, file size, the WebDataset copy, --overwrite and --allow-foreign-scorer
        change speed, layout or permission, not the rows, and decoding settings the method ignores (all of them,
        when no caption is decoded) change nothing."""
        settings = self.to_json() | {"decode": None if self.embed_only else self.decode.output_defining()}
        # the model is defined by its bundle's sha256 (recorded beside), not by the path that named it
        for name in ("output", "model", "batch_size", "actors", "gpus_per_actor", "rows_per_file",
                     "write_webdataset", "overwrite", "allow_foreign_scorer"):
            settings.pop(name)
        return settings


def differing_keys(ours: dict[str, Any], theirs: dict[str, Any]) -> list[str]:
    """The keys whose values differ between two recorded settings (a key missing on one side differs)."""
    return sorted(key for key in ours.keys() | theirs.keys() if ours.get(key) != theirs.get(key))
