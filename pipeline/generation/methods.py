"""The decoding methods, by the name `--decode` takes: one module each, registered here by one line. Torch-free, so
the command line checks its usage without importing the model stack."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    module: str  # where its generate(captioner, prefix, settings, sample_seeds) lives
    settings: tuple[str, ...] = ()  # the GenerationSettings it reads besides max_new_tokens: they define its output


METHODS = {
    "greedy": Method("pipeline.generation.greedy"),
    "beam": Method("pipeline.generation.beam", ("num_candidates", "beam_width", "length_penalty")),
    "sample": Method("pipeline.generation.sampling", ("num_candidates", "temperature", "top_p", "top_k", "seed")),
}
