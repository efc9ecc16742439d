"""A CLIP whose text tower is a Hugging Face transformers encoder, as open_clip's multilingual
xlm-roberta-base-ViT-B-32 and nllb-clip-base have: loaded from an open_clip folder, by name with a tag or a
weights file, or from the hub; stored in a bundle with the tower's config and tokenizer; scoring offline once
the bundle is copied elsewhere and everything it came from is gone."""

from __future__ import annotations

import json
import logging
import shutil
import socket
from pathlib import Path

import huggingface_hub
import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from conftest import (
    MULTILINGUAL_CONTEXT,
    TURKISH_SENTENCES,
    tar_corpus,
    tiny_captioner,
    tiny_clip,
    tiny_multilingual_clip,
    tiny_multilingual_config,
    tiny_multilingual_folder,
    tiny_xlm_roberta,
)
from open_clip.tokenizer import HFTokenizer
from safetensors.torch import save_file

from pipeline.config import GenerationSettings, RunConfig
from pipeline.generation.captioning import caption_batch
from pipeline.models.bundle import load_bundle, save_bundle
from pipeline.models.clip_factory import ClipSpec, create_clip
from pipeline.models.errors import ModelLoadError
from pipeline.models.languages import MULTILINGUAL, infer
from pipeline.run.chain import run
from pipeline.run.errors import UsageError

TEXTS = ["Resimde büyük bir kırmızı daire var.", "mavi kare", "İki sarı yıldız ortada görünüyor.", "ılık"]
OPENAI_ENCODER = {"arch": "ViT-B-32", "weights": "openai"}


def _pixels(size: int, count: int = 3, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, size, size, 3), dtype=torch.uint8, generator=generator)


def _expected(clip: torch.nn.Module, tokenizer_dir: Path, pixels: torch.Tensor, mean, std):
    """The model's own unit image and text embeddings, normalized and tokenized here, not by the code under test."""
    images = (pixels.permute(0, 3, 1, 2).float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) \
        / torch.tensor(std).view(1, 3, 1, 1)
    tokens = HFTokenizer(str(tokenizer_dir), context_length=MULTILINGUAL_CONTEXT)(TEXTS)
    with torch.inference_mode():
        return F.normalize(clip.encode_image(images), dim=-1), F.normalize(clip.encode_text(tokens), dim=-1)


def _offline(monkeypatch, cache: Path) -> None:
    """HF_HUB_OFFLINE=1 with `cache` as the Hugging Face hub cache (huggingface_hub reads both when imported, before
    conftest sets the variable: set here as it reads them at each call)."""
    cache.mkdir(parents=True, exist_ok=True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))


def _no_network(monkeypatch, empty_cache: Path) -> None:
    """No socket and an empty Hugging Face cache: nothing but the files at hand can be read."""
    def refuse(*args, **kwargs):
        raise AssertionError("loading tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    _offline(monkeypatch, empty_cache)


def test_an_open_clip_folder_holding_its_text_tower_loads_from_any_working_directory(tmp_path, monkeypatch):
    """The folder names its tower "."; open_clip would hand that to transformers, which reads it against the
    working directory: the loader points it at the folder, and leaves the folder's files as they are."""
    folder, clip = tiny_multilingual_folder(tmp_path / "models")
    files = {file.name: file.read_bytes() for file in folder.iterdir()}
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    pixels = _pixels(48)
    images, texts = _expected(clip, folder, pixels, [0.5, 0.4, 0.3], [0.2, 0.25, 0.3])
    for name in (f"local-dir:{folder}", str(folder), f"local-dir:{Path('..') / 'models' / 'tiny-scorer'}"):
        loaded = create_clip(ClipSpec.parse(name))
        assert isinstance(loaded.tokenizer, HFTokenizer) and loaded.tokenizer.context_length == MULTILINGUAL_CONTEXT
        assert loaded.embed_dim == 16 and loaded.image_spec.size == 48
        assert loaded.image_spec.interpolation == "bilinear"
        with torch.inference_mode():
            assert torch.allclose(loaded.encode_images(pixels), images, atol=1e-6)
            assert torch.allclose(loaded.encode_texts(TEXTS), texts, atol=1e-6)  # open_clip's encode_text, whole
    assert {file.name: file.read_bytes() for file in folder.iterdir()} == files


def test_a_folder_without_its_text_tower_s_config_is_one_clear_error(tmp_path):
    folder, _ = tiny_multilingual_folder(tmp_path)
    (folder / "config.json").unlink()
    with pytest.raises(ModelLoadError, match=r"cannot load CLIP .*tiny-scorer") as info:
        create_clip(ClipSpec.parse(f"local-dir:{folder}"))
    assert "\n" not in str(info.value)


@pytest.fixture()
def moved_bundle(tokenizer, tmp_path, monkeypatch):
    """A bundle whose scorer is the tiny multilingual folder model, copied elsewhere once written; the folder and
    the bundle it was written to are deleted, and nothing outside the copy can be read."""
    source = tmp_path / "source"
    folder, _ = tiny_multilingual_folder(source)
    scorer_spec = ClipSpec.parse(f"local-dir:{folder}")
    scorer = create_clip(scorer_spec)
    encoder, encoder_spec = tiny_clip(tokenizer, source / "encoder")
    manifest = save_bundle(source / "bundle", encoder, encoder_spec, tiny_captioner(tokenizer), scorer=scorer,
                           scorer_spec=scorer_spec, name="multilingual")
    shutil.copytree(source / "bundle", tmp_path / "elsewhere" / "bundle")
    shutil.rmtree(source)
    _no_network(monkeypatch, tmp_path / "empty-hub-cache")
    monkeypatch.chdir(tmp_path / "elsewhere")
    return tmp_path / "elsewhere" / "bundle", manifest, scorer, encoder


def test_a_bundle_stores_the_scorer_with_its_text_tower_s_files_and_runs_it_offline(moved_bundle):
    path, manifest, scorer, _ = moved_bundle
    assert manifest["scorer"] == {"arch": "local-dir:scorer_open_clip"}
    assert manifest["languages"] == {"captions": "tr", "scorer": [MULTILINGUAL]}  # its folder's name says nothing
    stored = path / "scorer_open_clip"
    names = {file.name for file in stored.iterdir()}
    assert {"open_clip_config.json", "open_clip_model.safetensors", "config.json", "tokenizer.json",
            "tokenizer_config.json"} <= names
    assert not names & {"model.safetensors", "pytorch_model.bin"}  # the tower's weights are in the CLIP's file
    assert {f"scorer_open_clip/{name}" for name in names} <= set(manifest["files"])  # each one sha256-checked
    text_cfg = json.loads((stored / "open_clip_config.json").read_text())["model_cfg"]["text_cfg"]
    assert (text_cfg["hf_model_name"], text_cfg["hf_tokenizer_name"]) == (".", ".")
    assert text_cfg["hf_model_pretrained"] is False and text_cfg["context_length"] == MULTILINGUAL_CONTEXT

    bundle = load_bundle(path)
    assert bundle.scorer is not bundle.encoder and bundle.identity()["scorer_encodes_images"] is True
    assert torch.equal(bundle.scorer.tokenizer(TEXTS), scorer.tokenizer(TEXTS))
    pixels = _pixels(48)
    with torch.inference_mode():
        assert torch.equal(bundle.scorer.encode_images(pixels), scorer.encode_images(pixels))
        turkish = bundle.scorer.encode_texts(TURKISH_SENTENCES[:6])
        assert torch.equal(turkish, scorer.encode_texts(TURKISH_SENTENCES[:6]))
    assert turkish.shape == (6, 16) and torch.allclose(turkish.norm(dim=-1), torch.ones(6), atol=1e-5)


def test_a_bundle_missing_a_file_of_its_scorer_s_folder_does_not_load(moved_bundle):
    path = moved_bundle[0]
    (path / "scorer_open_clip" / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match=r"bundle file missing: .*scorer_open_clip/tokenizer\.json"):
        load_bundle(path)


def test_captioning_scores_with_the_multilingual_scorer_at_its_own_input_size(moved_bundle):
    path, _, scorer, encoder = moved_bundle
    bundle = load_bundle(path)
    pixels, scorer_pixels = _pixels(32), _pixels(48)
    settings = GenerationSettings(method="sample", num_candidates=3, max_new_tokens=6, seed=1)
    result = caption_batch(bundle, pixels, settings, scorer_pixels=scorer_pixels)
    with torch.inference_mode():
        assert np.allclose(result.image_embeddings, encoder.encode_images(pixels).numpy(), atol=1e-6)
        image_embeddings = scorer.encode_images(scorer_pixels)
        for i, candidates in enumerate(result.candidates):
            assert len(candidates) == 3 and result.captions[i] == candidates[0][0]
            texts = scorer.encode_texts([text for text, _ in candidates])
            assert [score for _, score in candidates] == pytest.approx((texts @ image_embeddings[i]).tolist(),
                                                                      abs=1e-5)


def test_a_run_says_first_that_its_scorer_encodes_each_image_again(moved_bundle, tiny_bundle, tmp_path, caplog):
    shards = tar_corpus(tmp_path / "in", shards=1, per_shard=1)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("not a run")  # the run stops there, before any model runs
    for model, says in ((moved_bundle[0], True), (tiny_bundle, False)):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="pipeline.run.chain"), pytest.raises(UsageError, match="not empty"):
            run(RunConfig(inputs=(str(shards[0]),), output=str(tmp_path / "out"), model=str(model)))
        assert ("the scorer is a model of its own: each image is decoded at its 48 px too and encoded twice"
                in caplog.text) == says


@pytest.mark.parametrize(("hf_config", "reads"), [
    ({"model_type": "xlm-roberta"}, MULTILINGUAL),
    ({"model_type": "m2m_100"}, MULTILINGUAL),    # nllb-clip's tower
    ({"model_type": "bert"}, "en"),
    (None, "en"),                                 # a tower named "." without its config: no telling
])
def test_a_scorer_folder_s_languages_come_from_its_text_tower_s_config(tmp_path, monkeypatch, hf_config, reads):
    folder = tmp_path / "my-scorer"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": tiny_multilingual_config(".")}))
    if hf_config is not None:
        (folder / "config.json").write_text(json.dumps(hf_config))
    for arch in (f"local-dir:{folder}", str(folder)):
        assert infer({"encoder": OPENAI_ENCODER, "scorer": {"arch": arch}}).scorer == (reads,)
    monkeypatch.chdir(tmp_path)  # a folder named relative to the working directory, as on a command line
    assert infer({"encoder": {"arch": "local-dir:my-scorer"}, "scorer": "encoder"}).scorer == (reads,)


def test_a_scorer_folder_whose_text_tower_is_a_hub_name_says_its_languages_by_that_name(tmp_path):
    """A hub snapshot of laion's xlm-roberta CLIP names its tower xlm-roberta-base and has no config.json."""
    folder = tmp_path / "snapshot"
    folder.mkdir()
    config = {"model_cfg": tiny_multilingual_config("xlm-roberta-base")}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    assert infer({"encoder": OPENAI_ENCODER, "scorer": {"arch": str(folder)}}).scorer == (MULTILINGUAL,)


HUB_MODEL = "xlm-roberta-tiny-ViT-T-16"  # a built-in open_clip name, as xlm-roberta-base-ViT-B-32 is
HUB_TOWER = "xlm-roberta-tiny"           # its text tower's hub name, as xlm-roberta-base
HUB_REPO = "org/CLIP-tiny-xlm-roberta"   # its weights' hub repo, as laion/CLIP-ViT-B-32-xlm-roberta-base-...


def _cache(root: Path, repo: str, files: dict[str, Path]) -> None:
    """`files` in a Hugging Face hub cache as a download leaves them (offline, huggingface_hub reads them there)."""
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text("0" * 40)
    for name, file in files.items():
        shutil.copy(file, snapshot / name)


def _hub_config() -> dict:
    """HUB_MODEL's config: as xlm-roberta-base-ViT-B-32's, no context_length (its tokenizer takes open_clip's 77)."""
    config = tiny_multilingual_config(HUB_TOWER)
    del config["text_cfg"]["context_length"]
    return config


@pytest.fixture()
def hub_model(tmp_path, monkeypatch):
    """HUB_MODEL as open_clip knows it (a built-in config and a pretrained tag 'tiny' on HUB_REPO), its tower and its
    weights in the user's hub cache: what `xlm-roberta-base-ViT-B-32:laion5b_s13b_b90k` needs, tiny."""
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, HUB_MODEL, _hub_config())
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, HUB_MODEL, {"tiny": open_clip.pretrained._pcfg(
        hf_hub=f"{HUB_REPO}/", mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))})
    tower = tiny_xlm_roberta(tmp_path / "downloads" / HUB_TOWER)
    clip = tiny_multilingual_clip(str(tower), seed=3)
    weights = tmp_path / "downloads" / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(weights))
    config = tmp_path / "downloads" / "open_clip_config.json"
    config.write_text(json.dumps({"model_cfg": _hub_config(),
                                  "preprocess_cfg": {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}}))
    cache = tmp_path / "hub-cache"
    _cache(cache, HUB_TOWER, {file.name: file for file in tower.iterdir()})
    _cache(cache, HUB_REPO, {"open_clip_model.safetensors": weights, "open_clip_config.json": config})
    _offline(monkeypatch, cache)
    return clip, tower, weights


@pytest.mark.parametrize("form", ["name:tag", "name:file", "hf-hub"])
def test_a_named_model_whose_tower_comes_from_the_hub_cache_makes_a_bundle_that_needs_none(
        tokenizer, hub_model, tmp_path, monkeypatch, form):
    clip, tower, weights = hub_model
    name = {"name:tag": f"{HUB_MODEL}:tiny", "name:file": f"{HUB_MODEL}:{weights}", "hf-hub": f"hf-hub:{HUB_REPO}"}
    # a weights file brings no preprocessing: open_clip's defaults, OpenAI's
    mean, std = ((list(open_clip.OPENAI_DATASET_MEAN), list(open_clip.OPENAI_DATASET_STD)) if form == "name:file"
                 else ([0.5, 0.4, 0.3], [0.2, 0.25, 0.3]))
    spec = ClipSpec.parse(name[form])
    loaded = create_clip(spec)
    assert loaded.tokenizer.context_length == 77
    pixels = _pixels(48)
    images, texts = _expected(clip, tower, pixels, mean, std)  # (padded to fewer tokens: masked, the same)
    with torch.inference_mode():
        assert torch.allclose(loaded.encode_images(pixels), images, atol=1e-6)
        assert torch.allclose(loaded.encode_texts(TEXTS), texts, atol=1e-6)

    encoder, encoder_spec = tiny_clip(tokenizer, tmp_path / "encoder")
    manifest = save_bundle(tmp_path / "bundle", encoder, encoder_spec, tiny_captioner(tokenizer), scorer=loaded,
                           scorer_spec=spec, dtype=torch.float16)
    assert manifest["scorer"] == {"arch": "local-dir:scorer_open_clip"}  # no tag or file left to fetch
    assert manifest["languages"]["scorer"] == [MULTILINGUAL]
    stored = json.loads((tmp_path / "bundle" / "scorer_open_clip" / "open_clip_config.json").read_text())
    assert stored["model_cfg"]["vision_cfg"] == _hub_config()["vision_cfg"]
    assert stored["model_cfg"]["text_cfg"]["context_length"] == 77  # what its tokenizer took, said explicitly
    assert (stored["preprocess_cfg"]["mean"], stored["preprocess_cfg"]["std"]) == (mean, std)
    weights.unlink()
    _no_network(monkeypatch, tmp_path / "empty-hub-cache")
    with pytest.raises(ModelLoadError):  # the name alone no longer loads: its tower's files are gone
        create_clip(ClipSpec.parse(f"{HUB_MODEL}:tiny"))
    reloaded = load_bundle(tmp_path / "bundle").scorer
    assert reloaded.image_spec == loaded.image_spec
    with torch.inference_mode():
        assert torch.allclose(reloaded.encode_images(pixels), images, atol=2e-3)  # stored as fp16
        assert torch.allclose(reloaded.encode_texts(TEXTS), texts, atol=2e-3)
