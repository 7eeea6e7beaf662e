"""Files: the formats modelpress saves and reads, each registering itself (formats/registry.py).
Importing this package registers them all."""
from . import awq, bnb, checkpoint, compressed_tensors, gguf_writer, gptq
from .registry import check_destination, describe, detect, formats, get_format, save

__all__ = ["awq", "bnb", "check_destination", "checkpoint", "compressed_tensors", "describe", "detect", "formats",
           "get_format", "gguf_writer", "gptq", "save"]
