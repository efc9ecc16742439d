"""Batched KV-cache decoding against the original ClipCap loop, on random-init models."""

from __future__ import annotations

import itertools
import unicodedata

import pytest
import torch
from conftest import tiny_captioner

from pipeline.config import GenerationSettings
from pipeline.generation.generate import decode_texts, generate
from pipeline.generation.reference import reference_clipcap_generate
from pipeline.generation.sampling import seeds_for


def _prefixes(captioner, n: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(n, captioner.config.prefix_dim, generator=generator, dtype=dtype) * 3
    return captioner.prefix(embeddings)


def _captioner_with_mixed_lengths(tokenizer, max_new_tokens: int):
    """Random models rarely emit '.', so pick as stop token a token the reference loop emits at
    different positions for different images: then greedy runs end at mixed lengths."""
    captioner = tiny_captioner(tokenizer, stop_token="", raw_prefix=True).double()  # the prefixes as drawn
    prefix = _prefixes(captioner, 12)
    runs = [reference_clipcap_generate(captioner, prefix[i:i + 1], max_new_tokens) for i in range(12)]
    for token in sorted({t for run in runs for t in run}):
        text = tokenizer.decode([token])
        if tokenizer.encode(text, add_special_tokens=False)[:1] != [token]:
            continue
        first_positions = {run.index(token) if token in run else None for run in runs}
        if len(first_positions) >= 3 and None in first_positions:
            captioner.config.stop_token = text
            return captioner, prefix
    pytest.fail("no token gives mixed lengths; change the seed")


def test_batched_greedy_equals_reference_loop_with_mixed_lengths(tokenizer):
    max_new = 10
    captioner, prefix = _captioner_with_mixed_lengths(tokenizer, max_new)
    expected = [reference_clipcap_generate(captioner, prefix[i:i + 1], max_new) for i in range(len(prefix))]
    got = generate(captioner, prefix, GenerationSettings(max_new_tokens=max_new))
    assert [candidates[0] for candidates in got] == expected
    lengths = {len(tokens) for tokens in expected}
    assert len(lengths) >= 3 and min(lengths) < max_new  # really mixed, some stopped early
    stop_id = tokenizer.encode(captioner.config.stop_token, add_special_tokens=False)[0]
    assert any(tokens[-1] == stop_id for tokens in expected if len(tokens) < max_new)  # '.'-style stop kept


@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_decoding_runs_one_forward_pass_per_token_it_keeps(tokenizer, method):
    """The prefix pass picks the first token and each later pass one more: max_new_tokens passes in all,
    none whose logits go unread after the last token."""
    captioner = tiny_captioner(tokenizer).double()
    captioner.stop_token_ids = list  # no stop id at all: every row runs the full length
    passes = []
    hook = captioner.lm.register_forward_hook(lambda *_: passes.append(1))
    got = generate(captioner, _prefixes(captioner, 3), GenerationSettings(method=method, max_new_tokens=6))
    hook.remove()
    assert [len(candidates[0]) for candidates in got] == [6, 6, 6]
    assert len(passes) == 6


def test_beam_width_one_equals_greedy(tokenizer):
    captioner, prefix = _captioner_with_mixed_lengths(tokenizer, 10)
    greedy = generate(captioner, prefix, GenerationSettings(max_new_tokens=10))
    beam = generate(captioner, prefix, GenerationSettings(method="beam", beam_width=1, max_new_tokens=10))
    assert beam == greedy


def _sequence_logprob(captioner, prefix: torch.Tensor, tokens: list[int]) -> float:
    embeds = torch.cat((prefix, captioner.embed_tokens(torch.tensor([tokens]))), dim=1)
    logprobs = captioner.lm(inputs_embeds=embeds).logits.log_softmax(-1)[0]
    start = prefix.shape[1] - 1
    return float(sum(logprobs[start + i, t] for i, t in enumerate(tokens)))


@torch.inference_mode()
def test_beam_search_with_full_width_is_exact_over_two_tokens(tokenizer):
    """With beam width >= vocabulary size and two steps, beam search is exhaustive: its best
    candidate must be the most probable sequence (length penalty 0 = plain sum of log-probs)."""
    captioner = tiny_captioner(tokenizer, stop_token="", raw_prefix=True).double()  # the prefixes as drawn
    prefix = _prefixes(captioner, 2, seed=3)
    vocab = captioner.lm.config.vocab_size
    settings = GenerationSettings(method="beam", beam_width=vocab, num_candidates=3, max_new_tokens=2,
                                  length_penalty=0.0)
    results = generate(captioner, prefix, settings)
    eos = tokenizer.eos_token_id
    for image, candidates in enumerate(results):
        p = prefix[image:image + 1]
        first = captioner.lm(inputs_embeds=p).logits[0, -1].log_softmax(-1)
        best_score, best = float(first[eos]), []
        top_first = first.topk(20).indices.tolist()
        for a in top_first:
            if a == eos:
                continue
            embeds = torch.cat((p, captioner.embed_tokens(torch.tensor([[a]]))), dim=1)
            second = captioner.lm(inputs_embeds=embeds).logits[0, -1].log_softmax(-1)
            b = int(second.argmax())
            score = float(first[a] + second[b])
            if score > best_score:
                best_score, best = score, [a] if b == eos else [a, b]
        assert candidates[0] == best
        assert len(candidates) == 3 and len({tuple(c) for c in candidates}) == 3
        scores = [_sequence_logprob(captioner, p, c + ([eos] if len(c) < 2 else [])) for c in candidates]
        assert scores == sorted(scores, reverse=True)


def test_sampling_is_seeded_and_top_k_one_is_greedy(tokenizer):
    captioner = tiny_captioner(tokenizer).double()
    prefix = _prefixes(captioner, 4)
    settings = GenerationSettings(method="sample", num_candidates=3, max_new_tokens=8, temperature=1.5, seed=7)
    first, again = generate(captioner, prefix, settings), generate(captioner, prefix, settings)
    assert first == again and all(len(c) == 3 for c in first)
    other_seed = generate(captioner, prefix, GenerationSettings(**{**settings.to_json(), "seed": 8}))
    assert other_seed != first
    greedy = generate(captioner, prefix, GenerationSettings(max_new_tokens=8))
    top1 = generate(captioner, prefix, GenerationSettings(method="sample", num_candidates=2, top_k=1,
                                                          max_new_tokens=8))
    assert all(candidates == [g[0], g[0]] for candidates, g in zip(top1, greedy, strict=True))


def test_a_sampled_image_draws_the_same_in_any_batch(tokenizer):
    # the draws follow the sample (its seed), not its place in a batch: a resumed run or another
    # batching repeats a seeded run's captions
    captioner = tiny_captioner(tokenizer).double()
    prefix = _prefixes(captioner, 5)
    settings = GenerationSettings(method="sample", num_candidates=2, max_new_tokens=8, temperature=2.0, seed=3)
    seeds = seeds_for(settings.seed, ["a", "b", "c", "d", "e"])
    together = generate(captioner, prefix, settings, seeds)
    alone = [generate(captioner, prefix[i:i + 1], settings, seeds[i:i + 1])[0] for i in range(5)]
    order = [3, 0, 4, 2, 1]
    shuffled = generate(captioner, prefix[order], settings, [seeds[i] for i in order])
    assert together == alone and [together[i] for i in order] == shuffled
    assert len({tuple(map(tuple, c)) for c in together}) > 1  # the streams differ between samples
    assert seeds_for(4, ["a"]) != seeds_for(3, ["a"])
    with pytest.raises(ValueError, match="2 sample seeds for 5 images"):
        generate(captioner, prefix, settings, seeds[:2])


def test_sampling_draws_each_token_at_its_probability():
    from pipeline.generation.sampling import _sampler, _streams, _uniforms

    probs = torch.tensor([0.5, 0.3, 0.0, 0.15, 0.05, 0.0])  # zero-mass tokens must never come up
    rows = 20_000
    uniforms = _uniforms(_streams(seeds_for(0, [str(i) for i in range(rows)]), 1), steps=2)
    choose = _sampler(GenerationSettings(method="sample", seed=0), torch.from_numpy(uniforms))
    picks = choose(probs.log().expand(rows, -1), torch.arange(rows), step=0)
    frequencies = torch.bincount(picks, minlength=len(probs)) / rows
    assert (frequencies - probs).abs().max() < 0.015, frequencies  # 4.5 sigma for p = 0.5
    later = choose(probs.log().expand(rows, -1), torch.arange(rows), step=1)
    assert 0.3 < (later != picks).float().mean() < 0.9  # each step draws anew


def test_top_p_keeps_only_the_nucleus(tokenizer):
    captioner = tiny_captioner(tokenizer).double()
    prefix = _prefixes(captioner, 1)
    with torch.inference_mode():
        probs = captioner.lm(inputs_embeds=prefix).logits[0, -1].softmax(-1)
    ordered = probs.sort(descending=True)
    nucleus = set(ordered.indices[: int((ordered.values.cumsum(0) < 0.5).sum()) + 1].tolist())
    settings = GenerationSettings(method="sample", num_candidates=64, max_new_tokens=1, top_p=0.5, seed=1)
    firsts = {candidate[0] for candidate in generate(captioner, prefix, settings)[0] if candidate}
    assert firsts <= nucleus and len(nucleus) < len(probs)


def test_decode_texts_are_clean_nfc_without_special_tokens(tokenizer):
    captioner = tiny_captioner(tokenizer)
    decomposed = unicodedata.normalize("NFD", "  Işık   ağacın  altında .")
    ids = [*tokenizer.encode(decomposed, add_special_tokens=False), tokenizer.eos_token_id]
    text = decode_texts(captioner, [ids])[0]
    assert text == "Işık ağacın altında."
    assert unicodedata.is_normalized("NFC", text)


def test_decode_texts_drop_bytes_that_are_no_text(tokenizer):
    # a byte-level BPE can emit half of a two-byte letter anywhere when sampling (U+FFFD once decoded)
    # and control characters; neither is caption text
    captioner = tiny_captioner(tokenizer)
    half_s = tokenizer.convert_tokens_to_ids(["Å"])  # the byte-level symbol of 0xC5, ş's first byte
    bell = tokenizer.convert_tokens_to_ids(tokenizer.tokenize("\x07"))
    assert tokenizer.decode(half_s) == "\ufffd" and len(bell) == 1
    ids = [*tokenizer.encode("bir", add_special_tokens=False), *half_s, *bell,
           *tokenizer.encode(" kedi", add_special_tokens=False), *half_s]
    assert decode_texts(captioner, [ids]) == ["bir kedi"]


@pytest.mark.parametrize(("method", "extra"), [("greedy", {}), ("beam", {"beam_width": 3}),
                                                ("sample", {"num_candidates": 2})])
def test_bf16_runs_every_method(tokenizer, method, extra):
    captioner = tiny_captioner(tokenizer).to(torch.bfloat16)
    prefix = _prefixes(captioner, 3, dtype=torch.bfloat16)
    result = generate(captioner, prefix, GenerationSettings(method=method, max_new_tokens=5, **extra))
    assert len(result) == 3
    assert all(len(tokens) <= 5 for tokens in itertools.chain.from_iterable(result))


def test_only_the_settings_a_method_uses_define_its_output():
    greedy = GenerationSettings(max_new_tokens=7)
    assert GenerationSettings(max_new_tokens=7, seed=3, temperature=2.0, beam_width=9).output_defining() == \
        greedy.output_defining() == {"method": "greedy", "max_new_tokens": 7}
    sample = GenerationSettings(method="sample", seed=3)
    assert sample.output_defining() != GenerationSettings(method="sample", seed=4).output_defining()
    assert sample.output_defining() == GenerationSettings(method="sample", seed=3, beam_width=9).output_defining()
    assert GenerationSettings(method="beam", beam_width=3).output_defining() != \
        GenerationSettings(method="beam", beam_width=4).output_defining()


def test_invalid_settings_are_refused():
    for bad in ({"method": "nucleus"}, {"max_new_tokens": 0}, {"method": "beam", "beam_width": 2,
                                                                "num_candidates": 3}, {"top_p": 0},
                {"temperature": float("nan")}, {"temperature": float("inf")}, {"top_p": float("nan")},
                {"num_candidates": 4},  # greedy gives one caption: four asked for is a mistake, not one candidate
                {"method": "sample", "seed": 2**64}, {"method": "sample", "seed": -(2**63) - 1}):
        with pytest.raises(ValueError):
            GenerationSettings(**bad)
    GenerationSettings(method="sample", seed=2**63 - 1)
    GenerationSettings(method="sample", seed=-(2**63))


def test_a_new_decoding_method_is_one_module_and_one_registry_line(tokenizer, tmp_path, monkeypatch):
    """generate() and the settings know the methods only through the registry: a module with a generate()
    and one entry make a method the settings accept and generate() runs, with the settings it names defining
    its output."""
    from pipeline.generation import methods

    (tmp_path / "first_token.py").write_text(
        "import torch\n\n"
        "def generate(captioner, prefix, settings, sample_seeds=None):\n"
        "    logits = captioner.lm(inputs_embeds=prefix).logits[:, -1]\n"
        "    return [[[int(t)]] * settings.num_candidates for t in logits.argmax(-1)]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(methods.METHODS, "first_token", methods.Method("first_token", ("num_candidates",)))
    settings = GenerationSettings(method="first_token", num_candidates=2, max_new_tokens=1)
    captioner = tiny_captioner(tokenizer)
    prefix = captioner.prefix(torch.randn(3, 24))
    got = generate(captioner, prefix, settings)
    greedy = generate(captioner, prefix, GenerationSettings(max_new_tokens=1))
    assert all(row[0] for row in greedy)  # no row stopped at once: each has its first token
    assert got == [[row[0]] * 2 for row in greedy]
    assert settings.output_defining() == {"method": "first_token", "max_new_tokens": 1, "num_candidates": 2}
