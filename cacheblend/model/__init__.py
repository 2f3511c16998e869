"""Model loading (bundled GGUF, HF dirs), fingerprinting, RoPE, and the layer-wise runner."""
