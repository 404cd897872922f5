"""Loading a model folder: the tokenizer as AutoTokenizer gives it, and a state dict consumed
while the model is built."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from kvcache.errors import ModelFormatError
from kvcache.models.llama import LlamaModel
from kvcache.models.loader import load_model, load_tokenizer
from kvcache.models.step import StepInputs

TEXTS = ["Hello world", "The cat sat on the mat.", "  spaces\tand\nlines  ", "<|im_start|>user"]


def _auto(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def test_the_plain_fast_class_loads_the_same_tokenizer_as_auto(tiny_model_dir):
    assert json.loads((tiny_model_dir / "tokenizer_config.json").read_text())["tokenizer_class"] == "TokenizersBackend"
    ours, auto = load_tokenizer(tiny_model_dir), _auto(tiny_model_dir)
    assert type(ours) is type(auto)
    assert [ours.encode(t) for t in TEXTS] == [auto.encode(t) for t in TEXTS]
    chat = [{"role": "user", "content": "hi"}]
    assert ours.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
        auto.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert (ours.eos_token_id, ours.pad_token_id, len(ours)) == (auto.eos_token_id, auto.pad_token_id, len(auto))


def test_another_named_class_goes_through_auto(tiny_model_dir, tmp_path):
    folder = tmp_path / "gpt2-named"
    shutil.copytree(tiny_model_dir, folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**cfg, "tokenizer_class": "GPT2Tokenizer"}))
    ours = load_tokenizer(folder)
    assert type(ours) is type(_auto(folder)) and type(ours).__name__ == "GPT2Tokenizer"


def test_a_folder_without_a_tokenizer_is_one_sentence(tmp_path):
    with pytest.raises(ModelFormatError, match="Could not load the tokenizer"):
        load_tokenizer(tmp_path)


def test_a_consumed_state_dict_builds_the_same_model_and_ends_empty(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir), progress=False)
    kept = LlamaModel.from_state_dict(loaded.config, dict(loaded.state_dict), torch.float32, "cpu")
    sd = dict(loaded.state_dict)
    consumed = LlamaModel.from_state_dict(loaded.config, sd, torch.float32, "cpu", consume=True)
    assert not sd  # every tensor the model uses was taken
    ids = torch.tensor([[3, 9, 27, 4, 11]])  # (1, 5)
    step = StepInputs(ids, None, 0, None, logits_for="all")
    assert torch.equal(kept.forward(step, None), consumed.forward(step, None))


def test_a_lazy_state_dict_is_consumed_too(tiny_model_dir):
    lazy = load_model(str(tiny_model_dir), progress=False, quantization="int8").state_dict
    model = LlamaModel.from_state_dict(load_model(str(tiny_model_dir), progress=False).config, lazy, torch.float32,
                                       "cpu", quantization="int8", consume=True)
    assert len(lazy) == 0 and model.quantization == "int8"
