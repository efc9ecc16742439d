"""Bundles: save -> load round trip, integrity checks, and loading without any network."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys

import pytest
import torch
from conftest import tiny_captioner, tiny_clip

from pipeline.config import GenerationSettings
from pipeline.generation.generate import generate
from pipeline.models.bundle import load_bundle, save_bundle
from pipeline.models.errors import ModelLoadError
from pipeline.models.manifest import BUNDLE_FILE, FACTS, bundle_facts, load_manifest


@pytest.fixture()
def bundle_dir(tokenizer, tmp_path):
    clip, spec = tiny_clip(tokenizer, tmp_path / "src")
    captioner = tiny_captioner(tokenizer, mapper="transformer", raw_prefix=True)
    save_bundle(tmp_path / "bundle", clip, spec, captioner, name="tiny")
    return tmp_path / "bundle", clip, captioner


def test_round_trip_reproduces_every_model(bundle_dir, monkeypatch):
    path, clip, captioner = bundle_dir

    def no_network(*args, **kwargs):
        raise AssertionError("bundle loading tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    bundle = load_bundle(path)
    assert bundle.scorer is bundle.encoder
    assert bundle.captioner.config == captioner.config
    pixels = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    with torch.inference_mode():
        assert torch.equal(bundle.encoder.encode_images(pixels), clip.encode_images(pixels))
        assert torch.equal(bundle.encoder.encode_texts(["mavi kare"]), clip.encode_texts(["mavi kare"]))
        embeddings = clip.encode_images(pixels)
        assert torch.equal(bundle.captioner.prefix(embeddings), captioner.prefix(embeddings))
        settings = GenerationSettings(max_new_tokens=6)
        assert generate(bundle.captioner, bundle.captioner.prefix(embeddings), settings) == generate(
            captioner, captioner.prefix(embeddings), settings)
    identity = bundle.identity()
    assert identity["name"] == "tiny" and len(identity["sha256"]) == 64
    assert identity["captioner"]["mapper"] == "transformer"
    # what an embed-only run's actors load: the same bundle, no language model
    import pipeline.models.bundle as bundles

    monkeypatch.setattr(bundles, "load_language_model", lambda *args: pytest.fail("the LM was loaded"))
    without = load_bundle(path, captioner=False)
    assert without.captioner is None and without.identity() == identity
    with torch.inference_mode():
        assert torch.equal(without.encoder.encode_images(pixels), clip.encode_images(pixels))


def test_loading_draws_no_random_weights_that_the_files_then_replace(bundle_dir, tokenizer, tmp_path, monkeypatch):
    """Every weight of a bundle comes from its files, so none is drawn first (ViT-B/32 + the mapper: ~1 s of
    each model actor's start on one core); a model built without weights is still initialized."""
    draws = []

    def counted(name: str, original):
        def init(tensor: torch.Tensor, *args, **kwargs):
            if not tensor.is_meta:  # transformers builds on the meta device first: no memory is filled
                draws.append(name)
            return original(tensor, *args, **kwargs)
        return init

    for name in ("uniform_", "normal_", "kaiming_uniform_", "trunc_normal_", "xavier_uniform_"):
        monkeypatch.setattr(torch.nn.init, name, counted(name, getattr(torch.nn.init, name)))
    path, clip, _ = bundle_dir
    bundle = load_bundle(path)
    assert draws == []
    pixels = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    with torch.inference_mode():
        assert torch.equal(bundle.encoder.encode_images(pixels), clip.encode_images(pixels))
    tiny_clip(tokenizer, tmp_path / "random")
    assert draws


def test_missing_file_is_named(bundle_dir):
    path = bundle_dir[0]
    (path / "mapper.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"bundle file missing: .*mapper\.safetensors"):
        load_bundle(path)


def test_tampered_file_is_named(bundle_dir):
    path = bundle_dir[0]
    with (path / "encoder.safetensors").open("r+b") as handle:
        handle.seek(-4, 2)
        handle.write(b"\0\0\0\0")
    with pytest.raises(ModelLoadError, match=r"does not match bundle\.json: .*encoder\.safetensors"):
        load_bundle(path)


def test_mismatched_weights_name_the_keys(bundle_dir):
    """A manifest whose config disagrees with the weights (consistent hashes) still fails clearly."""
    path = bundle_dir[0]
    manifest = json.loads((path / BUNDLE_FILE).read_text())
    manifest["captioner"]["num_layers"] = 3
    (path / BUNDLE_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ModelLoadError, match=r"mapper\.safetensors: missing keys transformer\.layers\.2"):
        load_bundle(path)


def test_the_facts_a_run_plans_with_are_recorded_and_hold_for_the_models(bundle_dir):
    path, clip, captioner = bundle_dir
    manifest = load_manifest(path)
    recorded = bundle_facts(path, manifest)
    assert recorded == load_bundle(path).facts()
    assert (recorded.embed_dim, recorded.encoder_image) == (clip.embed_dim, clip.image_spec)
    assert recorded.scorer_image is None  # the scorer is the encoder
    assert recorded.caption_tokens == captioner.max_caption_tokens() > 0
    with pytest.raises(ValueError, match=f"exceeds the {recorded.caption_tokens} positions"):
        recorded.check_max_new_tokens(recorded.caption_tokens + 1)
    # a bundle saved before facts were recorded: built once, the same facts
    del manifest[FACTS]
    assert bundle_facts(path, manifest) == recorded


@pytest.mark.parametrize("edit,message", [
    (lambda f: f.update(embed_dim=f["embed_dim"] + 1), "'facts' (BundleFacts(embed_dim="),
    (lambda f: f["encoder_image"].update(size=f["encoder_image"]["size"] * 2), "are not those of its models"),
    (lambda f: f.update(scorer_image=dict(f["encoder_image"])), "are not those of its models"),
    (lambda f: f.update(embed_dim="wide"), "invalid 'facts' entry"),
])
def test_facts_that_are_not_the_models_stop_the_load(bundle_dir, edit, message):
    # the driver decodes images at the recorded size: the actors must not caption pixels of another size
    path = bundle_dir[0]
    manifest = json.loads((path / BUNDLE_FILE).read_text())
    edit(manifest[FACTS])
    (path / BUNDLE_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ModelLoadError, match=re.escape(message)) as info:
        load_bundle(path)
    assert "\n" not in str(info.value)


def test_the_driver_plans_a_run_without_importing_the_models_code(tmp_path):
    # torch, transformers and open_clip cost seconds to import: only the model actors need them
    code = ("import sys; import pipeline.run.chain; "
            "print(sorted(m for m in ('torch', 'transformers', 'open_clip') if m in sys.modules))")
    imported = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert imported.stdout.strip() == "[]"


@pytest.mark.parametrize("edit,message", [
    (lambda m: m.update(files=list(m["files"])), "'files' must map file names to sha256 digests"),
    (lambda m: m["files"].update({"../../etc/hostname": "0" * 64}), "'../../etc/hostname' lies outside the bundle"),
    (lambda m: m["files"].update({"/etc/hostname": "0" * 64}), "'/etc/hostname' lies outside the bundle"),
    (lambda m: m["captioner"].update(prefix_length="4"), "invalid captioner entry: TypeError"),
])
def test_a_hand_edited_manifest_is_one_clear_error_and_reads_nothing_outside(bundle_dir, edit, message):
    path = bundle_dir[0]
    manifest = json.loads((path / BUNDLE_FILE).read_text())
    edit(manifest)
    (path / BUNDLE_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ModelLoadError, match=re.escape(message)) as info:
        load_bundle(path)
    assert "\n" not in str(info.value)


def test_a_bundle_written_over_another_keeps_none_of_its_files(bundle_dir, tokenizer, tmp_path):
    path, _, captioner = bundle_dir
    clip, spec = tiny_clip(tokenizer, tmp_path / "src")
    other_clip, other_spec = tiny_clip(tokenizer, tmp_path / "other", seed=3)
    save_bundle(path, clip, spec, captioner, scorer=other_clip, scorer_spec=other_spec)
    assert (path / "scorer.safetensors").is_file()
    (path / "lm" / "model.safetensors.index.json").write_text("{}")  # a stale file from an earlier save
    manifest = save_bundle(path, clip, spec, captioner, name="again")
    assert not (path / "scorer.safetensors").exists() and not (path / "lm" / "model.safetensors.index.json").exists()
    assert sorted(manifest["files"]) == sorted(str(f.relative_to(path)) for f in path.rglob("*")
                                               if f.is_file() and f.name != BUNDLE_FILE)
    assert load_bundle(path).identity()["name"] == "again"
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []  # nothing left beside it


def test_a_bundle_is_not_written_into_a_folder_of_other_files(bundle_dir, tokenizer, tmp_path):
    captioner = bundle_dir[2]
    clip, spec = tiny_clip(tokenizer, tmp_path / "src")
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(ModelLoadError, match="exists and is not a model bundle"):
        save_bundle(folder, clip, spec, captioner)
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]
    (tmp_path / "empty").mkdir()
    assert save_bundle(tmp_path / "empty", clip, spec, captioner)["name"] == "empty"


@pytest.mark.parametrize("content", [None, "{not json", json.dumps({"format": "other"})])
def test_not_a_bundle(tmp_path, content):
    if content is not None:
        (tmp_path / BUNDLE_FILE).write_text(content)
    with pytest.raises(ModelLoadError) as info:
        load_bundle(tmp_path)
    assert "\n" not in str(info.value)


def test_a_language_model_whose_checkpoint_pickles_an_object_is_refused_in_one_line(tokenizer, tmp_path):
    """transformers loads pytorch_model.bin with torch.load(weights_only=True); what it refuses is one line."""
    from conftest import tiny_lm

    from pipeline.models.bundle import load_language_model

    lm = tiny_lm(tokenizer)
    lm.save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    (tmp_path / "lm" / "model.safetensors").unlink()  # the older transformers' format
    torch.save(lm.state_dict(), tmp_path / "lm" / "pytorch_model.bin")
    load_language_model(tmp_path / "lm")  # a real .bin loads
    torch.save({"transformer.wte.weight": torch.zeros(1), "hook": _Pickled()}, tmp_path / "lm" / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match=r"cannot load language model .*: refused: the checkpoint pickles"):
        load_language_model(tmp_path / "lm")


class _Pickled:
    """A class no torch.load(weights_only=True) allows."""
