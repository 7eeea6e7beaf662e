"""ModelRunner: the engine's side of the decoder model (model/decoder.py). It owns the model's
paged KV cache's size and turns a scheduled batch of sequences into the decoder's `Batch`; the
decoder computes it (through the C fast path where it applies) and returns each sequence's last
logits."""
from __future__ import annotations

import torch

from ..model.decoder import Batch, Decoder
from .sequence import Sequence


def cache_blocks(tokens: int, block_size: int) -> int:
    """KV blocks for `tokens` positions and one more."""
    return -(-(tokens + 1) // block_size)


class ModelRunner:
    def __init__(self, model: torch.nn.Module, num_blocks: int, block_size: int = 16,
                 fused_decode: bool = True, int8_activations: bool = True, kv_dtype: str = "auto") -> None:
        self.model = model
        self.block_size = block_size
        self.decoder = Decoder(model, fused=fused_decode, int8_activations=int8_activations)
        self.decoder.allocate(num_blocks, block_size, kv_dtype)

    @property
    def num_blocks(self) -> int:
        return self.decoder.num_blocks

    @property
    def k_cache(self) -> list[torch.Tensor]:
        return self.decoder.k_cache

    @property
    def v_cache(self) -> list[torch.Tensor]:
        return self.decoder.v_cache

    @property
    def kv_dtype(self) -> torch.dtype:
        return self.decoder.k_cache[0].dtype

    @property
    def bytes_per_block(self) -> int:
        return self.decoder.bytes_per_block

    def fused(self):  # noqa: ANN201
        """The decoder's fused fast path; None where the model does not allow it."""
        return self.decoder.fused

    def grow(self, num_blocks: int) -> None:
        """Room for `num_blocks` blocks, the ones there kept (a cache that grows as tokens come)."""
        self.decoder.grow(num_blocks)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        self.decoder.copy_blocks(pairs)

    def run(self, seqs: list[Sequence], num_tokens: list[int]) -> torch.Tensor:
        """Compute the scheduled tokens into the cache; returns (len(seqs), vocab) fp32 logits of
        each sequence's last scheduled token (callers use those of sequences now complete)."""
        batch = Batch([s.token_ids[s.num_computed:s.num_computed + n] for s, n in zip(seqs, num_tokens)],
                      [s.num_computed for s in seqs], [s.block_table for s in seqs], self.block_size,
                      [s.adapter for s in seqs])
        return self.decoder(batch)
