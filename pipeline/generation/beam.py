"""Beam search: the `num_candidates` best of `beam_width` beams per image, by length-normalised log-probability."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pipeline.config import GenerationSettings
from pipeline.generation.kv_cache import new_cache, next_logits
from pipeline.models.captioner import PrefixCaptioner


def generate(captioner: PrefixCaptioner, prefix: torch.Tensor, settings: GenerationSettings,
             sample_seeds: Sequence[int] | None = None) -> list[list[list[int]]]:
    """Batched beam search. A finished beam stays in its image's beam set with its score frozen
    (its only continuation is a no-op of log-probability 0), so finished and live beams compete
    on the length-normalized score."""
    batch, k = prefix.shape[0], settings.beam_width
    stop_ids = captioner.stop_token_ids()
    device = prefix.device
    cache = new_cache(prefix, settings.max_new_tokens)
    logprobs = next_logits(captioner, prefix, cache).float().log_softmax(dim=-1)
    cache.batch_repeat_interleave(k)
    vocab = logprobs.shape[-1]
    logprobs = logprobs.repeat_interleave(k, dim=0)
    stops = torch.tensor(stop_ids, device=device)
    scores = torch.zeros(batch, k, device=device)
    scores[:, 1:] = float("-inf")  # all beams start identical: expand only the first
    lengths = torch.zeros(batch * k, device=device)
    finished = torch.zeros(batch * k, dtype=torch.bool, device=device)
    tokens = torch.empty(batch * k, 0, dtype=torch.long, device=device)
    for step in range(settings.max_new_tokens):
        logprobs[finished] = float("-inf")
        logprobs[finished, 0] = 0.0  # the frozen continuation; its token is never emitted
        new_lengths = lengths + (~finished).float()
        total = scores.view(-1, 1) + logprobs
        normalized = total / new_lengths.clamp(min=1).pow(settings.length_penalty).view(-1, 1)
        flat = normalized.view(batch, k * vocab).topk(k, dim=-1).indices
        source = (flat // vocab + torch.arange(batch, device=device).view(-1, 1) * k).view(-1)
        next_tokens = (flat % vocab).view(-1)
        scores = total.view(-1)[source * vocab + next_tokens].view(batch, k)
        was_finished = finished[source]
        lengths = new_lengths[source]
        finished = was_finished | torch.isin(next_tokens, stops)
        tokens = torch.cat((tokens[source], torch.where(was_finished, -1, next_tokens)[:, None]), dim=1)
        if finished.all() or step == settings.max_new_tokens - 1:
            break
        cache.reorder_cache(source)
        logprobs = next_logits(captioner, captioner.embed_tokens(next_tokens[:, None]), cache).float().log_softmax(
            dim=-1)
    order = (scores / lengths.clamp(min=1).view(batch, k).pow(settings.length_penalty)).argsort(dim=-1,
                                                                                             descending=True)
    eos = captioner.tokenizer.eos_token_id
    best, token_rows = order[:, : settings.num_candidates].tolist(), tokens.tolist()  # two copies to the host
    results = []
    for image in range(batch):
        beams = []
        for beam in best[image]:
            ids = [t for t in token_rows[image * k + beam] if t >= 0]
            beams.append(ids[:-1] if ids and ids[-1] == eos else ids)
        results.append(beams)
    return results
