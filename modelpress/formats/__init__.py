"""On-disk formats: GGUF reading, the modelpress checkpoint (safetensors + JSON)."""
