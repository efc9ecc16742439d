"""Measure a model bundle on a held-out split: COCO caption metrics on Turkish tokens, object accuracy where an
`ObjectChecker` reads the objects a sample shows (the demo world's does), and how well the CLIP-score filter
tells a right caption from a wrong one.

Everything runs in-process (no Ray) with the same `caption_batch` the pipeline's model stage calls, so the
captions and clip_scores measured here are the ones a run would write.
"""

from __future__ import annotations

import random
import re
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge
from tqdm import tqdm
from transformers import AutoModelForCausalLM

from pipeline.config import GenerationSettings
from pipeline.generation.captioning import caption_batch
from pipeline.io.images import ImageError, decode_image
from pipeline.io.sources import record_metadata, reference_captions
from pipeline.models.bundle import Bundle
from pipeline.models.captioner import PrefixCaptioner
from pipeline.text import tr_lower

# A word keeps its inner apostrophes and hyphens ("ankara'da", "açık-mavi"). Punctuation is dropped, as the COCO
# toolkit's PTB tokenizer drops it, so a caption's final "." is no free match for every hypothesis.
_WORD = re.compile(r"\w+(?:['’-]\w+)*")
PERCENTILES = (5, 25, 50, 75, 95)
RECALL_TARGET = 0.90  # the filter is useful when it picks an image's own caption this often
_SIMILARITY_ROWS = 1024  # image rows per similarity block: memory stays bounded on large splits


class EvaluationError(ValueError):
    """Nothing to evaluate (no decodable sample); the message is one line for the user."""


class ObjectChecker(Protocol):
    """What evaluation needs to know of a world whose samples list the objects they show."""

    def objects(self, meta: dict[str, Any]) -> Any | None:
        """The objects a sample's KEY.json describes, or None when it describes none this checker reads."""

    def single_object(self, objects: Any) -> bool:
        """Whether they are one object (reported apart: the easy case)."""

    def check(self, caption: str, objects: Any) -> dict[str, Any]:
        """Verdict of a caption: `objects_correct`, `counts_correct`, `counts_by_kind_correct`, `correct`."""

    def swap(self, caption: str, rng: random.Random) -> str:
        """The caption with one attribute (colour, shape) changed; ValueError when it names none."""


def tokenize_tr(text: str) -> str:
    """Turkish-lowercased words joined by single spaces, punctuation removed: the form pycocoevalcap's scorers take."""
    return " ".join(_WORD.findall(tr_lower(text)))


def caption_metrics(hypotheses: dict[str, str], references: dict[str, list[str]]) -> dict[str, float]:
    """BLEU-1..4, ROUGE-L and CIDEr-D (pycocoevalcap) of one hypothesis per id against its references.

    CIDEr weighs n-grams by their document frequency over the references of *all* ids, so it is a corpus
    figure: with a single id every n-gram is in every document and CIDEr is 0.
    """
    if not hypotheses or hypotheses.keys() != references.keys():
        raise ValueError("hypotheses and references need the same, non-empty set of ids")
    if any(not refs for refs in references.values()):
        raise ValueError("every id needs at least one reference")
    res = {key: [tokenize_tr(text)] for key, text in hypotheses.items()}
    gts = {key: [tokenize_tr(text) for text in refs] for key, refs in references.items()}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    return {**{f"BLEU-{n}": float(bleu[n - 1]) for n in range(1, 5)}, "ROUGE-L": float(rouge), "CIDEr": float(cider)}


def roc_auc(positive: Iterable[float], negative: Iterable[float]) -> float:
    """Probability that a random positive scores above a random negative, ties counting half (Mann-Whitney U)."""
    pos = np.asarray(list(positive), dtype=np.float64)
    neg = np.asarray(list(negative), dtype=np.float64)
    if not len(pos) or not len(neg):
        raise ValueError("roc_auc needs at least one positive and one negative score")
    values = np.concatenate([pos, neg])
    if not np.isfinite(values).all():
        raise ValueError("roc_auc got a non-finite score")
    _, group, counts = np.unique(values, return_inverse=True, return_counts=True)
    mid_ranks = np.cumsum(counts) - (counts - 1) / 2  # 1-based rank of each group of equal values, ties averaged
    positive_rank_sum = mid_ranks[group[:len(pos)]].sum()
    return float((positive_rank_sum - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def recall_at_1(image_emb: np.ndarray, text_emb: np.ndarray, targets: np.ndarray | None = None) -> float:
    """Share of images whose own text (text row i, or row `targets[i]`) scores strictly above every other text.

    Embeddings are L2-normalized rows, so the score is the cosine. A tie is a miss: a scorer that gives every
    text the same embedding must not look perfect.
    """
    image_emb = np.asarray(image_emb, dtype=np.float32)
    text_emb = np.asarray(text_emb, dtype=np.float32)
    targets = np.arange(len(image_emb)) if targets is None else np.asarray(targets)
    if not len(image_emb) or len(targets) != len(image_emb):
        raise ValueError("recall_at_1 needs one target text per image and at least one image")
    hits = 0
    for start in range(0, len(image_emb), _SIMILARITY_ROWS):
        scores = image_emb[start:start + _SIMILARITY_ROWS] @ text_emb.T
        rows = np.arange(len(scores))
        own = scores[rows, targets[start:start + len(scores)]].copy()
        scores[rows, targets[start:start + len(scores)]] = -np.inf
        hits += int((own > scores.max(axis=1)).sum())
    return hits / len(image_emb)


def score_stats(scores: Iterable[float]) -> dict[str, float]:
    """Mean, standard deviation and percentiles of a set of clip_scores."""
    values = np.asarray(list(scores), dtype=np.float64)
    if not len(values):
        raise ValueError("no scores")
    return {"count": len(values), "mean": float(values.mean()), "std": float(values.std()),
            **{f"p{p}": float(v) for p, v in zip(PERCENTILES, np.percentile(values, PERCENTILES), strict=True)}}


def untrained_bundle(bundle: Bundle, seed: int = 0) -> Bundle:
    """The same bundle with the mapper and the language model re-initialized randomly (same architecture,
    tokenizer, encoder and scorer): the floor a trained captioner's clip_scores must clear."""
    trained = bundle.captioner
    parameter = next(trained.parameters())
    with torch.random.fork_rng(devices=[]):  # a fixed seed without disturbing the caller's RNG stream
        torch.manual_seed(seed)
        captioner = PrefixCaptioner(trained.config, AutoModelForCausalLM.from_config(trained.lm.config),
                                    trained.tokenizer)
    captioner.to(device=parameter.device, dtype=parameter.dtype)
    return Bundle(encoder=bundle.encoder, captioner=captioner.eval(), scorer=bundle.scorer, manifest=bundle.manifest)


@dataclass
class _Item:
    """What evaluation keeps of one decoded sample (its pixels are dropped after its batch)."""

    key: str
    references: list[str]
    objects: Any | None  # what the checker read in its KEY.json, None without one


def evaluate(bundle: Bundle, samples: Iterable[dict], settings: GenerationSettings | None = None, batch_size: int = 64,
             seed: int = 0, baseline: bool = True, num_examples: int = 10, progress: bool = False,
             checker: ObjectChecker | None = None) -> dict[str, Any]:
    """Caption `samples` (records from `pipeline.io.sources.read_samples`) and measure every figure.

    References are KEY.json "captions" (canonical first), else the sample's own text; object accuracy and the
    scorer's attribute-swap test need a `checker` (`pipeline.demo.DemoObjects` for the demo corpus). Raises
    EvaluationError when no sample can be decoded.
    """
    settings = settings or GenerationSettings()
    start = time.perf_counter()
    untrained = untrained_bundle(bundle, seed) if baseline else None
    separate_scorer = not bundle.scorer.shares_image_tower(bundle.encoder)
    items: list[_Item] = []
    captions: list[str] = []
    clip_scores: list[float] = []
    untrained_scores: list[float] = []
    image_embeddings: list[np.ndarray] = []  # the scorer's, for recall and the swap test
    skipped: Counter[str] = Counter()
    captioning_s = 0.0
    with tqdm(unit="img", desc="evaluate", disable=None if progress else True) as bar:
        for batch, pixels, scorer_pixels in _decoded_batches(bundle, samples, batch_size, skipped, checker):
            tic = time.perf_counter()
            keys = [item.key for item in batch]  # seed sampling as the caption job does
            result = caption_batch(bundle, pixels, settings, scorer_pixels, keys)
            captioning_s += time.perf_counter() - tic
            items += batch
            captions += result.captions
            clip_scores += result.clip_scores.tolist()
            if separate_scorer:
                with torch.inference_mode():
                    scorer_input = pixels if scorer_pixels is None else scorer_pixels
                    image_embeddings.append(bundle.scorer.encode_images(scorer_input).cpu().numpy())
            else:
                image_embeddings.append(result.image_embeddings)
            if untrained is not None:
                untrained_scores += caption_batch(untrained, pixels, settings, scorer_pixels, keys).clip_scores.tolist()
            bar.update(len(batch))
    if not items:
        found = ", ".join(f"{count} {status}" for status, count in sorted(skipped.items())) or "none"
        raise EvaluationError(f"no decodable sample to evaluate (samples found: {found})")
    images = np.concatenate(image_embeddings)
    referenced = [i for i, item in enumerate(items) if item.references]
    verdicts = {i: checker.check(captions[i], item.objects) for i, item in enumerate(items)
                if checker is not None and item.objects is not None}
    return {
        "model": bundle.identity(),
        "decode": settings.to_json(),
        "seed": seed,
        "counts": {"evaluated": len(items), "skipped": dict(sorted(skipped.items())),
                   "with_references": len(referenced), "with_objects": len(verdicts)},
        "caption_metrics": caption_metrics({str(i): captions[i] for i in referenced},
                                           {str(i): items[i].references for i in referenced}) if referenced else None,
        "object_accuracy": _object_accuracy(items, verdicts, checker) if verdicts else None,
        "filter": _filter_figures(bundle, items, captions, images, clip_scores, untrained_scores, batch_size, seed,
                                  checker),
        "timings": {"captioning_s": captioning_s, "images_per_s": len(items) / captioning_s if captioning_s else None,
                    "total_s": time.perf_counter() - start},
        "examples": [{"key": items[i].key, "caption": captions[i], "clip_score": clip_scores[i],
                      "references": items[i].references,
                      "objects": {k: verdicts[i][k] for k in ("objects_correct", "counts_correct", "correct")}
                      if i in verdicts else None}
                     for i in range(min(num_examples, len(items)))],
    }


def _decoded_batches(bundle: Bundle, samples: Iterable[dict], batch_size: int, skipped: Counter[str],
                     checker: ObjectChecker | None) -> Iterator[tuple[list[_Item], torch.Tensor, torch.Tensor | None]]:
    """Batches of decodable samples as uint8 pixels (plus the scorer's when its input size differs);
    a sample that cannot be used is counted in `skipped` under its status."""
    encoder_spec = bundle.encoder.image_spec
    scorer_spec = bundle.scorer.image_spec if bundle.scorer.image_spec != encoder_spec else None
    batch: list[_Item] = []
    pixels: list[np.ndarray] = []
    scorer_pixels: list[np.ndarray] = []
    for record in samples:
        if record["status"] != "ok":
            skipped[record["status"]] += 1
            continue
        try:
            pixels.append(decode_image(record["image"], encoder_spec).pixels)
            if scorer_spec is not None:
                scorer_pixels.append(decode_image(record["image"], scorer_spec).pixels)
        except ImageError as exc:
            del pixels[len(batch):]  # the encoder's pixels may be in when only the scorer's decode failed
            skipped[exc.status] += 1
            continue
        batch.append(_item(record, checker))
        if len(batch) == batch_size:
            yield batch, _stack(pixels), _stack(scorer_pixels) if scorer_spec else None
            batch, pixels, scorer_pixels = [], [], []
    if batch:
        yield batch, _stack(pixels), _stack(scorer_pixels) if scorer_spec else None


def _stack(pixels: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(pixels))


def _item(record: dict, checker: ObjectChecker | None) -> _Item:
    meta = record_metadata(record)
    return _Item(record["key"], reference_captions(record, meta), checker.objects(meta) if checker else None)


def _object_accuracy(items: list[_Item], verdicts: dict[int, dict[str, Any]], checker: ObjectChecker,
                     ) -> dict[str, Any]:
    """Shares of images whose generated caption gets the objects right (the checker's verdicts)."""
    single = [i for i in verdicts if checker.single_object(items[i].objects)]

    def share(indices: list[int], key: str) -> float | None:
        return sum(verdicts[i][key] for i in indices) / len(indices) if indices else None

    everything = list(verdicts)
    return {"images": len(everything), "single_object_images": len(single),
            "objects_correct": share(everything, "objects_correct"),
            "objects_correct_single_object": share(single, "objects_correct"),
            "counts_correct": share(everything, "counts_correct"),
            "counts_by_kind_correct": share(everything, "counts_by_kind_correct"),
            "correct": share(everything, "correct")}


def _filter_figures(bundle: Bundle, items: list[_Item], captions: list[str], images: np.ndarray,
                    clip_scores: list[float], untrained_scores: list[float], batch_size: int, seed: int,
                    checker: ObjectChecker | None) -> dict[str, Any]:
    """Recall@1 and attribute-swap ROC-AUC of the scorer, for generated and canonical reference captions,
    and the clip_score distributions of the trained and the untrained captioner."""
    canonical = {i: item.references[0] for i, item in enumerate(items) if item.references}
    figures: dict[str, Any] = {"recall_at_1": {}, "swap_auc": {}, "swap_pairs": {}}
    for name, texts in (("generated", dict(enumerate(captions))), ("reference", canonical)):
        if not texts:
            figures["recall_at_1"][name] = figures["swap_auc"][name] = None
            figures["swap_pairs"][name] = 0
            continue
        rows = np.fromiter(texts, dtype=np.int64)
        # Identical texts (two scenes described alike) become one candidate, so "the top text is its own" is
        # well defined: the image is right when that shared text wins.
        unique = sorted(set(texts.values()))
        index = {text: n for n, text in enumerate(unique)}
        text_emb = _encode_texts(bundle, unique, batch_size)
        targets = np.array([index[texts[i]] for i in rows])
        figures["recall_at_1"][name] = recall_at_1(images[rows], text_emb, targets)
        positive, negative = _swap_scores(bundle, items, texts, images, text_emb[targets], batch_size, seed,
                                          checker) if checker is not None else ([], [])
        figures["swap_pairs"][name] = len(positive)
        figures["swap_auc"][name] = roc_auc(positive, negative) if positive else None
    figures["clip_score"] = {"trained": score_stats(clip_scores),
                             "untrained": score_stats(untrained_scores) if untrained_scores else None}
    figures["trained_vs_untrained_auc"] = roc_auc(clip_scores, untrained_scores) if untrained_scores else None
    return figures


def _swap_scores(bundle: Bundle, items: list[_Item], texts: dict[int, str], images: np.ndarray,
                 own_text_emb: np.ndarray, batch_size: int, seed: int, checker: ObjectChecker,
                 ) -> tuple[list[float], list[float]]:
    """clip_score of each image with its text and with that text after one colour or shape swap; texts naming
    no colour or shape (possible for generated captions) have no swapped twin and are left out."""
    rows, swapped = [], []
    for position, (i, text) in enumerate(texts.items()):
        try:
            # one RNG per key: the swap of a sample does not depend on which other samples were evaluated
            swapped.append(checker.swap(text, random.Random(f"swap/{seed}/{items[i].key}")))
        except ValueError:
            continue
        rows.append(position)
    if not rows:
        return [], []
    image_rows = images[np.fromiter(texts, dtype=np.int64)[rows]]
    positive = (image_rows * own_text_emb[rows]).sum(axis=1)
    negative = (image_rows * _encode_texts(bundle, swapped, batch_size)).sum(axis=1)
    return positive.tolist(), negative.tolist()


@torch.inference_mode()
def _encode_texts(bundle: Bundle, texts: list[str], batch_size: int) -> np.ndarray:
    return np.concatenate([bundle.scorer.encode_texts(texts[start:start + batch_size]).cpu().numpy()
                           for start in range(0, len(texts), batch_size)])


def format_table(report: dict[str, Any]) -> str:
    """The report as a plain-text table for the terminal."""
    def number(value: float | None, digits: int = 4) -> str:
        return "n/a" if value is None else f"{value:.{digits}f}"

    counts, figures = report["counts"], report["filter"]
    skipped = sum(counts["skipped"].values())
    rate = report["timings"]["images_per_s"]
    lines = [f"model {report['model']['name']} (sha256 {report['model']['sha256'][:12]}), "
             f"decode {report['decode']['method']}, {counts['evaluated']} images ({skipped} skipped), "
             f"{number(rate, 1)} images/s", ""]
    if report["caption_metrics"]:
        lines.append(f"caption metrics ({counts['with_references']} images)")
        lines += [f"  {name:<36}{number(value)}" for name, value in report["caption_metrics"].items()]
    objects = report["object_accuracy"]
    if objects:
        lines.append(f"object accuracy ({objects['images']} images)")
        lines += [f"  {'colour+shape of every object':<36}{number(objects['objects_correct'])}",
                  f"  {'  single-object scenes':<36}{number(objects['objects_correct_single_object'])}"
                  f"  ({objects['single_object_images']} images)",
                  f"  {'counts':<36}{number(objects['counts_correct'])}",
                  f"  {'  added up per colour+shape':<36}{number(objects['counts_by_kind_correct'])}",
                  f"  {'everything (objects and counts)':<36}{number(objects['correct'])}"]
    lines.append("clip-score filter")
    for name in ("generated", "reference"):
        lines.append(f"  {f'recall@1, {name} captions':<36}{number(figures['recall_at_1'][name])}"
                     f"  (target >= {RECALL_TARGET:.2f})")
    for name in ("generated", "reference"):
        lines.append(f"  {f'swap ROC-AUC, {name} captions':<36}{number(figures['swap_auc'][name])}"
                     f"  ({figures['swap_pairs'][name]} pairs)")
    columns = ("mean", "std", *(f"p{p}" for p in PERCENTILES))
    lines.append(f"  {'clip_score':<22}" + "".join(f"{c:>8}" for c in columns))
    for name, stats in figures["clip_score"].items():
        if stats:
            lines.append(f"  {f'  {name} captioner':<22}" + "".join(f"{stats[c]:>8.4f}" for c in columns))
    lines.append(f"  {'ROC-AUC trained vs untrained':<36}{number(figures['trained_vs_untrained_auc'])}")
    lines.append("examples")
    for example in report["examples"]:
        verdict = example["objects"]
        mark = "" if verdict is None else ("  [objects ok]" if verdict["objects_correct"] else "  [objects wrong]")
        lines.append(f"  {example['key']}: {example['caption']!r}{mark}")
        if example["references"]:
            lines.append(f"  {'':{len(example['key'])}}  ref {example['references'][0]!r}")
    return "\n".join(lines)
