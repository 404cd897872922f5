"""The architecture numbers our Llama-family model needs, read from a HF `config.json`."""

from __future__ import annotations

from dataclasses import dataclass, field

from kvcache.errors import ModelFormatError

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class LlamaConfig:
    """Shape and hyper-parameters of a Llama / Mistral / Qwen2 / SmolLM decoder."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2 has q/k/v biases
    model_type: str = "llama"
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA)."""
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf(cls, cfg: dict) -> "LlamaConfig":
        """Build from a Hugging Face config dict (as in `config.json`)."""
        model_type = cfg.get("model_type", "llama")
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise ModelFormatError(
                f"Model type '{model_type}' is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}."
            )
        try:
            hidden = int(cfg["hidden_size"])
            heads = int(cfg["num_attention_heads"])
            rope = cfg.get("rope_parameters") or {}
            theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
            scaling = cfg.get("rope_scaling")
            if scaling is None and rope.get("rope_type", "default") not in ("default", None):
                scaling = dict(rope)
            eos = cfg.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
            return cls(
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
                rope_theta=float(theta),
                rope_scaling=scaling,
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                attention_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
                model_type=model_type,
                eos_token_ids=eos_ids,
            )
        except KeyError as exc:
            raise ModelFormatError(f"The model config lacks the required key {exc.args[0]!r}.") from None
