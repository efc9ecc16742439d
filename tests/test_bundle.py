"""Bundles: save -> load round trip, integrity checks, and loading without any network."""

from __future__ import annotations

import json
import socket

import pytest
import torch
from conftest import tiny_captioner, tiny_clip

from pipeline.decoding import DecodeSettings, generate
from pipeline.models.bundle import BUNDLE_FILE, load_bundle, save_bundle
from pipeline.models.errors import ModelLoadError


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
        settings = DecodeSettings(max_new_tokens=6)
        assert generate(bundle.captioner, bundle.captioner.prefix(embeddings), settings) == generate(
            captioner, captioner.prefix(embeddings), settings)
    identity = bundle.identity()
    assert identity["name"] == "tiny" and len(identity["sha256"]) == 64
    assert identity["captioner"]["mapper"] == "transformer"


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


@pytest.mark.parametrize("content", [None, "{not json", json.dumps({"format": "other"})])
def test_not_a_bundle(tmp_path, content):
    if content is not None:
        (tmp_path / BUNDLE_FILE).write_text(content)
    with pytest.raises(ModelLoadError) as info:
        load_bundle(tmp_path)
    assert "\n" not in str(info.value)
