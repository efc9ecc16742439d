"""Text towers made from Hugging Face models (a causal LM, an encoder): pooling, padding, causality."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_lm, tiny_xlm_roberta

from pipeline.models.errors import ModelLoadError
from pipeline.models.text_tower import LAST, MEAN, PADDING, create_text_tower, read_text_tower_config

TEXTS = ["Kare.", "Solda küçük mavi bir kare, sağda büyük kırmızı bir daire var."]


def _gpt2_folder(tokenizer, folder: Path) -> Path:
    tiny_lm(tokenizer).save_pretrained(folder)  # a GPT-2 pads with its eos, when it pads at all
    tokenizer.save_pretrained(folder)
    return folder


def _xlm_roberta_folder(folder: Path) -> Path:
    from transformers import XLMRobertaConfig, XLMRobertaModel

    tiny_xlm_roberta(folder)
    torch.manual_seed(0)
    XLMRobertaModel(XLMRobertaConfig.from_pretrained(folder)).save_pretrained(folder)
    return folder


def test_a_causal_lm_reads_each_text_up_to_its_appended_eos_whatever_the_padding(tokenizer, tmp_path):
    """GPT-2 attends causally: pooled at the eos appended to each text, which pads with no vocabulary id, so a
    short text embeds the same alone and beside a long one (padding with the eos id, as its tokenizer would,
    read the padding as text)."""
    clip, reader = create_text_tower(_gpt2_folder(tokenizer, tmp_path / "gpt2"), output_dim=8)
    assert clip.text.pooling == LAST and reader.append_eos
    ids = reader(TEXTS)
    short = (ids[0] != PADDING).sum()
    assert ids[0, short - 1] == tokenizer.eos_token_id and (ids[0, short:] == PADDING).all() and short < ids.shape[1]
    with torch.no_grad():
        together = clip.encode_text(ids)
        alone = torch.cat([clip.encode_text(reader([text])) for text in TEXTS])
        hidden = clip.text.backbone(input_ids=reader(TEXTS[:1])).last_hidden_state
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone[0], clip.text.proj(hidden[0, -1]), atol=1e-5, rtol=1e-5)


def test_an_encoder_mean_pools_its_tokens_whatever_the_padding(tmp_path):
    clip, reader = create_text_tower(_xlm_roberta_folder(tmp_path / "xlmr"), output_dim=8)
    assert clip.text.pooling == MEAN and not reader.append_eos
    ids = reader(TEXTS)
    assert ids[0, 0] == reader.tokenizer.cls_token_id  # the encoder's own special tokens
    with torch.no_grad():
        together = clip.encode_text(ids)
        alone = torch.cat([clip.encode_text(reader([text])) for text in TEXTS])
        hidden = clip.text.backbone(input_ids=reader(TEXTS[:1])).last_hidden_state
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone[0], clip.text.proj(hidden[0].mean(dim=0)), atol=1e-5, rtol=1e-5)


def test_long_texts_are_cut_to_the_context_length_and_keep_their_eos(tokenizer, tmp_path):
    clip, reader = create_text_tower(_gpt2_folder(tokenizer, tmp_path / "gpt2"), output_dim=8, context_length=6)
    ids = reader([TEXTS[1] * 3, ""])
    assert ids.shape == (2, 6) and ids[0, -1] == tokenizer.eos_token_id and ids[1, 0] == tokenizer.eos_token_id
    with torch.no_grad():
        assert torch.isfinite(clip.encode_text(ids)).all()


def test_a_folder_that_holds_no_model_is_one_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="cannot load text tower"):
        read_text_tower_config(tmp_path / "empty")
    with pytest.raises(ModelLoadError, match="cannot load text tower"):
        create_text_tower(tmp_path / "empty", output_dim=8)
