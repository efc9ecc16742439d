"""Speed benchmarks on real-size architectures with random weights (speed does not depend on them).

  python jobs/benchmark.py decoding [--batch-size 64] [--json out.json]

Each run measures every figure it reports itself, so ratios compare numbers taken on one machine
in one run. Model: ClipCap MLP mapper 512 -> 3840 -> 7680 + GPT-2 small (124M, 50,257-token vocab).
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import _bootstrap  # noqa: F401
import click
import torch
from tokenizers import Tokenizer, models
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from pipeline.decoding import DecodeSettings, generate, reference_clipcap_generate
from pipeline.models.captioner import CaptionerConfig, PrefixCaptioner

GPT2_VOCAB = 50257
EOS = "<|endoftext|>"


def gpt2_small_captioner(seed: int = 0) -> PrefixCaptioner:
    """GPT-2 small's exact shapes with a stand-in word-level vocabulary of GPT-2's size: decoding cost
    depends on the vocabulary size, not on which strings the ids stand for."""
    vocab = {f"t{i}": i for i in range(GPT2_VOCAB - 1)} | {EOS: GPT2_VOCAB - 1}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token=EOS)),
                                        eos_token=EOS, pad_token=EOS)
    torch.manual_seed(seed)
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=GPT2_VOCAB, eos_token_id=GPT2_VOCAB - 1)).eval()
    # no '.' stop: every caption runs the full max_new_tokens, the same work for both loops
    return PrefixCaptioner(CaptionerConfig(stop_token=""), lm, tokenizer).eval()


def _rate(count: int, fn) -> float:
    start = time.perf_counter()
    fn()
    return count / (time.perf_counter() - start)


@torch.inference_mode()
def bench_decoding(batch_size: int, max_new_tokens: int, reference_images: int) -> dict:
    captioner = gpt2_small_captioner()
    embeddings = torch.nn.functional.normalize(torch.randn(batch_size, 512), dim=-1)
    settings = DecodeSettings(max_new_tokens=max_new_tokens)
    figures: dict[str, float] = {}
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        captioner.to(dtype)
        prefix = captioner.prefix(embeddings)
        generate(captioner, prefix[:4], settings)  # warm-up
        figures[f"reference_{name}"] = _rate(reference_images, lambda p=prefix: [
            reference_clipcap_generate(captioner, p[i:i + 1], max_new_tokens) for i in range(reference_images)])
        figures[f"batched_{name}"] = _rate(batch_size, lambda p=prefix: generate(captioner, p, settings))
    reference = figures["reference_float32"]  # the original ClipCap loop runs in fp32
    best = max(figures["batched_float32"], figures["batched_bfloat16"])
    return {
        "captions_per_s": figures,
        "speedup_vs_reference_fp32": best / reference,
        "speedup_same_dtype": {d: figures[f"batched_{d}"] / figures[f"reference_{d}"]
                               for d in ("float32", "bfloat16")},
        "batch_size": batch_size,
        "max_new_tokens": max_new_tokens,
    }


@click.group()
def main() -> None:
    """Benchmarks; each prints a table and can write JSON."""


@main.command()
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--max-new-tokens", default=20, show_default=True, type=click.IntRange(min=1))
@click.option("--reference-images", default=3, show_default=True, type=click.IntRange(min=1))
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None)
def decoding(batch_size: int, max_new_tokens: int, reference_images: int, json_path: Path | None) -> None:
    """Batched KV-cache greedy decoding vs the original ClipCap loop, GPT-2 small, fp32 and bf16."""
    result = bench_decoding(batch_size, max_new_tokens, reference_images)
    result["machine"] = {"cpu_threads": torch.get_num_threads(), "processor": platform.processor(),
                         "torch": torch.__version__}
    click.echo(f"{'loop':<28}{'captions/s':>12}")
    for name, value in result["captions_per_s"].items():
        click.echo(f"{name:<28}{value:>12.2f}")
    click.echo(f"batched (best dtype) / reference fp32: {result['speedup_vs_reference_fp32']:.1f}x")
    if json_path:
        json_path.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
