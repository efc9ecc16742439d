"""Caption generation from prefix embeddings: batched greedy, beam search and sampling with a KV cache,
plus the original ClipCap loop (one image, whole sequence recomputed each step) as the baseline.

All methods stop a row at any of `stop_ids` (the LM's eos, and ClipCap's '.'), keep the stop token
when it is text ('.') and drop it when it is the eos, and return token id lists; `decode_texts` turns
them into clean Turkish text.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from transformers.cache_utils import Cache, DynamicLayer

from pipeline.config import GenerationSettings
from pipeline.models.captioner import PrefixCaptioner
from pipeline.text import clean_caption


@torch.inference_mode()
def generate(captioner: PrefixCaptioner, prefix: torch.Tensor, settings: GenerationSettings,
             sample_seeds: Sequence[int] | None = None) -> list[list[list[int]]]:
    """(B, L, E) prefixes -> for each image, its candidates' token ids (best first for beam).

    Sampling draws from one random stream per image and candidate, seeded by `sample_seeds` (one per
    image, see `seeds_for`; default: the settings' seed and the image's place in the batch), so an
    image gets the same draws in any batch it is captioned in."""
    stop_ids = captioner.stop_token_ids()
    if settings.method == "beam":
        return _beam_search(captioner, prefix, settings, stop_ids)
    batch = prefix.shape[0]
    n = settings.num_candidates if settings.method == "sample" else 1
    if settings.method == "greedy":
        choose = _greedy_choice
    else:
        seeds = seeds_for(settings.seed, [str(i) for i in range(batch)]) if sample_seeds is None else sample_seeds
        if len(seeds) != batch:
            raise ValueError(f"{len(seeds)} sample seeds for {batch} images")
        uniforms = _uniforms(_streams(seeds, n), settings.max_new_tokens)
        choose = _sampler(settings, torch.from_numpy(uniforms).to(prefix.device))  # one copy, not one a step
    rows = _decode_rows(captioner, prefix.repeat_interleave(n, dim=0), settings.max_new_tokens, stop_ids, choose)
    return [rows[i * n:(i + 1) * n] for i in range(batch)]


def seeds_for(seed: int, keys: Sequence[str]) -> list[int]:
    """One 64-bit sampling seed per sample, from the run's seed and the sample's key."""
    return [int.from_bytes(hashlib.blake2b(f"{seed}\0{key}".encode("utf-8", "surrogatepass"),
                                           digest_size=8).digest(), "little") for key in keys]


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(state: np.ndarray) -> np.ndarray:
    """SplitMix64's output function: a counter-based generator, so draw number t of a stream is
    computed directly (no generator object per stream, no state carried between steps)."""
    with np.errstate(over="ignore"):
        state = (state ^ (state >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        state = (state ^ (state >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return state ^ (state >> np.uint64(31))


def _streams(seeds: Sequence[int], candidates: int) -> np.ndarray:
    """(B * candidates,) stream keys, image-major as the rows `generate` decodes."""
    with np.errstate(over="ignore"):
        per_image = np.asarray(seeds, dtype=np.uint64)[:, None]
        return _splitmix64(per_image + _GOLDEN * np.arange(1, candidates + 1, dtype=np.uint64)).reshape(-1)


def _uniforms(streams: np.ndarray, steps: int) -> np.ndarray:
    """(streams, steps) draws, row r's draw t uniform in [0, 1) on a 2^-24 grid (exact in float32)."""
    with np.errstate(over="ignore"):
        counters = streams[:, None] + _GOLDEN * np.arange(1, steps + 1, dtype=np.uint64)
        bits = _splitmix64(counters) >> np.uint64(40)
    return bits.astype(np.float32) * np.float32(2.0**-24)


def decode_texts(captioner: PrefixCaptioner, token_lists: list[list[int]]) -> list[str]:
    texts = captioner.tokenizer.batch_decode(token_lists, skip_special_tokens=True,
                                             clean_up_tokenization_spaces=False)
    return [clean_caption(_NOT_TEXT.sub("", text)) for text in texts]


# Bytes of a byte-level BPE that form no UTF-8 letter decode as U+FFFD: a two-byte letter (ş, ğ) cut at
# max_new_tokens, or any byte sampled at a high temperature; control characters are no caption text either.
_NOT_TEXT = re.compile("[\ufffd\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


class _InPlaceLayer(DynamicLayer):
    """A KV-cache layer that writes each new position into buffers sized for the whole caption. The
    stock DynamicLayer concatenates, copying the whole cache at every step (9% of a batch-64 greedy
    decode, 19% at batch 256, here); rows leaving the batch and beam reordering still copy once."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.key_buffer = key_states.new_empty((*key_states.shape[:2], self.capacity, key_states.shape[3]))
        self.value_buffer = value_states.new_empty((*value_states.shape[:2], self.capacity, value_states.shape[3]))
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any,
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        self.key_buffer[:, :, self.length:end] = key_states
        self.value_buffer[:, :, self.length:end] = value_states
        self.length = end
        return self._views()

    def _views(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys = self.key_buffer[:, :, :self.length]
        self.values = self.value_buffer[:, :, :self.length]
        return self.keys, self.values

    def _rows(self, rows: torch.Tensor) -> None:
        if self.is_initialized:
            self.key_buffer, self.value_buffer = self.key_buffer[rows], self.value_buffer[rows]
            self._views()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._rows(indices)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._rows(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._rows(torch.arange(self.key_buffer.shape[0], device=self.device).repeat_interleave(repeats))


def _new_cache(prefix: torch.Tensor, max_new_tokens: int) -> Cache:
    return Cache(layer_class_to_replicate=lambda: _InPlaceLayer(prefix.shape[1] + max_new_tokens))


def _step(captioner: PrefixCaptioner, embeds: torch.Tensor, cache: Cache) -> torch.Tensor:
    """One forward pass over new positions; returns the last position's logits in the model's dtype."""
    return captioner.lm(inputs_embeds=embeds, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]


def _greedy_choice(logits: torch.Tensor, rows: torch.Tensor, step: int) -> torch.Tensor:
    # In the model's own dtype: float32 copies of bf16 logits hold the same values, and making them took
    # 12 ms a step at batch 256 here. max's indices are argmax's (the first maximum on ties), ~4x faster.
    return logits.max(dim=-1).indices


def _sampler(settings: GenerationSettings, uniforms: torch.Tensor):
    """`uniforms`: (rows, steps) draws on the logits' device (see `_uniforms`); `rows` are the live rows'
    indices into them, on that device too, so that choosing needs nothing from the host."""
    def choose(logits: torch.Tensor, rows: torch.Tensor, step: int) -> torch.Tensor:
        logits = logits.float() / settings.temperature
        if settings.top_k:
            kth = logits.topk(min(settings.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if settings.top_p < 1:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
            # drop a token once the mass before it already reaches top_p (the first token always stays)
            drop_sorted = cumulative - sorted_logits.softmax(dim=-1) >= settings.top_p
            logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
        # inverse-CDF sampling: each row's own uniform picks the first token whose cumulative mass exceeds it
        cdf = logits.softmax(dim=-1).cumsum(dim=-1)
        picks = torch.searchsorted(cdf, (uniforms[rows, step] * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
        # rounding may put the threshold at the total: the last token of positive mass, never a masked one
        return torch.minimum(picks, cdf.argmax(dim=-1))

    return choose


def _decode_rows(captioner: PrefixCaptioner, prefix: torch.Tensor, max_new_tokens: int,
                 stop_ids: list[int], choose) -> list[list[int]]:
    """Greedy/sampling loop. Finished rows leave the batch (and the KV cache), so a batch of mixed
    caption lengths costs what its live rows cost. The host waits for the device once a step, for the
    step's tokens and their rows (and sends it the rows to keep when some finished)."""
    cache = _new_cache(prefix, max_new_tokens)
    logits = _step(captioner, prefix, cache)
    stops = set(stop_ids)
    eos = captioner.tokenizer.eos_token_id
    outputs: list[list[int]] = [[] for _ in range(prefix.shape[0])]
    live_rows = torch.arange(prefix.shape[0], device=prefix.device)
    for step in range(max_new_tokens):
        tokens = choose(logits, live_rows, step)
        picked, live = torch.stack((tokens, live_rows)).tolist()
        finished = [token in stops for token in picked]
        for row, token, done in zip(live, picked, finished, strict=True):
            if not (done and token == eos):
                outputs[row].append(token)
        if all(finished) or step == max_new_tokens - 1:  # no forward pass whose logits nobody reads
            break
        if any(finished):
            keep = torch.tensor([i for i, done in enumerate(finished) if not done], device=tokens.device)
            cache.batch_select_indices(keep)
            tokens, live_rows = tokens[keep], live_rows[keep]
        logits = _step(captioner, captioner.embed_tokens(tokens[:, None]), cache)
    return outputs


def _beam_search(captioner: PrefixCaptioner, prefix: torch.Tensor, settings: GenerationSettings,
                 stop_ids: list[int]) -> list[list[list[int]]]:
    """Batched beam search. A finished beam stays in its image's beam set with its score frozen
    (its only continuation is a no-op of log-probability 0), so finished and live beams compete
    on the length-normalized score."""
    batch, k = prefix.shape[0], settings.beam_width
    device = prefix.device
    cache = _new_cache(prefix, settings.max_new_tokens)
    logprobs = _step(captioner, prefix, cache).float().log_softmax(dim=-1)
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
        logprobs = _step(captioner, captioner.embed_tokens(next_tokens[:, None]), cache).float().log_softmax(
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


@torch.inference_mode()
def reference_clipcap_generate(captioner: PrefixCaptioner, prefix: torch.Tensor, max_new_tokens: int) -> list[int]:
    """The original ClipCap greedy loop for ONE image: no KV cache, the whole sequence is fed again
    at every step, stop at the stop token. The baseline that tests and benchmarks compare against."""
    stop_ids = captioner.stop_token_ids()
    eos = captioner.tokenizer.eos_token_id
    generated = prefix[:1]
    tokens: list[int] = []
    for _ in range(max_new_tokens):
        logits = captioner.lm(inputs_embeds=generated).logits[:, -1, :]
        token = int(logits.argmax(-1).item())
        if token in stop_ids and token == eos:
            break
        tokens.append(token)
        if token in stop_ids:
            break
        next_embed = captioner.embed_tokens(torch.tensor([[token]], device=prefix.device))
        generated = torch.cat((generated, next_embed), dim=1)
    return tokens
