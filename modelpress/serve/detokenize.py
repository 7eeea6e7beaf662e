"""Incremental detokenizing, vLLM's scheme, for one completion: each step decodes only the tokens
since the last complete text, beside the step before's tokens as context (so a tokenizer that
drops a window's leading space drops it from both), and adds nothing while the newest bytes end
inside a UTF-8 character; a finished completion is its whole decode. Each step costs a few tokens
instead of the whole output (32 streams of 2048 tokens decoded whole: ~65000 tokens a step).
The engine (serve/engine.py) and `modelpress generate` (generate.py) both stream through it."""
from __future__ import annotations

from typing import Any


class TextStream:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.prefix = self.read = 0   # ids[prefix:read]: the context decoded the step before
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def update(self, ids: list[int], final: bool = False) -> str:
        """The text of the completion's output ids so far (all of them: the ids seen before, then new ones)."""
        if final:
            self.text = self._decode(ids)
            return self.text
        new = self._decode(ids[self.prefix:])
        if new.endswith("\ufffd"):
            return self.text  # the newest token ends inside a UTF-8 character: wait for the rest
        old = self._decode(ids[self.prefix:self.read]) if self.read > self.prefix else ""
        self.text = self.text + new[len(old):] if new.startswith(old) else self._decode(ids)  # else: it rewrites
        self.prefix, self.read = self.read, len(ids)
        return self.text
