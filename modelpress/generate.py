"""Token-by-token generation with a KV cache: the streaming loop behind `modelpress generate`
and the decode-speed measurement. `generate_ids` runs the model's own forward (transformers' cache;
the reference the engine's tests compare with); `runner_ids` the serving engine's runner."""
from __future__ import annotations

from typing import Iterator

import torch

from .errors import ModelpressError, one_line
from .model.walker import device_of
from .serve.detokenize import TextStream
from .serve.runner import ModelRunner
from .serve.sampler import SamplingParams, sample, stop_ids


def encode_prompt(tokenizer, prompt: str, chat: bool) -> torch.Tensor:  # noqa: ANN001
    """(1, T) prompt ids; with `chat` and a chat template, the prompt as one user turn. A template
    that cannot render (Jinja's sandbox refuses it, say) or an empty prompt is a ModelpressError."""
    from jinja2 import TemplateError

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


class _Sampler:
    """The serving engine's sampler (serve/sampler.py) over one sequence: greedy by default."""

    def __init__(self, params: SamplingParams | None, prompt: list[int]) -> None:
        self.params = params or SamplingParams(temperature=0)
        self.gen = torch.Generator().manual_seed(self.params.seed) if self.params.seed is not None else None
        self.seen = list(prompt)

    def __call__(self, logits: torch.Tensor) -> int:
        tok = sample(logits.float().cpu(), self.params, self.seen, self.gen)
        self.seen.append(tok)
        return tok


def _cache_kwarg(model: torch.nn.Module) -> str:
    """transformers renamed `past_key_values` to `cache` (5.2x); accept either."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.inference_mode()
def generate_ids(model: torch.nn.Module, input_ids: torch.Tensor, max_new_tokens: int,
                 eos_ids: set[int] | None = None, params: SamplingParams | None = None) -> Iterator[int]:
    """Yield new token ids one at a time (greedy unless `params` say otherwise); stops at an eos id."""
    from transformers import DynamicCache

    device = device_of(model)
    pick = _Sampler(params, input_ids[0].tolist())
    kv = {_cache_kwarg(model): DynamicCache(config=model.config)}
    out = model(input_ids=input_ids.to(device), use_cache=True, logits_to_keep=1, **kv)
    for _ in range(max_new_tokens):
        tok = pick(out.logits[0, -1])
        yield tok
        if eos_ids and tok in eos_ids:
            return
        out = model(input_ids=torch.tensor([[tok]], device=device), use_cache=True, logits_to_keep=1, **kv)


def runner_ids(runner, input_ids: torch.Tensor, max_new_tokens: int, eos_ids: set[int] | None = None,  # noqa: ANN001
               params: SamplingParams | None = None) -> Iterator[int]:
    """generate_ids through a serve.runner.ModelRunner: the engine's numbers and its fused decode.
    Its cache grows (doubling) as the tokens come, so a large max_new_tokens costs nothing up front."""
    from types import SimpleNamespace

    pick = _Sampler(params, input_ids[0].tolist())
    seq = SimpleNamespace(token_ids=input_ids[0].tolist(), num_computed=0, block_table=list(range(runner.num_blocks)))
    runner.grow(-(-len(seq.token_ids) // runner.block_size))
    seq.block_table = list(range(runner.num_blocks))
    logits = runner.run([seq], [len(seq.token_ids)])
    seq.num_computed = len(seq.token_ids)
    for _ in range(max_new_tokens):
        tok = pick(logits[-1])
        yield tok
        if eos_ids and tok in eos_ids:
            return
        seq.token_ids.append(tok)
        if len(seq.token_ids) > runner.num_blocks * runner.block_size:
            runner.grow(2 * runner.num_blocks)
            seq.block_table = list(range(runner.num_blocks))
        logits = runner.run([seq], [1])
        seq.num_computed += 1


def cache_blocks(tokens: int, block_size: int) -> int:
    """KV blocks for `tokens` positions and one more."""
    return -(-(tokens + 1) // block_size)


def fused_runner(model: torch.nn.Module, tokens: int, block_size: int = 16):  # noqa: ANN201
    """A serve.runner.ModelRunner with a cache for `tokens` positions whose fused batch-1 decode
    takes `model`, or None (its torch path is no faster than transformers' own forward at batch 1,
    so other models keep that)."""

    cfg = getattr(model, "config", None)
    if not (getattr(cfg, "model_type", "") in ("llama", "mistral", "qwen2") and device_of(model).type == "cpu"
            and hasattr(getattr(model, "model", None), "layers")):
        return None
    runner = ModelRunner(model, cache_blocks(tokens, block_size), block_size)
    return runner if runner.fused() is not None else None


def stream_text(model: torch.nn.Module, tokenizer, prompt: str, max_new_tokens: int = 128,  # noqa: ANN001
                chat: bool = True, params: SamplingParams | None = None,
                stats: dict[str, float] | None = None) -> Iterator[str]:
    """Yield the completion as text pieces, decoded incrementally as the engine decodes its streams
    (serve/detokenize.py), sampled by its sampler and stopped by its end-of-sequence rule. Runs on the
    serving engine's fused decode where it takes the model (a Llama-family model on a CPU: fp32 or
    GGUF blocks, which then multiply with int8 activations as llama.cpp does), else through the
    model's forward. Stops at the model's context (max_position_embeddings). `stats`, if given, gets
    the prompt's and the decode's tokens and seconds, as llama.cpp prints them."""
    import time

    ids = encode_prompt(tokenizer, prompt, chat)
    context = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30)
    if ids.shape[1] >= context:
        raise ModelpressError(f"the prompt has {ids.shape[1]} tokens; the model's context holds {context}")
    max_new_tokens = min(max_new_tokens, context - ids.shape[1])
    eos = stop_ids(model, tokenizer)
    runner = fused_runner(model, ids.shape[1] + min(max_new_tokens, 256))  # the cache grows past that
    toks = (runner_ids(runner, ids, max_new_tokens, eos, params) if runner is not None
            else generate_ids(model, ids, max_new_tokens, eos, params))
    stream, new, shown = TextStream(tokenizer), [], ""
    start, first, sampled = time.perf_counter(), None, 0
    for tok in toks:
        sampled += 1
        if first is None:  # the prompt's forward has run
            first = time.perf_counter()
        if tok in eos:
            break
        new.append(tok)
        text = stream.update(new)
        if len(text) > len(shown):
            yield text[len(shown):]
            shown = text
    text = stream.update(new, final=True)
    if len(text) > len(shown):
        yield text[len(shown):]
    if stats is not None and first is not None:
        end = time.perf_counter()
        stats.update(prompt_tokens=ids.shape[1], prompt_seconds=first - start,
                     decode_tokens=sampled - 1, decode_seconds=end - first)


def speed_line(stats: dict[str, float]) -> str:
    """stream_text's `stats` as llama.cpp reports them: the prompt's and the decode's tokens/s."""
    def rate(n: float, seconds: float) -> str:
        return f"{n / seconds:.1f} tokens/s" if seconds > 0 and n else "-"

    return (f"prompt: {stats['prompt_tokens']} tokens in {stats['prompt_seconds'] * 1e3:.0f} ms "
            f"({rate(stats['prompt_tokens'], stats['prompt_seconds'])}); decode: {stats['decode_tokens']} tokens in "
            f"{stats['decode_seconds'] * 1e3:.0f} ms ({rate(stats['decode_tokens'], stats['decode_seconds'])})")
