"""C kernels: `build` compiles and loads the library (no torch); `ops` (fused CPU kernels on torch
tensors), `qlinear` (quantized-weight linear layers and the fused decode layers) bind it for the
model; `signatures` declares the C functions' argument types for every binding."""
