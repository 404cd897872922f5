"""Dequantize a llama-architecture GGUF file once into a Hugging Face folder.

The folder (config.json, model.safetensors in float32, tokenizer files) is cached, so
later loads read safetensors instead of dequantizing again. llama.cpp stores Q and K
projections with rows permuted for its RoPE layout; we undo that permutation so the
weights follow the Hugging Face (rotate-half) convention our model and `transformers` use.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from kvcache.errors import ModelFormatError
from kvcache.models.gguf_file import (check_rope_factors, file_fingerprint, hf_tensor_name, rope_heads,
                                      unpermute_rope_rows)


def field(reader, key: str, default=None):
    """A metadata value of the GGUF, or `default`."""
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def read_gguf(path: Path):
    """A `gguf.GGUFReader` for a llama-architecture file (ModelFormatError otherwise)."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # gguf raises ValueError, struct errors, IndexError, ...
        raise ModelFormatError(f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc}).") from None
    arch = field(reader, "general.architecture")
    if arch != "llama":
        raise ModelFormatError(f"{path} holds a '{arch}' model; only the llama architecture is supported in GGUF.")
    return reader


def gguf_hf_config(reader, vocab_size: int, has_output: bool, bos: int | None, eos: int | None) -> dict:
    """A Hugging Face LlamaConfig dict from the GGUF metadata."""
    a = "llama."
    hidden = int(field(reader, a + "embedding_length"))
    heads = int(field(reader, a + "attention.head_count"))
    theta = float(field(reader, a + "rope.freq_base", 10000.0))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": int(field(reader, a + "feed_forward_length")),
        "num_hidden_layers": int(field(reader, a + "block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(field(reader, a + "attention.head_count_kv", heads)),
        "head_dim": int(field(reader, a + "rope.dimension_count", hidden // heads)),
        "max_position_embeddings": int(field(reader, a + "context_length", 2048)),
        "rms_norm_eps": float(field(reader, a + "attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "tie_word_embeddings": not has_output,
        "attention_bias": False,
        "mlp_bias": False,
        "hidden_act": "silu",
        "bos_token_id": bos,
        "eos_token_id": eos,
        "torch_dtype": "float32",
    }


@contextmanager
def folder_written_atomically(out_dir: Path):
    """Yield a fresh scratch folder beside `out_dir`; when the block ends it replaces `out_dir`
    whole, and if the block raises it is removed (readers never see a half-written folder)."""
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def convert_gguf(path: Path, out_dir: Path, progress: bool = True) -> Path:
    """Dequantize `path` into an HF folder at `out_dir` (written atomically) and return it."""
    import gguf
    import torch
    from safetensors.torch import save_file

    reader = read_gguf(path)
    check_rope_factors(path, {t.name for t in reader.tensors})
    heads = int(field(reader, "llama.attention.head_count"))
    kv_heads = int(field(reader, "llama.attention.head_count_kv", heads))
    with folder_written_atomically(out_dir) as tmp:
        tensors: dict[str, torch.Tensor] = {}
        names = [t.name for t in reader.tensors]
        iterator = reader.tensors
        if progress:
            from rich.progress import track

            iterator = track(reader.tensors, description=f"Dequantizing {path.name} (once)", transient=True)
        for t in iterator:
            try:
                arr = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
            except Exception as exc:
                raise ModelFormatError(f"{path} has an unreadable tensor {t.name} ({exc}).") from None
            hf_name = hf_tensor_name(t.name)
            if hf_name is None:
                continue
            rope = rope_heads(t.name, heads, kv_heads)
            if rope:
                arr = unpermute_rope_rows(arr, rope)
            tensors[hf_name] = torch.from_numpy(np.array(arr, dtype=np.float32, order="C"))
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})

        tokenizer = convert_tokenizer(path, tmp)
        vocab = int(tensors["model.embed_tokens.weight"].shape[0])
        cfg = gguf_hf_config(reader, vocab, "output.weight" in names, tokenizer.bos_token_id, tokenizer.eos_token_id)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        (tmp / "kvcache-source.json").write_text(json.dumps({"gguf": str(path), "fingerprint": file_fingerprint(path)}))
    return out_dir


def convert_tokenizer(path: Path, out_dir: Path):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as exc:
        raise ModelFormatError(f"Could not read the tokenizer from {path} ({exc}).") from None
    tok.save_pretrained(str(out_dir))
    return tok


def gguf_config(path: Path) -> dict:
    """The HF config dict a GGUF file describes, read from its metadata alone (no tensors)."""
    reader = read_gguf(path)
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = int(field(reader, "llama.vocab_size", len(tokens.data) if tokens is not None else 0))
    names = {t.name for t in reader.tensors}
    return gguf_hf_config(reader, vocab, "output.weight" in names, None, None)
