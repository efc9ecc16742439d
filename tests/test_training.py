"""The training job on a tiny demo corpus: both stages, the bundle it writes, resume after a stop, and
stage 2 straight from this project's own output (stored embeddings, no images)."""

from __future__ import annotations

import itertools
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import jpeg_bytes, tiny_captioner
from tqdm import tqdm

from pipeline.config import GenerationSettings
from pipeline.demo.corpus import write_corpus
from pipeline.generation.captioning import caption_batch
from pipeline.generation.generate import decode_texts, generate
from pipeline.io.images import ImageSpec
from pipeline.io.sources import InputError
from pipeline.models.bundle import load_bundle
from pipeline.models.clip_factory import ClipSpec, create_clip
from pipeline.models.errors import ModelLoadError
from pipeline.training.caption_stage import CaptionLoss, _caption_loss_parts, _token_ids, length_grouped
from pipeline.training.clip_stage import contrastive_loss, word_swap_negative
from pipeline.training.compute import Compute, cosine_lr
from pipeline.training.config import CLIPCAP_LR, ClipArch, LMArch, TrainConfig
from pipeline.training.examples import (
    MAX_LISTED_SKIPS,
    Block,
    ExampleStore,
    StoreWriter,
    add_embedding_examples,
    add_image_examples,
)
from pipeline.training.trainer import train
from schemas.captions import captions_schema

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))


def _config(out: Path, **overrides) -> TrainConfig:
    base = TrainConfig(
        out=str(out), clip_epochs=1, caption_epochs=1, clip_batch_size=16, caption_batch_size=16, vocab_size=300,
        precision="fp32", prefix_length=4,
        clip_arch=ClipArch(image_size=32, embed_dim=32, vision_layers=(1, 1, 1, 1), vision_width=16, text_width=32,
                           text_layers=1, text_heads=2, context_length=48),
        lm_arch=LMArch(n_embd=32, n_layer=1, n_head=2, n_positions=64))
    return replace(base, **overrides)


def test_contrastive_loss_uses_hard_negatives():
    torch.manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    texts = images.clone()
    scale = torch.tensor(10.0)
    easy = contrastive_loss(images, texts, None, scale)
    hard = contrastive_loss(images, texts, images.clone(), scale)  # negatives as close as the positives
    assert hard > easy + 0.1


@pytest.mark.parametrize("epochs", [1, 2, 4, 24])
def test_learning_rate_warms_up_to_the_peak_and_decays_to_near_zero_however_short_the_run(epochs):
    steps_per_epoch, peak = 10, 1e-3
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    total = epochs * steps_per_epoch
    rates = []
    for step in range(total):
        cosine_lr(optimizer, peak, step, total, steps_per_epoch)
        rates.append(optimizer.param_groups[0]["lr"])
    top = int(np.argmax(rates))
    assert rates[top] == pytest.approx(peak) and max(rates) <= peak * (1 + 1e-9)
    assert all(a < b for a, b in itertools.pairwise(rates[:top + 1]))  # warmup rises to the peak
    assert all(a >= b for a, b in itertools.pairwise(rates[top + 1:]))  # then only falls
    assert top + 1 == min(steps_per_epoch, total // 4)  # one epoch of warmup, at most a quarter of the run
    assert rates[-1] < 0.05 * peak


def test_caption_batches_group_similar_lengths_and_still_cover_every_example_once_in_random_order():
    lengths = np.random.default_rng(0).integers(5, 26, size=165).tolist()
    batches = length_grouped(lengths, 16, torch.Generator().manual_seed(1))
    members = [i for batch in batches for i in batch]
    assert all(len(batch) == 16 for batch in batches)
    assert len(members) == len(set(members)) == 165 // 16 * 16

    def padding(batches: list[list[int]]) -> int:
        return sum(max(lengths[i] for i in batch) * len(batch) - sum(lengths[i] for i in batch) for batch in batches)

    in_order = [list(range(start, start + 16)) for start in range(0, 160, 16)]
    assert padding(batches) * 4 < padding(in_order)
    longest = [max(lengths[i] for i in batch) for batch in batches]
    assert longest != sorted(longest) and longest != sorted(longest, reverse=True)
    assert batches == length_grouped(lengths, 16, torch.Generator().manual_seed(1))


def test_bf16_autocast_moves_attention_off_the_slow_flash_kernel_and_restores_it():
    """The CPU flash-attention kernel's bf16 backward is 7x slower than fp32 (runs/demo-model-experiments.md);
    bf16 training must take the math kernel, and leave the process's attention settings as they were."""
    assert torch.backends.cuda.flash_sdp_enabled()
    with Compute(torch.device("cpu"), torch.bfloat16).autocast():
        assert torch.is_autocast_enabled("cpu") and not torch.backends.cuda.flash_sdp_enabled()
        query = torch.randn(2, 2, 5, 8, requires_grad=True)
        out = torch.nn.functional.scaled_dot_product_attention(query, query, query, is_causal=True)
        assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert torch.isfinite(query.grad).all()
    assert torch.backends.cuda.flash_sdp_enabled() and not torch.is_autocast_enabled("cpu")
    with Compute(torch.device("cpu"), torch.float32).autocast():
        assert torch.backends.cuda.flash_sdp_enabled() and not torch.is_autocast_enabled("cpu")


def test_jsonl_captions_skip_bad_lines_and_keep_only_text_references(tmp_path, caplog):
    """A caption file from elsewhere: a line that is not JSON, is not an object, names no image or a missing
    one, or has no caption is skipped with a warning, as an undecodable image is; only non-empty strings count
    as captions."""
    (tmp_path / "a.jpg").write_bytes(jpeg_bytes(0))
    (tmp_path / "b.jpg").write_bytes(jpeg_bytes(1))
    lines = [{"image": "a.jpg", "captions": ["bir kedi", 3, "", None, "bir \ud800 kedi"], "negatives": "bir köpek"},
             "{not json", {"caption": "resimsiz"}, {"image": "missing.jpg", "caption": "yok"}, [1, 2],
             {"image": "b.jpg", "captions": "tek bir dize", "caption": "iki köpek", "negatives": ["üç köpek", 7]},
             {"image": "b.jpg", "captions": []}, "[" * 5000]
    (tmp_path / "captions.jsonl").write_text("\n".join(
        line if isinstance(line, str) else json.dumps(line) for line in lines))
    with caplog.at_level(logging.WARNING):
        examples, store = _load([str(tmp_path / "captions.jsonl")], tmp_path / "store")
    # JSON's lone surrogate ("\\ud800"), which the tokenizer cannot encode, is replaced
    assert examples.references == [["bir kedi", "bir \ufffd kedi"], ["iki köpek"]]
    assert examples.values.shape == (2, 16, 16, 3) and examples.values.dtype == np.uint8
    assert not store.has_negatives  # not every example has one
    messages = [r.getMessage() for r in caplog.records]
    skipped = sorted(int(m.split(" line ")[1].split(":")[0]) for m in messages if " line " in m)
    assert skipped == [2, 3, 5, 7, 8]
    assert [m for m in messages if " line " not in m] == [
        f"skipping missing.jpg of {tmp_path / 'captions.jsonl'}: read_error: cannot read "
        f"{tmp_path / 'missing.jpg'}: [Errno 2] No such file or directory: '{tmp_path / 'missing.jpg'}'"]


@pytest.mark.parametrize("encoding", ["cp1254", "utf-8-sig"])
def test_a_caption_file_saved_by_windows_tools_keeps_its_turkish_letters(tmp_path, encoding):
    """A JSON Lines file in the Windows Turkish code page was refused line by line as 'not an object with
    an image path and a caption'; one with Notepad's byte-order mark lost its first line."""
    (tmp_path / "a.jpg").write_bytes(jpeg_bytes(0))
    (tmp_path / "b.jpg").write_bytes(jpeg_bytes(1))
    lines = [{"image": "a.jpg", "caption": "Işık ağacın üstünde"}, {"image": "b.jpg", "caption": "şişe ve çiçek"}]
    (tmp_path / "captions.jsonl").write_bytes("\n".join(json.dumps(line, ensure_ascii=False) for line in lines)
                                              .encode(encoding))
    examples, _ = _load([str(tmp_path / "captions.jsonl")], tmp_path / "store")
    assert examples.references == [["Işık ağacın üstünde"], ["şişe ve çiçek"]]


def test_a_frozen_encoder_encodes_images_as_they_are_read_and_keeps_no_pixels(tmp_path):
    """With `encode`, at most `encode_batch` decoded images are held at once: the examples keep each image's
    embedding, the same as encoding all the pixels afterwards, and no pixels; exchanged every 3 samples, each
    sample is still stored once."""
    lines = []
    for i in range(7):
        (tmp_path / f"{i}.jpg").write_bytes(jpeg_bytes(i))
        lines.append(json.dumps({"image": f"{i}.jpg", "caption": f"resim {i}"}))
    (tmp_path / "captions.jsonl").write_text("\n".join(lines) + "\n{broken\n")
    projection = torch.randn(16 * 16 * 3, 8)
    batches = []

    def encode(pixels: torch.Tensor) -> torch.Tensor:
        batches.append(len(pixels))
        return pixels.reshape(len(pixels), -1).float() @ projection

    files = [str(tmp_path / "captions.jsonl")]
    streamed, _ = _load(files, tmp_path / "embeddings", encode=encode, encode_batch=3, exchange_every=3)
    whole, _ = _load(files, tmp_path / "pixels")
    assert batches == [3, 3, 1] and streamed.values.dtype == np.float32 and whole.values.dtype == np.uint8
    assert streamed.references == whole.references == [[f"resim {i}"] for i in range(7)]
    torch.testing.assert_close(torch.from_numpy(streamed.values),
                               torch.from_numpy(whole.values).reshape(7, -1).float() @ projection)


def test_coco_and_karpathy_caption_files_pair_each_image_with_all_its_captions(tmp_path, caplog):
    """Turkish MS COCO comes as COCO's captions JSON (captions are annotations pointing at an image id, the
    images in a folder beside annotations/) or as Karpathy's split file (sentences inside each image, whose
    val and test splits are held out); a JSON array of objects is read as JSON Lines are."""
    for folder, name, seed in [("train2014", "a.jpg", 0), ("train2014", "b.jpg", 1), ("val2014", "c.jpg", 2)]:
        (tmp_path / folder).mkdir(exist_ok=True)
        (tmp_path / folder / name).write_bytes(jpeg_bytes(seed))
    (tmp_path / "annotations").mkdir()
    coco = {"images": [{"id": 7, "file_name": "a.jpg"}, {"id": 9, "file_name": "b.jpg"},
                       {"id": 11, "file_name": "yok.jpg"}, {"id": 12, "file_name": "a.jpg"}],
            "annotations": [{"image_id": 9, "caption": "iki kedi"}, {"image_id": 7, "caption": "bir köpek"},
                            {"image_id": 9, "caption": "kediler"}, {"image_id": 11, "caption": "kayıp"},
                            {"image_id": 99, "caption": "resmi yok"}, {"image_id": 7, "caption": " "}]}
    (tmp_path / "annotations" / "captions_tr.json").write_text(json.dumps(coco, ensure_ascii=False, indent=1))
    karpathy = {"dataset": "coco", "images": [
        {"filepath": "train2014", "filename": "a.jpg", "split": "train", "sentences": [{"raw": "bir köpek"}]},
        {"filepath": "val2014", "filename": "c.jpg", "split": "restval", "sentences": [{"raw": "bir kuş"}]},
        {"filepath": "train2014", "filename": "b.jpg", "split": "test", "sentences": [{"raw": "test resmi"}]}]}
    (tmp_path / "dataset_coco_tr.json").write_text(json.dumps(karpathy))
    (tmp_path / "train2014" / "array.json").write_text(json.dumps([{"image": "b.jpg", "caption": "dizi"}]))

    with caplog.at_level(logging.INFO):
        coco_examples, _ = _load([str(tmp_path / "annotations" / "captions_tr.json")], tmp_path / "coco",
                                 image_root=str(tmp_path / "train2014"))
        files = [str(tmp_path / "dataset_coco_tr.json"), str(tmp_path / "train2014" / "array.json")]
        karpathy_examples, _ = _load(files, tmp_path / "karpathy")
    # image 12 has no caption of its own, 11's file is missing: both skipped with a warning
    assert coco_examples.references == [["bir köpek"], ["iki kedi", "kediler"]]
    assert coco_examples.values.shape == (2, 16, 16, 3)
    assert any("yok.jpg" in r.getMessage() for r in caplog.records)
    assert karpathy_examples.references == [["bir köpek"], ["bir kuş"], ["dizi"]]
    assert any("reading its train/restval split(s), 2 of 3 images" in r.getMessage() for r in caplog.records)


def test_unusable_samples_are_warned_about_a_bounded_number_of_times(tmp_path, caplog):
    (tmp_path / "a.jpg").write_bytes(jpeg_bytes(0))
    lines = [{"image": f"gone{i}.jpg", "caption": "yok"} for i in range(50)] + [{"image": "a.jpg", "caption": "var"}]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    with caplog.at_level(logging.WARNING):
        examples, _ = _load([str(tmp_path / "c.jsonl")], tmp_path / "store")
    assert examples.references == [["var"]]
    assert len(caplog.records) == MAX_LISTED_SKIPS + 1 and "gone0.jpg" in caplog.records[0].getMessage()


def test_train_cli_usage_is_one_line(tmp_path):
    import train_captioner
    from click.testing import CliRunner

    (tmp_path / "afile").write_text("x")
    cases = [(["--data", "x.tar", "--embeddings-from", "out", "--out", str(tmp_path / "a")], "needs --clip"),
             (["--data", "x.json", "--clip", "RN50", "--out", str(tmp_path / "b")], "names no weights"),
             (["--data", "x.json", "--out", str(tmp_path / "afile")], "cannot write --out"),
             (["--data", "x.json", "--prefix-length", "95", "--out", str(tmp_path / "c")], "too few for a caption")]
    for args, message in cases:
        result = CliRunner().invoke(train_captioner.main, args)
        assert result.exit_code == 2 and message in result.output, (args, result.output)
        assert "Traceback" not in result.output


def test_train_cli_takes_captions_and_image_root(tmp_path, monkeypatch):
    import train_captioner
    from click.testing import CliRunner

    seen = []
    monkeypatch.setattr(train_captioner, "train", lambda config, **options: seen.append((config, options)) or {
        "examples": 1, "train_s": 0.0, "bundle": "b"})
    result = CliRunner().invoke(train_captioner.main, ["--captions", "ann.json", "--captions", "x.tar",
                                                       "--image-root", "imgs", "--out", str(tmp_path / "run"),
                                                       "--scorer", "xlm-roberta-base-ViT-B-32:laion5b_s13b_b90k"])
    assert result.exit_code == 0, result.output
    config, options = seen[0]
    assert config.data == ("ann.json", "x.tar") and config.image_root == "imgs"
    assert options["scorer"] == "xlm-roberta-base-ViT-B-32:laion5b_s13b_b90k"
    # every option reaches the field it sets; the others keep their defaults
    result = CliRunner().invoke(train_captioner.main, [
        "--embeddings-from", "out", "--text-column", "original_text", "--clip", "bundle", "--batch-size", "8",
        "--micro-batch-size", "4", "--clip-stride", "16", "--clip-image-size", "48", "--train-scorer",
        "--scorer-text-tower", "tower", "--device", "cpu", "--precision", "fp16", "--seed", "3", "--lm-width",
        "768", "--lm-layers", "12", "--lm-heads", "12", "--vocab-size", "8000", "--out", "o"])
    assert result.exit_code == 0, result.output
    config = seen[1][0]
    assert replace(config, clip_arch=ClipArch(), lm_arch=LMArch()) == TrainConfig(
        out="o", embeddings_from=("out",), text_column="original_text", clip="bundle", clip_batch_size=8,
        caption_batch_size=8, caption_micro_batch_size=4, train_scorer=True, scorer_text_tower="tower",
        device="cpu", precision="fp16", seed=3, vocab_size=8000)
    assert config.clip_arch == ClipArch(image_size=48, vision_stride=16)
    assert config.lm_arch == LMArch(n_embd=768, n_layer=12, n_head=12)
    result = CliRunner().invoke(train_captioner.main, ["--data", "x.tar", "--lm", "gpt2", "--lm-layers", "2",
                                                       "--out", "o"])
    assert result.exit_code == 2 and "not with --lm" in result.output


def _silent(*args, **kwargs):
    return tqdm(*args, disable=True, **kwargs)


def _read(store: ExampleStore) -> Block:
    return Block.concat(list(store.blocks()))


def _load(specs: list[str], folder: Path, **options) -> tuple[Block, ExampleStore]:
    """The examples of `specs` at 16 px, through a store at `folder`."""
    with StoreWriter(folder) as writer:
        add_image_examples(writer, specs, ImageSpec(size=16), progress=_silent, **options)
    return _read(writer.store), writer.store


def test_training_writes_a_bundle_resumes_and_trains_from_output(tmp_path):
    write_corpus(tmp_path / "corpus", seed=3, counts={"train": 48}, size=(32, 32), formats=("webdataset",))
    data = (str(tmp_path / "corpus" / "train" / "*.tar"),)
    with pytest.raises(InputError):  # a typo in --data: the corrected command must still start in this --out
        train(_config(tmp_path / "run", data=(str(tmp_path / "corpus" / "tran" / "*.tar"),)))
    first = train(_config(tmp_path / "run", data=data))
    assert len(first["clip_losses"]) == 1 and len(first["caption_losses"]) == 1
    # the GPT-2 trained from scratch gets the from-scratch rate, recorded in the run summary
    assert json.loads((tmp_path / "run" / "train_summary.json").read_text())["config"]["caption_lr"] == 1e-3
    bundle = load_bundle(tmp_path / "run" / "bundle")
    assert bundle.encoder.image_spec.size == 32 and bundle.captioner.config.prefix_length == 4
    pixels = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    with torch.inference_mode():
        tokens = generate(bundle.captioner, bundle.captioner.prefix(bundle.encoder.encode_images(pixels)),
                          GenerationSettings(max_new_tokens=5))
    assert len(decode_texts(bundle.captioner, [t[0] for t in tokens])) == 2

    # a longer schedule on the same run directory resumes: no CLIP epoch again, one new caption epoch;
    # its summary keeps the whole loss history, the resumed epochs' losses included
    resumed = train(_config(tmp_path / "run", data=data, caption_epochs=2))
    assert resumed["clip_losses"] == first["clip_losses"]
    assert len(resumed["caption_losses"]) == 2 and resumed["caption_losses"][0] == first["caption_losses"][0]
    assert json.loads((tmp_path / "run" / "train_summary.json").read_text())["caption_losses"] == \
        resumed["caption_losses"]

    # stage 2 from a pipeline output: image_embedding + caption columns, encoder taken from the bundle
    dim = bundle.encoder.embed_dim
    _write_output(tmp_path / "output" / "filtered", dim)
    from_output = train(_config(tmp_path / "next", embeddings_from=(str(tmp_path / "output" / "filtered"),),
                                clip=str(tmp_path / "run" / "bundle"), lm=str(tmp_path / "run" / "bundle" / "lm")))
    assert from_output["examples"] == 19 and "clip_losses" not in from_output
    summary = json.loads((tmp_path / "next" / "train_summary.json").read_text())
    assert summary["config"]["embeddings_from"] == [str(tmp_path / "output" / "filtered")]
    assert summary["config"]["caption_lr"] == CLIPCAP_LR  # a pretrained LM is fine-tuned at ClipCap's rate
    assert load_bundle(tmp_path / "next" / "bundle").encoder.embed_dim == dim

    # embeddings of another width than --clip's encoder makes are refused, not trained into noise
    _write_output(tmp_path / "wider", dim + 8)
    with pytest.raises(ValueError, match=f"holds {dim + 8}-d embeddings"):
        train(_config(tmp_path / "wide", embeddings_from=(str(tmp_path / "wider"),),
                      clip=str(tmp_path / "run" / "bundle")))
    # the same run directory under other settings is refused; resuming it silently mixed two runs
    with pytest.raises(ValueError, match=r"holds a training run with other settings \(data, seed\)"):
        train(_config(tmp_path / "run", data=data + data, seed=1))
    # a pretrained --lm beside a CLIP trained here: the CLIP still gets a text tokenizer of its own
    lm_run = train(_config(tmp_path / "lm_run", data=data, lm=str(tmp_path / "run" / "bundle" / "lm")))
    assert len(lm_run["clip_losses"]) == 1 and load_bundle(tmp_path / "lm_run" / "bundle").encoder.embed_dim == dim


def test_a_scorer_trained_against_the_frozen_encoder_shares_its_image_tower(tmp_path):
    """--train-scorer with a bundle's encoder and --caption-epochs 0: a text tower learns the captions against
    the encoder's frozen image embeddings; the new bundle keeps the captioner, stores no second image tower,
    and its scorer scores against the encoder's own embeddings (one image forward serves both)."""
    write_corpus(tmp_path / "corpus", seed=4, counts={"train": 64}, size=(32, 32), formats=("webdataset",))
    data = (str(tmp_path / "corpus" / "train" / "*.tar"),)
    train(_config(tmp_path / "base", data=data))
    base = load_bundle(tmp_path / "base" / "bundle")
    visual_before = {k: v.clone() for k, v in base.encoder.clip.visual.state_dict().items()}
    summary = train(_config(tmp_path / "lit", data=data, clip=str(tmp_path / "base" / "bundle"), train_scorer=True,
                            scorer_epochs=3, caption_epochs=0))
    losses = summary["scorer_losses"]
    assert len(losses) == 3 and losses[-1] < losses[0] and "caption_losses" not in summary
    lit = load_bundle(tmp_path / "lit" / "bundle")
    manifest = lit.manifest
    assert manifest["scorer"]["image_tower"] == "encoder" and manifest["languages"]["scorer"] == ["tr"]
    stored = _safetensors_keys(tmp_path / "lit" / "bundle" / manifest["scorer"]["weights"])
    assert stored and not any(key.startswith("visual.") for key in stored)
    assert lit.scorer.shares_image_tower(lit.encoder) and not base.scorer.shares_image_tower(lit.encoder)
    for key, value in lit.encoder.clip.visual.state_dict().items():  # the image tower was never trained
        assert torch.equal(value, visual_before[key]), key
    for name, value in lit.captioner.mapper.state_dict().items():  # nor the captioner
        assert torch.equal(value, base.captioner.mapper.state_dict()[name]), name
    pixels = torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8)
    result = caption_batch(lit, pixels, GenerationSettings(max_new_tokens=5))
    with torch.inference_mode():
        texts = lit.scorer.encode_texts(result.captions).numpy()
        differs = base.scorer.encode_texts(result.captions).numpy()
    np.testing.assert_allclose(result.clip_scores, (result.image_embeddings * texts).sum(1), atol=1e-5)
    assert not np.allclose(texts, differs, atol=1e-3)  # a new text tower, not the encoder's


def test_a_scorer_trains_from_an_outputs_stored_embeddings_with_word_swap_negatives(tiny_bundle, tmp_path,
                                                                                     monkeypatch):
    """--embeddings-from OUT --train-scorer: no image is read; the output brings no negatives, so each
    caption's hard negative is a word swap; the bundle keeps --clip's captioner."""
    import pipeline.training.clip_stage as training

    swapped = []
    real_swap = training.word_swap_negative
    monkeypatch.setattr(training, "word_swap_negative",
                        lambda text, *args: swapped.append(text) or real_swap(text, *args))
    _write_output(tmp_path / "output" / "filtered", load_bundle(tiny_bundle).encoder.embed_dim)
    summary = train(_config(tmp_path / "lit", embeddings_from=(str(tmp_path / "output" / "filtered"),),
                            clip=str(tiny_bundle), train_scorer=True, scorer_epochs=2, caption_epochs=0,
                            clip_batch_size=8))
    assert summary["examples"] == 19 and len(summary["scorer_losses"]) == 2 and "caption_losses" not in summary
    assert len(swapped) == 2 * 2 * 8  # 2 epochs of 2 batches of 8: one swap per caption
    lit = load_bundle(tmp_path / "lit" / "bundle")
    assert lit.scorer.shares_image_tower(lit.encoder) and lit.manifest["scorer"]["image_tower"] == "encoder"


def test_a_scorer_text_tower_starts_from_a_causal_lm_and_its_bundle_stands_alone(tiny_bundle, tmp_path):
    """--train-scorer --scorer-text-tower LM: the tower is the LM's transformer (weights included), last-token
    pooled and projected, trained against the frozen encoder; the bundle holds its config and tokenizer, so a
    copy loads anywhere and scores as the original. A tower that does not load stops the run before it trains."""
    import shutil

    _write_output(tmp_path / "output", 24)
    config = _config(tmp_path / "lit", embeddings_from=(str(tmp_path / "output"),), clip=str(tiny_bundle),
                     train_scorer=True, scorer_text_tower=str(tiny_bundle / "lm"), scorer_epochs=4,
                     scorer_lr=1e-3, caption_epochs=0, clip_batch_size=8)
    with pytest.raises(ModelLoadError, match="cannot load text tower"):
        train(replace(config, out=str(tmp_path / "typo"), scorer_text_tower=str(tmp_path / "no-such-lm")))
    assert not any((tmp_path / "typo").glob("checkpoints/*"))
    with pytest.raises(ValueError, match="--scorer-text-tower is what --train-scorer starts from"):
        train(replace(config, out=str(tmp_path / "alone"), train_scorer=False))
    summary = train(config)
    losses = summary["scorer_losses"]
    assert len(losses) == 4 and losses[-1] < losses[0]
    recorded = json.loads((tmp_path / "lit" / "train_summary.json").read_text())["config"]
    assert recorded["scorer_text_tower"] == str(tiny_bundle / "lm") and recorded["scorer_lr"] == 1e-3
    shutil.copytree(tmp_path / "lit" / "bundle", tmp_path / "moved")
    shutil.rmtree(tmp_path / "lit")
    lit = load_bundle(tmp_path / "moved")
    entry = lit.manifest["scorer"]
    assert entry["image_tower"] == "encoder" and entry["config"]["text_tower"] == {
        "model": "scorer_text", "pooling": "last", "context_length": 64}  # the tiny GPT-2's 64 positions
    assert (tmp_path / "moved" / "scorer_text" / "config.json").is_file() and lit.languages.scorer == ("tr",)
    stored = _safetensors_keys(tmp_path / "moved" / entry["weights"])
    assert any(key.startswith("text.backbone.") for key in stored) and not any(k.startswith("visual.") for k in stored)
    assert lit.scorer.shares_image_tower(lit.encoder)
    start = load_bundle(tiny_bundle).captioner.lm.transformer.wte.weight
    trained = lit.scorer.clip.text.backbone.wte.weight
    moved_by = (trained - start).norm() / start.norm()
    assert 0 < moved_by < 0.5  # trained from the LM's embeddings, not from random ones
    pixels = torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8)
    result = caption_batch(lit, pixels, GenerationSettings(max_new_tokens=5))
    with torch.inference_mode():
        texts = lit.scorer.encode_texts(result.captions).numpy()
    np.testing.assert_allclose(result.clip_scores, (result.image_embeddings * texts).sum(1), atol=1e-5)


def test_embeddings_from_an_output_train_with_every_caption_of_a_caption_file_joined_by_key(tiny_bundle, tmp_path,
                                                                                            monkeypatch):
    """ClipCap's recipe: the images are encoded once (a pipeline run), then training reads the stored embeddings
    with every reference caption a COCO captions file holds for each image, joined by key (the output of an images
    folder keys a file by its path below the folder, a WebDataset's by its stem; the COCO file names it by file
    name), or the rows' own
    original_text. No image is read, rows without a caption are left out with one warning."""
    import pipeline.training.caption_stage as training

    _write_output(tmp_path / "output", 24)  # keys k0..k19, k19 a decode_error
    table = pq.read_table(tmp_path / "output" / "part-0.parquet")
    keys = [f"train2014/k{i}.jpg" if i % 2 else f"k{i}" for i in range(20)]  # a folder's keys, a WebDataset's
    originals = [f"Alt metin {i}." if i % 3 else None for i in range(20)]
    table = table.set_column(0, "key", pa.array(keys)).set_column(
        table.schema.get_field_index("original_text"), "original_text", pa.array(originals, pa.string()))
    pq.write_table(table, tmp_path / "output" / "part-0.parquet")
    coco = {"images": [{"id": i, "file_name": f"k{i}.jpg"} for i in range(18)],  # no captions for k18
            "annotations": [{"image_id": i, "caption": f"Resim {i}, cümle {j}."} for i in range(18) for j in range(5)]}
    (tmp_path / "captions_train.json").write_text(json.dumps(coco, ensure_ascii=False))
    seen = []
    real = training.train_captioner
    monkeypatch.setattr(training, "train_captioner",
                        lambda captioner, examples, *args, **kw: seen.append(_read(examples)) or real(
                            captioner, examples, *args, **kw))
    monkeypatch.setattr(sys.modules["pipeline.training.trainer"], "train_captioner", training.train_captioner)
    summary = train(_config(tmp_path / "coco", embeddings_from=(str(tmp_path / "output"),), clip=str(tiny_bundle),
                            data=(str(tmp_path / "captions_train.json"),)))
    examples = seen[-1]
    assert summary["examples"] == 18 and len(examples) == 18
    assert examples.references[5] == [f"Resim 5, cümle {j}." for j in range(5)]
    stored = np.asarray(table.column("image_embedding").to_pylist()[5], dtype=np.float32)
    np.testing.assert_allclose(examples.values[5], stored / np.linalg.norm(stored), atol=1e-6)

    summary = train(_config(tmp_path / "alt", embeddings_from=(str(tmp_path / "output"),), clip=str(tiny_bundle),
                            text_column="original_text"))
    with_text = [i for i in range(19) if originals[i]]
    assert summary["examples"] == len(with_text) and seen[-1].references == [[originals[i]] for i in with_text]
    # an output written without captions trains on its captions only with a word on what to give instead
    (tmp_path / "uncaptioned").mkdir()
    pq.write_table(table.set_column(table.schema.get_field_index("caption"), "caption", pa.nulls(20, pa.string())),
                   tmp_path / "uncaptioned" / "part-0.parquet")
    with pytest.raises(ValueError, match=r"no ok rows .* caption in their 'caption' column .* original_text"):
        train(_config(tmp_path / "none", embeddings_from=(str(tmp_path / "uncaptioned"),), clip=str(tiny_bundle)))


def test_a_student_trains_on_labelled_images_and_an_output_s_kept_rows_without_encoding_them(tiny_bundle, tmp_path,
                                                                                              monkeypatch):
    """The pseudo-label round's student: --embeddings-from OUT, the output folder itself (its filtered/ rows), with
    --data images. The output's rows come with their stored embeddings and captions; the labelled images are
    encoded with --clip as they are read; both are the student's examples."""
    import pipeline.training.caption_stage as training

    _write_output(tmp_path / "out" / "filtered", 24)  # 19 kept rows (k19 a decode_error)
    (tmp_path / "out" / "captions").mkdir()
    write_corpus(tmp_path / "labelled", seed=1, counts={"train": 12}, size=(32, 32), formats=("webdataset",))
    shards = str(tmp_path / "labelled" / "train" / "*.tar")
    bundle = load_bundle(tiny_bundle)
    with StoreWriter(tmp_path / "labelled-store") as writer:
        add_image_examples(writer, [shards], bundle.encoder.image_spec, progress=_silent)
    labelled = _read(writer.store)
    seen = []
    real = training.train_captioner
    monkeypatch.setattr(sys.modules["pipeline.training.trainer"], "train_captioner",
                        lambda captioner, examples, *args, **kw: seen.append(_read(examples)) or real(
                            captioner, examples, *args, **kw))
    summary = train(_config(tmp_path / "student", embeddings_from=(str(tmp_path / "out"),), clip=str(tiny_bundle),
                            data=(shards,)))
    examples = seen[-1]
    assert summary["examples"] == 19 + 12 == len(examples)
    table = pq.read_table(tmp_path / "out" / "filtered" / "part-0.parquet")
    assert examples.references[:19] == [[caption] for caption in table.column("caption").to_pylist()[:19]]
    assert examples.references[19:] == labelled.references
    stored = np.asarray(table.column("image_embedding").to_pylist()[:19], dtype=np.float32)
    np.testing.assert_allclose(examples.values[:19], stored / np.linalg.norm(stored, axis=1, keepdims=True),
                               atol=1e-6)
    with torch.no_grad():
        encoded = bundle.encoder.encode_images(torch.from_numpy(labelled.values)).float().numpy()
    np.testing.assert_allclose(examples.values[19:], encoded, atol=1e-5)


def test_embeddings_from_a_folder_without_parquet_says_what_to_give(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"--embeddings-from .*empty: no Parquet files there \(give an output"):
        add_embedding_examples(StoreWriter(tmp_path / "store"), [str(tmp_path / "empty")])


def test_micro_batches_give_the_whole_batch_s_loss_and_gradients(tokenizer):
    """--micro-batch-size: a caption batch computed in pieces, each weighted by its share of the batch's tokens,
    gives the loss and gradients of the whole batch (captions of different lengths: a plain mean of the pieces'
    losses would not)."""
    captioner = tiny_captioner(tokenizer)
    texts = ["Kare.", "Solda küçük mavi bir kare var.", "Daire.", "İki sarı yıldız ortada görünüyor, sağda bir kalp.",
             "Mor altıgen.", "Resimde büyük bir kırmızı daire var.", "Üçgen."]
    ids = _token_ids(tokenizer, texts, 30)
    embeddings = torch.nn.functional.normalize(torch.randn(len(texts), 24), dim=-1)
    compute = Compute(torch.device("cpu"), torch.float32)
    rows = [6, 1, 3, 0, 5, 2, 4]
    gradients = []
    for micro in (len(rows), 3):
        captioner.zero_grad()
        loss = 0.0
        for part in _caption_loss_parts(CaptionLoss(captioner), captioner.tokenizer.eos_token_id, embeddings, ids, rows,
                                        micro, compute):
            part.backward()
            loss += part.item()
        gradients.append((loss, {name: parameter.grad.clone() for name, parameter in captioner.named_parameters()
                                 if parameter.grad is not None}))
    (whole, whole_grads), (pieces, piece_grads) = gradients
    assert pieces == pytest.approx(whole, rel=1e-6)
    for name, grad in whole_grads.items():
        torch.testing.assert_close(piece_grads[name], grad, atol=1e-6, rtol=1e-5)


def test_fp16_training_scales_its_loss_and_trains(tiny_bundle, tmp_path, monkeypatch):
    """--precision fp16 (a GPU without native bf16): the loss goes through a grad scaler, which unscales before the
    captioner's gradient clipping; both a captioner and a scorer still train to finite, falling losses."""
    scaled = []
    real_scale = torch.amp.GradScaler.scale
    monkeypatch.setattr(torch.amp.GradScaler, "scale", lambda self, loss: scaled.append(self.is_enabled())
                        or real_scale(self, loss))
    _write_output(tmp_path / "output", 24)
    summary = train(_config(tmp_path / "fp16", embeddings_from=(str(tmp_path / "output"),), clip=str(tiny_bundle),
                            precision="fp16", caption_epochs=3, train_scorer=True, scorer_epochs=3, clip_batch_size=8,
                            caption_batch_size=8))
    assert scaled and all(scaled)
    for losses in (summary["caption_losses"], summary["scorer_losses"]):
        assert np.isfinite(losses).all() and losses[-1] < losses[0]


def test_a_word_swap_negative_changes_one_word_and_keeps_the_punctuation():
    import random

    vocabulary = ["kırmızı", "mavi", "kare", "daire", "iki"]
    for seed in range(20):
        text = "Solda iki kırmızı kare."
        swapped = word_swap_negative(text, vocabulary, random.Random(seed))
        changed = [(a, b) for a, b in zip(text.split(" "), swapped.split(" "), strict=True) if a != b]
        assert len(changed) == 1 and swapped.endswith(".")
        assert changed[0][1].strip(".") in vocabulary


def _safetensors_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return list(handle.keys())


def _write_output(folder: Path, dim: int) -> None:
    """A pipeline output part of 20 rows (19 ok) with random embeddings; every other caption longer."""
    embeddings = np.random.default_rng(0).normal(size=(20, dim)).astype(np.float16)
    table = pa.table({
        "key": [f"k{i}" for i in range(20)], "source": ["s"] * 20, "status": ["ok"] * 19 + ["decode_error"],
        "error": [None] * 19 + ["bad"], "width": [32] * 20, "height": [32] * 20,
        "caption": ["Resimde büyük bir mavi kare var." + " Solda bir daire." * (i % 2) for i in range(19)] + [None],
        "clip_score": [0.5] * 19 + [None],
        "image_embedding": pa.FixedSizeListArray.from_arrays(pa.array(embeddings.reshape(-1), pa.float16()), dim),
        "candidates": [None] * 20, "keep": [True] * 19 + [False], "original_text": [None] * 20,
        "original_clip_score": pa.nulls(20, pa.float32())},
        schema=captions_schema(dim))
    folder.mkdir(parents=True)
    pq.write_table(table, folder / "part-0.parquet")


def test_a_hub_lm_whose_tokenizer_got_a_pad_token_beyond_its_embeddings_trains(tokenizer, tiny_bundle, tmp_path):
    """`tokenizer.add_special_tokens({"pad_token": "<pad>"})` without resizing the LM (common with GPT-2,
    which has no pad token) gives a pad id past the embedding rows: padding with it stopped training with
    an IndexError, after stage 1."""
    import copy

    from conftest import tiny_lm

    padded = copy.deepcopy(tokenizer)
    padded.add_special_tokens({"pad_token": "[PAD]"})
    lm = tiny_lm(tokenizer)
    assert padded.pad_token_id >= lm.get_input_embeddings().num_embeddings
    lm.save_pretrained(tmp_path / "lm")
    padded.save_pretrained(tmp_path / "lm")
    _write_output(tmp_path / "output", 24)
    summary = train(_config(tmp_path / "run", embeddings_from=(str(tmp_path / "output"),), clip=str(tiny_bundle),
                            lm=str(tmp_path / "lm")))
    assert np.isfinite(summary["caption_losses"]).all()


def test_a_scorer_given_to_training_is_the_new_bundle_s_and_a_bad_one_stops_it_first(tiny_bundle, tmp_path):
    """--scorer (a multilingual open_clip folder here) is stored as the bundle's scorer, the encoder stays the one
    the captioner trains on; a --scorer that does not load stops the run before it trains."""
    from conftest import tiny_multilingual_folder

    folder, _ = tiny_multilingual_folder(tmp_path / "models")
    _write_output(tmp_path / "output", 24)
    config = _config(tmp_path / "run", embeddings_from=(str(tmp_path / "output"),), clip=str(tiny_bundle),
                     lm=str(tiny_bundle / "lm"))
    with pytest.raises(ModelLoadError, match="--scorer xlm-roberta-base-ViT-B-32 names no weights"):
        train(config, scorer="xlm-roberta-base-ViT-B-32")
    assert not (tmp_path / "run").exists()
    summary = train(config, scorer=str(folder))
    bundle = load_bundle(summary["bundle"])
    assert bundle.scorer is not bundle.encoder and bundle.manifest["scorer"] == {"arch": "local-dir:scorer_open_clip"}
    assert bundle.manifest["encoder"] == load_bundle(tiny_bundle).manifest["encoder"]
    assert summary["languages"] == {"captions": "tr", "scorer": ["multilingual"]}
    given = create_clip(ClipSpec.parse(str(folder)))
    pixels = torch.randint(0, 256, (2, 48, 48, 3), dtype=torch.uint8)
    with torch.inference_mode():
        assert torch.equal(bundle.scorer.encode_images(pixels), given.encode_images(pixels))


def test_training_on_a_bundle_whose_encoder_is_a_named_model_with_stored_weights(tokenizer, tmp_path):
    """--clip BUNDLE where the encoder is ARCH + the bundle's own weights file (an imported ClipCap's, or one
    trained with --clip ARCH:FILE): the new bundle must carry those weights, not a name for a file it lacks."""
    from pipeline.models.bundle import save_bundle
    from pipeline.models.clip_factory import ClipSpec, create_clip
    from pipeline.models.weights import save_weights

    torch.manual_seed(0)
    save_weights(create_clip(ClipSpec.parse("ViT-S-32")).clip, tmp_path / "vit.safetensors", torch.float16)
    spec = ClipSpec.parse(f"ViT-S-32:{tmp_path / 'vit.safetensors'}")
    encoder = create_clip(spec)
    save_bundle(tmp_path / "first", encoder, spec, tiny_captioner(tokenizer, prefix_dim=encoder.embed_dim), name="a")
    (tmp_path / "vit.safetensors").unlink()  # the first bundle stands alone
    _write_output(tmp_path / "output", encoder.embed_dim)
    train(_config(tmp_path / "next", embeddings_from=(str(tmp_path / "output"),), clip=str(tmp_path / "first"),
                  lm=str(tmp_path / "first" / "lm")))
    reloaded = load_bundle(tmp_path / "next" / "bundle").encoder
    pixels = torch.randint(0, 256, (2, 224, 224, 3), dtype=torch.uint8)
    with torch.inference_mode():
        assert torch.allclose(reloaded.encode_images(pixels), encoder.encode_images(pixels), atol=1e-4)


def test_stride_16_tower_ends_in_a_3x3_grid_at_48px_and_survives_its_bundle(tokenizer, tmp_path):
    from pipeline.models.bundle import save_bundle
    from pipeline.models.clip_factory import ClipSpec, create_clip
    from pipeline.models.errors import ModelLoadError
    from pipeline.training.clip_stage import build_custom_clip

    tokenizer.backend_tokenizer.save(str(tmp_path / "text_tokenizer.json"))
    arch = replace(_config(tmp_path).clip_arch, image_size=48, vision_stride=16)
    torch.manual_seed(0)
    clip, spec = build_custom_clip(arch, tmp_path / "text_tokenizer.json")
    visual = clip.clip.visual
    assert clip.image_spec.size == 48 and visual.attnpool.positional_embedding.shape[0] == 3 * 3 + 1
    pixels = torch.randint(0, 256, (2, 48, 48, 3), dtype=torch.uint8)
    with torch.inference_mode():
        trunk = visual.layer4(visual.layer3(visual.layer2(visual.layer1(visual.stem(clip.normalize_pixels(pixels))))))
        assert trunk.shape[-2:] == (3, 3)
        embeddings = clip.encode_images(pixels)
    assert torch.allclose(embeddings.norm(dim=-1), torch.ones(2))
    save_bundle(tmp_path / "bundle", clip, spec, tiny_captioner(tokenizer, prefix_dim=arch.embed_dim), name="s16")
    reloaded = load_bundle(tmp_path / "bundle").encoder
    with torch.inference_mode():
        assert reloaded.image_spec.size == 48 and torch.allclose(reloaded.encode_images(pixels), embeddings, atol=1e-5)
    # open_clip's own tower stays the default, and a stride it does not have is refused in one line
    assert _config(tmp_path).clip_arch.open_clip_config(300, 1)["vision_cfg"]["image_size"] == 32
    bad = ClipSpec(arch="custom", config={**spec.config, "vision_stride": 8}, tokenizer=spec.tokenizer)
    with pytest.raises(ModelLoadError, match=r"^invalid custom CLIP config: vision_stride 8 \(32, or 16"):
        create_clip(bad, tmp_path)
