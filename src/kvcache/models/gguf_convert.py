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
from pathlib import Path

import numpy as np

from kvcache.errors import ModelFormatError

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def file_fingerprint(path: Path) -> str:
    """Cheap content fingerprint: size + SHA-256 of the first and last MiB."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def unpermute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Invert llama.cpp's Q/K row permutation (interleaved pairs -> rotate-half halves)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def _read_gguf(path: Path):
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # gguf raises ValueError, struct errors, IndexError, ...
        raise ModelFormatError(f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc}).") from None
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ModelFormatError(f"{path} holds a '{arch}' model; only the llama architecture is supported in GGUF.")
    return reader


def gguf_hf_config(reader, vocab_size: int, has_output: bool, bos: int | None, eos: int | None) -> dict:
    """A Hugging Face LlamaConfig dict from the GGUF metadata."""
    a = "llama."
    hidden = int(_field(reader, a + "embedding_length"))
    heads = int(_field(reader, a + "attention.head_count"))
    theta = float(_field(reader, a + "rope.freq_base", 10000.0))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, a + "feed_forward_length")),
        "num_hidden_layers": int(_field(reader, a + "block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, a + "attention.head_count_kv", heads)),
        "head_dim": int(_field(reader, a + "rope.dimension_count", hidden // heads)),
        "max_position_embeddings": int(_field(reader, a + "context_length", 2048)),
        "rms_norm_eps": float(_field(reader, a + "attention.layer_norm_rms_epsilon", 1e-5)),
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


def convert_gguf(path: Path, out_dir: Path, progress: bool = True) -> Path:
    """Dequantize `path` into an HF folder at `out_dir` (written atomically) and return it."""
    import gguf
    import torch
    from safetensors.torch import save_file

    reader = _read_gguf(path)
    heads = int(_field(reader, "llama.attention.head_count"))
    kv_heads = int(_field(reader, "llama.attention.head_count_kv", heads))
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
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
            parts = t.name.split(".")
            if parts[0] == "blk":
                base = parts[2]
                if base not in _LAYER_NAMES:
                    continue
                if base == "attn_q":
                    arr = unpermute_rope_rows(arr, heads)
                elif base == "attn_k":
                    arr = unpermute_rope_rows(arr, kv_heads)
                hf_name = f"model.layers.{parts[1]}.{_LAYER_NAMES[base]}.{parts[3]}"
            elif t.name in _GLOBAL_NAMES:
                hf_name = _GLOBAL_NAMES[t.name]
            else:
                continue
            tensors[hf_name] = torch.from_numpy(np.array(arr, dtype=np.float32, order="C"))
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})

        tokenizer = _convert_tokenizer(path, tmp)
        vocab = int(tensors["model.embed_tokens.weight"].shape[0])
        cfg = gguf_hf_config(reader, vocab, "output.weight" in names, tokenizer.bos_token_id, tokenizer.eos_token_id)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        (tmp / "kvcache-source.json").write_text(json.dumps({"gguf": str(path), "fingerprint": file_fingerprint(path)}))
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _convert_tokenizer(path: Path, out_dir: Path):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as exc:
        raise ModelFormatError(f"Could not read the tokenizer from {path} ({exc}).") from None
    tok.save_pretrained(str(out_dir))
    return tok


def gguf_config(path: Path) -> dict:
    """The HF config dict a GGUF file describes, read from its metadata alone (no tensors)."""
    reader = _read_gguf(path)
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = int(_field(reader, "llama.vocab_size", len(tokens.data) if tokens is not None else 0))
    names = {t.name for t in reader.tensors}
    return gguf_hf_config(reader, vocab, "output.weight" in names, None, None)
