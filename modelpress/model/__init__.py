"""Loading models (transformers folder, GGUF, modelpress checkpoint, the embedded default) and walking them."""
