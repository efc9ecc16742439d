"""Importing original ClipCap checkpoints: same logits as the reference forward pass."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from clipcap_reference import ClipCaptionModel
from conftest import tiny_clip_config, tiny_lm

from pipeline.config import GenerationSettings
from pipeline.generation.captioning import caption_batch
from pipeline.generation.generate import decode_texts, generate
from pipeline.models.bundle import load_bundle
from pipeline.models.clipcap_import import import_clipcap
from pipeline.models.errors import ModelLoadError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "jobs"))
import import_clipcap as import_job  # noqa: E402


@pytest.fixture()
def parts(tokenizer, tmp_path):
    """A local LM directory and a local open_clip model directory (local-dir: schema)."""
    import json

    import open_clip
    from safetensors.torch import save_file

    lm_dir = tmp_path / "lm"
    tiny_lm(tokenizer, seed=5).save_pretrained(lm_dir)
    tokenizer.save_pretrained(lm_dir)
    clip_dir = tmp_path / "clip"
    clip_dir.mkdir()
    config = tiny_clip_config(49408)
    config["text_cfg"] = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
    (clip_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": config}))
    save_file({k: v.contiguous() for k, v in open_clip.CLIP(**config).state_dict().items()},
              str(clip_dir / "open_clip_model.safetensors"))
    return lm_dir, f"local-dir:{clip_dir}"


def _reference(tokenizer, mapping: str, seed: int) -> ClipCaptionModel:
    torch.manual_seed(seed)
    gpt = tiny_lm(tokenizer, seed=seed)
    return ClipCaptionModel(gpt, prefix_length=4, clip_length=3, prefix_size=24, num_layers=2,
                            mapping=mapping).eval()


@pytest.mark.parametrize("mapping", ["mlp", "transformer"])
@pytest.mark.parametrize("with_gpt", [True, False, "bare"], ids=["ClipCaptionModel", "ClipCaptionPrefix", "mapper"])
def test_imported_checkpoint_gives_the_reference_logits(tokenizer, parts, tmp_path, mapping, with_gpt):
    reference = _reference(tokenizer, mapping, seed=11 if with_gpt is True else 5)
    state = reference.state_dict()
    if with_gpt is True:  # as old transformers wrote it, with the causal-mask buffers in the file
        state["gpt.transformer.h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
    elif with_gpt == "bare":  # the mapper's own state dict, torch.save(model.clip_project.state_dict())
        state = reference.clip_project.state_dict()
    else:  # mapper-only file: GPT-2 comes from --lm (the tiny LM saved with the same seed 5)
        state = {k: v for k, v in state.items() if k.startswith("clip_project.")}
    _assert_imports_as(reference, state, mapping, tokenizer, parts, tmp_path)


def test_checkpoint_saved_from_data_parallel_imports(tokenizer, parts, tmp_path):
    # a model trained under nn.DataParallel / DDP and saved unwrapped keeps the "module." prefix
    reference = _reference(tokenizer, "mlp", seed=11)
    state = {f"module.{k}": v for k, v in reference.state_dict().items()}
    _assert_imports_as(reference, state, "mlp", tokenizer, parts, tmp_path)


def _assert_imports_as(reference: ClipCaptionModel, state: dict, mapping: str, tokenizer, parts, tmp_path) -> None:
    lm_dir, clip = parts
    checkpoint = tmp_path / "clipcap.pt"
    torch.save(state, checkpoint)
    result = CliRunner().invoke(import_job.main, [
        str(checkpoint), "--lm", str(lm_dir), "--clip", clip, "--mapper", mapping, "--prefix-length", "4",
        "--out", str(tmp_path / "bundle")])
    assert result.exit_code == 0, result.output
    bundle = load_bundle(tmp_path / "bundle")
    assert bundle.captioner.config.clip_length == 3 or mapping == "mlp"
    prefix = torch.randn(3, 24)
    tokens = torch.randint(2, len(tokenizer), (3, 7))
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, -2:] = 0
    with torch.inference_mode():
        expected = reference(tokens, prefix, mask).logits
        got = bundle.captioner(prefix, tokens, mask[:, 4:])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_unknown_keys_and_wrong_shapes_are_named(tokenizer, parts, tmp_path):
    lm_dir, clip = parts
    state = _reference(tokenizer, "mlp", seed=1).state_dict()
    bad = dict(state, **{"optimizer.step": torch.zeros(1)})
    torch.save(bad, tmp_path / "unknown.pt")
    with pytest.raises(ModelLoadError, match=r"unknown\.pt: not a ClipCap checkpoint \(unknown keys optimizer"):
        import_clipcap(tmp_path / "unknown.pt", str(lm_dir), clip, "mlp", 4, tmp_path / "b1")
    torch.save(state, tmp_path / "ok.pt")
    expected = r"ok\.pt \(clip_project\.\*\): wrong shapes .*model\.2\.weight \[128, 64\] \(model needs \[160, 80\]\)"
    with pytest.raises(ModelLoadError, match=expected):
        import_clipcap(tmp_path / "ok.pt", str(lm_dir), clip, "mlp", 5, tmp_path / "b2")


class _Exploit:
    def __reduce__(self):
        return (Path.touch, (Path(__file__).with_name("PWNED"),))


def test_malicious_pickle_is_not_executed_and_cli_prints_one_line(tmp_path, parts):
    lm_dir, clip = parts
    marker = Path(__file__).with_name("PWNED")
    marker.unlink(missing_ok=True)
    evil, junk = tmp_path / "evil.pt", tmp_path / "junk.pt"
    torch.save({"clip_project.model.0.weight": _Exploit()}, evil)
    junk.write_bytes(b"junk\n")  # fails inside torch's unpickler with a KeyError
    for checkpoint in (evil, junk):
        proc = subprocess.run(
            [sys.executable, str(ROOT / "jobs" / "import_clipcap.py"), str(checkpoint), "--lm", str(lm_dir),
             "--clip", clip, "--mapper", "mlp", "--prefix-length", "4", "--out", str(tmp_path / "b")],
            capture_output=True, text=True, timeout=120)
        assert not marker.exists()
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert proc.stderr.strip().count("\n") == 0 and "not a loadable weights-only checkpoint" in proc.stderr


def test_a_separate_scorer_is_stored_and_loaded(tokenizer, parts, tmp_path):
    lm_dir, clip = parts
    torch.save(_reference(tokenizer, "mlp", seed=5).state_dict(), tmp_path / "c.pt")
    manifest = import_clipcap(tmp_path / "c.pt", str(lm_dir), clip, "mlp", 4, tmp_path / "b", scorer=clip)
    assert manifest["scorer"]["arch"] == "local-dir:scorer_open_clip"  # copied in: the bundle stands alone
    shutil.rmtree(clip.removeprefix("local-dir:"))
    bundle = load_bundle(tmp_path / "b")
    assert bundle.scorer is not bundle.encoder
    pixels = torch.randint(0, 256, (1, 32, 32, 3), dtype=torch.uint8)
    with torch.inference_mode():
        assert torch.allclose(bundle.scorer.encode_images(pixels), bundle.encoder.encode_images(pixels))


@pytest.mark.parametrize("normalize_prefix", [False, True], ids=["raw_features", "normalize_prefix"])
def test_captioning_feeds_the_imported_mapper_what_clipcap_trained_it_on(tokenizer, parts, tmp_path,
                                                                        normalize_prefix):
    """The original ClipCap trained its mappers on CLIP's image features as encode_image returns them (a norm
    near 10 for ViT-B/32), L2-normalized only under --normalize_prefix: an imported bundle captions as the
    reference model does on those features, not on the unit vectors this project's own captioners take."""
    lm_dir, clip = parts
    reference = _reference(tokenizer, "mlp", seed=11)
    torch.save(reference.state_dict(), tmp_path / "c.pt")
    import_clipcap(tmp_path / "c.pt", str(lm_dir), clip, "mlp", 4, tmp_path / "b", normalize_prefix=normalize_prefix)
    bundle = load_bundle(tmp_path / "b")
    with torch.no_grad():
        bundle.encoder.clip.visual.proj.mul_(10)  # a random tower's features are near unit length; CLIP's are not
    pixels = torch.randint(0, 256, (6, 32, 32, 3), dtype=torch.uint8)
    settings = GenerationSettings(max_new_tokens=8)

    def reference_captions(features: torch.Tensor) -> list[str]:
        prefix = reference.clip_project(features).view(len(features), 4, -1)
        return decode_texts(bundle.captioner, [c[0] for c in generate(bundle.captioner, prefix, settings)])

    with torch.inference_mode():
        features = bundle.encoder.clip.encode_image(bundle.encoder.normalize_pixels(pixels))
        assert features.norm(dim=-1).min() > 3
        unit = torch.nn.functional.normalize(features, dim=-1)
        expected, other = (unit, features) if normalize_prefix else (features, unit)
        assert caption_batch(bundle, pixels, settings).captions == reference_captions(expected) \
            != reference_captions(other)
