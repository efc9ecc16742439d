"""How many model actors the nodes hold, and how many threads each gets."""

from __future__ import annotations

from pathlib import Path

import ray

from pipeline.config import ActorRange


def total_resources(nodes: list[dict[str, float]]) -> str:
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


def cpu_threads_per_actor(nodes: list[dict[str, float]], actors: int) -> int:
    """A CPU-only actor's share of the smallest node's cores."""
    cores = min((int(resources.get("CPU", 1)) for resources in nodes), default=1)
    actors_per_node = max(1, -(-actors // max(1, len(nodes))))
    return max(1, cores // actors_per_node)


def rows_per_block(rows: int | None, actors: int, batch_size: int) -> int:
    """The rows each model actor task takes. A run of unknown size: `batch_size`. A run of `rows` rows: the
    fewest equal blocks of at most `batch_size` rows that are a multiple of `actors`, so that every actor
    ends at about the same time. Cut by `batch_size` alone, 64 images were one block for one actor while
    the others waited, and 576 were 256 + 256 + 64: one actor captioned the last 64 alone."""
    if rows is None or rows <= 0:
        return batch_size
    blocks = actors * -(-rows // (actors * batch_size))
    return max(1, -(-rows // blocks))
