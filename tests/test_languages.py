"""A bundle says which language its captioner writes and its scorer reads, and a run whose scorer was not
trained on the captions' language warns first and filters only with --allow-foreign-scorer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from conftest import tar_corpus, tiny_captioner

from pipeline.config import DEMO_BUNDLE, RunConfig
from pipeline.models.bundle import load_bundle, save_bundle
from pipeline.models.clip_factory import ClipSpec, create_clip
from pipeline.models.languages import MULTILINGUAL, Languages, infer, of_manifest
from pipeline.quality.report import build_report
from pipeline.run.chain import run
from pipeline.run.errors import UsageError
from pipeline.run.filtering import FilterSettings

ROOT = Path(__file__).resolve().parents[1]
CUSTOM_ENTRY = {"arch": "custom", "config": {}, "tokenizer": "encoder_tokenizer.json"}


@pytest.mark.parametrize(("encoder", "scorer", "reads"), [
    (CUSTOM_ENTRY, "encoder", ("tr",)),                                    # trained here, on the captions
    ({"arch": "ViT-B-32", "weights": "openai"}, "encoder", ("en",)),
    ({"arch": "ViT-B-32", "weights": "laion2b_s34b_b79k"}, "encoder", ("en",)),
    ({"arch": "openai/clip-vit-base-patch32"}, "encoder", ("en",)),        # a transformers CLIP
    ({"arch": "ViT-B-32", "weights": "openai"},
     {"arch": "xlm-roberta-base-ViT-B-32", "weights": "laion5b_s13b_b90k"}, (MULTILINGUAL,)),
    ({"arch": "ViT-B-32", "weights": "openai"}, {"arch": "nllb-clip-base", "weights": "v1"}, (MULTILINGUAL,)),
    ({"arch": "ViT-B-32", "weights": "openai"},
     {"arch": "custom", "config": {"text_cfg": {"hf_model_name": "/models/xlm-roberta-small"}}}, ("tr",)),
    ({"arch": "ViT-B-32", "weights": "openai"}, {"arch": "ViT-B-32", "weights": "/w/my-clip.safetensors"}, ("en",)),
])
def test_a_bundle_without_languages_gets_them_guessed_from_its_scorer(encoder, scorer, reads):
    languages = of_manifest({"encoder": encoder, "scorer": scorer})
    assert languages == Languages("tr", reads, inferred=True)
    assert languages.scorer_reads_captions == (reads != ("en",))
    assert (languages.warning() is None) == languages.scorer_reads_captions


def test_recorded_languages_win_over_the_guess_and_bad_ones_fall_back_to_it():
    openai = {"encoder": {"arch": "ViT-B-32", "weights": "openai"}, "scorer": "encoder"}
    declared = of_manifest(openai | {"languages": {"captions": "tr", "scorer": ["tr", "en"]}})
    assert declared == Languages("tr", ("tr", "en")) and declared.scorer_reads_captions
    assert of_manifest(openai | {"languages": {"captions": "tr", "scorer": ["Türkçe!"]}}) == infer(openai)
    english = of_manifest(openai | {"languages": {"captions": "en", "scorer": ["en"]}})  # English ClipCap
    assert english.scorer_reads_captions and english.warning() is None
    with pytest.raises(ValueError, match="ISO 639"):
        Languages("turkish", ("tr",))


def test_the_demo_bundle_reads_the_turkish_it_writes():
    languages = load_bundle(DEMO_BUNDLE).languages
    assert languages.captions == "tr" and languages.scorer_reads_captions


@pytest.fixture(scope="module")
def english_bundle(tokenizer, tmp_path_factory) -> Path:
    """A bundle made from an English-only open_clip model (ViT-B-32 from a local weights file, as a user
    with OpenAI's file has it) with a small Turkish captioner."""
    root = tmp_path_factory.mktemp("english")
    torch.manual_seed(0)
    weights = root / "vit_b32.pt"
    torch.save(open_clip.create_model("ViT-B-32").state_dict(), weights)
    spec = ClipSpec.parse(f"ViT-B-32:{weights}")
    save_bundle(root / "bundle", create_clip(spec), spec, tiny_captioner(tokenizer, prefix_dim=512), name="english")
    return root / "bundle"


def test_a_bundle_records_the_languages_guessed_or_declared(english_bundle, tiny_bundle, tokenizer, tmp_path):
    manifest = json.loads((english_bundle / "bundle.json").read_text())
    assert manifest["languages"] == {"captions": "tr", "scorer": ["en"]}  # guessed when saved, recorded as such
    assert json.loads((tiny_bundle / "bundle.json").read_text())["languages"] == {"captions": "tr", "scorer": ["tr"]}
    english = load_bundle(english_bundle)
    declared = save_bundle(tmp_path / "declared", english.encoder, ClipSpec.parse("ViT-B-32"), english.captioner,
                           scorer_languages=("tr", "en"))
    assert declared["languages"] == {"captions": "tr", "scorer": ["tr", "en"]}
    assert load_bundle(tmp_path / "declared").identity()["languages"] == declared["languages"]


def test_a_turkish_run_with_an_english_scorer_warns_first_and_filters_only_when_allowed(
        ray_local, english_bundle, tmp_path):
    shards = tar_corpus(tmp_path / "in", shards=1, per_shard=4)
    base = {"inputs": (str(shards[0]),), "output": str(tmp_path / "out"), "model": str(english_bundle),
            "batch_size": 4}
    command = [sys.executable, str(ROOT / "jobs" / "caption_shards.py"), "--input", str(shards[0]),
               "--output", str(tmp_path / "out"), "--model", str(english_bundle), "--keep-top-fraction", "0.5"]
    refused = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    assert "WARNING" in lines[0] and "reads en" in lines[0] and "not the captions' language tr" in lines[0], lines
    assert lines[-1].startswith("error: refusing to filter tr captions") and "--allow-foreign-scorer" in lines[-1]
    assert not (tmp_path / "out").exists()  # refused before anything was written
    with pytest.raises(UsageError, match="--allow-foreign-scorer"):
        run(RunConfig(**base, filter=FilterSettings(min_clip_score=0.1)))

    summary = run(RunConfig(**base))  # scores, keeps every row, and says why the scores mean little
    assert summary["counts"]["kept"] == 4 and "reads en" in summary["warnings"][0]
    assert summary["model"]["languages"] == {"captions": "tr", "scorer": ["en"]}
    assert json.loads((tmp_path / "out" / "run.json").read_text())["warnings"] == summary["warnings"]
    assert summary["warnings"][0] in build_report(str(tmp_path / "out")).replace("&#x27;", "'")

    refiltered = run(RunConfig(**base, filter=FilterSettings(keep_top_fraction=0.5), overwrite=True,
                               allow_foreign_scorer=True))
    assert refiltered["counts"]["kept"] == 2 and refiltered["warnings"] == summary["warnings"]
