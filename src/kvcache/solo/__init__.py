"""The single-user runtime: a quantized GGUF decoded by the native kernels alone, without torch.

One conversation at a time on the CPU, the case a laptop user of llama.cpp is in: the packed
weights (`models.gguf_file`, `models.packed_tiles`) and the same C decode loop the engine's
fused decode step runs (`native/decode_layers.c`: norms, projections from the packed codes,
RoPE, the K/V write, attention, SwiGLU), driven from numpy arrays. Not importing torch keeps the
process's memory near the weights' own bytes (torch's import alone holds about 220 MB).

What it runs: llama-architecture GGUFs whose matrices are all Q8_0 / Q4_0 / Q4_1, default RoPE,
float32 activations, K/V kept exactly (no policy), one sequence; the engine's `SamplingParams`
(greedy, temperature, top-k, top-p, seed, stop strings and ids); a conversation's earlier turns
stay cached. Everything else (batching, policies, other formats,
the server) is the engine's (`kvcache.LLM`).
"""

from kvcache.solo.load import load_solo
from kvcache.solo.model import SoloModel
from kvcache.solo.runner import SoloChat, SoloGenerator, SoloOutput

__all__ = ["SoloChat", "SoloGenerator", "SoloModel", "SoloOutput", "load_solo"]
