"""Tiny real models built and saved by the tests themselves: no weights can be downloaded here."""

from __future__ import annotations

import json
import os
from pathlib import Path

import open_clip
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from pipeline.models.captioner import CaptionerConfig, PrefixCaptioner
from pipeline.models.clip import ClipModel
from pipeline.models.clip_factory import CUSTOM, ClipSpec, create_clip
from pipeline.models.text_tokenizers import train_bpe_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TURKISH_SENTENCES = [
    "Resimde büyük bir kırmızı daire var.",
    "Solda küçük mavi bir kare duruyor.",
    "Sağdaki yeşil üçgen dairenin altında.",
    "İki sarı yıldız ortada görünüyor.",
    "Kalbin üstünde mor bir altıgen var.",
    "Işık, ağaç, çiçek, göğüs, şişe, öğrenci, ılık, İzmir.",
] * 20


@pytest.fixture(scope="session")
def tokenizer():
    return train_bpe_tokenizer(TURKISH_SENTENCES, vocab_size=400)


def tiny_lm(tokenizer, n_embd: int = 32, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=n_embd, n_layer=2, n_head=4,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                        tie_word_embeddings=False, initializer_range=0.3)
    return GPT2LMHeadModel(config).eval()


def tiny_clip_config(vocab_size: int, embed_dim: int = 24, image_size: int = 32) -> dict:
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": image_size, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": vocab_size, "width": 32, "heads": 2, "layers": 2,
                     "pool_type": "eos", "eos_id": 1},
    }


def tiny_clip(tokenizer, tmp_path: Path, seed: int = 0) -> tuple[ClipModel, ClipSpec]:
    """A custom open_clip CLIP with the project's own text tokenizer, saved so it can be reloaded."""
    torch.manual_seed(seed)
    tmp_path.mkdir(parents=True, exist_ok=True)
    tokenizer_file = tmp_path / "clip_tokenizer.json"
    tokenizer.backend_tokenizer.save(str(tokenizer_file))
    spec = ClipSpec(arch=CUSTOM, config=tiny_clip_config(len(tokenizer)), tokenizer=tokenizer_file.name)
    return create_clip(spec, tmp_path), spec


def tiny_captioner(tokenizer, mapper: str = "mlp", prefix_dim: int = 24, seed: int = 0,
                   **config) -> PrefixCaptioner:
    lm = tiny_lm(tokenizer, seed=seed)
    torch.manual_seed(seed + 1)
    cfg = CaptionerConfig(mapper=mapper, prefix_dim=prefix_dim, prefix_length=4, clip_length=3, num_layers=2,
                          **config)
    return PrefixCaptioner(cfg, lm, tokenizer).eval()


MULTILINGUAL_CONTEXT = 32  # the tiny XLM-R tokenizer's length (text_cfg.context_length)
MULTILINGUAL_PREPROCESS = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], "interpolation": "bilinear",
                           "resize_mode": "shortest"}


def tiny_xlm_roberta(folder: Path) -> Path:
    """A tiny XLM-RoBERTa text tower's config.json and tokenizer files, as xlm-roberta-base has them on the hub
    (no weights: a CLIP checkpoint holds them); its Unigram tokenizer is trained on Turkish, XLM-R's special ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import XLMRobertaConfig, XLMRobertaTokenizer

    unigram = Tokenizer(models.Unigram())
    unigram.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    unigram.train_from_iterator(TURKISH_SENTENCES, trainers.UnigramTrainer(
        vocab_size=200, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"], unk_token="<unk>",
        show_progress=False))
    vocab = [tuple(piece) for piece in json.loads(unigram.to_str())["model"]["vocab"]]
    tokenizer = XLMRobertaTokenizer(vocab=vocab, model_max_length=MULTILINGUAL_CONTEXT)
    # RoBERTa's positions start after the pad id (room for open_clip's default 77 tokens); open_clip masks the
    # tower's input where it is the pad id
    XLMRobertaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=77 + 2, type_vocab_size=1,
                     pad_token_id=tokenizer.pad_token_id, bos_token_id=0, eos_token_id=2).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_multilingual_config(text_tower: str) -> dict:
    """An open_clip model_cfg shaped as xlm-roberta-base-ViT-B-32's, tiny: a ViT at 48 px and the Hugging Face
    text tower `text_tower` (a hub name or folder), mean-pooled and projected by an MLP."""
    return {"embed_dim": 16,
            "vision_cfg": {"image_size": 48, "patch_size": 16, "width": 32, "layers": 1, "head_width": 16},
            "text_cfg": {"hf_model_name": text_tower, "hf_tokenizer_name": text_tower, "hf_pooler_type": "mean_pooler",
                         "hf_proj_type": "mlp", "context_length": MULTILINGUAL_CONTEXT}}


def tiny_multilingual_clip(text_tower: str, seed: int = 0) -> torch.nn.Module:
    """open_clip's CustomTextCLIP of `tiny_multilingual_config`, random weights, MULTILINGUAL_PREPROCESS."""
    torch.manual_seed(seed)
    config = tiny_multilingual_config(text_tower)
    config["text_cfg"]["hf_model_pretrained"] = False  # the tower's config only: no transformers weights
    clip = open_clip.CustomTextCLIP(**config).eval()
    open_clip.model.set_model_preprocess_cfg(clip, {**MULTILINGUAL_PREPROCESS, "size": 48})
    return clip


def tiny_multilingual_folder(root: Path, seed: int = 0) -> tuple[Path, torch.nn.Module]:
    """An open_clip folder as a user keeps a multilingual CLIP (root/tiny-scorer: a name that says nothing of its
    languages): open_clip_config.json naming the text tower ".", open_clip_model.safetensors, and the tower's
    config.json and tokenizer files beside them. Returns the folder and the model it holds."""
    from safetensors.torch import save_file

    folder = tiny_xlm_roberta(root / "tiny-scorer")
    clip = tiny_multilingual_clip(str(folder), seed)
    (folder / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": tiny_multilingual_config("."), "preprocess_cfg": MULTILINGUAL_PREPROCESS}))
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return folder, clip


@pytest.fixture(scope="session")
def tiny_bundle(tokenizer, tmp_path_factory) -> Path:
    """A complete random-weight bundle (32x32 custom CLIP + 2-layer GPT-2), saved to disk."""
    from pipeline.models.bundle import save_bundle

    root = tmp_path_factory.mktemp("tiny_bundle")
    clip, spec = tiny_clip(tokenizer, root / "src")
    save_bundle(root / "bundle", clip, spec, tiny_captioner(tokenizer), name="tiny")
    return root / "bundle"


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray instance for the tests that run the pipeline in-process. Module-scoped and started
    on demand: the cluster tests shut it down to start their own clusters."""
    import ray

    if not ray.is_initialized():
        # address="local": always a fresh instance, even when a Ray head runs on this machine
        ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False,
                 runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}})
        ray.data.DataContext.get_current().enable_progress_bars = False
    return ray


def jpeg_bytes(seed: int, size: tuple[int, int] = (48, 40)) -> bytes:
    """A distinct JPEG per seed (noise over a seed-dependent colour), so no two images tie in score."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = (rng.integers(0, 256, 3) * 0.7 + rng.integers(0, 77, (size[1], size[0], 3))).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def write_tar(path: Path, samples: dict[str, dict[str, bytes]]) -> Path:
    """A WebDataset shard in img2dataset's layout: KEY.jpg, KEY.txt, KEY.json members."""
    import io
    import tarfile

    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, members in samples.items():
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def tar_corpus(root: Path, shards: int = 2, per_shard: int = 5) -> list[Path]:
    """Shards 00000.tar... of distinct JPEGs keyed SSSIIII (shard, index), with .txt and .json members."""
    import json

    paths = []
    for s in range(shards):
        samples = {}
        for i in range(per_shard):
            key = f"{s:03d}{i:04d}"
            samples[key] = {"jpg": jpeg_bytes(s * 100 + i),
                            "txt": f"örnek {key}".encode(), "json": json.dumps({"key": key}).encode()}
        paths.append(write_tar(root / f"{s:05d}.tar", samples))
    return paths


def read_parts(folder: Path):
    """The Parquet parts of an output folder (captions/, filtered/) as one table, in part order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pa.concat_tables([pq.read_table(path) for path in sorted(folder.glob("*.parquet"))])
