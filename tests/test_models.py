"""The three models as plain torch modules: shapes, loss masking, CLIP loading paths, scoring."""

from __future__ import annotations

import json
import pickle
import shutil
import zipfile

import numpy as np
import open_clip
import pytest
import torch
from conftest import tiny_captioner, tiny_clip, tiny_clip_config, tiny_lm
from safetensors.torch import save_file

from pipeline.config import GenerationSettings
from pipeline.generation.captioning import caption_batch
from pipeline.io.images import ImageSpec
from pipeline.models import clip as clip_module
from pipeline.models.bundle import Bundle, load_bundle, save_bundle
from pipeline.models.captioner import CaptionerConfig, MLPMapper, PrefixCaptioner, TransformerMapper
from pipeline.models.clip import ClipModel
from pipeline.models.clip_factory import ClipSpec, create_clip
from pipeline.models.errors import ModelLoadError


def test_mlp_mapper_has_clipcap_sizes():
    mapper = MLPMapper(prefix_dim=512, embed_dim=768, prefix_length=10)
    shapes = [tuple(p.shape) for p in mapper.parameters()]
    assert shapes == [(3840, 512), (3840,), (7680, 3840), (7680,)]
    assert mapper(torch.zeros(2, 512)).shape == (2, 10, 768)


def test_transformer_mapper_outputs_prefix_length_tokens():
    mapper = TransformerMapper(prefix_dim=24, embed_dim=32, prefix_length=5, clip_length=3, num_layers=2)
    assert mapper(torch.randn(2, 24)).shape == (2, 5, 32)


def test_the_captioner_computes_gpt2_s_gelu_new_in_one_kernel_with_the_same_outputs(tokenizer):
    lm = tiny_lm(tokenizer).double()
    assert lm.config.activation_function == "gelu_new"
    tokens = torch.tensor([[5, 6, 7, 8, 9]])
    before = lm(tokens).logits
    ops = {type(module).__name__ for module in lm.modules()}
    captioner = PrefixCaptioner(CaptionerConfig(prefix_dim=24, prefix_length=4), lm, tokenizer)
    after = {type(module).__name__ for module in captioner.lm.modules()}
    assert "NewGELUActivation" in ops and "NewGELUActivation" not in after and "GELUTanh" in after
    assert torch.allclose(captioner.lm(tokens).logits, before, atol=1e-12)


def test_caption_loss_is_only_on_caption_tokens(tokenizer):
    captioner = tiny_captioner(tokenizer).double()
    embeddings = torch.randn(2, 24, dtype=torch.float64)
    tokens = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    loss = captioner.caption_loss(embeddings, tokens, mask)
    logits = captioner(embeddings, tokens, mask)
    prefix_length = captioner.config.prefix_length
    manual = [-logits[b, prefix_length - 1 + t].log_softmax(-1)[tokens[b, t]]
              for b in range(2) for t in range(4) if mask[b, t]]
    assert torch.allclose(loss.double(), torch.stack(manual).mean())
    changed_padding = tokens.masked_fill(mask == 0, 42)
    assert torch.allclose(captioner.caption_loss(embeddings, changed_padding, mask), loss)
    changed_caption = tokens.clone()
    changed_caption[0, 1] = 11
    assert not torch.allclose(captioner.caption_loss(embeddings, changed_caption, mask), loss)


def test_custom_clip_embeddings_are_normalized_and_match_open_clip_preprocessing(tokenizer, tmp_path):
    clip, _ = tiny_clip(tokenizer, tmp_path)
    pixels = torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8)
    embeddings = clip.encode_images(pixels)
    assert embeddings.shape == (3, 24)
    assert torch.allclose(embeddings.norm(dim=-1), torch.ones(3), atol=1e-5)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    expected = (pixels.permute(0, 3, 1, 2).float() / 255 - mean) / std
    assert torch.allclose(clip.normalize_pixels(pixels), expected, atol=1e-5)
    texts = clip.encode_texts(["kırmızı daire", "mavi kare"])
    assert torch.allclose(texts.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_on_cpu_the_towers_take_a_large_batch_in_chunks_with_the_same_embeddings(tokenizer, tmp_path, monkeypatch):
    clip, _ = tiny_clip(tokenizer, tmp_path)
    pixels = torch.randint(0, 256, (5, 32, 32, 3), dtype=torch.uint8)
    texts = ["solda sarı bir yıldız ve sağda mor bir kare", "kare", "iki yeşil üçgen ve bir mavi daire", "kalp",
             "üstte kırmızı bir daire"]
    whole_images, whole_texts = clip.encode_images(pixels), clip.encode_texts(texts)
    monkeypatch.setattr(clip_module, "CPU_CHUNK", 2)
    passes = []
    hooks = [tower.register_forward_hook(lambda _, args, __: passes.append(tuple(args[0].shape[:2])))
             for tower in (clip.clip.visual, clip.clip.transformer)]
    images, text_embeddings = clip.encode_images(pixels), clip.encode_texts(texts)
    for hook in hooks:
        hook.remove()
    assert [rows for rows, _ in passes] == [2, 2, 1, 2, 2, 1]
    # texts go shortest first: the two one-word texts pass together, trimmed to their own length
    text_lengths = [length for _, length in passes[3:]]
    assert text_lengths == sorted(text_lengths) and text_lengths[0] < text_lengths[-1]
    assert torch.allclose(images, whole_images, atol=1e-6) and torch.allclose(text_embeddings, whole_texts, atol=1e-6)


def _small_openai_style_clip() -> ClipModel:
    """open_clip's CLIP with OpenAI's tokenizer (77 tokens, pooled at the highest id: the end token)."""
    config = tiny_clip_config(49408)
    config["text_cfg"] = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}
    torch.manual_seed(0)
    return ClipModel(open_clip.CLIP(**config).eval(), open_clip.get_tokenizer("ViT-B-32"), ImageSpec(size=32),
                     open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)


@pytest.mark.parametrize("kind", ["openai_argmax_pool", "custom_eos_pool"])
def test_texts_are_encoded_only_up_to_the_batch_s_last_pooled_token(tokenizer, tmp_path, kind):
    """The scorer's text tower runs on the batch's longest caption, not the padded context, and gives the
    embeddings of the whole context (open_clip's own encode_text)."""
    clip = _small_openai_style_clip() if kind == "openai_argmax_pool" else tiny_clip(tokenizer, tmp_path)[0]
    texts = ["kırmızı daire", "solda büyük bir mavi kare", "kare"]
    lengths = []
    hook = clip.clip.transformer.register_forward_hook(lambda module, args, out: lengths.append(args[0].shape[1]))
    with torch.inference_mode():
        trimmed = clip.encode_texts(texts)
        full = torch.nn.functional.normalize(clip.clip.encode_text(clip.tokenizer(texts)), dim=-1)
    hook.remove()
    assert torch.allclose(trimmed, full, atol=1e-5)
    longest = max(len(row.nonzero()) for row in clip.tokenizer(texts))  # with its start and end tokens
    assert lengths[0] == longest < clip.clip.context_length


def test_named_architecture_loads_a_local_weights_file(tmp_path):
    """An open_clip name + a local .pt state dict (loaded with weights_only=True) reproduces the model."""
    torch.manual_seed(0)
    original = open_clip.create_model("ViT-B-32").eval()
    weights = tmp_path / "vit_b32.pt"
    torch.save(original.state_dict(), weights)
    loaded = create_clip(ClipSpec.parse(f"ViT-B-32:{weights}"))
    assert loaded.image_spec.size == 224
    pixels = torch.randint(0, 256, (1, 224, 224, 3), dtype=torch.uint8)
    with torch.inference_mode():
        expected = torch.nn.functional.normalize(original.encode_image(loaded.normalize_pixels(pixels)), dim=-1)
        assert torch.allclose(loaded.encode_images(pixels), expected, atol=1e-5)
        tokens = open_clip.get_tokenizer("ViT-B-32")(["bir kedi"])
        assert torch.allclose(loaded.encode_texts(["bir kedi"]),
                              torch.nn.functional.normalize(original.encode_text(tokens), dim=-1), atol=1e-5)
    # open_clip would interpolate 224 px weights to ViT-B-32-256's grid, only logging it: features differ
    with pytest.raises(ModelLoadError, match=r"image position embedding is \(50, 768\), the model's \(65, 768\)"):
        create_clip(ClipSpec.parse(f"ViT-B-32-256:{weights}"))
    # a checkpoint that pickles anything but tensors (an epoch file holding an object) is refused, never run
    torch.save({"state_dict": original.state_dict(), "args": _Pickled()}, tmp_path / "epoch_1.pt")
    with pytest.raises(ModelLoadError, match="refused: the checkpoint pickles more than tensors"):
        create_clip(ClipSpec.parse(f"ViT-B-32:{tmp_path / 'epoch_1.pt'}"))


class _Pickled:
    """A class no torch.load(weights_only=True) allows."""


def test_openai_torchscript_file_loads_without_torchscript_and_keeps_quick_gelu(tokenizer, tmp_path, monkeypatch):
    """OpenAI's original CLIP files (`clip.load`'s ViT-B-32.pt) are TorchScript archives of fp16 weights for
    QuickGELU models: named with the plain architecture they load, never through torch.jit.load or
    torch.load, with QuickGELU, and a bundle made from them keeps QuickGELU."""
    torch.manual_seed(0)
    original = open_clip.create_model("ViT-B-32-quickgelu").eval().half()
    archive = tmp_path / "ViT-B-32.pt"
    torch.jit.script(original).save(str(archive))
    original = original.float()

    def refuse(*args, **kwargs):
        raise AssertionError("the archive was handed to torch's own loaders")

    monkeypatch.setattr(torch.jit, "load", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    loaded = create_clip(ClipSpec.parse(f"ViT-B-32:{archive}"))
    assert clip_module.uses_quick_gelu(loaded.clip)
    assert not clip_module.uses_quick_gelu(create_clip(ClipSpec.parse("ViT-B-32")).clip)
    pixels = torch.randint(0, 256, (2, 224, 224, 3), dtype=torch.uint8)
    with torch.inference_mode():
        expected = torch.nn.functional.normalize(original.encode_image(loaded.normalize_pixels(pixels)), dim=-1)
        assert torch.allclose(loaded.encode_images(pixels), expected, atol=1e-5)

    manifest = save_bundle(tmp_path / "bundle", loaded, ClipSpec.parse(f"ViT-B-32:{archive}"),
                           tiny_captioner(tokenizer, prefix_dim=512), dtype=torch.float16)
    assert manifest["encoder"] == {"arch": "ViT-B-32", "weights": "encoder.safetensors", "quick_gelu": True}
    archive.unlink()
    reloaded = load_bundle(tmp_path / "bundle").encoder
    with torch.inference_mode():
        assert torch.allclose(reloaded.encode_images(pixels), expected, atol=1e-5)


def test_hostile_torchscript_archive_is_refused_without_running_anything(tmp_path):
    """A zip shaped like a TorchScript archive whose pickle calls os.system: one clear error, nothing run."""
    marker = tmp_path / "ran"
    payload = b"cos\nsystem\n(V" + f"touch {marker}".encode() + b"\ntR."
    archive = tmp_path / "ViT-B-32.pt"
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("model/data.pkl", payload)
        handle.writestr("model/constants.pkl", pickle.dumps(()))
    with pytest.raises(ModelLoadError, match=r"refusing os\.system") as info:
        create_clip(ClipSpec.parse(f"ViT-B-32:{archive}"))
    assert "\n" not in str(info.value) and not marker.exists()


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_transformers_clip_directory_loads_as_the_same_open_clip_model(tokenizer, tmp_path, act):
    """A Hugging Face CLIPModel folder (openai/clip-vit-base-patch32's layout, tiny here) is converted to open_clip's
    CLIP: the same image and text features as transformers computes, its preprocessing, and a bundle that keeps
    it without the folder."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(0)
    layers = {"intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "hidden_act": act}
    config = CLIPConfig(text_config={"vocab_size": 49408, "hidden_size": 32, "max_position_embeddings": 77, **layers},
                        vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 48, **layers},
                        projection_dim=24)
    reference = CLIPModel(config).eval()
    folder = tmp_path / "clip-vit-tiny"
    reference.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, resample=2,
                       image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.25, 0.25]).save_pretrained(folder)

    loaded = create_clip(ClipSpec.parse(str(folder)))
    assert clip_module.uses_quick_gelu(loaded.clip) == (act == "quick_gelu")
    assert loaded.image_spec.size == 32 and loaded.image_spec.interpolation == "bilinear"
    pixels = torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8)
    texts = ["a red circle", "two small blue squares on the left"]
    tokens = loaded.tokenizer(texts)
    with torch.inference_mode():
        normalized = loaded.normalize_pixels(pixels)
        assert torch.allclose(normalized[0, :, 0, 0], (pixels[0, 0, 0].float() / 255 - 0.5) / 0.25)
        expected_images = torch.nn.functional.normalize(
            reference.get_image_features(pixel_values=normalized).pooler_output, dim=-1)
        expected_texts = torch.nn.functional.normalize(reference.get_text_features(input_ids=tokens).pooler_output,
                                                       dim=-1)
        assert torch.allclose(loaded.encode_images(pixels), expected_images, atol=1e-5)
        assert torch.allclose(loaded.encode_texts(texts), expected_texts, atol=1e-5)

    manifest = save_bundle(tmp_path / "bundle", loaded, ClipSpec.parse(str(folder)),
                           tiny_captioner(tokenizer, prefix_dim=24))
    assert manifest["encoder"]["arch"] == "local-dir:encoder_open_clip"
    shutil.rmtree(folder)
    reloaded = load_bundle(tmp_path / "bundle").encoder
    assert reloaded.image_spec == loaded.image_spec
    with torch.inference_mode():
        assert torch.allclose(reloaded.encode_images(pixels), expected_images, atol=1e-5)
        assert torch.allclose(reloaded.encode_texts(texts), expected_texts, atol=1e-5)


def test_a_transformers_folder_that_is_not_a_clip_is_one_clear_error(tokenizer, tmp_path):
    tiny_lm(tokenizer).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ModelLoadError, match=r"cannot load CLIP .*gpt2.* with transformers: .*'gpt2' model") as info:
        create_clip(ClipSpec.parse(str(tmp_path / "gpt2")))
    assert "\n" not in str(info.value)


def test_local_dir_schema_loads_config_and_weights(tokenizer, tmp_path):
    config = tiny_clip_config(49408)
    config["text_cfg"] = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": config, "preprocess_cfg": {
        "size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "interpolation": "bilinear"}}))
    torch.manual_seed(0)
    reference = open_clip.CLIP(**config).eval()
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()},
              str(tmp_path / "open_clip_model.safetensors"))
    loaded = create_clip(ClipSpec.parse(f"local-dir:{tmp_path}"))
    assert loaded.image_spec.size == 32 and loaded.image_spec.interpolation == "bilinear"
    # the folder named as a plain path (a hub snapshot, as users name it) is the same model
    folder = json.loads((tmp_path / "open_clip_config.json").read_text())
    assert create_clip(ClipSpec.parse(str(tmp_path))).open_clip_config == loaded.open_clip_config == folder
    pixels = torch.full((1, 32, 32, 3), 128, dtype=torch.uint8)
    assert torch.allclose(loaded.normalize_pixels(pixels), torch.full((1, 3, 32, 32), (128 / 255 - 0.5) / 0.25))
    with torch.inference_mode():
        expected = torch.nn.functional.normalize(reference.encode_image(loaded.normalize_pixels(pixels)), dim=-1)
        assert torch.allclose(loaded.encode_images(pixels), expected, atol=1e-5)


@pytest.mark.parametrize("spec", ["NoSuchNet-1", "ViT-B-32:no-such-tag", ":openai"])
def test_bad_clip_names_raise_one_line(spec):
    with pytest.raises(ModelLoadError) as info:
        create_clip(ClipSpec.parse(spec))
    assert "\n" not in str(info.value)


def test_caption_batch_scores_candidates_and_picks_the_best(tokenizer, tmp_path):
    clip, _ = tiny_clip(tokenizer, tmp_path)
    bundle = Bundle(encoder=clip, captioner=tiny_captioner(tokenizer), scorer=clip, manifest={})
    pixels = torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8)
    settings = GenerationSettings(method="sample", num_candidates=4, max_new_tokens=6, seed=1)
    result = caption_batch(bundle, pixels, settings)
    assert len(result.captions) == 3 and result.image_embeddings.shape == (3, 24)
    for i, candidates in enumerate(result.candidates):
        assert len(candidates) == 4
        assert result.captions[i] == candidates[0][0]
        assert result.clip_scores[i] == pytest.approx(max(score for _, score in candidates), abs=1e-6)
        with torch.inference_mode():
            text = clip.encode_texts([result.captions[i]])[0].numpy()
        assert result.clip_scores[i] == pytest.approx(float(np.dot(result.image_embeddings[i], text)), abs=1e-5)
    assert result.original_scores is None  # none asked for


def test_caption_batch_scores_the_text_that_came_with_each_image(tokenizer, tmp_path):
    """original_clip_score: the scorer's cosine of the image and its own text (alt text), as for a caption."""
    clip, _ = tiny_clip(tokenizer, tmp_path)
    bundle = Bundle(encoder=clip, captioner=tiny_captioner(tokenizer), scorer=clip, manifest={})
    pixels = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8)
    settings = GenerationSettings(max_new_tokens=6)
    captions = caption_batch(bundle, pixels, settings).captions
    originals = [captions[0], None, "Solda küçük mavi bir kare duruyor.", ""]
    result = caption_batch(bundle, pixels, settings, original_texts=originals)
    assert result.original_scores.dtype == np.float32 and np.isnan(result.original_scores[[1, 3]]).all()
    assert result.original_scores[0] == pytest.approx(result.clip_scores[0], abs=1e-5)  # same text, same score
    with torch.inference_mode():
        text = clip.encode_texts([originals[2]])[0].numpy()
    assert result.original_scores[2] == pytest.approx(float(np.dot(result.image_embeddings[2], text)), abs=1e-5)
