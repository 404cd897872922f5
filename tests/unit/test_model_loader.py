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


def test_a_lazy_matrix_is_read_by_rows_and_quantizes_as_the_whole_tensor(tiny_model_dir, monkeypatch):
    from kvcache.models import packed_tiles
    from kvcache.models import weight_packing as wp
    from kvcache.models.loader import LazyMatrix

    lazy = load_model(str(tiny_model_dir), progress=False, quantization="int8").state_dict
    eager = load_model(str(tiny_model_dir), progress=False).state_dict
    name = "model.embed_tokens.weight"
    matrix = lazy[name]
    assert isinstance(matrix, LazyMatrix) and matrix.shape == tuple(eager[name].shape)
    assert isinstance(lazy["model.norm.weight"], torch.Tensor)  # vectors come whole
    monkeypatch.setattr(packed_tiles, "ROWS_AT_ONCE", 40)  # blocks of 32 rows (whole tiles), the last one short
    reads = []
    real = LazyMatrix.__getitem__
    monkeypatch.setattr(LazyMatrix, "__getitem__", lambda self, rows: reads.append(rows) or real(self, rows))
    for quantize in (wp.quantize_int8, wp.quantize_table, wp.quantize_int4):
        reads.clear()
        assert torch.equal(quantize(matrix).data, quantize(eager[name]).data)
        assert len(reads) == -(-matrix.shape[0] // 32)  # never the whole matrix at once


def test_a_lazy_state_dict_reads_bf16_and_f16_and_refuses_other_types_in_one_sentence(tmp_path):
    from safetensors.torch import save_file

    from kvcache.models.loader import LazyStateDict

    torch.manual_seed(0)
    tensors = {"a.weight": torch.randn(5, 7).to(torch.bfloat16), "b.weight": torch.randn(3, 4).half(),
               "c.bias": torch.randn(6), "d.scale": torch.randn(2, 3, 4)}
    save_file(tensors, str(tmp_path / "w.safetensors"))
    lazy = LazyStateDict([tmp_path / "w.safetensors"])
    assert torch.equal(lazy["a.weight"][1:4], tensors["a.weight"][1:4])
    assert torch.equal(lazy["b.weight"][0:3], tensors["b.weight"])
    assert torch.equal(lazy["c.bias"], tensors["c.bias"]) and torch.equal(lazy["d.scale"], tensors["d.scale"])
    save_file({"ids": torch.arange(4)}, str(tmp_path / "ints.safetensors"))
    with pytest.raises(ModelFormatError, match="holds ids as I64; float weights are F32, BF16 or F16"):
        LazyStateDict([tmp_path / "ints.safetensors"])
