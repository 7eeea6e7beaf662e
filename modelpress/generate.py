"""`modelpress generate`: one prompt through the serving engine at batch 1, streamed as text, with
llama.cpp's prompt and decode speed line."""
from __future__ import annotations

import dataclasses
import time
from typing import Iterator

import torch
from jinja2 import TemplateError

from .errors import ModelpressError, one_line
from .serve.engine import Engine
from .serve.runner import cache_blocks
from .serve.sampler import SamplingParams


def encode_prompt(tokenizer, prompt: str, chat: bool) -> torch.Tensor:  # noqa: ANN001
    """(1, T) prompt ids; with `chat` and a chat template, the prompt as one user turn. A template
    that cannot render (Jinja's sandbox refuses it, say) or an empty prompt is a ModelpressError."""
    if chat and getattr(tokenizer, "chat_template", None):
        try:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                add_generation_prompt=True, tokenize=True, return_dict=False)
        except (TemplateError, ValueError, TypeError) as e:
            raise ModelpressError(f"the model's chat template cannot render the prompt ({one_line(e)}); "
                                  "pass --raw to send the prompt as it is") from None
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
    else:
        ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    if not len(ids):
        raise ModelpressError("the prompt is empty; give some text with -p")
    return torch.tensor([list(ids)], dtype=torch.long)


def stream_text(model: torch.nn.Module, tokenizer, prompt: str, max_new_tokens: int = 128,  # noqa: ANN001
                chat: bool = True, params: SamplingParams | None = None,
                stats: dict[str, float] | None = None, int8_activations: bool = True) -> Iterator[str]:
    """Yield the completion as text pieces, through the serving engine at batch 1: the one decoder
    model (model/decoder.py, its C fast path where it applies), the engine's sampler (greedy unless
    `params` say otherwise), its end-of-sequence rule and its incremental detokenizer. Stops at the
    model's context (max_position_embeddings); the KV cache grows as the tokens come. `stats`, if
    given, gets the prompt's and the decode's tokens and seconds, as llama.cpp prints them."""
    ids = encode_prompt(tokenizer, prompt, chat)[0].tolist()
    context = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30)
    if len(ids) >= context:
        raise ModelpressError(f"the prompt has {len(ids)} tokens; the model's context holds {context}")
    params = dataclasses.replace(params or SamplingParams(temperature=0),
                                 max_tokens=min(max_new_tokens, context - len(ids)))
    bs = 16
    engine = Engine(model, tokenizer, max_num_seqs=1, block_size=bs, prefix_caching=False,
                    kv_blocks=cache_blocks(len(ids) + min(params.max_tokens, 256), bs),
                    max_kv_blocks=cache_blocks(len(ids) + params.max_tokens, bs), int8_activations=int8_activations)
    shown, start, first, out = "", time.perf_counter(), None, None
    for out in engine.stream(ids, params):
        if first is None:  # the prompt's forward has run
            first = time.perf_counter()
        text = out.outputs[0].text
        if len(text) > len(shown):
            yield text[len(shown):]
            shown = text
    if stats is not None and out is not None:
        stats.update(prompt_tokens=len(ids), prompt_seconds=first - start,
                     decode_tokens=len(out.outputs[0].token_ids) - 1, decode_seconds=time.perf_counter() - first)


def speed_line(stats: dict[str, float]) -> str:
    """stream_text's `stats` as llama.cpp reports them: the prompt's and the decode's tokens/s."""
    def rate(n: float, seconds: float) -> str:
        return f"{n / seconds:.1f} tokens/s" if seconds > 0 and n else "-"

    return (f"prompt: {stats['prompt_tokens']} tokens in {stats['prompt_seconds'] * 1e3:.0f} ms "
            f"({rate(stats['prompt_tokens'], stats['prompt_seconds'])}); decode: {stats['decode_tokens']} tokens in "
            f"{stats['decode_seconds'] * 1e3:.0f} ms ({rate(stats['decode_tokens'], stats['decode_seconds'])})")
